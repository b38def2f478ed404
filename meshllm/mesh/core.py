"""`MeshCore`: the mesh state machine of one node, sans-IO.

Inputs, each with `now`: `start`, `link_up`, `link_down`, `receive`, `handle_timer`,
`job_done` / `job_failed`, `links_measured` (the link figures, about once a second), and for
answers typed here `open_session` / `cancel_session` / `close_session`; `leave` before going.
Outputs, drained by the driver: `sends()`, `jobs()`, `events()`, and `next_timer()`.

What it holds:
- membership and the bully election (`meshllm.mesh.election`);
- plans (`PlanBook`): adopt, load, report ready, activate;
- measurements: every member's LinkReport (its links, entry costs, measured token times);
- on the coordinator: planning (by measured links and latency targets, docs/placement.md),
  re-planning on joins, leaves and losses, on links that changed, and balancing;
- on a stage: the checks of every forwarded step, and a bound on the steps queued for compute;
- on the entry node: its answers' policy (`meshllm.mesh.entry`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from meshllm.mesh import election as el
from meshllm import wire
from meshllm.placement.balance import BalanceSettings, Balancer
from meshllm.errors import PlacementError, WireError
from meshllm.mesh.entry import EntrySessions
from meshllm.placement.linkstats import LinkStats
from meshllm.mesh import measured as ms
from meshllm.mesh.events import Channel, Event, LogKind, Logged, Send, SessionEnded, SessionOutput, StatusChanged
from meshllm.mesh.jobs import Compute, Computed, DropSessions, ImportCache, Job, LoadSpan, Loaded, RebuildPart
from meshllm.mesh.stats import StageStats
from meshllm.placement.planner import ModelSpec, NodeCapacity, Plan as PlannerPlan, plan_layers
from meshllm.mesh.plans import PlanBook, PlanView
from meshllm.mesh.session import Session, Token

log = logging.getLogger(__name__)

PLAN_TOLERANCE = 0.05
"""A re-plan keeps what the nodes hold when that is within this fraction of the best plan."""


@dataclass(frozen=True)
class MeshSettings:
    objective: str = "throughput"
    codec: str = "f32"
    election_timeout_s: float = 0.5
    plan_wait_s: float = 30.0
    """How long an answer waits for an active plan before it fails."""
    replan_debounce_s: float = 0.1
    debug_delay_s: float = 0.0
    """Testing aid (the driver applies it): a delay before every step this node's layers run,
    as a slow device would take."""
    step_timeout_s: float = 120.0
    """A step whose result has not come back after this long is lost (no hangs)."""
    report_interval_s: float = 1.0
    """How often a stage reports its measured decode speed to the coordinator."""
    max_queued_steps: int = 64
    """Forwarded steps waiting for this node's compute; more are refused ("busy")."""
    max_queued_rebuild_parts: int = 1024
    """Rebuild parts waiting for this node's compute; more are refused ("busy")."""
    handover_wait_s: float = 5.0
    """How long a node that takes over layers from a live node waits for their caches
    before it reports ready without them (they are then rebuilt, or replayed)."""
    balance: BalanceSettings = field(default_factory=BalanceSettings)
    target_ms_per_token: float | None = None
    """Latency target (coordinator): the plan with the fewest stages predicted to decode
    within this many ms per token (docs/placement.md)."""
    target_ttft_ms: float | None = None
    """Latency target for the first token of a typical prompt."""
    head_ms: float = 0.0
    """This node's own work per token as an entry node (embed, head, sample), measured."""
    prefill_ms_per_layer: float | None = None
    """One layer over a typical prompt on this node, measured (None: not measured)."""
    batch_invariant: bool = False
    """This node's numerics are batch-invariant (its runtime's `batch_invariant`: the weight
    format's kernels give a position the same bits alone, in a chunk or in a batch). Every
    node of a mesh runs the same model id, weight format included, so as an entry node it
    plans its answers' rebuilds by its own numerics: parts of up to
    `rebuild.INVARIANT_PART_POSITIONS`, each run by a stage in one pass, and a full replay in
    steps as large; False keeps the original chunking (meshllm.mesh.rebuild)."""

    def __post_init__(self) -> None:
        for name in ("target_ms_per_token", "target_ttft_ms"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= wire.messages.MAX_REPORT_MS):
                raise ValueError(f"{name} must be in (0, {wire.messages.MAX_REPORT_MS:g}], got {value}")


def incompatibility(ours: wire.Hello, theirs: wire.Hello) -> str | None:
    """Why a peer cannot join our mesh, or None when it can."""
    if theirs.protocol_version != ours.protocol_version:
        return f"protocol version {theirs.protocol_version} != {ours.protocol_version}"
    if theirs.mesh_name != ours.mesh_name:
        return f"mesh name {theirs.mesh_name!r} != {ours.mesh_name!r}"
    if theirs.model_id != ours.model_id:
        return f"model {theirs.model_id} != {ours.model_id}"
    return None


def election_score(hello: wire.Hello) -> float:
    """Who should coordinate: memory per unit of compute time; -1 for a node that cannot."""
    if not hello.can_coordinate:
        return -1.0
    return hello.mem_budget_bytes / 1e9 / max(hello.ms_per_layer, 1e-3)


@dataclass(frozen=True)
class _StageStep:
    """A forwarded step (or rebuild part) computing here, and where its output goes."""

    msg: wire.Forward | wire.Rebuild
    plan: PlanView


@dataclass(frozen=True)
class ModelLimits:
    """What a forwarded hidden state (and a handed-over cache) must fit."""

    hidden_size: int
    max_positions: int
    kv_heads: int = 0
    """Keys and values are (kv_heads, positions, head_dim); 0: not checked."""
    head_dim: int = 0


class MeshCore:
    def __init__(self, hello: wire.Hello, spec: ModelSpec, limits: ModelLimits,
                 settings: MeshSettings = MeshSettings()) -> None:
        self.hello = hello
        self.node_id = hello.node_id
        self.spec = spec
        self.limits = limits
        self.settings = settings
        self.election = el.Election(self.node_id, election_score(hello), timeout_s=settings.election_timeout_s)
        self.book = PlanBook()
        self.members: dict[str, wire.Hello] = {self.node_id: hello}
        self.ready_nodes: set[str] = set()
        self.placement_error: str | None = None
        self.leaving: set[str] = set()
        """Coordinator side: nodes that asked to leave; planned around, then let go."""
        self.balancer = Balancer(spec, objective=settings.objective,  # type: ignore[arg-type]
                                 settings=settings.balance)
        self.stats = StageStats()
        self.span: tuple[int, int] = (0, 0)
        """The layers this node holds (once loaded)."""
        self.entry = EntrySessions(self)
        self.measurements = ms.Measurements(self.node_id)
        self.tokens = ms.TokenClock()
        """Times between the tokens of the answers entered here."""
        self._planned_hops: Mapping[tuple[str, str], float] | None = None
        """The decode hop table the coordinator last planned with."""
        self._planned_entries: tuple[str, ...] = ()
        """...and the entry nodes in use then."""
        self._links_replan_at = -math.inf
        self._trips_seen: dict[str, int] = {}
        """Coordinator: token gaps of each entry node's reports already judged (this plan)."""
        self._target_miss_said: tuple[int, int] | None = None
        self._entry_work: deque[float] = deque(maxlen=ms.ENTRY_WORK_WINDOW)
        """This node's own work per token as an entry node, timed on its answers."""
        self._epoch = 0
        self._seen_plan_key: tuple[int, int] = (0, 0)
        """The highest (term, epoch) of any plan seen, adopted or not."""
        self._seen_stages: tuple[wire.Stage, ...] | None = None
        """The stages of that plan."""
        self._published: wire.Plan | None = None
        self._leaving_self = False
        self._replan_due: float | None = None
        self._replan_soft = False
        """The re-plan due is for measurements only (see `_schedule_replan`)."""
        self._next_report = 0.0
        self._reported = (0, 0.0)
        self._job_ids = 0
        self._loads: dict[int, PlanView] = {}
        self._loaded_view: PlanView | None = None
        """The plan whose span this node loaded last."""
        self._ready_due: PlanView | None = None
        """A plan loaded here whose StageReady waits for the caches handed over to this node."""
        self._awaiting: tuple[tuple[int, int], set[str]] = ((0, 0), set())
        """(plan key, nodes that hand layers over to this node under it)."""
        self._handovers_done: dict[tuple[int, int], set[str]] = {}
        self._unhanded: tuple[tuple[int, int], tuple[tuple[str, int, np.ndarray, np.ndarray], ...]] | None = None
        """The span held before a load whose plan was superseded while it ran, and the caches
        it gave up: handed over when the load of the newer plan completes."""
        self._links_down: dict[str, int] = {}
        """How many times each peer's link went down: a peer that came back holds no caches."""
        self._loaded_links: dict[str, int] = {}
        """`_links_down` when this node loaded `_loaded_view`."""
        self._handover_deadline: float | None = None
        self._stage_steps: dict[int, _StageStep] = {}
        self._stage_rebuilds: dict[int, _StageStep] = {}
        self._rebuild_ms: dict[tuple[str, int], float] = {}
        """Compute time of the rebuilds running here, by (session, seq)."""
        self._stage_sessions: set[str] = set()
        """Sessions of other entry nodes whose caches this node may hold."""
        self._sends: list[Send] = []
        self._jobs: list[Job] = []
        self._events: list[Event] = []
        self._now = 0.0
        """The time of the input being handled (for what it triggers on this node itself)."""

    # -- outputs -------------------------------------------------------------------------

    def sends(self) -> list[Send]:
        out, self._sends = self._sends, []
        return out

    def jobs(self) -> list[Job]:
        out, self._jobs = self._jobs, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def next_timer(self) -> float | None:
        deadlines = [self.election.next_timer(), self._replan_due, self.entry.next_timer(), self._handover_deadline]
        if self.book.active is not None and self.span[1] > self.span[0]:
            deadlines.append(self._next_report)
        return min((d for d in deadlines if d is not None), default=None)

    # -- state ---------------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.election.coordinator_id == self.node_id

    @property
    def coordinator_id(self) -> str | None:
        return self.election.coordinator_id

    @property
    def leave_settled(self) -> bool:
        """After `leave`: the others hold every layer without this node, or cannot at all."""
        active = self.book.active
        return (active is not None and self.node_id not in active.node_ids) or self.placement_error is not None

    @property
    def active_plan(self) -> PlanView | None:
        """The plan this node serves answers on now, if any."""
        return self.book.active

    def serving_model(self, hello: wire.Hello) -> None:
        """This node now serves another model id (a tune job's adapter was taken up): its own
        member record carries it from now on."""
        self.hello = hello
        self.members[self.node_id] = hello

    def name_of(self, node_id: str) -> str:
        h = self.members.get(node_id)
        return h.name if h and h.name else node_id

    # -- inputs: lifecycle and links ---------------------------------------------------------

    def start(self, now: float) -> None:
        self._now = now
        self.election.start(now)
        self._next_report = now + self.settings.report_interval_s
        self._flush_election(now)

    def link_up(self, peer_id: str, hello: wire.Hello, now: float) -> None:
        self._now = now
        self.members[peer_id] = hello
        self.election.peer_up(peer_id, election_score(hello), now)
        self._log("join", f"{hello.name or peer_id} joined")
        self._flush_election(now)  # a coordinator announces itself first: plans come from it
        if self.is_coordinator and self._published is not None and self._published.term == self.election.term:
            # a newcomer that the next plan leaves out must still learn the plan in force
            self.send(peer_id, self._published)
            active = self.book.active
            if active is not None and active.key == (self._published.term, self._published.epoch):
                self.send(peer_id, wire.PlanActive(*active.key))
        self._schedule_replan(now)
        self._changed()

    def link_down(self, peer_id: str, reason: str, now: float) -> None:
        self._now = now
        hello = self.members.pop(peer_id, None)
        if hello is None:
            return
        self.ready_nodes.discard(peer_id)
        self.leaving.discard(peer_id)
        self.balancer.forget(peer_id)
        self.measurements.forget(peer_id)
        self._trips_seen.pop(peer_id, None)
        self._links_down[peer_id] = self._links_down.get(peer_id, 0) + 1
        self._awaiting[1].discard(peer_id)  # its caches are gone with it
        self._maybe_ready()
        self.election.peer_lost(peer_id, now)
        self._log("leave", f"{hello.name or peer_id} left ({reason})")
        plan_void = self.book.forget_node(peer_id)
        self.entry.node_lost(peer_id, now)
        if plan_void:
            self.entry.plan_changed(now)
        prefix = f"{peer_id}/"  # sessions whose entry node left: their user is gone
        orphans = tuple(sid for sid in self._stage_sessions if sid.startswith(prefix))
        if orphans:
            self._drop_local(orphans)
        self._flush_election(now)
        self._schedule_replan(now)
        self._changed()

    def leave(self, now: float) -> bool:
        """Ask the coordinator for a plan without this node. False when there is nobody to
        hand over to; then watch `leave_settled`, and call `stop_loading` when done waiting."""
        self._now = now
        coordinator = self.election.coordinator_id
        if len(self.members) <= 1 or coordinator is None:
            return False
        self.send(coordinator, wire.NodeReport(self.node_id, self.election.term, self.hello.mem_budget_bytes,
                                               self.hello.ms_per_layer, *self.span, "leaving"))
        return True

    def stop_loading(self) -> None:
        """On the way out: adopt no more plans."""
        self._leaving_self = True

    def stop(self, reason: str) -> None:
        self.entry.stop(reason)

    # -- inputs: measurements ------------------------------------------------------------------

    def links_measured(self, stats: Mapping[str, LinkStats | None], now: float) -> None:
        """What this node's links measured (``LinkManager.link_stats`` of each peer), about
        once a second: kept, and sent to every member with this node's other figures in a
        LinkReport (docs/placement.md)."""
        self._now = now
        self.measurements.own_links = {peer: figures for peer, figures in stats.items()
                                       if figures is not None and peer in self.members and peer != self.node_id}
        report = self._own_report(now)
        self.measurements.reports[self.node_id] = report
        for peer in list(self.members):
            if peer != self.node_id:
                self.send(peer, report)
        self._judge_measurements(self.node_id, report, now)
        self._changed()

    def entry_work_measured(self, ms_per_token: float) -> None:
        """One decode token's work on this node as its entry (embed, head, sample), as the
        driver timed it on the worker: it replaces the start-up figure once there are a few."""
        if ms_per_token >= 0 and math.isfinite(ms_per_token):
            self._entry_work.append(ms_per_token)

    @property
    def head_ms(self) -> float:
        """This node's entry work per token: measured on answers, else at start."""
        if len(self._entry_work) >= ms.MIN_TOKEN_GAPS:
            return statistics.median(self._entry_work)
        return self.settings.head_ms

    def _own_report(self, now: float) -> wire.LinkReport:
        active = self.book.active
        term, epoch = active.key if active is not None else (0, 0)
        links = [figures for figures in (ms.figures_of(peer, stats)
                                         for peer, stats in sorted(self.measurements.own_links.items()))
                 if figures is not None][:wire.messages.MAX_LINKS]
        cap = wire.messages.MAX_REPORT_MS

        def ms_or_0(value: float | None) -> float:
            return min(cap, value) if value is not None and value >= 0 and math.isfinite(value) else 0.0

        span_ms = self.stats.span_ms_per_layer(self.span, self.settings.balance.min_steps)
        return wire.LinkReport(
            self.node_id, term, epoch, ms_or_0(self.head_ms), ms_or_0(self.settings.prefill_ms_per_layer),
            ms_or_0(span_ms), ms_or_0(self.tokens.ms_per_token), self.tokens.count, self.tokens.is_entry(now),
            ms_or_0(self.settings.target_ms_per_token), ms_or_0(self.settings.target_ttft_ms), tuple(links))

    # -- inputs: messages ----------------------------------------------------------------------

    def receive(self, sender: str, msg: wire.Message, now: float) -> None:
        """Everything that arrives from a peer. Never raises: bad input is logged and dropped."""
        self._now = now
        try:
            self._dispatch(sender, msg, now)
        except (WireError, ValueError) as e:
            log.warning("rejected %s from %s: %s", type(msg).__name__, sender, e)

    def _dispatch(self, sender: str, msg: wire.Message, now: float) -> None:
        if isinstance(msg, wire.Forward):
            self._on_forward(sender, msg, now)
        elif isinstance(msg, wire.Result):
            self.entry.result(sender, msg, now)
        elif isinstance(msg, wire.Rebuild):
            self._on_rebuild(sender, msg, now)
        elif isinstance(msg, wire.Rebuilt):
            self.entry.rebuilt(sender, msg, now)
        elif isinstance(msg, wire.StepFailed):
            self.entry.step_failed(sender, msg, now)
        elif isinstance(msg, (wire.Election, wire.Answer, wire.Coordinator)):
            self._on_election(sender, msg, now)
        elif isinstance(msg, wire.Plan):
            # even a plan refused here tells a future coordinator which epochs this term used,
            # and what the nodes hold (its first plan keeps that: nothing moves for nothing)
            if (msg.term, msg.epoch) > self._seen_plan_key and msg.stages[0].start_layer == 0 \
                    and msg.stages[-1].end_layer == self.spec.num_layers:
                self._seen_stages = msg.stages
            self._seen_plan_key = max(self._seen_plan_key, (msg.term, msg.epoch))
            self._check_from_coordinator(sender, msg.term, "a plan")
            self._on_plan(sender, msg, now)
        elif isinstance(msg, wire.StageReady):
            if msg.node_id != sender:
                raise ValueError("a node may only report itself ready")
            self._on_stage_ready(msg)
        elif isinstance(msg, wire.PlanActive):
            self._check_from_coordinator(sender, msg.term, "a plan activation")
            self._activate(msg, now)
        elif isinstance(msg, wire.DropSession):
            if msg.session_id.startswith(f"{sender}/") and msg.session_id in self._stage_sessions:
                self._drop_local((msg.session_id,))
        elif isinstance(msg, wire.NodeReport):
            self._on_report(sender, msg, now)
        elif isinstance(msg, wire.LinkReport):
            if msg.node_id != sender:
                raise ValueError("a node may only report its own measurements")
            self.measurements.reports[sender] = msg
            self._judge_measurements(sender, msg, now)
        elif isinstance(msg, wire.CacheHandover):
            self._on_cache_handover(sender, msg)
        elif isinstance(msg, wire.HandoverDone):
            if msg.node_id != sender:
                raise ValueError("a node may only report its own hand-over done")
            if (msg.term, msg.epoch) >= self.book.highest_key:
                for key in [k for k in self._handovers_done if k < self.book.highest_key]:
                    del self._handovers_done[key]
                self._handovers_done.setdefault((msg.term, msg.epoch), set()).add(sender)
                self._maybe_ready()
        elif isinstance(msg, wire.PlanRefused):
            self._check_from_coordinator(sender, msg.term, "a refusal to plan")
            self.placement_error = msg.reason
            self.entry.plan_changed(now)
            self._changed()
        else:
            log.debug("ignoring %s from %s", type(msg).__name__, sender)

    def _check_from_coordinator(self, sender: str, term: int, what: str) -> None:
        """Plans and their outcomes come only from the coordinator of the term they name."""
        if sender != self.election.coordinator_id or term != self.election.term:
            raise ValueError(f"{what} for term {term} from {sender}, which is not its coordinator")

    # -- inputs: timers and jobs -----------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        self._now = now
        timer = self.election.next_timer()
        if timer is not None and timer <= now:
            self.election.handle_timer(now)
            self._flush_election(now)
        if self._replan_due is not None and self._replan_due <= now:
            self._replan_due = None
            self._replan(now)
        if self._next_report <= now:
            self._report_speed(now)
        if self._handover_deadline is not None and self._handover_deadline <= now:
            self._handover_deadline = None
            waiting = self._awaiting[1] - self._handovers_done.get(self._awaiting[0], set())
            if self._ready_due is not None and waiting:
                self._log("info", f"no cache hand-over from {', '.join(sorted(map(self.name_of, waiting)))} "
                                  f"in {self.settings.handover_wait_s:.0f} s: ready without it")
            self._awaiting = (self._awaiting[0], set())
            self._maybe_ready()
        self.entry.handle_timer(now)

    def job_done(self, job_id: int, result: Computed | Loaded | None, now: float) -> None:
        """A job issued by `jobs()` finished; `result` for a `Compute` or `RebuildPart` job
        (a `Computed`) and for a `LoadSpan` job (a `Loaded`)."""
        self._now = now
        if job_id in self._loads:
            self._loaded(self._loads.pop(job_id), result if isinstance(result, Loaded) else Loaded())
        elif job_id in self._stage_steps:
            assert isinstance(result, Computed)
            self._stage_step_done(self._stage_steps.pop(job_id), result)
        elif job_id in self._stage_rebuilds:
            assert isinstance(result, Computed)
            self._stage_rebuild_done(self._stage_rebuilds.pop(job_id), result)
        elif isinstance(result, Computed):
            self.entry.job_done(job_id, result, now)

    def job_failed(self, job_id: int, reason: str, now: float) -> None:
        self._now = now
        if job_id in self._loads:
            view = self._loads.pop(job_id)
            self._log("error", f"cannot load layers {view.span_of(self.node_id)}: {reason}")
        elif job_id in self._stage_steps:
            step = self._stage_steps.pop(job_id)
            log.info("step %s/%d failed here: %s", step.msg.session_id, step.msg.seq, reason)
            self._refuse(step.msg, "bad_step", reason)
        elif job_id in self._stage_rebuilds:
            step = self._stage_rebuilds.pop(job_id)
            self._rebuild_ms.pop((step.msg.session_id, step.msg.seq), None)
            self._refuse(step.msg, "no_log", reason)  # the entry node replays the session instead
        else:
            self.entry.job_failed(job_id, reason, now)

    # -- inputs: answers typed here ----------------------------------------------------------------

    def open_session(self, session: Session, now: float) -> str:
        """Start answering `session` (this node is its entry node); its id."""
        self._now = now
        self.tokens.opened(now)
        return self.entry.open(session, now)

    def cancel_session(self, session_id: str, now: float) -> None:
        self._now = now
        self.entry.cancel(session_id, now)

    def close_session(self, session_id: str) -> None:
        self.entry.close(session_id)

    # -- helpers the entry side uses ---------------------------------------------------------------

    def next_job_id(self) -> int:
        self._job_ids += 1
        return self._job_ids

    def add_job(self, job: Job) -> None:
        self._jobs.append(job)

    def emit(self, event: Event) -> None:
        if isinstance(event, SessionOutput):
            item = event.item
            if isinstance(item, Token) and item.id >= 0 and item.finish_reason != "cancelled":
                self.tokens.token(event.session_id, self._now)
            else:
                self.tokens.pause(event.session_id)
        elif isinstance(event, SessionEnded):
            self.tokens.pause(event.session_id)
        self._events.append(event)

    def send(self, dest: str, msg: wire.Message, *, channel: Channel = "control", positions: int = 0) -> None:
        """Queue a message for a peer; one for this node is handled at once, without a link."""
        if dest == self.node_id:
            self._dispatch_local(msg)
        elif dest in self.members:
            self._sends.append(Send(dest, msg, channel, positions))
        elif isinstance(msg, (wire.Forward, wire.Rebuild)) and msg.route:
            # no link to the next stage (yet, or any more): the step is lost; say so at once
            # rather than let its entry node wait out the step timeout
            self._refuse(msg, "stale_plan", f"no link from {self.node_id} to {dest}")

    def decode_hidden(self, payload: wire.TensorPayload, codec: str, positions: int | None = None) -> np.ndarray:
        """A hidden-state tensor from a peer, checked against the model and the plan."""
        return wire.decode_tensor(payload, expect_shape=(positions, self.limits.hidden_size), expect_codec=codec)

    @staticmethod
    def encode_hidden(hidden: np.ndarray, codec: str) -> wire.TensorPayload:
        """zstd is tried on prompts (many positions), where it can pay; a decode step's one
        position barely compresses (docs/wire-format.md), so it goes raw."""
        return wire.encode_tensor(hidden, codec, compress="auto" if hidden.shape[0] > 1 else False)

    def drop_everywhere(self, session_id: str) -> None:
        plan = self.book.active
        for nid in plan.node_ids if plan is not None else ():
            if nid == self.node_id:
                self._drop_local((session_id,))
            else:
                self.send(nid, wire.DropSession(session_id))

    def log_step_lost(self, session_id: str, seq: int, reason: str) -> None:
        log.info("session %s step %d lost: %s", session_id, seq, reason)

    # -- internals ---------------------------------------------------------------------------------

    def _dispatch_local(self, msg: wire.Message) -> None:
        """Messages this node sends itself (plans, activation, reports as coordinator)."""
        if isinstance(msg, wire.Plan):
            self._adopt_plan(self.node_id, msg, self._now)
        elif isinstance(msg, wire.StageReady):
            self._on_stage_ready(msg)
        elif isinstance(msg, wire.PlanActive):
            self._activate(msg, self._now)
        elif isinstance(msg, wire.PlanRefused):
            self.placement_error = msg.reason
            self._changed()
        elif isinstance(msg, wire.NodeReport):
            self._note_report(self.node_id, msg, self._now)
        elif isinstance(msg, wire.StepFailed):  # a step of this node's own answer, refused here
            self.entry.step_failed(self.node_id, msg, self._now)
        # election messages, drops and forwarded steps are never sent to this node itself

    def _drop_local(self, session_ids: tuple[str, ...]) -> None:
        self._stage_sessions.difference_update(session_ids)
        self._jobs.append(DropSessions(self.next_job_id(), session_ids))

    def _log(self, kind: LogKind, message: str) -> None:
        self._events.append(Logged(kind, message))

    def _changed(self) -> None:
        self._events.append(StatusChanged())

    def _broadcast(self, msg: wire.Message, *, include_self: bool = True) -> None:
        for peer in list(self.members):
            if include_self or peer != self.node_id:
                self.send(peer, msg)

    # -- election ----------------------------------------------------------------------------------

    def _on_election(self, sender: str, msg: wire.Message, now: float) -> None:
        # a node campaigns, answers and claims only for itself
        claimed = msg.candidate_id if isinstance(msg, wire.Election) else msg.node_id  # type: ignore[attr-defined]
        if claimed != sender:
            raise ValueError(f"{type(msg).__name__} for {claimed} from {sender}")
        if isinstance(msg, wire.Election):
            self.election.receive(sender, el.ElectionMsg(msg.term, msg.candidate_id, msg.score), now)
        elif isinstance(msg, wire.Answer):
            self.election.receive(sender, el.AnswerMsg(msg.term, msg.node_id), now)
        elif isinstance(msg, wire.Coordinator):
            self.election.receive(sender, el.CoordinatorMsg(msg.term, msg.node_id), now)
        self._flush_election(now)

    def _flush_election(self, now: float) -> None:
        for dest, m in self.election.outbox():
            if isinstance(m, el.ElectionMsg):
                msg: wire.Message = wire.Election(m.term, m.candidate_id, m.score)
            elif isinstance(m, el.AnswerMsg):
                msg = wire.Answer(m.term, m.node_id)
            else:
                msg = wire.Coordinator(m.term, m.node_id)
            if dest == el.BROADCAST:
                self._broadcast(msg, include_self=False)
            else:
                self.send(dest, msg)
        for event in self.election.events():
            if isinstance(event, el.CoordinatorElected):
                self._log("election", f"{self.name_of(event.node_id)} is coordinator (term {event.term})")
                if event.node_id == self.node_id:
                    self._schedule_replan(now, at_once=True)
            self._changed()

    # -- coordinator -------------------------------------------------------------------------------

    def _schedule_replan(self, now: float, at_once: bool = False, *, measured: bool = False) -> None:
        """A re-plan soon. ``measured``: only because measurements changed; such a re-plan
        moves layers only for a gain of ``balance.min_gain`` (hysteresis), unless a re-plan for
        another reason (membership) comes with it."""
        if not self.is_coordinator:
            return
        if not measured:
            self._replan_soft = False
        elif self._replan_due is None:
            self._replan_soft = True
        due = now + (0.0 if at_once else self.settings.replan_debounce_s)
        if self._replan_due is None or due < self._replan_due:
            self._replan_due = due

    def _advertised(self) -> list[NodeCapacity]:
        """Every member that stays: its budget, its advertised speed and the entry costs it
        reported."""
        return [self.measurements.capacity(NodeCapacity(nid, h.mem_budget_bytes, h.ms_per_layer))
                for nid, h in sorted(self.members.items()) if nid not in self.leaving]

    def _planning(self, targets: tuple[float | None, float | None] | None = None) -> ms.Planning:
        """The planner's inputs from what the members measured: hop tables (none before the
        first measurement), the entry nodes in use, and the targets (this node's own)."""
        members = [nid for nid in sorted(self.members) if nid not in self.leaving]
        target_ms, target_ttft = targets if targets is not None else (
            self.settings.target_ms_per_token, self.settings.target_ttft_ms)
        return ms.planning(self.measurements.link_stats(members), codec=self.settings.codec,
                           hidden_size=self.limits.hidden_size, members=members,
                           entry_ids=self._entries(members),
                           target_ms_per_token=target_ms, target_ttft_ms=target_ttft)

    def _entries(self, members: list[str]) -> tuple[str, ...]:
        """The members that entered answers lately (this node: as of now, not its last report)."""
        others = [nid for nid in self.measurements.entries(members) if nid != self.node_id]
        if self.node_id in members and self.tokens.is_entry(self._now):
            others.append(self.node_id)
        return tuple(sorted(others))

    def _replan(self, now: float, *, soft: bool | None = None) -> None:
        """Plan (or re-plan, sticky to what the nodes hold); ``soft``: a re-plan for measurements
        only, within ``balance.min_gain`` of the best rather than PLAN_TOLERANCE."""
        soft = self._replan_soft if soft is None else soft
        self._replan_soft = False
        if not self.is_coordinator or self._leaving_self:
            return
        caps = self.balancer.capacities(self._advertised())
        current = self.book.active or self.book.pending
        # sticky: keep what the nodes hold, even under a new coordinator (one that just joined
        # knows the plan in force only from the plans it saw and refused)
        stages = current.stages if current is not None else self._seen_stages
        previous = PlannerPlan(stages, 0.0) if stages is not None else None
        planning = self._planning()
        try:
            if not caps:
                raise PlacementError("no node is left to hold the model", 0)
            planned = plan_layers(self.spec, caps, objective=self.settings.objective,  # type: ignore[arg-type]
                                  previous=previous, **planning.kwargs(),  # type: ignore[arg-type]
                                  tolerance=self.settings.balance.min_gain if soft else PLAN_TOLERANCE)
            self._planned_hops = planning.hop_ms
            self._planned_entries = planning.entries_in_use
        except PlacementError as e:
            self.placement_error = str(e)
            self._log("error", f"cannot place the model: {e}")
            self._broadcast(wire.PlanRefused(self.election.term, str(e)[:1000]))
            self.entry.plan_changed(now)
            return
        self.placement_error = None
        if previous is not None and planned.stages == previous.stages and current is not None \
                and current.key[0] == self.election.term:
            return  # the plan in force (made in this term) is still the best one
        self._publish(planned)

    def _publish(self, planned: PlannerPlan) -> None:
        # Nodes that started apart may each have coordinated this term alone: the new plan
        # must outrank every plan of the term seen here, or the others would ignore it.
        term, seen_epoch = max(self.book.highest_key, self._seen_plan_key)
        self._epoch = max(self._epoch, seen_epoch if term == self.election.term else 0) + 1
        msg = wire.Plan(self.election.term, self._epoch, tuple(planned.stages), self.settings.codec)
        self._published = msg
        spans = ", ".join(f"{self.name_of(s.node_id)} [{s.start_layer}, {s.end_layer})" for s in msg.stages)
        summary = ms.plan_summary(planned) if self._planned_hops or (
            self.settings.target_ms_per_token or self.settings.target_ttft_ms) else ""
        self._log("replan", f"plan {self.election.term}.{self._epoch}: {spans}" + (f" ({summary})" if summary else ""))
        self._broadcast(msg)

    def _on_stage_ready(self, msg: wire.StageReady) -> None:
        if self.is_coordinator and self.book.mark_ready((msg.term, msg.epoch), msg.node_id):
            self._broadcast(wire.PlanActive(msg.term, msg.epoch))

    def _on_report(self, sender: str, msg: wire.NodeReport, now: float) -> None:
        if msg.node_id != sender:
            raise ValueError("a node may only report for itself")
        self._note_report(sender, msg, now)

    def _note_report(self, sender: str, msg: wire.NodeReport, now: float) -> None:
        if msg.state == "leaving" and sender not in self.leaving:
            self.leaving.add(sender)
            self._log("leave", f"{self.name_of(sender)} is leaving: handing its layers over")
            self._schedule_replan(now, at_once=True)
        elif msg.state == "ready" and self.is_coordinator and self.book.active is not None:
            layers = msg.span_end - msg.span_start
            self.balancer.observe(sender, msg.ms_per_layer * layers, layers,
                                  steps=self.settings.balance.min_steps, now=now)
            planning = self._planning()
            rebalance = self.balancer.check(self._advertised(), now, **planning.kwargs())
            if rebalance is not None:
                self._planned_hops = planning.hop_ms
                names = ", ".join(self.name_of(n) for n in rebalance.changed)
                self._log("replan", f"rebalancing: {names} runs off its planned speed "
                                    f"({100 * rebalance.gain:.0f}% better plan)")
                self._publish(rebalance.plan)

    def _judge_measurements(self, sender: str, report: wire.LinkReport, now: float) -> None:
        """Coordinator: re-plan when links changed much since the last plan (at most once per
        ``min_interval_s``), or when an entry node's measured ms per token keeps missing the
        target although the plan predicted better (the balancer's hysteresis rules)."""
        if not self.is_coordinator or self._leaving_self:
            return
        planning = self._planning()
        moved = ms.hops_moved(self._planned_hops, planning.hop_ms)
        news = [f"{self.name_of(a)}->{self.name_of(b)}" for a, b in moved[:4]]
        if planning.has_targets and planning.entries_in_use != self._planned_entries:
            news.append("entry nodes " + (", ".join(map(self.name_of, planning.entries_in_use)) or "none"))
        everyone = all(nid in self.measurements.reports for nid in self.members if nid not in self.leaving)
        if news and everyone and now >= self._links_replan_at + self.settings.balance.min_interval_s:
            self._links_replan_at = now
            log.info("measured: %s: re-planning", "; ".join(news))
            self._planned_hops = planning.hop_ms
            self._planned_entries = planning.entries_in_use
            self._schedule_replan(now, measured=True)
        active = self.book.active
        target = self.settings.target_ms_per_token
        if target is None or active is None or (report.term, report.epoch) != active.key \
                or report.ms_per_token <= 0 or not report.entry:
            return
        if report.tokens - self._trips_seen.get(sender, 0) < self.settings.balance.min_steps:
            return
        self._trips_seen[sender] = report.tokens
        caps = self._predicting_caps(active.key)
        predicted = planning.predict(active.stages, caps, entry_ids=[sender])
        if predicted is None:
            return
        self.balancer.observe_trip(sender, report.ms_per_token, predicted[0], target, now)
        missed = self.balancer.target_missed(now)
        if missed is None:
            return
        self.balancer.refresh(now)
        message = (f"{self.name_of(missed)} measures {report.ms_per_token:.1f} ms per token against a target of "
                   f"{target:g} ms (predicted {predicted[0]:.1f}): re-planning from fresh measurements")
        if self._target_miss_said != active.key:  # once a plan in the event log
            self._target_miss_said = active.key
            self._log("replan", message)
        log.info("%s", message)
        self._replan(now, soft=True)

    def _predicting_caps(self, key: tuple[int, int]) -> list[NodeCapacity]:
        """Members as predictions see them: advertised (or balancer) speeds, replaced by what
        each stage measured under plan ``key``, with their entry costs."""
        caps = self.balancer.capacities(self._advertised()) if self.is_coordinator else self._advertised()
        return [self.measurements.measured_speed(cap, key) for cap in caps]

    def _report_speed(self, now: float) -> None:
        """Stage side: tell the coordinator how fast this node's span really runs, once a few
        decode steps ran since the last report, so that each report averages real work."""
        self._next_report = now + self.settings.report_interval_s
        start, end = self.span
        coordinator = self.election.coordinator_id
        steps, total_ms = self.stats.decode_steps, self.stats.decode_compute_ms
        d_steps, d_ms = steps - self._reported[0], total_ms - self._reported[1]
        if self.book.active is None or coordinator is None or end == start \
                or d_steps < self.settings.balance.min_steps:
            return
        self._reported = (steps, total_ms)
        report = wire.NodeReport(self.node_id, self.election.term, self.hello.mem_budget_bytes,
                                 d_ms / d_steps / (end - start), start, end, "ready")
        if coordinator == self.node_id:
            self._note_report(self.node_id, report, now)
        else:
            self.send(coordinator, report)

    # -- every node: plans ---------------------------------------------------------------------------

    def _on_plan(self, sender: str, msg: wire.Plan, now: float) -> None:
        if sender == self.node_id:
            raise ValueError("a plan from this node's own id over a link")
        self._adopt_plan(sender, msg, now)

    def _adopt_plan(self, sender: str, msg: wire.Plan, now: float) -> None:
        view = PlanView(key=(msg.term, msg.epoch), stages=msg.stages, codec=msg.codec, coordinator_id=sender)
        if view.stages[0].start_layer != 0 or view.stages[-1].end_layer != self.spec.num_layers:
            raise ValueError(f"plan does not cover [0, {self.spec.num_layers})")
        before = self.book.active or self.book.pending
        if not self.book.offer(view, self.election.term):
            log.info("ignoring plan %s from %s (have seen %s)", view.key, sender, self.book.highest_key)
            return
        self.placement_error = None
        self.entry.plan_changed(now)
        if not self._leaving_self:
            job = LoadSpan(self.next_job_id(), *view.span_of(self.node_id))
            self._loads[job.job_id] = view
            self._jobs.append(job)
            self._expect_handovers(view, before, now)
        self._changed()

    def _expect_handovers(self, view: PlanView, before: PlanView | None, now: float) -> None:
        """The live nodes whose layers this node takes under `view` hand their caches over:
        its StageReady waits for them (at most `handover_wait_s`). Who held what comes from the
        plan before `view` (a node that just joined loaded none of its own)."""
        old = before or self._loaded_view
        givers: set[str] = set()
        if old is not None:
            start, end = view.span_of(self.node_id)
            held = self.span
            for stage in old.stages:
                overlap = (max(start, stage.start_layer), min(end, stage.end_layer))
                gains = overlap[0] < overlap[1] and not (held[0] <= overlap[0] and overlap[1] <= held[1])
                same_incarnation = self._links_down.get(stage.node_id) == self._loaded_links.get(stage.node_id)
                if gains and stage.node_id != self.node_id and stage.node_id in self.members and same_incarnation:
                    givers.add(stage.node_id)
        self._awaiting = (view.key, givers)
        self._handover_deadline = now + self.settings.handover_wait_s if givers else None

    def _loaded(self, view: PlanView, loaded: Loaded) -> None:
        old_span, self.span = self.span, view.span_of(self.node_id)
        self._loaded_view = view
        self._loaded_links = dict(self._links_down)
        if self.span == (0, 0):
            self._stage_sessions.clear()  # a node out of the plan holds no caches
        if self._unhanded is not None:  # what a superseded plan's load gave up goes out now
            old_span, given = self._unhanded
            loaded = Loaded(given + loaded.handover)
            self._unhanded = None
        if self.book.pending is not view:
            # a newer plan came while loading: its takers want the caches (and the word that
            # they are all sent) under its key, and refuse those of this one
            self._unhanded = (old_span, loaded.handover)
            return
        self._hand_over(view, old_span, loaded)
        self._ready_due = view
        self._maybe_ready()
        self._changed()

    def _hand_over(self, view: PlanView, old_span: tuple[int, int], loaded: Loaded) -> None:
        """Send the caches of the layers this node gave up to their new owners, then tell each
        owner it has them all (a clean leave, a join, a rebalance: nothing to recompute)."""
        owners = {layer: s.node_id for s in view.stages for layer in range(s.start_layer, s.end_layer)}
        for session_id, layer, keys, values in loaded.handover:
            dest = owners.get(layer)
            if dest is not None and dest != self.node_id:
                self.send(dest, wire.CacheHandover(session_id, view.key[0], view.key[1], layer,
                                                   wire.encode_tensor(keys, "f32", compress=False),
                                                   wire.encode_tensor(values, "f32", compress=False)),
                          channel="activation")
        # every stage hears it, not only the owners of the layers this node held: a taker
        # expects hand-overs by the plan before, which this node may never have loaded (it was
        # superseded here first, or refused from a coordinator this node did not follow)
        givees = {owners[layer] for layer in range(*old_span) if owners.get(layer, self.node_id) != self.node_id}
        givees |= {node for node in view.node_ids if node != self.node_id}
        for dest in sorted(givees):
            self.send(dest, wire.HandoverDone(view.key[0], view.key[1], self.node_id), channel="activation")

    def _maybe_ready(self) -> None:
        view = self._ready_due
        if view is None or self.book.pending is not view:
            return
        key, givers = self._awaiting
        if key == view.key and givers - self._handovers_done.get(key, set()) & set(self.members):
            return  # caches are still on their way here
        self._ready_due = None
        self._handover_deadline = None
        if self.node_id in view.node_ids:
            self.send(view.coordinator_id, wire.StageReady(view.key[0], view.key[1], self.node_id))

    def _on_cache_handover(self, sender: str, msg: wire.CacheHandover) -> None:
        if (msg.term, msg.epoch) < self.book.highest_key or msg.layer >= self.spec.num_layers:
            raise ValueError(f"cache hand-over for plan {msg.term}.{msg.epoch}, layer {msg.layer}: not wanted here")
        shape = msg.keys.shape
        if shape[1] > self.limits.max_positions or (self.limits.kv_heads and (shape[0], shape[2]) != (
                self.limits.kv_heads, self.limits.head_dim)):
            raise ValueError(f"cache hand-over of shape {shape} does not fit this model")
        keys = wire.decode_tensor(msg.keys, expect_codec="f32")
        values = wire.decode_tensor(msg.values, expect_codec="f32")
        self._jobs.append(ImportCache(self.next_job_id(), msg.session_id, msg.layer, keys, values))
        if not msg.session_id.startswith(f"{self.node_id}/"):
            self._stage_sessions.add(msg.session_id)

    def _activate(self, msg: wire.PlanActive, now: float) -> None:
        plan = self.book.activate((msg.term, msg.epoch))
        if plan is None:
            return
        if self.is_coordinator:
            self.balancer.plan_active(PlannerPlan(plan.stages, 0.0), now)
        self.tokens.new_plan()
        self._trips_seen.clear()
        self._reported = (self.stats.decode_steps, self.stats.decode_compute_ms)
        self.ready_nodes = set(plan.node_ids)
        self.entry.plan_active(now)
        self._changed()

    # -- stage side --------------------------------------------------------------------------------

    def _admit(self, msg: wire.Forward | wire.Rebuild, payload: wire.TensorPayload | None,
               positions: int) -> tuple[PlanView, str, np.ndarray | None] | None:
        """The checks every step from a peer passes: (plan, entry node, hidden), or None
        when it was refused (the entry node is told why)."""
        entry = msg.route[-1] if msg.route else None
        plan = self.book.active
        if plan is None or plan.key != (msg.term, msg.epoch):
            self._refuse(msg, "stale_plan", f"plan {msg.term}.{msg.epoch} is not active here", entry)
            return None
        if self.node_id not in plan.node_ids:
            self._refuse(msg, "stale_plan", "this node holds no layers in the active plan", entry)
            return None
        if entry is None or any(n not in plan.node_ids and n != entry for n in msg.route):
            self._refuse(msg, "bad_step", "route names nodes outside the plan", entry)
            return None
        if not msg.session_id.startswith(f"{entry}/"):
            self._refuse(msg, "bad_step", "session id does not belong to its entry node", entry)
            return None
        hidden = None
        if payload is not None:
            try:
                hidden = self.decode_hidden(payload, plan.codec, positions)
            except WireError as e:
                self._refuse(msg, "bad_step", str(e), entry)
                return None
        if msg.start_pos + positions > self.limits.max_positions:
            self._refuse(msg, "bad_step", "step runs past the model's context window", entry)
            return None
        return plan, entry, hidden

    def _on_forward(self, sender: str, msg: wire.Forward, now: float) -> None:
        rows = msg.hidden.shape[0] if msg.hidden.shape else 0
        admitted = self._admit(msg, msg.hidden, rows)
        if admitted is None:
            return None
        plan, entry, hidden = admitted
        assert hidden is not None
        if self.entry.forward_is_final(msg.session_id, msg.route):
            self.entry.final_forward(msg, hidden, now)  # this node's own answer: layers + head
            return None
        if len(self._stage_steps) >= self.settings.max_queued_steps:
            return self._refuse(msg, "busy", f"over {self.settings.max_queued_steps} steps queued here", entry)
        self._stage_sessions.add(msg.session_id)
        job = Compute(self.next_job_id(), msg.session_id, msg.start_pos, hidden.shape[0], hidden=hidden)
        self._stage_steps[job.job_id] = _StageStep(msg, plan)
        self._jobs.append(job)
        return None

    def _on_rebuild(self, sender: str, msg: wire.Rebuild, now: float) -> None:
        """A part of a session's rebuild: run it here (meshllm.mesh.rebuild), pass it on."""
        admitted = self._admit(msg, msg.hidden[0] if msg.hidden else None, msg.positions)
        if admitted is None:
            return None
        plan, entry, hidden = admitted
        if msg.position > self.limits.max_positions:
            return self._refuse(msg, "bad_step", "rebuild runs past the model's context window", entry)
        if self.entry.forward_is_final(msg.session_id, msg.route):
            self.entry.final_rebuild_part(msg, hidden, now)  # this node's own answer, last stage
            return None
        if len(self._stage_rebuilds) >= self.settings.max_queued_rebuild_parts:
            return self._refuse(msg, "busy", f"over {self.settings.max_queued_rebuild_parts} rebuild parts "
                                             "queued here", entry)
        self._stage_sessions.add(msg.session_id)
        job = RebuildPart(self.next_job_id(), msg.session_id, msg.seq, msg.position, msg.prefill,
                          msg.start_pos, msg.positions, hidden=hidden, whole=msg.whole)
        self._stage_rebuilds[job.job_id] = _StageStep(msg, plan)
        self._jobs.append(job)
        return None

    def rebuild_part_done(self, msg: wire.Rebuild, result: Computed) -> bool:
        """A rebuild part ran here (a stage's, or the entry side's own as the last stage):
        count it; False (and the entry node told) when this node cannot rebuild."""
        key = (msg.session_id, msg.seq)
        if result.rebuild_error is not None:
            self._rebuild_ms.pop(key, None)
            self._refuse(msg, "no_log", result.rebuild_error)
            return False
        ms = self._rebuild_ms.pop(key, 0.0) + result.span_ms
        report = result.rebuild
        if msg.start_pos + msg.positions < msg.position:
            self._rebuild_ms[key] = ms
        elif report is not None:
            kept = report.kept[1] - report.kept[0] if report.kept else 0
            self.stats.rebuilt(kept, report.rebuilt_layers, ms)
            self._log("info", f"rebuilt session {msg.session_id} here: {report.describe()}, in {ms:.0f} ms")
        return True

    def _stage_rebuild_done(self, step: _StageStep, result: Computed) -> None:
        msg = step.msg
        assert isinstance(msg, wire.Rebuild)
        if not self.rebuild_part_done(msg, result):
            return
        last = msg.start_pos + msg.positions == msg.position
        if len(msg.route) == 1:  # the next hop is the entry node: it only needs to hear the end
            if last:
                self.send(msg.route[0], wire.Rebuilt(msg.session_id, msg.seq))
            return
        hidden = () if result.hidden is None else (self.encode_hidden(result.hidden, step.plan.codec),)
        self.send(msg.route[0], wire.Rebuild(msg.session_id, msg.seq, msg.term, msg.epoch, msg.position,
                                             msg.prefill, msg.start_pos, msg.positions, hidden, msg.route[1:],
                                             msg.whole),
                  channel="activation", positions=msg.positions)

    def _stage_step_done(self, step: _StageStep, result: Computed) -> None:
        assert result.hidden is not None
        msg = step.msg
        self.stats.computed(result.hidden.shape[0], result.span_ms)
        payload = self.encode_hidden(result.hidden, step.plan.codec)
        if len(msg.route) == 1:
            reply: wire.Message = wire.Result(msg.session_id, msg.seq, payload)
        else:
            reply = wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos, payload, msg.route[1:])
        self.send(msg.route[0], reply, channel="activation", positions=result.hidden.shape[0])

    def _refuse(self, msg: wire.Forward | wire.Rebuild, code: str, reason: str, entry: str | None = None) -> None:
        entry = entry or (msg.route[-1] if msg.route else None)
        log.info("step %s/%d refused: %s", msg.session_id, msg.seq, reason)
        if entry is not None:
            self.send(entry, wire.StepFailed(msg.session_id, msg.seq, code, reason[:500]))

    # -- status ------------------------------------------------------------------------------------

    def status_view(self, rtt_ms: Callable[[str], float | None] = lambda _peer: None) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md)."""
        latency = self._status_latency()
        return {
            "term": self.election.term,
            "coordinator_id": self.election.coordinator_id,
            "plan": self._status_plan(),
            "latency": self._status_latency_view(latency),
            "nodes": self._status_nodes(rtt_ms, latency),
            "codec": self.settings.codec,
            "placement_error": self.placement_error,
            "stats": self.stats.as_json(),
        }

    def _status_latency(self) -> _Latency:
        """Predictions for the plan in force with the latest measurements, beside what the
        entry nodes measured, and the coordinator's targets."""
        plan = self.book.active
        if self.is_coordinator:
            targets: tuple[float | None, float | None] | None = (
                self.settings.target_ms_per_token, self.settings.target_ttft_ms)
        else:
            targets = self.measurements.targets(self.election.coordinator_id)
        planning = self._planning(targets or (None, None))
        if plan is None:
            return _Latency(planning, targets, {}, {}, None)
        caps = self._predicting_caps(plan.key)
        per_entry: dict[str, float] = {}
        measured: dict[str, float] = {}
        for nid in self.members:
            predicted = planning.predict(plan.stages, caps, entry_ids=[nid])
            if predicted is not None:
                per_entry[nid] = predicted[0]
            figure = self.tokens.ms_per_token if nid == self.node_id else self.measurements.ms_per_token(nid, plan.key)
            if figure is not None:
                measured[nid] = figure
        return _Latency(planning, targets, per_entry, measured, planning.predict(plan.stages, caps))

    def _status_nodes(self, rtt_ms: Callable[[str], float | None], latency: _Latency) -> list[dict[str, object]]:
        plan = self.book.active or self.book.pending
        hop = latency.planning.hop_ms or {}
        rows = []
        for nid, h in sorted(self.members.items(), key=lambda kv: (kv[0] != self.node_id, kv[0])):
            span = plan.span_of(nid) if plan is not None else (0, 0)
            own = self.measurements.own_links.get(nid) if nid != self.node_id else None
            report = self.measurements.reports.get(nid)
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
                "rtt_ms": None if nid == self.node_id else rtt_ms(nid),
                "link": None if own is None or own.rtt_ms is None else {
                    "rtt_ms": _round(own.rtt_ms, 2),
                    "small_mb_s": _round(own.small_mb_s, 1),
                    "large_mb_s": _round(own.large_mb_s, 1),
                    "decode_hop_ms": _round(hop.get((self.node_id, nid)), 2),
                    "prefill_hop_ms": _round((latency.planning.prefill_hop_ms or {}).get((self.node_id, nid)), 1),
                },
                "head_ms": _round(report.head_ms, 2) if report is not None else None,
                "prefill_ms_per_layer": _round(report.prefill_ms_per_layer or None, 2) if report is not None else None,
                "predicted_ms_per_token": _round(latency.per_entry.get(nid), 2),
                "measured_ms_per_token": _round(latency.measured.get(nid), 2),
                "address": None,  # the status board fills in this node's own API address
            })
        return rows

    def _status_plan(self) -> dict[str, object] | None:
        plan = self.book.active or self.book.pending
        if plan is None:
            return None
        return {
            "term": plan.key[0],
            "epoch": plan.key[1],
            "state": "active" if plan is self.book.active else "pending",
            "stages": [{"node_id": s.node_id, "start_layer": s.start_layer, "end_layer": s.end_layer}
                       for s in plan.stages],
            "codec": plan.codec,
        }

    def _status_latency_view(self, latency: _Latency) -> dict[str, object] | None:
        """The active plan's predicted and measured times against the targets."""
        if self.book.active is None:
            return None
        target_ms, target_ttft = latency.targets or (None, None)
        predicted_ms, predicted_ttft = latency.predicted or (None, None)
        measured_ms = max(latency.measured.values(), default=None)
        return {
            "entry_ids": list(latency.planning.entry_ids or ()),
            "entry_mean": latency.planning.entry_mean,
            "predicted_ms_per_token": _round(predicted_ms, 2),
            "predicted_ttft_ms": _round(predicted_ttft, 1),
            "measured_ms_per_token": _round(measured_ms, 2),
            "target_ms_per_token": target_ms,
            "target_ttft_ms": target_ttft,
            "miss_ms_per_token": _round(ms.miss_ms(predicted_ms, target_ms), 2),
            "measured_miss_ms_per_token": _round(ms.miss_ms(measured_ms, target_ms), 2),
            "miss_ttft_ms": _round(ms.miss_ms(predicted_ttft, target_ttft), 1),
        }


@dataclass(frozen=True)
class _Latency:
    """What status shows of predictions and measurements (see `MeshCore._status_latency`)."""

    planning: ms.Planning
    targets: tuple[float | None, float | None] | None
    """The coordinator's targets (None: not known here yet)."""
    per_entry: dict[str, float]
    """Predicted ms per token of the plan in force for each member as the entry node."""
    measured: dict[str, float]
    """Measured ms per token of the entry nodes (this plan)."""
    predicted: tuple[float, float] | None
    """(ms per token, ms to first token) at the worst entry node in use (or the ring)."""


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
