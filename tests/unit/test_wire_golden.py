"""Golden frames: the bytes on disk decode to the expected messages and re-encode to the same
bytes, so an accidental change of the wire format fails here."""

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from meshllm.wire import MESSAGE_TAGS, CODECS, Forward, decode, decode_tensor, encode
from tests.fixtures.make_golden import FIXTURES, GOLDEN


def test_every_message_type_and_codec_has_a_golden_frame() -> None:
    kinds = {type(msg) for msg in GOLDEN.values()}
    assert kinds == set(MESSAGE_TAGS)
    forward_codecs = {msg.hidden.codec for msg in GOLDEN.values() if isinstance(msg, Forward)}
    assert forward_codecs == set(CODECS)
    assert any(isinstance(msg, Forward) and msg.hidden.zstd for msg in GOLDEN.values())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_frame_decodes_to_expected_message_and_reencodes_identically(name: str) -> None:
    frame = (FIXTURES / name).read_bytes()
    decoded = decode(frame)
    assert encode(decoded) == frame
    expected = GOLDEN[name]
    hidden = getattr(expected, "hidden", None)
    if hidden is not None and not isinstance(hidden, tuple) and hidden.zstd:
        # zstd output may differ between zstd library versions; compare what it carries.
        np.testing.assert_array_equal(decode_tensor(decoded.hidden), decode_tensor(hidden))
        assert replace(decoded, hidden=hidden) == expected
    else:
        assert decoded == expected


def test_golden_frames_on_disk_are_exactly_the_golden_set() -> None:
    on_disk = {path.name for path in Path(FIXTURES).glob("wire_*.bin")}
    assert on_disk == set(GOLDEN)


def test_golden_hello_layout_is_version_byte_then_cbor_array() -> None:
    frame = (FIXTURES / "wire_hello.bin").read_bytes()
    hello = GOLDEN["wire_hello.bin"]
    assert frame[0] == 3  # PROTOCOL_VERSION
    assert frame[1] == 0x80 + 1 + len(fields(hello))  # CBOR array header: tag + 9 fields
    assert frame[2] == MESSAGE_TAGS[type(hello)]
