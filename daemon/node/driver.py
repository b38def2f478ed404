"""The driver of the mesh logic: it owns the tasks, the worker calls and the links, and feeds
`meshllm.mesh.MeshCore`, which decides everything.

- Links: what arrives (`on_message`, `on_link_up`, `on_link_down`) goes to the core; what the
  core sends goes out through one ordered outbox per peer. `Links.send` raises `LinkError` for
  a link that failed; the link layer reports the loss itself, so a failed send is only logged.
- Compute: each job goes to the worker thread the moment the core issues it, so jobs run in
  the core's order, back to back; each outcome comes back to the core on the event loop.
- Timers: one task sleeps until the core's next timer.
- Measurements: every `report_interval_s`, what the links measured goes to the core
  (`links_measured`), which shares it with the mesh (docs/placement.md).
- Answers typed here: `generate` opens a session in the core and yields what it emits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from meshllm import wire
from meshllm.errors import MeshUnavailable
from meshllm.placement.linkstats import LinkStats
from meshllm.mesh import (
    Compute, Computed, DropSessions, Job, LoadSpan, Logged, MeshCore, MeshSettings, Send, SessionEnded,
    SessionOutput, StatusChanged, incompatibility,
)
from meshllm.mesh.core import ModelLimits
from meshllm.mesh.jobs import ImportCache, RebuildPart
from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.placement.planner import ModelSpec
from meshllm.mesh.session import StateChange, Token
from meshllm.tune.rounds import TUNE_MESSAGES, TuneSettings

from daemon.net.links import LinkError
from daemon.tasks import TaskSet
from daemon.node.tune import TuneRunner
from daemon.node.worker import GenerationWorker, WorkerStopped

if TYPE_CHECKING:
    from pathlib import Path

    from meshllm.model.adapter import Adapter

    from daemon.net.links import LinkManager

__all__ = ["Links", "MeshDriver", "MeshSettings", "MeshUnavailable", "incompatibility"]

log = logging.getLogger(__name__)

EventLogger = Callable[[str, str], None]
"""(kind, message): kind is join, leave, election, replan, error or info."""


class Links(Protocol):
    """What the driver needs from the link layer."""

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int:
        """The encoded bytes sent. Raises `LinkError` when the link to `peer_id` is gone."""
        ...

    def peers(self) -> dict[str, wire.Hello]: ...

    def rtt_ms(self, peer_id: str) -> float | None: ...

    def link_stats(self, peer_id: str) -> LinkStats | None:
        """What this node measured on its link to the peer (None: no link, or not measured)."""
        ...


class _Outbox:
    """The messages for one peer, sent in order by one task."""

    def __init__(self, peer_id: str, links: Links, sent: Callable[[Send, int], None], tasks: TaskSet) -> None:
        self.peer_id = peer_id
        self._links = links
        self._sent = sent
        self._queue: deque[Send] = deque()
        self._ready = asyncio.Event()
        self._task = tasks.spawn(self._run(), name=f"outbox-{peer_id}")

    def put(self, send: Send) -> None:
        self._queue.append(send)
        self._ready.set()

    def close(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            send = self._queue.popleft()
            try:
                nbytes = await self._links.send(self.peer_id, send.message, channel=send.channel)
            except LinkError as e:  # the link layer reports the loss; the core re-plans then
                log.debug("%s to %s not sent: %s", type(send.message).__name__, self.peer_id, e)
                continue
            self._sent(send, nbytes)


class MeshDriver:
    def __init__(
        self,
        hello: wire.Hello,
        runtime: Runtime,
        worker: GenerationWorker,
        links: Links,
        *,
        settings: MeshSettings = MeshSettings(),
        on_change: Callable[[], None] = lambda: None,
        log_event: EventLogger = lambda kind, message: None,
        state_dir: "Path | None" = None,
        tune_settings: TuneSettings = TuneSettings(),
        on_model_id: Callable[[str], None] = lambda model_id: None,
    ) -> None:
        self.hello = hello
        self.node_id = hello.node_id
        self.runtime = runtime
        self.worker = worker
        self.links = links
        self.settings = settings
        self._on_change = on_change
        self._log_event = log_event
        shape = runtime.engine.shape
        self.core = MeshCore(hello, ModelSpec(shape.num_layers, shape.layer_bytes, shape.embed_head_bytes),
                             ModelLimits(runtime.hidden_size, runtime.engine.info.max_positions,
                                         *runtime.kv_shape), settings)
        self.incompatible: dict[str, dict[str, str]] = {}
        """Discovered peers that cannot join, by instance name: address and reason."""
        self._advertised: dict[str, str] = {}
        """Compatible peers that discovery sees, by node id: their signaling address."""
        self._tasks = TaskSet("mesh")
        self._outboxes: dict[str, _Outbox] = {}
        self._answers: dict[str, asyncio.Queue[SessionOutput | SessionEnded]] = {}
        self._samplers: dict[str, Sampler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._sleeping_until = float("-inf")
        self._changed = asyncio.Event()
        self._connecting: set[str] = set()
        self._job_ms: dict[int, float] = {}
        """Wall time of the entry jobs (embed and/or head) run on the worker, by job id."""
        self._embed_ms: dict[str, float] = {}
        """A session's last embedding job (its head job completes the token's entry work)."""
        self._on_model_id = on_model_id
        self.tune = TuneRunner(self.node_id, runtime, worker, state_dir=state_dir, settings=tune_settings,
                               pump=self._pump, log_event=log_event, adapter_finished=self.serve_adapter)
        """Federated fine-tuning (docs/fine-tuning.md): its core runs beside the mesh core."""
        self._tune_view: tuple[str | None, frozenset[str]] | None = None

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the core's timers until cancelled."""
        self._loop = asyncio.get_running_loop()
        self.core.start(time.monotonic())
        self._pump()
        self._tasks.spawn(self._measure_links(), name="measure-links")
        try:
            while True:
                nxt = self._next_timer()
                self._sleeping_until = float("inf") if nxt is None else nxt
                self._wake.clear()
                try:
                    async with asyncio.timeout(None if nxt is None else max(0.0, nxt - time.monotonic())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._sleeping_until = float("-inf")
                now = time.monotonic()
                self.core.handle_timer(now)
                self.tune.core.handle_timer(now)
                self._pump()
        finally:
            self.core.stop("the daemon is stopping")
            self._pump()
            self._tasks.cancel()
            self.tune.close()

    def _next_timer(self) -> float | None:
        timers = [t for t in (self.core.next_timer(), self.tune.core.next_timer()) if t is not None]
        return min(timers) if timers else None

    async def _measure_links(self) -> None:
        """Hand the core what the links measured, every report interval."""
        while True:
            await asyncio.sleep(self.settings.report_interval_s)
            peers = self.links.peers()
            self.core.links_measured({peer: self.links.link_stats(peer) for peer in peers}, time.monotonic())
            self._pump()

    def _pump(self) -> None:
        """Carry out what the cores asked for: sends, jobs, events."""
        core, tune = self.core, self.tune.core
        # an election in progress (no coordinator yet) does not end a tune job: the tune core
        # hears of a new coordinator only once one is elected
        last = self._tune_view[0] if self._tune_view else None
        view = (core.coordinator_id or last, frozenset(core.members) - {self.node_id})
        if view != self._tune_view:  # the tune core learns of members and coordinators
            self._tune_view = view
            tune.membership(view[0], view[1], time.monotonic())
        for send in (*core.sends(), *tune.sends()):
            outbox = self._outboxes.get(send.dest)
            if outbox is None:
                outbox = self._outboxes[send.dest] = _Outbox(send.dest, self.links, self._sent, self._tasks)
            outbox.put(send)
        for job in core.jobs():
            self._submit(job)
        for event in core.events():
            if isinstance(event, (SessionOutput, SessionEnded)):
                queue = self._answers.get(event.session_id)
                if queue is not None:
                    queue.put_nowait(event)
            elif isinstance(event, Logged):
                self._log_event(event.kind, event.message)
            elif isinstance(event, StatusChanged):
                self._changed.set()
                self._on_change()
        tune_events = tune.events()
        for event in tune_events:
            if isinstance(event, Logged):
                self._log_event(event.kind, event.message)
        self.tune.handle(tune.jobs(), tune_events)
        if tune_events:
            self._on_change()
        nxt = self._next_timer()
        if nxt is not None and nxt < self._sleeping_until:
            self._wake.set()

    def _sent(self, send: Send, nbytes: int) -> None:
        if send.positions:
            self.core.stats.sent(send.positions, nbytes)

    # -- compute ---------------------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        runtime = self.runtime
        if isinstance(job, Compute):
            sampler = self._samplers.get(job.session_id)
            delay_s = self.settings.debug_delay_s if job.run_span else 0.0
            run: Callable[[], Computed | None] = lambda: runtime.compute(job, sampler, delay_s)
            if job.positions == 1 and (job.token_ids is not None or job.finish == "sample"):
                run = self._timed(job.job_id, run)
        elif isinstance(job, RebuildPart):
            run = lambda: runtime.rebuild_part(job)
        elif isinstance(job, LoadSpan):
            run = lambda: runtime.load_span(job.start_layer, job.end_layer)
        elif isinstance(job, ImportCache):
            run = lambda: runtime.import_cache(job)
        else:
            run = lambda: _drop(runtime, job)
        try:
            future = self.worker.submit(run)
        except WorkerStopped:
            return  # the node is stopping: nothing waits for this job any more
        loop = self._loop or asyncio.get_running_loop()

        def finished(f: Future[Computed | None]) -> None:
            try:
                loop.call_soon_threadsafe(self._job_finished, job, f)
            except RuntimeError:  # the loop has closed: the node has stopped
                pass

        future.add_done_callback(finished)

    def _timed(self, job_id: int, run: Callable[[], Computed | None]) -> Callable[[], Computed | None]:
        def timed() -> Computed | None:
            t0 = time.perf_counter()
            try:
                return run()
            finally:
                self._job_ms[job_id] = (time.perf_counter() - t0) * 1000
        return timed

    def _entry_work(self, job: Compute, result: object) -> None:
        """One decode token's own work on this entry node (embedding, final norm, lm_head,
        sampling), measured on the worker: the job's time less its layers'."""
        elapsed = self._job_ms.pop(job.job_id, None)
        if elapsed is None or not isinstance(result, Computed):
            return
        own = max(0.0, elapsed - result.span_ms)
        if job.finish != "sample":  # embedded for a first stage elsewhere: the head comes later
            self._embed_ms[job.session_id] = own
            return
        embed = self._embed_ms.pop(job.session_id, 0.0) if job.token_ids is None else 0.0
        self.core.entry_work_measured(embed + own)

    def _job_finished(self, job: Job, future: Future[Computed | None]) -> None:
        now = time.monotonic()
        error = future.exception()
        if isinstance(error, WorkerStopped):
            return
        if error is not None:
            # the model refused the step (a cache out of step, too many sessions) or failed:
            # the core decides (refuse the step, replay the answer); the node carries on
            log.info("job %s failed: %s: %s", type(job).__name__, type(error).__name__, error,
                     exc_info=not isinstance(error, (ValueError, RuntimeError)))
            self.core.job_failed(job.job_id, f"{type(error).__name__}: {error}", now)
        else:
            if isinstance(job, Compute) and job.job_id in self._job_ms:
                self._entry_work(job, future.result())
            self.core.job_done(job.job_id, future.result(), now)
        self._pump()

    # -- links -----------------------------------------------------------------------------------

    def on_link_up(self, peer_id: str, hello: wire.Hello) -> None:
        self.core.link_up(peer_id, hello, time.monotonic())
        self._pump()

    def on_link_down(self, peer_id: str, reason: str) -> None:
        outbox = self._outboxes.pop(peer_id, None)
        if outbox is not None:
            outbox.close()
        self.core.link_down(peer_id, reason, time.monotonic())
        self._pump()
        if self.node_id < peer_id and peer_id in self._advertised:
            # a link lost while discovery still sees the peer (a busy moment, a blip): discovery
            # says nothing new, so the dialling side links again by itself
            self._tasks.spawn(self._redial(peer_id), f"redial {peer_id}")

    async def _redial(self, peer_id: str, every_s: float = 1.0, tries: int = 60) -> None:
        for _ in range(tries):
            await asyncio.sleep(every_s)
            address = self._advertised.get(peer_id)
            if address is None or peer_id in self.links.peers():
                return
            if await self._dial(address, self.links) == peer_id:
                return

    def on_message(self, sender: str, msg: wire.Message) -> None:
        if isinstance(msg, TUNE_MESSAGES):
            self.tune.core.receive(sender, msg, time.monotonic())
        else:
            self.core.receive(sender, msg, time.monotonic())
        self._pump()

    # -- answers typed here -------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Token | StateChange]:
        """Answer one prompt across the mesh; this node is its entry node.

        Raises MeshUnavailable when the mesh cannot answer (no plan in time, too little
        memory, steps that keep failing)."""
        session = self.runtime.engine.new_session(prompt_ids, params)
        queue: asyncio.Queue[SessionOutput | SessionEnded] = asyncio.Queue()
        session_id = self.core.open_session(session, time.monotonic())
        self._answers[session_id] = queue
        self._samplers[session_id] = Sampler(params)
        self._pump()
        ended = False
        try:
            while True:
                if should_stop():
                    self.core.cancel_session(session_id, time.monotonic())
                    self._pump()
                event = await queue.get()
                if isinstance(event, SessionEnded):
                    ended = True
                    if event.error is not None:
                        raise MeshUnavailable(event.error)
                    return
                yield event.item
        finally:
            if not ended:  # the listener left: forget the answer everywhere
                self.core.close_session(session_id)
                self._pump()
            self._answers.pop(session_id, None)
            self._samplers.pop(session_id, None)
            self._embed_ms.pop(session_id, None)

    # -- leaving -----------------------------------------------------------------------------------

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Hand this node's layers over before going: ask the coordinator for a plan without
        it and wait (at most `timeout_s`) until that plan is active. Answers elsewhere replay
        onto it between two tokens, so nobody waits for a heartbeat timeout."""
        if not self.core.leave(time.monotonic()):
            return
        self._pump()
        try:
            async with asyncio.timeout(timeout_s):
                while not self.core.leave_settled:
                    await self.wait_changed()
        except TimeoutError:
            log.warning("leaving before the others took over this node's layers")
        self.core.stop_loading()

    async def wait_changed(self) -> None:
        """Until the mesh state changes (membership, election, plans)."""
        self._changed.clear()
        await self._changed.wait()

    # -- finding peers ------------------------------------------------------------------------------

    def on_discovery(self, event: object, links: "LinkManager") -> None:
        """A discovery event: link to compatible peers (the lower node id dials)."""
        from daemon.net.discovery import BadRecord, PeerGone, PeerSeen, hello_from_txt

        if isinstance(event, PeerGone):
            self.incompatible.pop(event.name, None)
            if event.node_id:
                self._advertised.pop(event.node_id, None)
            if event.node_id and event.node_id in self.core.members:
                links.drop(event.node_id, "mdns goodbye")
            self._on_change()
            return
        if not isinstance(event, PeerSeen) or event.node_id == self.node_id:
            return
        try:
            theirs = hello_from_txt(event.txt, event.name)
        except BadRecord as e:
            log.info("ignoring discovered peer %s: %s", event.name, e)
            return
        reason = incompatibility(self.hello, theirs)
        if reason is not None:
            if self.incompatible.get(event.name, {}).get("reason") != reason:
                self._log_event("info", f"{event.name} is incompatible: {reason}")
            self.incompatible[event.name] = {"name": event.name, "address": event.address, "reason": reason}
            self._on_change()
            return
        self.incompatible.pop(event.name, None)
        self._advertised[event.node_id] = event.address
        if self.node_id < event.node_id and event.node_id not in links.peers():
            self._tasks.spawn(self._dial(event.address, links))

    async def _dial(self, address: str, links: "LinkManager") -> str | None:
        if address in self._connecting:
            return None
        self._connecting.add(address)
        try:
            return await links.connect(address)
        except LinkError as e:
            self._log_event("error", f"cannot link to {address}: {e.reason}")
            return None
        finally:
            self._connecting.discard(address)

    async def keep_joined(self, address: str, links: "LinkManager", retry_s: float = 2.0) -> None:
        """--join HOST:PORT: link to that peer, and again whenever the link is gone."""
        peer: str | None = None
        while True:
            if peer is None or peer not in links.peers():
                peer = await self._dial(address, links)
            await asyncio.sleep(retry_s)

    # -- status --------------------------------------------------------------------------------------

    def status_view(self) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md)."""
        view = self.core.status_view(self.links.rtt_ms)
        view["incompatible"] = sorted(self.incompatible.values(), key=lambda d: d["name"])
        view["tune"] = self.tune.status_view()
        return view

    # -- adapters ----------------------------------------------------------------------------------

    async def serve_adapter(self, adapter: "Adapter | None") -> None:
        """Serve base plus `adapter` (None: the base alone) from now on, on this node's layers:
        a finished tune job does this on every member at once. The model id gains the adapter's
        digest, so a node that did not take the adapter up cannot join this mesh."""
        from dataclasses import replace

        runtime = self.runtime
        await self.worker.call(lambda: runtime.set_adapter(adapter))
        model_id = runtime.engine.info.model_id
        if model_id != self.hello.model_id:
            self.hello = replace(self.hello, model_id=model_id)
            self.core.serving_model(self.hello)
            self._on_model_id(model_id)
        self._log_event("info", f"serving {'the base model' if adapter is None else 'adapter ' + adapter.digest}"
                                f" (model id {model_id})")
        self._on_change()


def _drop(runtime: Runtime, job: DropSessions) -> None:
    for session_id in job.session_ids:
        runtime.drop(session_id)
