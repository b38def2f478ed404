"""Events the daemon shows to its clients (``GET /v1/events``), and the hub that fans them out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

LogKind = Literal["join", "leave", "election", "replan", "error", "info", "fallback"]


@dataclass(frozen=True)
class StatusEvent:
    """A new snapshot of the node's status (the body of ``GET /v1/status``)."""

    status: dict[str, Any]
    """The snapshot, as JSON-ready data."""

    def to_json(self) -> dict[str, Any]:
        return {"type": "status", "status": self.status}


@dataclass(frozen=True)
class LogEvent:
    """Something a person watching the mesh would want to see in the event log."""

    ts: float
    """Wall-clock time it happened, in seconds since the epoch."""
    kind: LogKind
    """join, leave, election, replan, error, info or fallback (the switch to the local
    fallback model and the return to the mesh)."""
    message: str
    """One line for people."""

    def to_json(self) -> dict[str, Any]:
        return {"type": "log", "ts": self.ts, "kind": self.kind, "message": self.message}


Event = StatusEvent | LogEvent


class _Closed:
    pass


_CLOSED = _Closed()


class EventHub:
    """Fans events out to every subscriber. A subscriber that falls behind loses old events.

    Each subscriber has a bounded queue; when it is full the oldest event is dropped, so one
    slow client never makes the daemon buffer without bound. Recent log events are kept so a
    new subscriber sees what just happened.
    """

    def __init__(self, *, queue_size: int = 256, history_size: int = 50) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[Event | _Closed]] = set()
        self._history: deque[LogEvent] = deque(maxlen=history_size)
        self._closed = False

    def recent_logs(self) -> list[LogEvent]:
        return list(self._history)

    def publish(self, event: Event) -> None:
        if isinstance(event, LogEvent):
            self._history.append(event)
        for queue in self._subscribers:
            _put_dropping_oldest(queue, event)

    def log(self, kind: LogKind, message: str, *, now: float | None = None) -> LogEvent:
        """Publish a log event (and write it to the daemon's log)."""
        event = LogEvent(ts=time.time() if now is None else now, kind=kind, message=message)
        log.log(logging.ERROR if kind == "error" else logging.INFO, "%s", message)
        self.publish(event)
        return event

    def close(self) -> None:
        """End every subscription (the daemon is stopping)."""
        self._closed = True
        for queue in self._subscribers:
            _put_dropping_oldest(queue, _CLOSED)

    def subscribe(self) -> Subscription:
        """Start receiving events published from now on (until the hub or subscription closes)."""
        queue: asyncio.Queue[Event | _Closed] = asyncio.Queue(self._queue_size)
        if self._closed:
            queue.put_nowait(_CLOSED)
        else:
            self._subscribers.add(queue)
        return Subscription(queue, self._subscribers)


class Subscription:
    """One client's view of the hub: ``async for event in subscription``; ``close()`` when done."""

    def __init__(
        self,
        queue: asyncio.Queue[Event | _Closed],
        subscribers: set[asyncio.Queue[Event | _Closed]],
    ) -> None:
        self._queue = queue
        self._subscribers = subscribers

    def close(self) -> None:
        self._subscribers.discard(self._queue)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if isinstance(event, _Closed):
                return
            yield event

    async def next_event(self, timeout_s: float) -> Event | None:
        """The next event, or None when ``timeout_s`` passes first. Raises StopAsyncIteration at the end."""
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if isinstance(event, _Closed):
            self._queue.put_nowait(_CLOSED)  # stay closed for later calls
            raise StopAsyncIteration
        return event


def _put_dropping_oldest(queue: asyncio.Queue[Event | _Closed], item: Event | _Closed) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
