"""The debug link delay: one link's outgoing pieces held back for a fixed time, in order.

``debug_link_delay_ms`` (testing aid, ``--debug-link-delay-ms``): every piece a node sends
(messages, heartbeats and their echoes, probes and their echoes, Byes) waits that long in one
:class:`DelayQueue` per link before it is handed to aiortc, so per-peer order holds, sends do
not wait for one another (the queued bytes count toward backpressure, see
:mod:`daemon.net.framing`), and peers see the delay in the round trip they measure, as from
a node on slow Wi-Fi.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from daemon.net.aiortc_tuning import rtc, send_piece, send_urgent

if TYPE_CHECKING:
    from daemon.net.framing import Channel

log = logging.getLogger(__name__)

MAX_DEBUG_LINK_DELAY_MS = 10_000.0


class DelayQueue:
    """Pieces waiting out the delay: (due, channel, piece, urgent), in sending order; one
    task (while any wait) hands them to aiortc when due."""

    def __init__(self, delay_s: float, *,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
                 fail: Callable[[str], None]) -> None:
        self.delay_s = delay_s
        self.peer_id: str | None = None
        self._spawn = spawn
        self._fail = fail
        self._pieces: deque[tuple[float, Channel, bytes, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __bool__(self) -> bool:
        """Whether any piece is still waiting."""
        return bool(self._pieces)

    def put(self, ch: Channel, piece: bytes, *, urgent: bool = False) -> None:
        """Queue ``piece`` to leave ``delay_s`` from now, after those before it; an urgent one
        then goes ahead of the other channels' pieces in aiortc (heartbeats)."""
        self._pieces.append((time.monotonic() + self.delay_s, ch, piece, urgent))
        ch.delayed_bytes += len(piece)
        if self._task is None and not self._closed:
            self._task = self._spawn(self._pump(), f"delayed sends to {self.peer_id}")

    async def _pump(self) -> None:
        """Hand the delayed pieces to aiortc when due, in order."""
        try:
            while self._pieces and not self._closed:
                due, ch, piece, urgent = self._pieces[0]
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                self._pieces.popleft()
                ch.delayed_bytes -= len(piece)
                ch.pushed_bytes += len(piece)
                try:
                    if urgent:
                        send_urgent(ch.dc, piece)
                    else:
                        await send_piece(ch.dc, piece)
                except rtc().InvalidStateError:
                    self._fail("channel closed")
                    return
                except Exception as exc:  # aiortc/aioice/OpenSSL, as in Outbox.send
                    log.warning("delayed send to %s failed: %r", self.peer_id, exc)
                    self._fail("send failed")
                    return
                ch.drained.set()  # a sender may be waiting on the delayed bytes
        finally:
            self._task = None

    def close(self) -> None:
        """Drop what waits and stop (the link is closed)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._pieces.clear()
