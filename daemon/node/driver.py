"""The driver of the mesh logic: it owns the tasks, the worker calls and the links, and feeds
`meshllm.mesh.MeshCore`, which decides everything.

- Links: what arrives (`on_message`, `on_link_up`, `on_link_down`) goes to the core; what the
  core sends goes out through one ordered outbox per peer. `Links.send` raises the link
  layer's error (`link_error`, given by the node) for a link that failed; the link layer
  reports the loss itself, so a failed send is only logged. No input from a peer ends the
  daemon: what a handler raises is logged and counted against that peer's bad-frame budget
  (`meshllm.mesh.checks.PeerFaults`: over it, the link is dropped); a timer or job outcome
  that raises is logged, and the node carries on.
- Peers: what discovery reports (`peer_seen`, `peer_gone`) and `--join` addresses are dialled
  (the lower node id dials); an address that fails is dialled again with backoff
  (`daemon.node.redial`), reported once, and reported again when it links.
- Compute: the core's jobs go to the worker thread one run at a time, in the core's order;
  the steps of several sessions that wait together run as one batched forward
  (`daemon.node.compute`); each job's outcome comes back to the core on the event loop.
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
from typing import TYPE_CHECKING, Protocol

from meshllm import wire
from meshllm.errors import MeshllmError, MeshUnavailable
from meshllm.placement.linkstats import LinkStats
from meshllm.mesh import (
    Compute, Computed, DropSessions, Job, LoadSpan, Logged, MeshCore, MeshSettings, Send, SessionEnded,
    SessionOutput, StatusChanged, incompatibility,
)
from meshllm.mesh.checks import PeerFaults
from meshllm.mesh.core import ModelLimits
from meshllm.mesh.speculate import policy_for
from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.placement.planner import ModelSpec
from meshllm.mesh.session import StateChange, Token
from meshllm.tune.rounds import TUNE_MESSAGES, TuneSettings

from daemon.tasks import TaskSet
from daemon.node.compute import ComputeRunner
from daemon.node.redial import DialBackoff, PeerAddresses
from daemon.node.tune import TuneRunner
from daemon.node.worker import GenerationWorker

if TYPE_CHECKING:
    from pathlib import Path

    from meshllm.model.adapter import Adapter

__all__ = ["Links", "MeshDriver", "MeshSettings", "MeshUnavailable", "incompatibility"]

log = logging.getLogger(__name__)

TIMER_RETRY_S = 0.5
"""After a timer of the cores failed: how long before the next timer runs."""

EventLogger = Callable[[str, str], None]
"""(kind, message): kind is join, leave, election, replan, error or info."""


class Links(Protocol):
    """What the driver needs from the link layer (`daemon.net.links.LinkManager` has it)."""

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int:
        """The encoded bytes sent. Raises the link error when the link to `peer_id` is gone."""
        ...

    async def connect(self, address: str) -> str:
        """Link to the node whose signaling is at HOST:PORT; its node id. Raises the link error."""
        ...

    def drop(self, peer_id: str, reason: str) -> None: ...

    def peers(self) -> dict[str, wire.Hello]: ...

    def rtt_ms(self, peer_id: str) -> float | None: ...

    def link_stats(self, peer_id: str) -> LinkStats | None:
        """What this node measured on its link to the peer (None: no link, or not measured)."""
        ...


class _Outbox:
    """The messages for one peer, sent in order by one task."""

    def __init__(self, peer_id: str, links: Links, sent: Callable[[Send, int], None], tasks: TaskSet,
                 link_error: type[Exception]) -> None:
        self.peer_id = peer_id
        self._links = links
        self._link_error = link_error
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
            except self._link_error as e:  # the link layer reports the loss; the core re-plans then
                log.debug("%s to %s not sent: %s", type(send.message).__name__, self.peer_id, e)
                continue
            self._sent(send, nbytes)


class MeshDriver:
    """The mesh logic of one node, driven: see the module doc."""

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
        on_model_id: Callable[[wire.Hello], None] = lambda hello: None,
        link_error: type[Exception] = MeshllmError,
        dial_backoff: DialBackoff | None = None,
        peer_faults: PeerFaults | None = None,
        speculate: str = "auto",
    ) -> None:
        """`on_model_id`: the node serves another model id now (an adapter), with this hello.
        `link_error`: what `links` raises for a link that failed or cannot be made (the node
        gives `daemon.net.links.LinkError`; by default any MeshllmError). `peer_faults`: the
        budget of what a peer's messages may make a handler raise (default 5 in 10 s)."""
        self.hello = hello
        self.speculate = speculate
        """`--speculate` (meshllm.mesh.speculate): how this node's own answers draft."""
        self._drafting: deque[tuple[int, int, int]] = deque(maxlen=32)
        """(drafted, accepted, verify steps) of the last answers here that drafted."""
        self.node_id = hello.node_id
        self.runtime = runtime
        self.worker = worker
        self.links = links
        self.settings = settings
        self._on_change = on_change
        self._log_event = log_event
        shape = runtime.engine.shape
        self.core = MeshCore(hello, ModelSpec(shape.num_layers, shape.layer_bytes, shape.embed_head_bytes,
                                              runtime.private_layers),
                             ModelLimits(runtime.hidden_size, runtime.engine.info.max_positions,
                                         *runtime.kv_shape), settings)
        self.incompatible: dict[str, dict[str, str]] = {}
        """Discovered peers that cannot join, by instance name: address and reason."""
        self._advertised = PeerAddresses()
        """Compatible peers that discovery sees: their signaling addresses (daemon.node.redial)."""
        self._tasks = TaskSet("mesh")
        self._outboxes: dict[str, _Outbox] = {}
        self._answers: dict[str, asyncio.Queue[SessionOutput | SessionEnded]] = {}
        self._samplers: dict[str, Sampler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._sleeping_until = float("-inf")
        self._changed = asyncio.Event()
        self._connecting: set[str] = set()
        """Addresses being dialled now."""
        self._dialling: set[str] = set()
        """Advertised peers (node ids) that a task dials until they link or go."""
        self._link_error = link_error
        self._backoff = dial_backoff or DialBackoff()
        self.compute = ComputeRunner(runtime, worker, self._samplers, settings.debug_delay_s,
                                     on_outcome=self._job_finished, after_run=self._pump,
                                     entry_work=lambda ms: self.core.entry_work_measured(ms),
                                     stages=lambda: len(self.core.active_plan.node_ids) if self.core.active_plan else 1)
        """The core's jobs, run on the worker one run (a batch of steps) at a time."""
        self._on_model_id = on_model_id
        self._faults = peer_faults or PeerFaults()
        """What each peer's messages made a handler raise: the link layer's bad-frame budget
        (5 in 10 s by default); a peer over it is dropped as one that sends bad frames."""
        self._timer_failed_at = float("-inf")
        self.tune = TuneRunner(self.node_id, runtime, worker, state_dir=state_dir, settings=tune_settings,
                               pump=self._pump, log_event=log_event, adapter_finished=self.serve_adapter,
                               hello=lambda: self.hello)
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
                self._handle_timers(time.monotonic())
                self._pump()
        finally:
            self.core.stop("the daemon is stopping")
            self._pump()
            self._tasks.cancel()
            self.tune.close()

    def _next_timer(self) -> float | None:
        timers = [t for t in (self.core.next_timer(), self.tune.next_timer()) if t is not None]
        if not timers:
            return None
        # after a timer that failed, not again at once (its deadline may still be due)
        return max(min(timers), self._timer_failed_at + TIMER_RETRY_S)

    def _handle_timers(self, now: float) -> None:
        """The cores' timers. One that raises (a state a peer's input left behind) is logged,
        and the node carries on."""
        for handle in (self.core.handle_timer, self.tune.handle_timer):
            try:
                handle(now)
            except Exception:  # noqa: BLE001 - no input from a peer may end the node
                self._timer_failed_at = now
                log.exception("a timer of the mesh failed; carrying on")

    async def _measure_links(self) -> None:
        """Hand the core what the links measured, every report interval."""
        while True:
            await asyncio.sleep(self.settings.report_interval_s)
            peers = self.links.peers()
            self.core.links_measured({peer: self.links.link_stats(peer) for peer in peers}, time.monotonic())
            self._pump()

    def _pump(self) -> None:
        """Carry out what the cores asked for: sends, jobs, events."""
        core, tune = self.core, self.tune
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
                outbox = self._outboxes[send.dest] = _Outbox(send.dest, self.links, self._sent, self._tasks,
                                                             self._link_error)
            outbox.put(send)
        for job in core.jobs():
            self.compute.add(job)
        self.compute.run_next()
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
        tune_events = tune.drain()
        for event in tune_events:
            if isinstance(event, Logged):
                self._log_event(event.kind, event.message)
        if tune_events:
            self._on_change()
        nxt = self._next_timer()
        if nxt is not None and nxt < self._sleeping_until:
            self._wake.set()

    def _sent(self, send: Send, nbytes: int) -> None:
        if send.positions:
            self.core.sent(send.positions, nbytes)

    # -- compute ---------------------------------------------------------------------------------

    def _job_finished(self, job: Job, outcome: object, now: float) -> None:
        if isinstance(outcome, BaseException):
            # the model refused the step (a cache out of step, too many sessions) or failed:
            # the core decides (refuse the step, replay the answer); the node carries on
            log.info("job %s failed: %s: %s", type(job).__name__, type(outcome).__name__, outcome,
                     exc_info=None if isinstance(outcome, (ValueError, RuntimeError)) else outcome)
            self.core.job_failed(job.job_id, f"{type(outcome).__name__}: {outcome}", now)
            return
        try:
            self.core.job_done(job.job_id, outcome, now)
        except Exception:  # noqa: BLE001 - what a peer sent may make its outcome fail
            log.exception("the outcome of job %s failed here; carrying on", type(job).__name__)

    # -- links -----------------------------------------------------------------------------------

    def on_link_up(self, peer_id: str, hello: wire.Hello) -> None:
        # linked, so compatible: what an older record of it said (another key, say) is stale
        for name in [n for n, entry in self.incompatible.items() if entry["id"] == peer_id]:
            del self.incompatible[name]
        self.core.link_up(peer_id, hello, time.monotonic())
        self._pump()

    def on_link_down(self, peer_id: str, reason: str) -> None:
        outbox = self._outboxes.pop(peer_id, None)
        if outbox is not None:
            outbox.close()
        self.core.link_down(peer_id, reason, time.monotonic())
        self._pump()
        if reason == "bye":  # it left (its mDNS goodbye may have come while it was linked)
            self._advertised.forget(peer_id)
        if self.node_id < peer_id and peer_id in self._advertised:
            # a link lost while discovery still sees the peer (a blip, or a peer that died and
            # whose record lingers): discovery says nothing new, so the dialling side links
            # again by itself, with backoff
            self._keep_dialling(peer_id, first_wait_s=self._backoff.first_delay_s)

    def on_message(self, sender: str, msg: wire.Message) -> None:
        """A message from a peer. Whatever a handler raises is logged and counted against the
        peer's bad-frame budget, per message: no input from a peer ends the daemon."""
        now = time.monotonic()
        try:
            if isinstance(msg, TUNE_MESSAGES):
                self.tune.receive(sender, msg, now)
            else:
                self.core.receive(sender, msg, now)
        except Exception as error:  # noqa: BLE001 - a peer's input must not end the node
            if self._faults.failed(sender, type(msg).__name__, error, now):
                self._log_event("error", f"dropping {self.core.name_of(sender)}: its messages keep failing here "
                                         f"({type(error).__name__})")
                self.links.drop(sender, "too many bad frames")
        self._pump()

    # -- answers typed here -------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Token | StateChange]:
        """Answer one prompt across the mesh; this node is its entry node.

        Raises MeshUnavailable when the mesh cannot answer (no plan in time, too little
        memory, steps that keep failing)."""
        session = self.runtime.engine.new_session(prompt_ids, params)
        if self._drafting_mode() != "off":
            session.drafting = policy_for(self.speculate, has_draft_model=self.runtime.draft is not None)
        queue: asyncio.Queue[SessionOutput | SessionEnded] = asyncio.Queue()
        session_id = self.core.open_session(session, time.monotonic())
        self._answers[session_id] = queue
        self._samplers[session_id] = Sampler(params)
        self._pump()
        ended = False
        drafting: tuple[int, int, int] | None = None
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
                if isinstance(event.item, Token) and event.item.speculation is not None:
                    drafting = event.item.speculation
                yield event.item
        finally:
            if drafting is not None:
                self._drafting.append(drafting)
            if not ended:  # the listener left: forget the answer everywhere
                self.core.close_session(session_id)
                self._pump()
            self._answers.pop(session_id, None)
            self._samplers.pop(session_id, None)
            self.compute.forget(session_id)

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

    async def wait_active_plan(self) -> None:
        """Until a plan is active: the mesh can answer."""
        while self.core.active_plan is None:
            await self.wait_changed()

    def health(self) -> tuple[object | None, str | None]:
        """The key of the active plan (None: none) and the planner's error (None: none): what
        the local fallback follows (`daemon.node.fallback.MeshHealth`)."""
        active = self.core.active_plan
        return (active.key if active is not None else None, self.core.placement_error)

    # -- finding peers ------------------------------------------------------------------------------

    def peer_seen(self, name: str, address: str, theirs: wire.Hello, refused: str | None = None) -> None:
        """Discovery sees a node: its instance `name`, its signaling HOST:PORT and the hello
        its record carries. A compatible one is linked to (the lower node id dials). `refused`:
        a reason found outside the hello (its record's mesh key id is another's)."""
        if theirs.node_id == self.node_id:
            return
        reason = refused or incompatibility(self.hello, theirs)
        if reason is not None and theirs.node_id in self.links.peers():
            return  # an old (or spoofed) record of a member: its link is authenticated, mDNS is not
        if reason is not None:
            if self.incompatible.get(name, {}).get("reason") != reason:
                self._log_event("info", f"{name} is incompatible: {reason}")
            self.incompatible[name] = {"name": name, "address": address, "reason": reason, "id": theirs.node_id}
            self._on_change()
            return
        self.incompatible.pop(name, None)
        self._advertised.seen(theirs.node_id, address, linked=theirs.node_id in self.links.peers())
        if self.node_id < theirs.node_id and theirs.node_id not in self.links.peers():
            self._keep_dialling(theirs.node_id)

    def peer_gone(self, name: str, node_id: str | None) -> None:
        """Discovery no longer sees the node `name` (a goodbye, or its record expired). A link
        that is up stays (mDNS is unauthenticated): heartbeats and `Bye` end links."""
        self.incompatible.pop(name, None)
        if node_id and not self._advertised.gone(node_id, linked=node_id in self.links.peers()):
            log.info("%s left mDNS while linked: its link decides whether it is gone", name)
        self._on_change()

    @property
    def dialling(self) -> frozenset[str]:
        """The advertised peers a task is dialling now (until they link or go)."""
        return frozenset(self._dialling)

    def _keep_dialling(self, peer_id: str, first_wait_s: float = 0.0) -> None:
        """Dial an advertised peer until it links, or discovery no longer sees it (one task
        per peer)."""
        if peer_id in self._dialling:
            return
        self._dialling.add(peer_id)
        self._tasks.spawn(self._dial_until_linked(peer_id, first_wait_s), f"dial {peer_id}")

    async def _dial_until_linked(self, peer_id: str, wait_s: float) -> None:
        """Dial, then wait out the backoff (at least its first delay: the address may be
        dialled by another task right now), until linked or no longer advertised."""
        try:
            while True:
                await asyncio.sleep(wait_s)
                if peer_id in self.links.peers():
                    return
                address = self._advertised.next_address(peer_id)
                if address is None:
                    return
                if self._backoff.may_dial(address, time.monotonic()) and await self._dial(address) == peer_id:
                    self._advertised.reached(peer_id, address)
                    return
                wait_s = max(self._backoff.first_delay_s, self._backoff.wait_s(address, time.monotonic()))
        finally:
            self._dialling.discard(peer_id)

    async def _dial(self, address: str) -> str | None:
        """Link to the node at `address`: its node id, or None (failed, or being dialled). A
        failure is logged once per run of failures; the dial that ends a run is logged too."""
        if address in self._connecting:
            return None
        self._connecting.add(address)
        try:
            peer = await self.links.connect(address)
        except self._link_error as e:
            backoff = self._backoff
            if backoff.failed(address, time.monotonic()):
                self._log_event("error", f"cannot link to {address}: {e}; trying again with backoff "
                                         f"(at most every {backoff.max_delay_s:g} s)")
            else:
                log.debug("cannot link to %s again: %s", address, e)
            return None
        finally:
            self._connecting.discard(address)
        failures = self._backoff.succeeded(address)
        if failures:
            self._log_event("info", f"linked to {address} again after {failures} failed "
                                    f"{'try' if failures == 1 else 'tries'}")
        return peer

    async def keep_joined(self, address: str, retry_s: float = 2.0) -> None:
        """--join HOST:PORT: link to that peer, and again whenever the link is gone (with
        backoff while it cannot be reached)."""
        peer: str | None = None
        while True:
            if (peer is None or peer not in self.links.peers()) \
                    and self._backoff.may_dial(address, time.monotonic()):
                peer = await self._dial(address)
            await asyncio.sleep(retry_s)

    # -- status --------------------------------------------------------------------------------------

    def status_view(self) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md)."""
        view = self.core.status_view(self.links.rtt_ms)
        view["incompatible"] = sorted(self.incompatible.values(), key=lambda d: d["name"])
        view["tune"] = self.tune.status_view()
        view["compute"] = self.compute.status_view()
        view["speculation"] = self._speculation_view()
        return view

    def _drafting_mode(self) -> str:
        """`--speculate` as this node applies it: with batch-invariant kernels as asked; on f32
        only when asked by name (`auto` does not: a loss would then replay the answer instead
        of rebuilding it from the logs); never where fallen drafts cannot be cut off."""
        runtime = self.runtime
        if runtime.batch_invariant or (runtime.can_draft and self.speculate != "auto"):
            return self.speculate
        return "off"

    def _speculation_view(self) -> dict[str, object]:
        """`/v1/status`'s "speculation": the mode in force and the last answers' figures."""
        drafted, accepted, trips = (sum(d[i] for d in self._drafting) for i in range(3))
        return {"mode": self._drafting_mode(),
                "answers": len(self._drafting),
                "acceptance": round(accepted / drafted, 3) if drafted else None,
                "tokens_per_trip": round((accepted + trips) / trips, 2) if trips else None,
                "draft_ms_per_token": None if self.runtime.draft is None or self.runtime.draft.ms_per_token is None
                else round(self.runtime.draft.ms_per_token, 2)}

    # -- adapters ----------------------------------------------------------------------------------

    async def serve_adapter(self, adapter: "Adapter | None") -> None:
        """Serve base plus `adapter` (None: the base alone) from now on, on this node's layers:
        a finished tune job does this on every member at once. The model id gains the adapter's
        digest, so a node that did not take the adapter up cannot join this mesh."""
        from dataclasses import replace

        runtime = self.runtime
        await self.worker.call(lambda: runtime.set_adapter(adapter))
        model_id = runtime.mesh_model_id
        if model_id != self.hello.model_id:
            self.hello = replace(self.hello, model_id=model_id)
            self.core.serving_model(self.hello)
            self._on_model_id(self.hello)
        self._log_event("info", f"serving {'the base model' if adapter is None else 'adapter ' + adapter.digest}"
                                f" (model id {model_id})")
        self._on_change()
