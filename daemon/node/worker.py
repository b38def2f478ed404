"""The one thread that runs torch work, bridged to asyncio.

The event loop never runs torch: a single worker thread does, with ``torch.set_num_threads``
applied and ``torch.inference_mode`` entered on it. Jobs run one at a time in the order they
were submitted; concurrent requests therefore queue behind each other (the mesh work may
interleave them later). A streamed job hands its items to the event loop with
``loop.call_soon_threadsafe`` into an ``asyncio.Queue``; closing the stream early (a client
that disconnected) sets the job's stop flag, which the producer polls between items.

The thread runs at a lower OS priority than the event loop's (Linux: its own nice value,
`WORKER_NICE`): when the cores are busy, the loop's heartbeats and sends win the CPU over
torch work. Alone on idle cores, nice changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from daemon.answer import WorkerStopped

log = logging.getLogger(__name__)

T = TypeVar("T")

ShouldStop = Callable[[], bool]


WORKER_NICE = 5
"""How much lower the worker thread's priority is than the event loop's (Linux nice units)."""


def lower_thread_priority(by: int) -> bool:
    """Raise the calling thread's nice value by `by` (Linux: nice is per thread). True when
    it did; elsewhere, or when the OS refuses, nothing changes (and False)."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + by)
    except (OSError, AttributeError) as error:
        log.debug("cannot lower the worker thread's priority: %s", error)
        return False
    return True


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


@dataclass(frozen=True)
class _Job:
    """One unit of work for the worker thread."""

    run: Callable[[], object]
    future: Future[object]
    runs_when_stopping: bool
    """Streams still run while stopping: they see the stop flag and end at once."""


class GenerationWorker:
    """Owns the single generation thread. Start it once; stop it once.

    ``call`` runs a function on the thread and awaits its result; ``stream`` runs an iterator
    factory there and yields its items on the event loop.
    """

    def __init__(self, threads: int, *, name: str = "meshllm-worker", nice: int = WORKER_NICE) -> None:
        """``nice``: how much lower the thread's OS priority is than the event loop's (0: the
        same); torch's own threads, started from it, inherit it."""
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads
        self._name = name
        self._nice = nice
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._pending = 0
        self._pending_lock = threading.Lock()

    @property
    def pending_jobs(self) -> int:
        """Jobs submitted and not finished (running or queued)."""
        with self._pending_lock:
            return self._pending

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask running streams to stop, fail queued calls, and end the thread (does not wait)."""
        self._stopping.set()
        self._jobs.put(None)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread and return its result (or raise its error)."""
        return await asyncio.wrap_future(self.submit(fn))

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn`` for the worker thread, behind every job queued before it; its future.

        Raises WorkerStopped when the worker is not running."""
        future: Future[object] = Future()
        self._submit(_Job(fn, future, runs_when_stopping=False))
        return future  # type: ignore[return-value]

    def stream(self, produce: Callable[[ShouldStop], Iterator[T]]) -> TokenStream[T]:
        """Run ``produce(should_stop)`` on the worker thread; iterate its items asynchronously.

        ``should_stop`` turns True once the stream is closed or the worker stops; the producer
        should then end soon (the engine yields a final "cancelled" token).
        """
        stream: TokenStream[T] = TokenStream(asyncio.get_running_loop(), self._stopping)
        future: Future[object] = Future()
        self._submit(_Job(lambda: stream.pump(produce), future, runs_when_stopping=True))
        return stream

    def _submit(self, job: _Job) -> None:
        if self._thread is None or self._stopping.is_set():
            raise WorkerStopped("the generation worker is not running")
        with self._pending_lock:
            self._pending += 1
        self._jobs.put(job)

    def _main(self) -> None:
        lower_thread_priority(self._nice)  # first: torch's threads started from here inherit it
        import torch  # imported here: the thread that runs torch sets it up

        torch.set_num_threads(self.threads)
        log.debug("worker thread started with %d torch threads", self.threads)
        with torch.inference_mode():
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                self._run(job)
        # fail whatever was queued behind the stop marker
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._run(job)

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            with self._pending_lock:
                self._pending -= 1
            return  # the awaiting coroutine was cancelled before the job started
        try:
            if self._stopping.is_set() and not job.runs_when_stopping:
                job.future.set_exception(WorkerStopped("the daemon is stopping"))
                return
            job.future.set_result(job.run())
        except BaseException as error:  # handed to the awaiting coroutine, which decides
            job.future.set_exception(error)
        finally:
            with self._pending_lock:
                self._pending -= 1


class TokenStream(Generic[T]):
    """Items produced on the worker thread, consumed with ``async for`` on the event loop.

    Leaving the ``async for`` early (break, exception, cancellation) does not stop the
    producer by itself: call ``close()`` (or use ``async with``), which sets the stop flag.
    A `daemon.answer.AnswerStream` (one that never announces who serves it).
    """

    announces = False

    def __init__(self, loop: asyncio.AbstractEventLoop, worker_stopping: threading.Event) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._stop = threading.Event()
        self._worker_stopping = worker_stopping
        self._ended = False

    def should_stop(self) -> bool:
        return self._stop.is_set() or self._worker_stopping.is_set()

    def close(self) -> None:
        """Ask the producer to stop. Safe to call more than once, from the event loop."""
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    async def __aenter__(self) -> TokenStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while not self._ended:
            item = await self._queue.get()
            if item is _END:
                self._ended = True
                return
            if isinstance(item, _Failed):
                self._ended = True
                raise item.error
            yield item  # type: ignore[misc]

    # -- worker thread side ----------------------------------------------------------------

    def pump(self, produce: Callable[[ShouldStop], Iterator[T]]) -> None:
        """Run on the worker thread: drive the producer, hand every item to the loop."""
        try:
            if self.should_stop():
                return
            for item in produce(self.should_stop):
                if not self._hand_over(item):
                    self._stop.set()  # nobody listens: the producer ends at its next check
        except BaseException as error:  # re-raised on the event loop side
            self._hand_over(_Failed(error))
        finally:
            self._hand_over(_END)

    def _hand_over(self, item: object) -> bool:
        """Queue ``item`` on the loop; False when the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop was closed: nobody is listening any more
            return False
        return True
