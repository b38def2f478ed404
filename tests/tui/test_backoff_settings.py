"""Reconnect delays, token rates and settings from the environment."""

from __future__ import annotations

import pytest

from tui.backoff import Backoff
from tui.settings import TuiSettings
from tui.throughput import TokenRate


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    assert [backoff.next_delay_s() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.attempts == 6
    backoff.reset()
    assert backoff.next_delay_s() == 0.5 and backoff.attempts == 1


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0)


def test_token_rate_runs_from_the_first_token() -> None:
    rate = TokenRate()
    assert rate.per_s() is None
    rate.add(1, now=10.0)  # time to first token is not part of the rate
    assert rate.per_s() is None
    for step in range(1, 21):
        rate.add(1, now=10.0 + step * 0.05)
    assert rate.tokens == 21
    assert rate.per_s() == pytest.approx(20.0)


def test_settings_from_the_environment() -> None:
    settings, notes = TuiSettings.from_env({"MESHLLM_CHAT_TEMPERATURE": "0", "MESHLLM_CHAT_MAX_TOKENS": "64"})
    assert (settings.chat_temperature, settings.chat_max_tokens, notes) == (0.0, 64, [])


def test_bad_settings_are_named_and_ignored() -> None:
    settings, notes = TuiSettings.from_env({"MESHLLM_CHAT_MAX_TOKENS": "many",
                                            "MESHLLM_CHAT_TEMPERATURE": "9"})
    assert settings == TuiSettings()
    assert notes == ["MESHLLM_CHAT_MAX_TOKENS='many' is not a number; using 512",
                     "MESHLLM_CHAT_TEMPERATURE='9' is out of range; using 0.7"]
