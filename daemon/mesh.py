"""The mesh side of a node: election over links, plans, stages and sessions that cross the mesh.

It owns no socket: it sends through a `Links` object (the WebRTC `LinkManager`, or an
in-memory one in tests) and is told what arrives through `on_message`, `on_link_up` and
`on_link_down`. Torch work goes to the node's single worker thread; the event loop only
moves hidden states between it and the links.

A node alone is a mesh of one: it elects itself, plans all layers onto itself, and answers
through the very same path, so single-node and multi-node answers share their code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from meshllm import election as el
from meshllm import wire
from meshllm.balance import BalanceSettings, Balancer
from meshllm.errors import MeshllmError, PlacementError, WireError
from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.planner import ModelSpec, NodeCapacity, Plan as PlannerPlan, Stage as PlannerStage, plan_layers
from meshllm.plans import PlanBook, PlanKey, PlanView
from meshllm.session import StateChange, Token

from daemon.worker import GenerationWorker
from daemon.tasks import TaskSet

if TYPE_CHECKING:
    from daemon.links import LinkManager


log = logging.getLogger(__name__)

MAX_STEP_RETRIES = 4
"""Consecutive failed steps of one session under one plan before the request fails."""


class Links(Protocol):
    """What the mesh needs from the link layer."""

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int: ...

    def peers(self) -> dict[str, wire.Hello]: ...

    def rtt_ms(self, peer_id: str) -> float | None: ...


class MeshUnavailable(MeshllmError):
    """The mesh cannot answer now (no active plan in time, or too little memory)."""


class StepLost(Exception):
    """A step did not come back: a stage was lost, the plan changed, or a stage refused it."""


@dataclass
class _Pending:
    """A step sent down the chain, waiting for its Result."""

    future: asyncio.Future[np.ndarray]
    plan_key: PlanKey
    nodes: frozenset[str]
    last_stage: str
    codec: str
    positions: int


@dataclass
class StageStats:
    """What this node computed and sent, for `meshllm bench` and runtime balancing.

    Decode steps (one position) are kept apart from prefill steps (many positions).
    """

    decode_steps: int = 0
    decode_compute_ms: float = 0.0
    prefill_steps: int = 0
    prefill_compute_ms: float = 0.0
    prefill_positions: int = 0
    decode_hops_sent: int = 0
    decode_bytes_sent: int = 0
    prefill_bytes_sent: int = 0
    recent_decode_ms: list[float] = field(default_factory=list)
    """The last few decode compute times (ms), newest last."""

    def computed(self, positions: int, ms: float) -> None:
        if positions == 1:
            self.decode_steps += 1
            self.decode_compute_ms += ms
            self.recent_decode_ms = (self.recent_decode_ms + [ms])[-32:]
        else:
            self.prefill_steps += 1
            self.prefill_positions += positions
            self.prefill_compute_ms += ms

    def sent(self, positions: int, nbytes: int) -> None:
        if positions == 1:
            self.decode_hops_sent += 1
            self.decode_bytes_sent += nbytes
        else:
            self.prefill_bytes_sent += nbytes

    def as_json(self) -> dict[str, float | int]:
        return {
            "decode_steps": self.decode_steps,
            "decode_compute_ms_avg": round(self.decode_compute_ms / self.decode_steps, 4) if self.decode_steps else 0.0,
            "prefill_steps": self.prefill_steps,
            "prefill_positions": self.prefill_positions,
            "prefill_compute_ms": round(self.prefill_compute_ms, 3),
            "decode_hops_sent": self.decode_hops_sent,
            "decode_bytes_per_hop": round(self.decode_bytes_sent / self.decode_hops_sent, 1) if self.decode_hops_sent else 0.0,
            "prefill_bytes_sent": self.prefill_bytes_sent,
        }


@dataclass(frozen=True)
class MeshSettings:
    objective: str = "throughput"
    codec: str = "f32"
    election_timeout_s: float = 0.5
    plan_wait_s: float = 30.0
    """How long a request waits for an active plan before it fails."""
    replan_debounce_s: float = 0.1
    debug_delay_s: float = 0.0
    """Testing aid: sleep before every step this node computes, as a slow device would."""
    step_timeout_s: float = 120.0
    """A step whose result has not come back after this long is lost (no hangs)."""
    report_interval_s: float = 1.0
    """How often a stage reports its measured decode speed to the coordinator."""
    balance: BalanceSettings = BalanceSettings()


def incompatibility(ours: wire.Hello, theirs: wire.Hello) -> str | None:
    """Why a peer cannot join our mesh, or None when it can."""
    if theirs.protocol_version != ours.protocol_version:
        return f"protocol version {theirs.protocol_version} != {ours.protocol_version}"
    if theirs.mesh_name != ours.mesh_name:
        return f"mesh name {theirs.mesh_name!r} != {ours.mesh_name!r}"
    if theirs.model_id != ours.model_id:
        return f"model {theirs.model_id} != {ours.model_id}"
    return None


def encode_hidden(hidden: np.ndarray, codec: str) -> wire.TensorPayload:
    """A hidden state for the wire. zstd is tried on prompts (many positions), where it can
    pay; a decode step's one position barely compresses (docs/wire-format.md), so it goes raw."""
    return wire.encode_tensor(hidden, codec, compress="auto" if hidden.shape[0] > 1 else False)


EventLogger = Callable[[str, str], None]
"""(kind, message): kind is join, leave, election, replan, error or info."""


class Mesh:
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
    ) -> None:
        self.hello = hello
        self.node_id = hello.node_id
        self.runtime = runtime
        self.worker = worker
        self.links = links
        self.settings = settings
        self._on_change = on_change
        self._log_event = log_event
        self.election = el.Election(
            self.node_id, self._score(hello), timeout_s=settings.election_timeout_s
        )
        self.book = PlanBook()
        self.members: dict[str, wire.Hello] = {self.node_id: hello}
        self.ready_nodes: set[str] = set()
        self.placement_error: str | None = None
        self._epoch = 0
        self.leaving: set[str] = set()
        """Nodes that asked to leave (coordinator side): planned around, then let go."""
        self.balancer = Balancer(self.spec_for(runtime), objective=settings.objective,  # type: ignore[arg-type]
                                 settings=settings.balance)
        """Coordinator side: measured stage speeds against the plan (runtime balancing)."""
        self._next_report = 0.0
        self._leaving_self = False
        self._published: wire.Plan | None = None
        """Coordinator side: the last plan this node published."""
        """Set once this node is leaving: it plans and loads nothing more."""
        self._reported = (0, 0.0)
        self._plan_changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._replan_due: float | None = None
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._session_ids = itertools.count()
        self._tasks = TaskSet('mesh')
        self._changed = asyncio.Event()
        self.incompatible: dict[str, dict[str, str]] = {}
        """Discovered peers that cannot join, by instance name: address and reason."""
        self._connecting: set[str] = set()
        self.stats = StageStats()
        self.spec = self.spec_for(runtime)

    # -- lifecycle -----------------------------------------------------------------------

    @staticmethod
    def _score(hello: wire.Hello) -> float:
        if not hello.can_coordinate:
            return -1.0
        return hello.mem_budget_bytes / 1e9 / max(hello.ms_per_layer, 1e-3)

    async def run(self) -> None:
        """Drive timers (election, debounced re-plans) until cancelled."""
        self.election.start(time.monotonic())
        await self._flush_election()
        try:
            while True:
                now = time.monotonic()
                deadlines = [d for d in (self.election.next_timer(), self._replan_due, self._next_report)
                             if d is not None]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                self._wake.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                now = time.monotonic()
                timer = self.election.next_timer()
                if timer is not None and timer <= now:
                    self.election.handle_timer(now)
                await self._flush_election()
                if self._replan_due is not None and self._replan_due <= now:
                    self._replan_due = None
                    await self._replan()
                if self._next_report <= now:
                    await self._report_speed(now)
        finally:
            self._tasks.cancel()
            for p in self._pending.values():
                if not p.future.done():
                    p.future.set_exception(StepLost("the node is stopping"))

    def _notify_change(self) -> None:
        self._changed.set()
        self._on_change()

    async def wait_changed(self) -> None:
        """Until the mesh state changes (membership, election, plans)."""
        self._changed.clear()
        await self._changed.wait()

    # -- links ---------------------------------------------------------------------------

    def on_link_up(self, peer_id: str, hello: wire.Hello) -> None:
        self.members[peer_id] = hello
        if self.is_coordinator and self._published is not None and self._published.term == self.election.term:
            # a newcomer that the next plan leaves out must still learn the plan in force
            self._tasks.spawn(self._tell_plan(peer_id, self._published))
        self.election.peer_up(peer_id, self._score(hello), time.monotonic())
        self._log_event("join", f"{hello.name or peer_id} joined")
        self._schedule_replan()
        self._wake.set()
        self._notify_change()

    def on_link_down(self, peer_id: str, reason: str) -> None:
        hello = self.members.pop(peer_id, None)
        if hello is None:
            return
        self.ready_nodes.discard(peer_id)
        self.leaving.discard(peer_id)
        self.balancer.forget(peer_id)
        self.election.peer_lost(peer_id, time.monotonic())
        self._log_event("leave", f"{hello.name or peer_id} left ({reason})")
        for key, p in list(self._pending.items()):
            if peer_id in p.nodes and not p.future.done():
                p.future.set_exception(StepLost(f"{peer_id} lost"))
        if self.book.forget_node(peer_id):
            self._plan_changed.set()
        # sessions whose entry node left: their user is gone
        prefix = f"{peer_id}/"
        for sid in self.runtime.shard.session_ids:
            if sid.startswith(prefix):
                self._tasks.spawn(self.worker.call(lambda s=sid: self.runtime.drop(s)))
        self._schedule_replan()
        self._wake.set()
        self._notify_change()

    def on_message(self, sender: str, msg: wire.Message) -> None:
        """Everything that arrives from a peer. Never raises: bad input is logged and dropped."""
        try:
            self._dispatch(sender, msg)
        except (WireError, ValueError) as e:
            log.warning("rejected %s from %s: %s", type(msg).__name__, sender, e)

    def _dispatch(self, sender: str, msg: wire.Message) -> None:
        now = time.monotonic()
        if isinstance(msg, wire.Election):
            self.election.receive(sender, el.ElectionMsg(msg.term, msg.candidate_id, msg.score), now)
        elif isinstance(msg, wire.Answer):
            self.election.receive(sender, el.AnswerMsg(msg.term, msg.node_id), now)
        elif isinstance(msg, wire.Coordinator):
            self.election.receive(sender, el.CoordinatorMsg(msg.term, msg.node_id), now)
        elif isinstance(msg, wire.Plan):
            self._on_plan(sender, msg)
        elif isinstance(msg, wire.StageReady):
            self._on_stage_ready(msg)
        elif isinstance(msg, wire.PlanActive):
            self._on_plan_active(msg)
        elif isinstance(msg, wire.Forward):
            self._tasks.spawn(self._on_forward(sender, msg))
        elif isinstance(msg, wire.Result):
            self._on_result(sender, msg)
        elif isinstance(msg, wire.StepFailed):
            self._fail_step(msg.session_id, msg.seq, f"{sender}: {msg.code}: {msg.message}")
        elif isinstance(msg, wire.DropSession):
            if msg.session_id.startswith(f"{sender}/"):
                self._tasks.spawn(self.worker.call(lambda: self.runtime.drop(msg.session_id)))
        elif isinstance(msg, wire.NodeReport):
            self._on_report(sender, msg)
        elif isinstance(msg, wire.PlanRefused):
            self.placement_error = msg.reason
            self._plan_changed.set()
            self._notify_change()
        else:
            log.debug("ignoring %s from %s", type(msg).__name__, sender)
        self._wake.set()

    async def _send(self, dest: str, msg: wire.Message, *, channel: str = "control") -> int:
        """Send to a peer (or hand to this node itself); the encoded bytes that went out."""
        if dest == self.node_id:
            self.on_message(self.node_id, msg)
            return 0
        return await self.links.send(dest, msg, channel=channel)

    async def _broadcast(self, msg: wire.Message, *, include_self: bool = True) -> None:
        for peer in list(self.members):
            if peer == self.node_id and not include_self:
                continue
            try:
                await self._send(peer, msg)
            except Exception as e:  # noqa: BLE001 - one dead link must not stop a broadcast
                log.warning("could not send %s to %s: %s", type(msg).__name__, peer, e)

    # -- election ------------------------------------------------------------------------

    async def _flush_election(self) -> None:
        for dest, m in self.election.outbox():
            if isinstance(m, el.ElectionMsg):
                msg: wire.Message = wire.Election(m.term, m.candidate_id, m.score)
            elif isinstance(m, el.AnswerMsg):
                msg = wire.Answer(m.term, m.node_id)
            else:
                msg = wire.Coordinator(m.term, m.node_id)
            if dest == el.BROADCAST:
                await self._broadcast(msg, include_self=False)
            else:
                try:
                    await self._send(dest, msg)
                except Exception as e:  # noqa: BLE001 - the election copes with lost messages
                    log.debug("election message to %s not sent: %s", dest, e)
        for event in self.election.events():
            if isinstance(event, el.CoordinatorElected):
                who = self.members.get(event.node_id)
                name = who.name if who else event.node_id
                self._log_event("election", f"{name} is coordinator (term {event.term})")
                if event.node_id == self.node_id:
                    self._schedule_replan(now=True)
            self._notify_change()

    # -- coordinator ---------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.election.coordinator_id == self.node_id

    def _schedule_replan(self, now: bool = False) -> None:
        if not self.is_coordinator:
            return
        due = time.monotonic() + (0.0 if now else self.settings.replan_debounce_s)
        if self._replan_due is None or due < self._replan_due:
            self._replan_due = due
        self._wake.set()

    async def _replan(self) -> None:
        if not self.is_coordinator or self._leaving_self:
            return
        caps = self.balancer.capacities([c for c in self._advertised() if c.node_id not in self.leaving])
        current = self.book.active or self.book.pending
        previous = None
        if current is not None:  # sticky: keep what the nodes hold, even under a new coordinator
            previous = PlannerPlan(tuple(PlannerStage(n, a, b) for n, a, b in current.stages), 0.0)
        try:
            if not caps:
                raise PlacementError("no node is left to hold the model", 0)
            planned = plan_layers(
                self.spec, caps, objective=self.settings.objective,  # type: ignore[arg-type]
                previous=previous,
            )
        except PlacementError as e:
            self.placement_error = str(e)
            self._log_event("error", f"cannot place the model: {e}")
            await self._broadcast(wire.PlanRefused(self.election.term, str(e)[:1000]))
            return
        self.placement_error = None
        if previous is not None and planned.stages == previous.stages and current is not None \
                and current.key[0] == self.election.term:
            return  # the plan in force (made in this term) is still the best one
        await self._publish(planned)

    async def _tell_plan(self, peer_id: str, plan: wire.Plan) -> None:
        active = self.book.active
        try:
            await self._send(peer_id, plan)
            if active is not None and active.key == (plan.term, plan.epoch):
                await self._send(peer_id, wire.PlanActive(plan.term, plan.epoch))
        except Exception as e:  # noqa: BLE001 - the peer went again; nothing to tell
            log.debug("could not tell %s the plan: %s", peer_id, e)

    async def _publish(self, planned: PlannerPlan) -> None:
        self._epoch += 1
        stages = tuple(wire.Stage(s.node_id, s.start_layer, s.end_layer) for s in planned.stages)
        msg = wire.Plan(self.election.term, self._epoch, stages, self.settings.codec)
        self._published = msg
        spans = ", ".join(f"{self._name(s.node_id)} [{s.start_layer}, {s.end_layer})" for s in stages)
        self._log_event("replan", f"plan {self.election.term}.{self._epoch}: {spans}")
        await self._broadcast(msg)

    def _on_report(self, sender: str, msg: wire.NodeReport) -> None:
        if msg.node_id != sender:
            raise ValueError("a node may only report for itself")
        if msg.state == "leaving" and sender not in self.leaving:
            self.leaving.add(sender)
            self._log_event("leave", f"{self._name(sender)} is leaving: handing its layers over")
            self._schedule_replan(now=True)
        elif msg.state == "ready" and self.is_coordinator and self.book.active is not None:
            layers = msg.span_end - msg.span_start
            now = time.monotonic()
            self.balancer.observe(sender, msg.ms_per_layer * layers, layers,
                                  steps=self.settings.balance.min_steps, now=now)
            rebalance = self.balancer.check(
                [c for c in self._advertised() if c.node_id not in self.leaving], now)
            if rebalance is not None:
                names = ", ".join(self._name(n) for n in rebalance.changed)
                self._log_event("replan", f"rebalancing: {names} runs off its planned speed "
                                          f"({100 * rebalance.gain:.0f}% better plan)")
                self._tasks.spawn(self._publish(rebalance.plan))

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Hand this node's layers over before going: ask the coordinator for a plan without
        it and wait (at most `timeout_s`) until that plan is active. Sessions elsewhere replay
        onto it between two tokens, so nobody waits for a heartbeat timeout."""
        if len(self.members) <= 1 or self.election.coordinator_id is None:
            return
        report = wire.NodeReport(self.node_id, self.election.term, self.hello.mem_budget_bytes,
                                 self.hello.ms_per_layer, *self.runtime.span, "leaving")
        try:
            await self._send(self.election.coordinator_id, report)
        except Exception as e:  # noqa: BLE001 - then peers notice the Bye instead
            log.info("could not announce leaving: %s", e)
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = self.book.active
            if active is not None and self.node_id not in active.node_ids:
                self._leaving_self = True
                return
            if self.placement_error is not None:
                return  # the others cannot hold the model without this node
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    await self.wait_changed()
            except TimeoutError:
                break
        self._leaving_self = True
        log.warning("leaving before the others took over this node's layers")

    def _advertised(self) -> list[NodeCapacity]:
        return [NodeCapacity(nid, h.mem_budget_bytes, h.ms_per_layer) for nid, h in sorted(self.members.items())]

    @staticmethod
    def spec_for(runtime: Runtime) -> ModelSpec:
        shape = runtime.engine.shape
        return ModelSpec(shape.num_layers, shape.layer_bytes, shape.embed_head_bytes)

    async def _report_speed(self, now: float) -> None:
        """Stage side: tell the coordinator how fast this node's span really runs.

        Only after at least a few decode steps since the last report, so that each report
        is an average of real work."""
        self._next_report = now + self.settings.report_interval_s
        plan = self.book.active
        start, end = self.runtime.span
        coordinator = self.election.coordinator_id
        steps, total_ms = self.stats.decode_steps, self.stats.decode_compute_ms
        d_steps, d_ms = steps - self._reported[0], total_ms - self._reported[1]
        if plan is None or coordinator is None or end == start or d_steps < self.settings.balance.min_steps:
            return
        self._reported = (steps, total_ms)
        report = wire.NodeReport(self.node_id, self.election.term, self.hello.mem_budget_bytes,
                                 d_ms / d_steps / (end - start), start, end, "ready")
        try:
            await self._send(coordinator, report)
        except Exception as e:  # noqa: BLE001 - a lost coordinator is handled by the election
            log.debug("speed report not sent: %s", e)

    def _name(self, node_id: str) -> str:
        h = self.members.get(node_id)
        return h.name if h and h.name else node_id

    def _on_stage_ready(self, msg: wire.StageReady) -> None:
        if not self.is_coordinator:
            return
        if self.book.mark_ready((msg.term, msg.epoch), msg.node_id):
            self._tasks.spawn(self._broadcast(wire.PlanActive(msg.term, msg.epoch)))

    # -- every node: plans ---------------------------------------------------------------

    def _on_plan(self, sender: str, msg: wire.Plan) -> None:
        view = PlanView(
            key=(msg.term, msg.epoch),
            stages=tuple((s.node_id, s.start_layer, s.end_layer) for s in msg.stages),
            codec=msg.codec,
            coordinator_id=sender,
        )
        if view.stages[0][1] != 0 or view.stages[-1][2] != self.spec.num_layers:
            raise ValueError(f"plan does not cover [0, {self.spec.num_layers})")
        if not self.book.offer(view, self.election.term):
            log.info("ignoring plan %s from %s (have seen %s)", view.key, sender, self.book.highest_key)
            return
        self.placement_error = None
        self._plan_changed.set()
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(StepLost("a new plan arrived"))
        self._tasks.spawn(self._adopt(view))
        self._notify_change()

    async def _adopt(self, view: PlanView) -> None:
        if self._leaving_self:
            return  # on the way out: load nothing
        start, end = view.span_of(self.node_id)
        await self.worker.call(lambda: self.runtime.load_span(start, end))
        if self.book.pending is not view:
            return  # a newer plan came while loading
        if self.node_id in view.node_ids:
            try:
                await self._send(view.coordinator_id, wire.StageReady(view.key[0], view.key[1], self.node_id))
            except Exception as e:  # noqa: BLE001 - a lost coordinator: the next one re-plans
                log.info("could not report ready to %s: %s", view.coordinator_id, e)
        self._notify_change()

    def _on_plan_active(self, msg: wire.PlanActive) -> None:
        plan = self.book.activate((msg.term, msg.epoch))
        if plan is None:
            return
        if self.is_coordinator:
            self.balancer.plan_active(
                PlannerPlan(tuple(PlannerStage(n, a, b) for n, a, b in plan.stages), 0.0), time.monotonic())
        self._reported = (self.stats.decode_steps, self.stats.decode_compute_ms)
        self.ready_nodes = set(plan.node_ids)
        self._plan_changed.set()
        self._notify_change()

    # -- stage side ----------------------------------------------------------------------

    def _decode_hidden(self, payload: wire.TensorPayload, codec: str, positions: int | None = None) -> np.ndarray:
        """A hidden-state tensor from a peer, checked against the model and the plan."""
        return wire.decode_tensor(payload, expect_shape=(positions, self.runtime.hidden_size),
                                  expect_codec=codec)

    async def _on_forward(self, sender: str, msg: wire.Forward) -> None:
        entry = msg.route[-1] if msg.route else sender
        log.debug("%s: forward %s/%d from %s", self.node_id, msg.session_id, msg.seq, sender)
        plan = self.book.active
        try:
            if plan is None or plan.key != (msg.term, msg.epoch):
                raise StepLost(f"plan {msg.term}.{msg.epoch} is not active here")
            if self.node_id not in plan.node_ids:
                raise StepLost("this node holds no layers in the active plan")
            if not msg.route or any(n not in plan.node_ids and n != entry for n in msg.route):
                raise ValueError("route names nodes outside the plan")
            if not msg.session_id.startswith(f"{entry}/"):
                raise ValueError("session id does not belong to its entry node")
            hidden = self._decode_hidden(msg.hidden, plan.codec)
            if msg.start_pos + hidden.shape[0] > self.runtime.engine.info.max_positions:
                raise ValueError("step runs past the model's context window")
            t0 = time.perf_counter()
            if self.settings.debug_delay_s:
                await asyncio.sleep(self.settings.debug_delay_s)
            out = await self.worker.call(lambda: self.runtime.forward(msg.session_id, hidden, msg.start_pos))
            self.stats.computed(hidden.shape[0], (time.perf_counter() - t0) * 1000)
        except (StepLost, ValueError, WireError, RuntimeError) as e:
            code = "stale_plan" if isinstance(e, StepLost) else "bad_step"
            log.info("step %s/%d refused: %s", msg.session_id, msg.seq, e)
            try:
                await self._send(entry, wire.StepFailed(msg.session_id, msg.seq, code, str(e)[:500]))
            except Exception as send_error:  # noqa: BLE001 - the entry may be gone too
                log.debug("could not report failed step to %s: %s", entry, send_error)
            return
        payload = encode_hidden(out, plan.codec)
        nxt = msg.route[0]
        if len(msg.route) == 1:
            reply: wire.Message = wire.Result(msg.session_id, msg.seq, payload)
        else:
            reply = wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos, payload, msg.route[1:])
        try:
            sent = await self._send(nxt, reply, channel="activation")
        except Exception as e:  # noqa: BLE001 - the next stage's loss is handled by link events
            log.info("could not pass step %s/%d to %s: %s", msg.session_id, msg.seq, nxt, e)
            return
        if sent:
            self.stats.sent(hidden.shape[0], sent)

    # -- entry side ----------------------------------------------------------------------

    def _on_result(self, sender: str, msg: wire.Result) -> None:
        p = self._pending.get((msg.session_id, msg.seq))
        if p is None or p.future.done():
            return
        if sender != p.last_stage:
            raise ValueError(f"result for {msg.session_id} from {sender}, not from the last stage")
        try:
            hidden = self._decode_hidden(msg.hidden, p.codec, p.positions)
        except WireError as e:  # the step is lost; the session replays
            p.future.set_exception(StepLost(f"bad result from {sender}: {e}"))
            return
        p.future.set_result(hidden)

    def _fail_step(self, session_id: str, seq: int, reason: str) -> None:
        p = self._pending.get((session_id, seq))
        if p is not None and not p.future.done():
            p.future.set_exception(StepLost(reason))

    async def _wait_active(self) -> PlanView:
        deadline = time.monotonic() + self.settings.plan_wait_s
        while True:
            if self.book.active is not None:
                return self.book.active
            if self.placement_error is not None:
                raise MeshUnavailable(f"the mesh cannot hold the model: {self.placement_error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeshUnavailable("no active plan: the mesh is still forming or re-planning")
            self._plan_changed.clear()
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await self._plan_changed.wait()
            except TimeoutError:
                pass

    async def _run_chain(self, plan: PlanView, session_id: str, seq: int, start_pos: int,
                         hidden: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        key = (session_id, seq)
        self._pending[key] = _Pending(future, plan.key, frozenset(plan.node_ids), plan.node_ids[-1],
                                      plan.codec, hidden.shape[0])
        try:
            route = tuple(plan.node_ids[1:]) + (self.node_id,)
            payload = encode_hidden(hidden, plan.codec)
            msg = wire.Forward(session_id, seq, plan.key[0], plan.key[1], start_pos, payload, route)
            try:
                sent = await self._send(plan.node_ids[0], msg, channel="activation")
            except Exception as e:  # noqa: BLE001 - a dead first hop: the step is lost
                raise StepLost(f"cannot reach {plan.node_ids[0]}: {e}") from e
            if sent:
                self.stats.sent(hidden.shape[0], sent)
            try:
                async with asyncio.timeout(self.settings.step_timeout_s):
                    return await future
            except TimeoutError:
                raise StepLost(f"no result after {self.settings.step_timeout_s:.0f} s") from None
        finally:
            self._pending.pop(key, None)

    def new_session_id(self) -> str:
        return f"{self.node_id}/{next(self._session_ids)}"

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[Token | StateChange]:
        """Answer one prompt across the mesh; this node is its entry node."""
        session = self.runtime.engine.new_session(prompt_ids, params)
        session.session_id = self.new_session_id()
        sampler = Sampler(params)
        plan_key: PlanKey | None = None
        seq = 0
        failures = 0
        paused = False
        try:
            while (step := session.next_step()) is not None:
                if should_stop():
                    yield session.cancel()
                    return
                if self.book.active is None and not paused:
                    paused = True
                    yield StateChange("replanning")
                plan = await self._wait_active()
                if plan_key is not None and plan.key != plan_key:
                    session.restart()  # caches live on the old plan's stages: replay
                    failures = 0
                    plan_key = plan.key
                    continue
                plan_key = plan.key
                log.debug("entry %s step %d pos %d plan %s", session.session_id, seq, step.start_pos, plan.key)
                hidden = await self.worker.call(lambda: self.runtime.embed(list(step.token_ids)))
                try:
                    out = await self._run_chain(plan, session.session_id, seq, step.start_pos, hidden)
                except StepLost as e:
                    failures += 1
                    log.info("session %s step %d lost: %s", session.session_id, seq, e)
                    if failures > MAX_STEP_RETRIES:
                        raise MeshUnavailable(f"steps keep failing: {e}") from e
                    if not paused:
                        paused = True
                        yield StateChange("replanning")
                    session.restart()  # failures count up only while the plan stays the same
                    seq += 1
                    continue
                seq += 1
                if paused and not session.replaying():
                    paused = False
                    yield StateChange("running")
                if step.replay:
                    session.step_done()
                    continue
                token_id = await self.worker.call(lambda: self.runtime.head_sample(out, sampler))
                failures = 0  # progress: a new token (replayed steps do not count)
                yield session.accept(token_id)
        finally:
            self._tasks.spawn(self._drop_everywhere(session.session_id))

    async def _drop_everywhere(self, session_id: str) -> None:
        plan = self.book.active
        for nid in plan.node_ids if plan is not None else ():
            try:
                await self._send(nid, wire.DropSession(session_id))
            except Exception as e:  # noqa: BLE001 - a gone stage has dropped it anyway
                log.debug("drop of %s on %s not sent: %s", session_id, nid, e)

    # -- finding peers --------------------------------------------------------------------

    def on_discovery(self, event: object, links: "LinkManager") -> None:
        """A discovery event: link to compatible peers (the lower node id dials)."""
        from daemon.discovery import BadRecord, PeerGone, PeerSeen, hello_from_txt

        if isinstance(event, PeerGone):
            self.incompatible.pop(event.name, None)
            if event.node_id and event.node_id in self.members:
                links.drop(event.node_id, "mdns goodbye")
            self._notify_change()
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
            self._notify_change()
            return
        self.incompatible.pop(event.name, None)
        if self.node_id < event.node_id and event.node_id not in links.peers():
            self._tasks.spawn(self._dial(event.address, links))

    async def _dial(self, address: str, links: "LinkManager") -> str | None:
        from daemon.links import LinkError

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

    # -- status ----------------------------------------------------------------------------

    def status_view(self) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md)."""
        return {
            "term": self.election.term,
            "coordinator_id": self.election.coordinator_id,
            "plan": self.status_plan(),
            "nodes": self.status_nodes(),
            "incompatible": sorted(self.incompatible.values(), key=lambda d: d["name"]),
            "codec": self.settings.codec,
            "placement_error": self.placement_error,
            "stats": self.stats.as_json(),
        }


    def status_nodes(self) -> list[dict[str, object]]:
        plan = self.book.active or self.book.pending
        rows = []
        for nid, h in sorted(self.members.items(), key=lambda kv: (kv[0] != self.node_id, kv[0])):
            span = plan.span_of(nid) if plan is not None else (0, 0)
            rows.append({
                "id": nid,
                "name": h.name,
                "is_self": nid == self.node_id,
                "role": "coordinator" if nid == self.election.coordinator_id else "member",
                "state": "ready" if nid in self.ready_nodes or (
                    self.book.active is not None and nid not in self.book.active.node_ids) else "loading",
                "mem_budget_bytes": h.mem_budget_bytes,
                "ms_per_layer": h.ms_per_layer,
                "span": list(span) if span != (0, 0) else None,
                # every node holds the embedding and head, plus the layers of its span
                "weight_bytes": (span[1] - span[0]) * self.spec.layer_bytes + self.spec.embed_head_bytes,
                "rtt_ms": None if nid == self.node_id else self.links.rtt_ms(nid),
                "address": None,  # the status board fills in this node's own API address
            })
        return rows

    def status_plan(self) -> dict[str, object] | None:
        plan = self.book.active or self.book.pending
        if plan is None:
            return None
        return {
            "term": plan.key[0],
            "epoch": plan.key[1],
            "state": "active" if plan is self.book.active else "pending",
            "stages": [{"node_id": n, "start_layer": s, "end_layer": e} for n, s, e in plan.stages],
            "codec": plan.codec,
        }
