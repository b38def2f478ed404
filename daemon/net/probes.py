"""Probes: a link's rates, measured with raw bytes on its probe channel.

A third data channel per link (``probe``, negotiated id PROBE_CHANNEL_ID) carries raw bytes
that never reach the mesh logic: messages of TINY, SMALL and LARGE bytes
(:mod:`meshllm.placement.linkstats`), each echoed by 5 bytes as soon as it has arrived whole,
a few times each; the least round trip of each size counts, and the differences between
sizes give the rates (latency and the echo cancel out). A peer without the probe channel
drops the probes (aiortc ignores data for a stream it has no channel for), so the rates stay
unmeasured.

The link manager probes a link when it comes up, again PROBE_SETTLE_S later (the first often
meets a node still busy starting), then the small probes every ``probe_interval_s`` and the
large ones every LARGE_PROBE_EVERY rounds (:meth:`LinkProber.periodic`); each probe replaces
the rates it measures. ``LinkManager.probe`` runs the whole probe on demand.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from meshllm.placement.linkstats import LARGE_PROBE_BYTES, SMALL_BYTES, TINY_PROBE_BYTES, LinkMeter

log = logging.getLogger(__name__)

PROBE_CHANNEL_ID = 2
"""The probe channel: raw bytes between link managers, never messages."""
PROBE_REPEATS = 5
"""Round trips per small probe size (interleaved); the least counts: on a busy machine the
difference between 64 bytes and 4 KB (~0.5 ms) is within a few tries' jitter."""
LARGE_PROBE_REPEATS = 3
"""Round trips of the large probe; the least counts."""
PROBE_TIMEOUT_S = 2.0
"""A probe that gets no echo within this is given up (a peer without the probe channel)."""
DEFAULT_PROBE_INTERVAL_S = 30.0
"""The small probes run again this often on every link (about 21 KB each time)."""
PROBE_SETTLE_S = 5.0
"""The whole probe runs once more this long after a link comes up: the first one often meets
a node still busy starting (loading its model, its layers), which slows everything."""
LARGE_PROBE_EVERY = 4
"""The periodic probes include the large ones every this many rounds (the first included)."""
_PROBE_HEADER = struct.Struct(">cI")
_PROBE_REQUEST = b"P"
_PROBE_ECHO = b"A"
_SEQ_MASK = 0xFFFFFFFF


class LinkProber:
    """The probes of one link. ``send(data)`` queues raw bytes on its probe channel;
    ``is_up()`` says whether the link is up."""

    def __init__(self, send: Callable[[bytes], None], meter: LinkMeter, *,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
                 is_up: Callable[[], bool], now_s: float) -> None:
        self._send = send
        self._meter = meter
        self._spawn = spawn
        self._is_up = is_up
        self.peer_id: str | None = None
        self._waiters: dict[int, asyncio.Future[float]] = {}
        self._next_seq = 0
        self.probing = 0
        """Probes in flight (a heartbeat sent meanwhile measures queueing)."""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._next_probe_s = now_s
        self._rounds = 0

    # --- scheduling -----------------------------------------------------------------------

    def schedule(self, now_s: float, interval_s: float | None) -> None:
        """The link just came up: the periodic probes start PROBE_SETTLE_S from now (or
        ``interval_s`` if shorter; None: never)."""
        if interval_s is not None:
            self._next_probe_s = now_s + min(PROBE_SETTLE_S, interval_s)

    def periodic(self, now_s: float, interval_s: float) -> None:
        """Start the periodic probe if it is due (the large ones every LARGE_PROBE_EVERY)."""
        if now_s >= self._next_probe_s:
            self._next_probe_s = now_s + interval_s
            self.start(large=self._rounds % LARGE_PROBE_EVERY == 0)
            self._rounds += 1

    def start(self, *, large: bool) -> None:
        """Probe in the background, unless a background probe is running."""
        if self._task is None or self._task.done():
            self._task = self._spawn(self.run(large=large), f"probe link to {self.peer_id}")

    def close(self) -> None:
        """The link ended: stop probing (a probe waiting for an echo returns None)."""
        if self._task is not None:
            self._task.cancel()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()

    # --- probing --------------------------------------------------------------------------

    def on_piece(self, data: bytes, now_s: float) -> None:
        """A piece on the probe channel: echo a request, or time an echo."""
        if len(data) < _PROBE_HEADER.size:
            return
        kind, seq = _PROBE_HEADER.unpack_from(data)
        if kind == _PROBE_REQUEST:
            self._send(_PROBE_HEADER.pack(_PROBE_ECHO, seq))
        elif kind == _PROBE_ECHO:
            waiter = self._waiters.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now_s)

    async def run(self, *, large: bool) -> None:
        """Round trips of TINY and SMALL probes (PROBE_REPEATS each, interleaved), then of
        LARGE ones; the least of each size goes to the link's meter."""
        async with self._lock:
            tiny: list[float] = []
            small: list[float] = []
            for _ in range(PROBE_REPEATS):
                for size, times in ((TINY_PROBE_BYTES, tiny), (SMALL_BYTES, small)):
                    ms = await self._once(size)
                    if ms is None:
                        return
                    times.append(ms)
            big: list[float] = []
            for _ in range(LARGE_PROBE_REPEATS if large else 0):
                ms = await self._once(LARGE_PROBE_BYTES)
                if ms is None:
                    break
                big.append(ms)
            self._meter.add_probe(min(tiny), min(small), min(big) if big else None)
            log.debug("probed %s: %.2f / %.2f / %s ms -> %s", self.peer_id, min(tiny), min(small),
                      f"{min(big):.2f}" if big else "-", self._meter.stats())

    async def _once(self, size: int) -> float | None:
        """One probe of ``size`` bytes: ms until its echo arrived; None if none came."""
        if not self._is_up():
            return None
        seq = self._next_seq
        self._next_seq = (seq + 1) & _SEQ_MASK
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[seq] = waiter
        self.probing += 1
        start_s = time.monotonic()
        try:
            self._send(_PROBE_HEADER.pack(_PROBE_REQUEST, seq) + bytes(size - _PROBE_HEADER.size))
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                arrived_s = await waiter
        except TimeoutError:
            log.debug("probe of %d bytes to %s: no echo", size, self.peer_id)
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not waiter.cancelled() or (task is not None and task.cancelling()):
                raise
            return None  # the link went down (close() cancels the waiters)
        finally:
            self.probing -= 1
            self._waiters.pop(seq, None)
        return (arrived_s - start_s) * 1000.0
