"""Framing: messages split into pieces of at most 256 KiB come back whole, in any interleaving
of messages; broken piece streams raise WireError and leave the reassembler bounded."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import WireError
from meshllm.wire import MAX_FRAME_BYTES, Reassembler, split_frames

FRAME = 64  # small pieces keep the tests quick; the logic does not depend on the size


def _pieces(data: bytes, message_id: int = 7) -> list[bytes]:
    return split_frames(data, message_id, max_frame_bytes=FRAME)


def _reassembler(**limits: object) -> Reassembler:
    return Reassembler(max_frame_bytes=FRAME, **limits)  # type: ignore[arg-type]


def test_default_pieces_fit_a_data_channel_message() -> None:
    data = bytes(range(256)) * 3000  # 768,000 bytes
    pieces = split_frames(data, 1)
    assert MAX_FRAME_BYTES == 262144
    assert len(pieces) == 3
    assert all(len(piece) <= MAX_FRAME_BYTES for piece in pieces)
    assert len(pieces[0]) == MAX_FRAME_BYTES
    reassembler = Reassembler()
    results = [reassembler.feed(piece, now=0.0) for piece in pieces]
    assert results[:2] == [None, None] and results[2] == data


def test_piece_header_layout() -> None:
    pieces = split_frames(b"abcdef", 0x01020304, max_frame_bytes=12)
    assert pieces == [
        bytes.fromhex("01020304 0000 0002") + b"abcd",
        bytes.fromhex("01020304 0001 0002") + b"ef",
    ]


def test_a_small_message_is_one_piece_and_comes_straight_back() -> None:
    (piece,) = split_frames(b"\x01\x80", 5)
    assert Reassembler().feed(piece, now=0.0) == b"\x01\x80"


@settings(max_examples=50, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=0, max_size=400), min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_interleaved_messages_reassemble(messages: list[bytes], order) -> None:  # type: ignore[no-untyped-def]
    """Pieces of several messages interleave (each message's pieces stay in order)."""
    queues = [_pieces(data, message_id) for message_id, data in enumerate(messages)]
    reassembler = _reassembler(max_partial_messages=len(messages))
    done: dict[int, bytes] = {}
    while any(queues):
        message_id = order.choice([i for i, queue in enumerate(queues) if queue])
        result = reassembler.feed(queues[message_id].pop(0), now=0.0)
        if result is not None:
            done[message_id] = result
    assert done == dict(enumerate(messages))
    assert reassembler.pending_messages == 0 and reassembler.buffered_bytes == 0


@pytest.mark.parametrize(
    "pieces, words",
    [
        (lambda p: [p[1]], "before piece 0"),
        (lambda p: [p[0], p[2]], "out of order: piece 1 expected"),
        (lambda p: [p[0], p[0]], "duplicate piece"),
        (lambda p: [p[0], p[1], p[1]], "duplicate piece"),
        (lambda p: [p[0], p[1][:6] + b"\x00\x09" + p[1][8:]], "count changed from 3"),
        (lambda p: [p[0][:4] + b"\x00\x00\x00\x00" + p[0][8:]], "count of at least 1"),
        (lambda p: [p[0][:4] + b"\x00\x03\x00\x03" + p[0][8:]], "index must be below"),
        (lambda p: [b"\x00" * 7], "shorter than its header"),
        (lambda p: [p[0] + b"x"], "at most 64"),
    ],
)
def test_broken_piece_streams_raise_wire_error(pieces, words: str) -> None:  # type: ignore[no-untyped-def]
    reassembler = _reassembler()
    stream = pieces(_pieces(bytes(150)))  # 150 bytes -> 3 pieces of up to 56
    with pytest.raises(WireError, match=words):
        for piece in stream:
            assert reassembler.feed(piece, now=0.0) is None
    assert reassembler.pending_messages == 0 and reassembler.buffered_bytes == 0


def test_message_size_limit() -> None:
    reassembler = _reassembler(max_message_bytes=100)
    assert reassembler.feed(_pieces(bytes(100))[0], now=0.0) is None
    with pytest.raises(WireError, match="could exceed the 100-byte limit"):
        reassembler.feed(_pieces(bytes(200), 8)[0], now=0.0)  # 4 pieces can't fit in 100 bytes
    with pytest.raises(WireError, match="over the limit of 100"):
        # A sender declares 2 pieces but sends full ones: 112 bytes.
        big = split_frames(bytes(112), 9, max_frame_bytes=FRAME)
        for piece in big:
            reassembler.feed(piece, now=0.0)
    small = _reassembler(max_message_bytes=10)
    with pytest.raises(WireError, match="over the limit of 10"):
        small.feed(split_frames(bytes(11), 1, max_frame_bytes=FRAME)[0], now=0.0)


def test_partial_message_and_buffer_limits() -> None:
    reassembler = _reassembler(max_partial_messages=2, max_buffered_bytes=150)
    firsts = [_pieces(bytes(150), message_id)[0] for message_id in range(3)]
    assert reassembler.feed(firsts[0], now=0.0) is None
    assert reassembler.feed(firsts[1], now=0.0) is None
    with pytest.raises(WireError, match="more than 2 messages in progress"):
        reassembler.feed(firsts[2], now=0.0)
    assert reassembler.pending_messages == 2 and reassembler.buffered_bytes == 112
    with pytest.raises(WireError, match="more than 150 bytes buffered"):
        reassembler.feed(_pieces(bytes(150), 0)[1], now=0.0)
    assert reassembler.pending_messages == 1 and reassembler.buffered_bytes == 56


def test_expire_drops_stale_partial_messages() -> None:
    reassembler = _reassembler(partial_timeout_s=5.0)
    old, fresh = _pieces(bytes(100), 1), _pieces(bytes(100), 2)
    reassembler.feed(old[0], now=10.0)
    reassembler.feed(fresh[0], now=14.0)
    assert reassembler.expire(now=15.0) == []
    assert reassembler.expire(now=15.5) == [1]
    assert reassembler.pending_messages == 1 and reassembler.buffered_bytes == 56
    with pytest.raises(WireError, match="before piece 0"):
        reassembler.feed(old[1], now=15.6)  # the rest of a dropped message
    assert reassembler.feed(fresh[1], now=16.0) == bytes(100)


def test_split_frames_bounds() -> None:
    with pytest.raises(WireError, match="message_id"):
        split_frames(b"x", 2**32)
    with pytest.raises(WireError, match="message_id"):
        split_frames(b"x", -1)
    with pytest.raises(WireError, match="max_frame_bytes"):
        split_frames(b"x", 1, max_frame_bytes=8)
    with pytest.raises(WireError, match="pieces"):
        split_frames(bytes(70000), 1, max_frame_bytes=9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=30))
def test_reassembler_fuzz_only_raises_wire_error_and_stays_bounded(pieces: list[bytes]) -> None:
    reassembler = _reassembler(max_message_bytes=300, max_partial_messages=3, max_buffered_bytes=500)
    for now, piece in enumerate(pieces):
        try:
            result = reassembler.feed(piece, now=float(now))
        except WireError:
            continue
        if result is not None:
            assert len(result) <= 300
        assert reassembler.pending_messages <= 3
        assert reassembler.buffered_bytes <= 500


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=300),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_reassembler_fuzz_with_mutated_valid_pieces(data: bytes, mutations: list[tuple[int, int]]) -> None:
    pieces = [bytearray(piece) for piece in _pieces(data)]
    for position, value in mutations:
        piece = pieces[position % len(pieces)]
        piece[position % len(piece)] = value
    reassembler = _reassembler(max_message_bytes=400)
    for piece in pieces:
        try:
            result = reassembler.feed(bytes(piece), now=0.0)
        except WireError:
            continue
        if result is not None:
            assert len(result) <= 400
