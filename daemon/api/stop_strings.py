"""OpenAI's ``stop`` strings over a stream of text pieces. Pure.

Text that might be the start of a stop string is held back until the next piece decides;
the stop string itself is never shown.
"""

from __future__ import annotations


class StopScanner:
    """Feed decoded text with ``push``; it returns the text safe to show and whether to stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = stops
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return (text to show now, True when a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        found = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return buffer[: min(found)], True
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The text held back, once the generation has ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
