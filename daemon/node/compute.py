"""The core's jobs on the worker thread: one run at a time, the steps waiting together batched.

The core issues jobs in order (meshllm.mesh.jobs). They wait here, in a
`meshllm.mesh.batching.JobQueue`, while the worker runs the previous run; the next run is
what waited meanwhile: the decode steps of every answer in flight (and at most one prompt
chunk) as one batched forward (`Runtime.compute_batch`), or one job that is not a step. Each
job's outcome, its result or its error, goes back to the core on the event loop.

A decode token's own work on its entry node (embedding, final norm, lm_head, sampling) is
measured on the runs that hold that step alone: the job's time less its layers'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

from meshllm.mesh.batching import JobQueue
from meshllm.mesh.jobs import Compute, Computed, DropSessions, ImportCache, Job, LoadSpan, RebuildPart
from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler

from daemon.answer import WorkerStopped
from daemon.node.worker import GenerationWorker

Outcome = Callable[[Job, object, float], None]
"""(job, its result or the exception it raised, now)."""


class ComputeRunner:
    """See the module doc. `samplers`: the samplers of this node's own answers, by session
    (the driver's, read when a run is made)."""

    def __init__(self, runtime: Runtime, worker: GenerationWorker, samplers: Mapping[str, Sampler],
                 debug_delay_s: float, *, on_outcome: Outcome, after_run: Callable[[], None],
                 entry_work: Callable[[float], None], stages: Callable[[], int] = lambda: 1) -> None:
        """`stages`: the stages of the plan in force (the session groups of a run)."""
        self._runtime = runtime
        self._worker = worker
        self._samplers = samplers
        self._delay_s = debug_delay_s
        self._on_outcome = on_outcome
        self._after_run = after_run
        self._entry_work = entry_work
        self._stages = stages
        self._queue = JobQueue(batching=runtime.batch_invariant)
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counts = {"runs": 0, "steps": 0, "batched_steps": 0, "largest_batch": 0}
        """Runs, the steps (Compute jobs) in them, the steps that ran in a batch of several,
        and the largest batch."""
        self._job_ms: dict[int, float] = {}
        """Wall time of the entry jobs (embed and/or head) that ran alone, by job id."""
        self._embed_ms: dict[str, float] = {}
        """A session's last embedding job (its head job completes the token's entry work)."""

    def add(self, job: Job) -> None:
        self._queue.add(job)

    def forget(self, session_id: str) -> None:
        """The answer ended here."""
        self._embed_ms.pop(session_id, None)

    def status_view(self) -> dict[str, object]:
        """`/v1/status`'s "compute" (docs/api.md)."""
        return {**self._counts, "queued_jobs": len(self._queue), "batching": self._queue.batching}

    def run_next(self) -> None:
        """Hand the worker the next run, unless one is on it."""
        if self._running:
            return
        run = self._queue.take(self._stages())
        if not run:
            return
        try:
            future = self._worker.submit(self._call(run))
        except WorkerStopped:
            return  # the node is stopping: nothing waits for these jobs any more
        self._running = True
        steps = sum(isinstance(job, Compute) for job in run)
        counts = self._counts
        counts["runs"] += 1
        counts["steps"] += steps
        counts["batched_steps"] += steps if steps > 1 else 0
        counts["largest_batch"] = max(counts["largest_batch"], steps)
        loop = self._loop = self._loop or asyncio.get_running_loop()

        def finished(f: Future[list[object]]) -> None:
            try:
                loop.call_soon_threadsafe(self._finished, run, f)
            except RuntimeError:  # the loop has closed: the node has stopped
                pass

        future.add_done_callback(finished)

    def _call(self, run: list[Job]) -> Callable[[], list[object]]:
        """What the worker runs for `run`: each job's outcome (its result or its error)."""
        runtime = self._runtime
        if len(run) > 1:
            steps = [job for job in run if isinstance(job, Compute)]
            samplers = {job.session_id: self._samplers[job.session_id] for job in steps
                        if job.session_id in self._samplers}
            delay_s = self._delay_s if any(job.run_span for job in steps) else 0.0
            return lambda: list(runtime.compute_batch(steps, samplers, delay_s))
        job = run[0]
        if isinstance(job, Compute):
            sampler = self._samplers.get(job.session_id)
            delay_s = self._delay_s if job.run_span else 0.0
            call: Callable[[], object] = lambda: runtime.compute(job, sampler, delay_s)
            if job.positions == 1 and (job.token_ids is not None or job.finish == "sample"):
                call = self._timed(job.job_id, call)
        elif isinstance(job, RebuildPart):
            call = lambda: runtime.rebuild_part(job)
        elif isinstance(job, LoadSpan):
            call = lambda: runtime.load_span(job.start_layer, job.end_layer)
        elif isinstance(job, ImportCache):
            call = lambda: runtime.import_cache(job)
        else:
            call = lambda: _drop(runtime, job)  # type: ignore[arg-type]

        def one() -> list[object]:
            try:
                return [call()]
            except Exception as error:  # noqa: BLE001 - the job's own outcome, for the core
                return [error]
        return one

    def _timed(self, job_id: int, run: Callable[[], object]) -> Callable[[], object]:
        def timed() -> object:
            t0 = time.perf_counter()
            try:
                return run()
            finally:
                self._job_ms[job_id] = (time.perf_counter() - t0) * 1000
        return timed

    def _measured(self, job: Job, result: object) -> None:
        """One decode token's entry work, from a job that ran alone (see the module doc)."""
        elapsed = self._job_ms.pop(job.job_id, None)
        if elapsed is None or not isinstance(job, Compute) or not isinstance(result, Computed):
            return
        own = max(0.0, elapsed - result.span_ms)
        if job.finish != "sample":  # embedded for a first stage elsewhere: the head comes later
            self._embed_ms[job.session_id] = own
            return
        embed = self._embed_ms.pop(job.session_id, 0.0) if job.token_ids is None else 0.0
        self._entry_work(embed + own)

    def _finished(self, run: list[Job], future: Future[list[object]]) -> None:
        self._running = False
        now = time.monotonic()
        error = future.exception()
        if isinstance(error, WorkerStopped):
            return
        outcomes: list[object] = [error] * len(run) if error is not None else future.result()
        for job, outcome in zip(run, outcomes):
            if not isinstance(outcome, BaseException):
                self._measured(job, outcome)
            self._on_outcome(job, outcome, now)
        self._after_run()


def _drop(runtime: Runtime, job: DropSessions) -> None:
    for session_id in job.session_ids:
        runtime.drop(session_id)
