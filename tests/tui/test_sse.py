"""Server-sent events are read the same however the bytes are split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tui.client import SseComment, SseError, SseParser

STREAM = (
    b'data: {"type":"status"}\n\n'
    b": ping\n\n"
    b"event: note\nid: 7\nretry: 100\ndata: first line\ndata: second line\n\n"
    b"data:no space\r\n\r\n"
    b'data: {"text":"\xc3\xa9t\xc3\xa9 \xf0\x9f\x99\x82"}\n\n'
)
EVENTS = ['{"type":"status"}', "first line\nsecond line", "no space", '{"text":"été 🙂"}']


def test_whole_stream() -> None:
    assert SseParser().feed(STREAM) == EVENTS


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    parser = SseParser()
    events: list[str] = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in zip(bounds, bounds[1:]):
        events.extend(parser.feed(STREAM[start:end]))
    assert events == EVENTS


def test_an_unfinished_event_waits_for_its_blank_line() -> None:
    parser = SseParser()
    assert parser.feed(b"data: [DONE]\n") == []
    assert parser.feed(b"\n") == ["[DONE]"]


def test_comments_alone_make_no_event() -> None:
    assert SseParser().feed(b": ping\n\n: ping\n\n\n") == []


def test_comments_when_asked_for_come_in_order_and_apart_from_data() -> None:
    items = SseParser(comments=True).feed(STREAM)
    assert items == ['{"type":"status"}', ": ping", *EVENTS[1:]]
    assert [isinstance(item, SseComment) for item in items] == [False, True, False, False, False]


def test_an_event_larger_than_the_bound_is_refused() -> None:
    parser = SseParser(max_event_bytes=64)
    with pytest.raises(SseError, match="larger than 64 bytes"):
        parser.feed(b"data: " + b"x" * 100)
    with pytest.raises(SseError):
        SseParser(max_event_bytes=64).feed(b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n")


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(SseError, match="UTF-8"):
        SseParser().feed(b"data: \xff\xfe\n\n")
