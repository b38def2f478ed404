"""A sans-IO reader of server-sent events (``text/event-stream``).

Feed it the bytes as they arrive, in chunks of any size; it returns the ``data`` of every event
that a blank line completed. Comment lines (``: ping``) and the other fields (``event``, ``id``,
``retry``) are read and dropped: the daemon's API puts everything in ``data``.
"""

from __future__ import annotations

DEFAULT_MAX_EVENT_BYTES = 1 << 20


class SseError(ValueError):
    """The stream is not server-sent events, or an event is larger than the bound."""


class SseParser:
    """Splits a byte stream into events; ``feed()`` returns the completed events' data."""

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._partial_line = bytearray()
        self._data_lines: list[str] = []
        self._event_bytes = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Take the next bytes of the stream; return the data of each event they complete."""
        self._partial_line += chunk
        events: list[str] = []
        while True:
            end = self._partial_line.find(b"\n")
            if end < 0:
                break
            raw = bytes(self._partial_line[:end])
            del self._partial_line[: end + 1]
            event = self._line(raw.removesuffix(b"\r"))
            if event is not None:
                events.append(event)
        if len(self._partial_line) + self._event_bytes > self._max_event_bytes:
            raise SseError(f"an event is larger than {self._max_event_bytes} bytes")
        return events

    def _line(self, raw: bytes) -> str | None:
        if not raw:  # a blank line ends the event
            if not self._data_lines:
                return None
            data = "\n".join(self._data_lines)
            self._data_lines.clear()
            self._event_bytes = 0
            return data
        self._event_bytes += len(raw)
        if self._event_bytes > self._max_event_bytes:
            raise SseError(f"an event is larger than {self._max_event_bytes} bytes")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SseError(f"an event line is not UTF-8: {error}") from None
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        return None
