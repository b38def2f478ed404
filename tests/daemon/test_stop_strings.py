"""Stop strings over streamed text: never shown, found across piece boundaries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.api.stop_strings import StopScanner


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    shown = ""
    for piece in pieces:
        text, stopped = scanner.push(piece)
        shown += text
        if stopped:
            return shown, True
    return shown + scanner.flush(), False


def test_no_stops_passes_text_through() -> None:
    assert run((), ["a", "b"]) == ("ab", False)


def test_stop_across_pieces() -> None:
    assert run(("END",), ["hello E", "N", "D and more"]) == ("hello ", True)


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    scanner = StopScanner(("END",))
    assert scanner.push("hi E") == ("hi ", False)
    assert scanner.push("X") == ("EX", False)


def test_held_text_is_flushed_at_the_end() -> None:
    assert run(("END",), ["hi E", "N"]) == ("hi EN", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(("b", "a"), ["xxab"]) == ("xx", True)


@given(st.text(alphabet="abc", max_size=30), st.lists(st.integers(1, 5), max_size=10),
       st.text(alphabet="abc", min_size=1, max_size=3))
def test_same_as_cutting_the_whole_text(text: str, cuts: list[int], stop: str) -> None:
    pieces, rest = [], text
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    index = text.find(stop)
    expected = (text[:index], True) if index >= 0 else (text, False)
    assert run((stop,), pieces) == expected
