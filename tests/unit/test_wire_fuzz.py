"""Fuzzing decode: any bytes either decode to a message or raise WireError, nothing else; what
decodes is canonical (re-encodes to the same bytes); declared lengths allocate nothing."""

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm.errors import WireError
from meshllm.wire import PROTOCOL_VERSION, decode, encode
from tests.fixtures.make_golden import FIXTURES, GOLDEN
from tests.fixtures.wire_strategies import messages

GOLDEN_FRAMES = [(FIXTURES / name).read_bytes() for name in sorted(GOLDEN)]


def _decode_or_wire_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except WireError:
        return
    assert encode(msg) == data  # only the canonical form decodes


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    _decode_or_wire_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_the_version_byte(data: bytes) -> None:
    _decode_or_wire_error(bytes([PROTOCOL_VERSION]) + data)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.one_of(st.sampled_from(GOLDEN_FRAMES), messages.map(encode))))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = draw(st.integers(1, max(1, len(frame) - 1)))  # keep the version byte
        if action == "flip" and position < len(frame):
            frame[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and position < len(frame):
            frame[position] = draw(st.sampled_from([0x00, 0x17, 0x18, 0x1B, 0x5B, 0x7F, 0x9B, 0xFF]))
        elif action == "insert":
            frame[position:position] = draw(st.binary(min_size=1, max_size=9))
        elif action == "delete":
            del frame[position : position + draw(st.integers(1, 9))]
        else:
            del frame[position:]
    return bytes(frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_frames())
def test_mutated_valid_frames_decode_or_raise_wire_error(frame: bytes) -> None:
    _decode_or_wire_error(frame)


HUGE = [
    # Forward whose session id declares 2**63 - 1 bytes of text
    bytes([PROTOCOL_VERSION, 0x87, 0x0A, 0x7B]) + (2**63 - 1).to_bytes(8, "big") + b"s",
    # a byte string of 2**32 - 1 bytes, truncated
    bytes([PROTOCOL_VERSION, 0x82, 0x0C, 0x5A]) + (2**32 - 1).to_bytes(4, "big") + b"xyz",
    # an array of 2**32 - 1 items
    bytes([PROTOCOL_VERSION, 0x9A]) + (2**32 - 1).to_bytes(4, "big") + b"\x01",
    # an array of 2**64 - 1 items
    bytes([PROTOCOL_VERSION, 0x9B]) + (2**64 - 1).to_bytes(8, "big") + b"\x01",
    # a Plan whose stage list declares 65535 stages but carries one
    bytes([PROTOCOL_VERSION, 0x84, 0x08, 0x01, 0x99, 0xFF, 0xFF, 0x83, 0x61, 0x61, 0x00, 0x01]),
    # 10,000 nested arrays
    bytes([PROTOCOL_VERSION]) + b"\x81" * 10_000 + b"\x01",
]


@pytest.mark.parametrize("frame", HUGE, ids=["text-2^63", "bytes-2^32", "array-2^32", "array-2^64", "stages-65535", "deep"])
def test_frames_declaring_huge_lengths_allocate_nothing_big(frame: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000
