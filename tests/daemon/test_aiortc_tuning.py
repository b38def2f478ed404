"""The aiortc tuning (daemon/net/aiortc_tuning.py) is written for one aiortc version: these
tests fail when another is installed, check the pin, and check that another version runs
stock aiortc with one warning."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tomllib
from collections import deque
from typing import Any

import pytest

import daemon.net.aiortc_tuning as tuning
from tests.conftest import REPO


def test_the_installed_aiortc_is_the_one_the_tuning_was_written_for() -> None:
    installed = importlib.metadata.version("aiortc")
    assert installed == tuning.TUNED_AIORTC_VERSION, (
        f"aiortc {installed} is installed, but daemon/net/aiortc_tuning.py patches aiortc "
        f"{tuning.TUNED_AIORTC_VERSION}'s SCTP internals: check each patch against the new "
        f"rtcsctptransport.py, then update TUNED_AIORTC_VERSION and the pin in pyproject.toml")


def test_pyproject_pins_that_version() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"aiortc\b", d)]
    assert pins == [f"aiortc=={tuning.TUNED_AIORTC_VERSION}"]


def test_the_tuning_is_in_force_on_that_version() -> None:
    tuning.rtc()
    from aiortc import rtcsctptransport

    assert tuning.aiortc_tuned()
    assert rtcsctptransport.USERDATA_MAX_LENGTH == tuning.SCTP_USERDATA_BYTES


def test_another_version_is_left_alone_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def must_not_patch() -> None:
        raise AssertionError("patched an aiortc version the tuning does not know")

    monkeypatch.setattr(tuning, "_tuned", None)
    monkeypatch.setattr(tuning, "installed_aiortc_version", lambda: "1.99.0")
    monkeypatch.setattr(tuning, "_patch_sctp", must_not_patch)
    caplog.set_level(logging.WARNING, logger=tuning.__name__)

    assert tuning.install_aiortc_tuning() is False
    assert tuning.install_aiortc_tuning() is False
    assert not tuning.aiortc_tuned()
    warnings = [r.getMessage() for r in caplog.records if r.name == tuning.__name__]
    assert len(warnings) == 1
    assert "aiortc 1.99.0 runs as it is" in warnings[0] and tuning.TUNED_AIORTC_VERSION in warnings[0]


class _FakeChannel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.buffered = 0

    def _addBufferedAmount(self, amount: int) -> None:  # noqa: N802 (aiortc's name)
        self.buffered += amount


def test_an_urgent_piece_passes_other_channels_but_not_its_own() -> None:
    tuning.rtc()
    from aiortc.rtcsctptransport import RTCSctpTransport

    control, activation = _FakeChannel("control"), _FakeChannel("activation")
    sctp: Any = type("FakeSctp", (), {})()
    sctp._remote_max_message_size = 0
    sctp._meshllm_inline = True  # no flush task
    sctp._meshllm_flush_pending = False
    sctp._meshllm_urgent = False
    sctp._data_channel_queue = deque()

    def send(channel: _FakeChannel, data: bytes, *, urgent: bool = False) -> None:
        sctp._meshllm_urgent = urgent
        RTCSctpTransport._data_channel_send(sctp, channel, data)

    send(activation, b"a1")
    send(control, b"c1")
    send(activation, b"a2")
    send(activation, b"a3")
    send(control, b"h1", urgent=True)
    send(control, b"h2", urgent=True)
    only_activation = deque([(activation, 53, b"x")])
    sctp._data_channel_queue, before = only_activation, sctp._data_channel_queue
    send(control, b"h3", urgent=True)

    assert [item[2] for item in before] == [b"a1", b"c1", b"h1", b"h2", b"a2", b"a3"]
    assert [item[2] for item in only_activation] == [b"h3", b"x"]
    assert control.buffered == 2 + 2 + 2 + 2 and activation.buffered == 6
