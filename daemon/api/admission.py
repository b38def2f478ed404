"""How many answers this node serves at once, and who waits (docs/operations.md, "Admission").

- Every answer served by this node, streamed or not, holds one of ``max_sessions`` slots from
  the moment it starts until it ends, fails, or its client goes away (`Slot.release`).
- Beyond them, requests wait in a FIFO queue of at most ``queue_max``; each gets a slot in
  arrival order. A waiter whose client disconnects leaves the queue (its task is cancelled).
- A request that finds the queue full is refused at once, and one that waited
  ``queue_wait_s`` without a slot leaves the queue refused: both raise `Busy`, which the API
  answers with 429 and ``Retry-After``. A client never hangs on a node that does not move.
- ``Retry-After`` is an estimate of when the requests waiting now will have started
  (`retry_after_s`).

The default number of slots comes from memory (`session_limits`): the KV cache one session
needs at the model's full context, against a quarter of the node's memory budget.

This is a separate limit from the per-client one of `daemon.api.access` (8 requests in
progress per client address, queued ones included), which is checked first.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_DEFAULT_SESSIONS = 16
"""The default (from memory) never goes above this; ``--max-sessions`` may."""
QUEUE_PER_SESSION = 4
"""The queue holds this many requests per slot."""
KV_SHARE = 4
"""The default slots' KV caches fit in 1/KV_SHARE of the node's memory budget."""
KV_BYTES_PER_VALUE = 4
"""KV caches are float32 in every weight format."""
QUEUE_WAIT_S = 120.0
"""A request that waited this long for a slot is refused (429) rather than kept waiting."""
ASSUMED_ANSWER_S = 10.0
"""How long an answer takes, for ``Retry-After``, before any answer has ended here."""
RECENT_ANSWERS = 16
"""``Retry-After`` averages the durations of this many last answers."""
MAX_RETRY_AFTER_S = 60


class Busy(Exception):
    """No slot for this request (the queue is full, or it waited too long): a 429."""

    def __init__(self, message: str, *, retry_after_s: int, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        """Seconds after which a new try is likely to find room (at least 1)."""
        self.code = code
        """``queue_full`` or ``queue_timeout``."""


@dataclass(frozen=True)
class SessionLimits:
    """How many answers run at once, how many wait, and how the first was chosen."""

    max_sessions: int
    queue_max: int
    how: str
    """Why max_sessions is what it is, for the start-up log."""

    def describe(self) -> str:
        return (f"at most {self.max_sessions} answer(s) at once, {self.queue_max} more may wait "
                f"({self.how})")


def kv_bytes_per_session(num_layers: int, kv_heads: int, head_dim: int, max_positions: int) -> int:
    """Bytes of keys and values one session holds at the model's full context, on every layer."""
    return num_layers * 2 * kv_heads * head_dim * KV_BYTES_PER_VALUE * max_positions


def session_limits(max_sessions: int | None, *, kv_bytes: int, mem_budget_bytes: int) -> SessionLimits:
    """The limits of a node: ``max_sessions`` as given (``--max-sessions``), else as many
    sessions of ``kv_bytes`` as fit in 1/KV_SHARE of ``mem_budget_bytes``, 1..MAX_DEFAULT_SESSIONS.
    The queue holds QUEUE_PER_SESSION requests per slot."""
    if max_sessions is not None:
        return SessionLimits(max_sessions, QUEUE_PER_SESSION * max_sessions, "--max-sessions")
    fit = mem_budget_bytes // KV_SHARE // max(1, kv_bytes)
    chosen = min(MAX_DEFAULT_SESSIONS, max(1, fit))
    how = (f"from memory: {kv_bytes / 1e6:.1f} MB of KV cache per session at full context; "
           f"1/{KV_SHARE} of the {mem_budget_bytes / 1e9:.1f} GB budget holds {fit}, "
           f"kept within 1..{MAX_DEFAULT_SESSIONS}; --max-sessions N sets it")
    return SessionLimits(chosen, QUEUE_PER_SESSION * chosen, how)


def retry_after_s(recent_answer_s: Sequence[float], queued: int, max_sessions: int) -> int:
    """Seconds until the ``queued`` requests waiting now have likely all started: (queued + 1)
    answers of the recent mean duration (ASSUMED_ANSWER_S before any), ``max_sessions`` at a
    time; at least 1, at most MAX_RETRY_AFTER_S."""
    mean_s = sum(recent_answer_s) / len(recent_answer_s) if recent_answer_s else ASSUMED_ANSWER_S
    estimate = mean_s * (queued + 1) / max(1, max_sessions)
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(estimate)))


class Slot:
    """One answer's right to run; `release` (or leaving ``with slot:``) gives it back, once."""

    def __init__(self, admission: Admission, started_s: float) -> None:
        self._admission = admission
        self._started_s = started_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._released(self._started_s)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Admission:
    """The slots and the queue of one node, on its event loop."""

    def __init__(self, max_sessions: int = MAX_DEFAULT_SESSIONS, queue_max: int | None = None, *,
                 queue_wait_s: float = QUEUE_WAIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        queue_max = QUEUE_PER_SESSION * max_sessions if queue_max is None else queue_max
        _check_limits(max_sessions, queue_max)
        self._max_sessions, self._queue_max = max_sessions, queue_max
        self._queue_wait_s = queue_wait_s
        self._clock = clock
        self._running = 0
        self._queue: deque[asyncio.Future[Slot]] = deque()
        self._recent_s: deque[float] = deque(maxlen=RECENT_ANSWERS)
        self._on_change: Callable[[], None] = lambda: None

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` whenever the running or queued count (or a limit) changes."""
        self._on_change = on_change

    def set_limits(self, max_sessions: int, queue_max: int) -> None:
        """New limits, from now on: answers running beyond a lowered limit finish; waiters get
        the slots a raised one adds."""
        _check_limits(max_sessions, queue_max)
        self._max_sessions, self._queue_max = max_sessions, queue_max
        self._grant()
        self._on_change()

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._queue)

    def view(self) -> dict[str, Any]:
        """The ``sessions`` object of ``GET /v1/status``."""
        return {"running": self._running, "queued": len(self._queue), "max": self._max_sessions,
                "queue_max": self._queue_max}

    async def acquire(self) -> Slot:
        """A slot, at once or after waiting in line; raises Busy. Cancelling the caller while
        it waits takes it out of the line (or hands on the slot it was just given)."""
        if self._running < self._max_sessions and not self._queue:
            self._running += 1
            self._on_change()
            return Slot(self, self._clock())
        if len(self._queue) >= self._queue_max:
            raise self._busy(f"this node is busy: {self._running} answer(s) running, its most "
                             f"(--max-sessions {self._max_sessions}), and its queue of {self._queue_max} "
                             "is full", "queue_full")
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        self._on_change()
        try:
            async with asyncio.timeout(self._queue_wait_s):
                return await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():  # given a slot as the wait ended
                if isinstance(error, TimeoutError):
                    return waiter.result()
                waiter.result().release()  # the caller gave up: hand it on
            else:
                waiter.cancel()
                if waiter in self._queue:
                    self._queue.remove(waiter)
                self._grant()
                self._on_change()
            if isinstance(error, TimeoutError):
                raise self._busy(f"this node is busy: no answer slot came free within "
                                 f"{self._queue_wait_s:g} s", "queue_timeout") from None
            raise

    def _busy(self, message: str, code: str) -> Busy:
        retry_s = retry_after_s(self._recent_s, len(self._queue), self._max_sessions)
        return Busy(f"{message}; retry after {retry_s} s", retry_after_s=retry_s, code=code)

    def _released(self, started_s: float) -> None:
        self._recent_s.append(max(0.0, self._clock() - started_s))
        self._running -= 1
        self._grant()
        self._on_change()

    def _grant(self) -> None:
        """Give free slots to the waiters, first come first served."""
        while self._queue and self._running < self._max_sessions:
            waiter = self._queue.popleft()
            if waiter.cancelled():  # its caller gave up and is leaving the line
                continue
            self._running += 1
            waiter.set_result(Slot(self, self._clock()))


def _check_limits(max_sessions: int, queue_max: int) -> None:
    if max_sessions < 1 or queue_max < 0:
        raise ValueError(f"max_sessions must be >= 1 and queue_max >= 0, not {max_sessions} and {queue_max}")
