"""The generation worker: one thread, results and errors handed to the loop, cancellation."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from daemon.answer import WorkerStopped
from daemon.node.worker import WORKER_NICE, GenerationWorker, lower_thread_priority


@pytest.fixture
async def worker() -> GenerationWorker:
    w = GenerationWorker(threads=1)
    w.start()
    yield w
    w.stop()
    await asyncio.to_thread(w.join, 5.0)


async def test_calls_run_on_the_worker_thread_with_its_torch_settings(worker: GenerationWorker) -> None:
    def where() -> tuple[str, int, bool]:
        import torch

        return threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled()

    assert await worker.call(where) == ("meshllm-worker", 1, True)


async def test_errors_reach_the_caller(worker: GenerationWorker) -> None:
    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await worker.call(boom)
    assert await worker.call(lambda: 5) == 5  # the worker goes on


async def test_stream_yields_items_then_ends(worker: GenerationWorker) -> None:
    stream = worker.stream(lambda should_stop: iter(range(5)))
    assert [item async for item in stream] == [0, 1, 2, 3, 4]


async def test_stream_error_is_raised_on_the_loop(worker: GenerationWorker) -> None:
    def produce(should_stop: Callable[[], bool]) -> Iterator[int]:
        yield 1
        raise ValueError("broken")

    seen = []
    with pytest.raises(ValueError, match="broken"):
        async for item in worker.stream(produce):
            seen.append(item)
    assert seen == [1]


async def test_closing_a_stream_stops_its_producer(worker: GenerationWorker) -> None:
    stopped = threading.Event()

    def produce(should_stop: Callable[[], bool]) -> Iterator[int]:
        n = 0
        while not should_stop():
            yield n
            n += 1
            threading.Event().wait(0.001)
        stopped.set()

    stream = worker.stream(produce)
    async for item in stream:
        if item == 3:
            break
    stream.close()
    assert await asyncio.to_thread(stopped.wait, 10)
    assert worker.pending_jobs == 0 or await worker.call(lambda: True)


async def test_jobs_run_one_at_a_time_in_order(worker: GenerationWorker) -> None:
    order: list[int] = []
    await asyncio.gather(*(worker.call(lambda i=i: order.append(i)) for i in range(10)))
    assert order == list(range(10))


async def test_stopped_worker_refuses_new_work() -> None:
    w = GenerationWorker(threads=1)
    w.start()
    w.stop()
    with pytest.raises(WorkerStopped):
        await w.call(lambda: 1)
    assert await asyncio.to_thread(w.join, 5.0)


def _own_nice() -> int:
    import os

    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
async def test_the_worker_thread_runs_at_a_lower_priority_than_the_loop() -> None:
    """Heartbeats and sends on the event loop win the CPU over torch work when cores are busy."""
    w = GenerationWorker(threads=1, nice=WORKER_NICE)
    w.start()
    try:
        loop_nice = _own_nice()
        assert await w.call(_own_nice) == min(19, loop_nice + WORKER_NICE)
        assert _own_nice() == loop_nice  # the loop's thread (and the process) keep theirs
    finally:
        w.stop()
        await asyncio.to_thread(w.join, 5.0)


async def test_nice_zero_leaves_the_worker_priority_alone() -> None:
    w = GenerationWorker(threads=1, nice=0)
    w.start()
    try:
        if sys.platform.startswith("linux"):
            assert await w.call(_own_nice) == _own_nice()
        assert lower_thread_priority(0) is False
    finally:
        w.stop()
        await asyncio.to_thread(w.join, 5.0)
