"""`MeshCore`: the mesh state machine of one node, sans-IO: its inputs, its outputs, and the
dispatch of each input to the role it is for.

Inputs, each with `now`: `start`, `link_up`, `link_down`, `receive`, `handle_timer`,
`job_done` / `job_failed`, `links_measured` (the link figures, about once a second), and for
answers typed here `open_session` / `cancel_session` / `close_session`; `leave` before going.
Outputs, drained by the driver: `sends()`, `jobs()`, `events()`, and `next_timer()`.

The work is done by the roles, each behind the port (`meshllm.mesh.port`) that the core
implements (`CorePort`):
- `transition` (meshllm.mesh.transition): plans adopted, loaded, handed over, ready, active;
- `coordinator` (meshllm.mesh.coordinator): the election, measurements, planning, balancing;
- `stage` (meshllm.mesh.stage): the checks and compute of every forwarded step;
- `entry` (meshllm.mesh.entry): the answers entered here, and their policy;
- `status` (meshllm.mesh.status): the views.
A message from a peer goes to its role by a table from message type to handler, after the
checks of who may send it (each role checks the rest against the sender's role:
meshllm.mesh.checks); a message this node sends itself, by a second table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh import election as el
from meshllm.mesh import measured as ms
from meshllm.mesh.checks import Refusals
from meshllm.mesh.coordinator import Coordinator, void_state
from meshllm.mesh.entry import EntrySessions
from meshllm.mesh.events import Channel, Event, LogKind, Logged, Send, SessionEnded, SessionOutput, StatusChanged
from meshllm.mesh.jobs import Computed, Job, Loaded
from meshllm.mesh.plans import PlanView
from meshllm.mesh.port import PlansView
from meshllm.mesh.session import Session, Token
from meshllm.mesh.settings import MeshSettings, ModelLimits, election_score, incompatibility
from meshllm.mesh.stage import RebuildMeter, Stage, refuse
from meshllm.mesh.stats import StageStats
from meshllm.mesh.status import MeshStatus
from meshllm.mesh.transition import Transition
from meshllm.placement.linkstats import LinkStats
from meshllm.placement.planner import ModelSpec

__all__ = ["CorePort", "MeshCore", "MeshSettings", "ModelLimits", "incompatibility"]

log = logging.getLogger(__name__)

Handler = Callable[[str, Any, float], None]

_OWN_WORD = {
    wire.StageReady: "a node may only report itself ready",
    wire.LinkReport: "a node may only report its own measurements",
    wire.HandoverDone: "a node may only report its own hand-over done",
    wire.NodeReport: "a node may only report for itself",
}
"""Messages a node sends only about itself: their `node_id` must be their sender."""

_FROM_COORDINATOR = {wire.Plan: "a plan", wire.PlanActive: "a plan activation", wire.PlanRefused: "a refusal to plan"}
"""Plans and their outcomes come only from the coordinator of the term they name."""


class MeshCore:
    """One node's mesh: its inputs, its outputs, and the roles that do the work."""

    def __init__(self, hello: wire.Hello, spec: ModelSpec, limits: ModelLimits,
                 settings: MeshSettings = MeshSettings()) -> None:
        self.hello = hello
        self.node_id = hello.node_id
        self.spec = spec
        self.limits = limits
        self.settings = settings
        self.members: dict[str, wire.Hello] = {self.node_id: hello}
        self.stats = StageStats()
        self.refusals = Refusals(self.node_id)
        """What peers sent that their role does not allow, by kind (each logged once per peer)."""
        self.election = el.Election(self.node_id, election_score(hello), timeout_s=settings.election_timeout_s)
        self._port = port = CorePort(self)
        meter = RebuildMeter(port)
        self.entry = EntrySessions(port, meter)
        # caches of a layer come only from its giver: the transition knows who held what
        self.stage = Stage(port, self.entry, meter,
                           givers=lambda sender, key, layer: self.transition.check_handover(
                               sender, key, layer, self.coordinator.seen_plan))
        self.coordinator = Coordinator(port, self.election, ms.Measurements(self.node_id), ms.TokenClock())
        self.transition = Transition(port, followers=(self.coordinator, self.entry, self.stage))
        self.book = self.transition.book
        """The plans (read-only outside the transition)."""
        self.status = MeshStatus(port, self.transition, self.coordinator)
        election_msg: Handler = self.coordinator.on_election
        self._remote: dict[type, Handler] = {
            wire.Forward: self.stage.on_forward,
            wire.Result: self.entry.result,
            wire.Rebuild: self.stage.on_rebuild,
            wire.Rebuilt: self.entry.rebuilt,
            wire.StepFailed: self.entry.step_failed,
            wire.Election: election_msg,
            wire.Answer: election_msg,
            wire.Coordinator: election_msg,
            wire.Plan: self._on_plan,
            # the coordinator plans again with a stage it left out for being late
            wire.StageReady: lambda sender, msg, now: (self.transition.on_stage_ready(sender, msg, now),
                                                       self.coordinator.stage_ready_heard(sender, now)),
            wire.PlanActive: self.transition.on_plan_active,
            wire.DropSession: self.stage.on_drop_session,
            wire.NodeReport: self.coordinator.on_report,
            wire.LinkReport: self.coordinator.on_link_report,
            wire.CacheHandover: self.stage.on_cache_handover,
            wire.HandoverDone: self.transition.on_handover_done,
            wire.PlanRefused: self.transition.on_plan_refused,
        }
        """What a peer may send, and the role each message is for (anything else is ignored)."""
        # what this node sends itself as coordinator, stage or entry node (no election
        # message and no forwarded step is ever sent to this node itself)
        port.local = {
            wire.Plan: self.transition.on_plan,
            wire.StageReady: self.transition.on_stage_ready,
            wire.PlanActive: self.transition.on_plan_active,
            wire.PlanRefused: self.transition.on_plan_refused,
            wire.NodeReport: self.coordinator.on_report,
            wire.StepFailed: self.entry.step_failed,  # a step of this node's own answer, refused here
            wire.DropSession: self.stage.drop_own,  # an answer of this node's own ended
        }

    # -- outputs -------------------------------------------------------------------------

    def sends(self) -> list[Send]:
        out, self._port.sends = self._port.sends, []
        return out

    def jobs(self) -> list[Job]:
        out, self._port.jobs = self._port.jobs, []
        return out

    def events(self) -> list[Event]:
        out, self._port.events = self._port.events, []
        return out

    def next_timer(self) -> float | None:
        deadlines = (self.coordinator.next_timer(), self.entry.next_timer(), self.transition.next_timer())
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

    @property
    def placement_error(self) -> str | None:
        """Why the mesh cannot hold the model (the coordinator's word), or None."""
        return self.transition.placement_error

    def serving_model(self, hello: wire.Hello) -> None:
        """This node now serves another model id (a tune job's adapter was taken up): its own
        member record carries it from now on."""
        self.hello = hello
        self.members[self.node_id] = hello

    def name_of(self, node_id: str) -> str:
        h = self.members.get(node_id)
        return h.name if h and h.name else node_id

    def sent(self, positions: int, nbytes: int) -> None:
        """The driver sent a step's hidden states of `positions` positions in `nbytes` bytes."""
        self.stats.sent(positions, nbytes)

    def status_view(self, rtt_ms: Callable[[str], float | None] = lambda _peer: None) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md), with the messages refused here
        for their sender's role (``refused``: counts by kind of message)."""
        view = self.status.view(rtt_ms)
        view["refused"] = self.refusals.as_json()
        return view

    # -- inputs: lifecycle and links ---------------------------------------------------------

    def start(self, now: float) -> None:
        self._port.now = now
        self.coordinator.start(now)

    def link_up(self, peer_id: str, hello: wire.Hello, now: float) -> None:
        self._port.now = now
        self.members[peer_id] = hello
        self.coordinator.peer_up(peer_id, hello, now)
        self.entry.node_linked(now)
        self._port.changed()

    def link_down(self, peer_id: str, reason: str, now: float) -> None:
        self._port.now = now
        hello = self.members.pop(peer_id, None)
        if hello is None:
            return
        self.refusals.forget(peer_id)
        plans = self.transition.book
        current = plans.active or plans.pending
        plan_void = self.transition.peer_lost(peer_id)  # its caches are gone with it
        self.coordinator.peer_lost(peer_id, now)
        coordinator = self.election.coordinator_id
        if plan_void and current is not None and coordinator not in (None, self.node_id, peer_id) \
                and coordinator in self.members:
            # the coordinator may still see the peer and keep the plan: ask for it again, or this
            # node would refuse every step until some other re-plan
            self._port.send(coordinator, wire.NodeReport(
                self.node_id, self.election.term, self.hello.mem_budget_bytes, self.hello.ms_per_layer,
                *self.transition.span, void_state(current.key)))
        self._port.log("leave", f"{hello.name or peer_id} left ({reason})")
        self.entry.node_lost(peer_id, now)
        if plan_void:
            self.entry.plan_changed(now)
        self.stage.peer_lost(peer_id)  # sessions whose entry node left: their user is gone
        self.coordinator.membership_changed(now)
        self._port.changed()

    def leave(self, now: float) -> bool:
        """Ask the coordinator for a plan without this node. False when there is nobody to
        hand over to; then watch `leave_settled`, and call `stop_loading` when done waiting."""
        self._port.now = now
        coordinator = self.election.coordinator_id
        if len(self.members) <= 1 or coordinator is None:
            return False
        self._port.send(coordinator, wire.NodeReport(self.node_id, self.election.term, self.hello.mem_budget_bytes,
                                                     self.hello.ms_per_layer, *self.transition.span, "leaving"))
        return True

    def stop_loading(self) -> None:
        """On the way out: adopt no more plans."""
        self.transition.loading = False
        self.coordinator.planning_stopped = True

    def stop(self, reason: str) -> None:
        self.entry.stop(reason)

    # -- inputs: measurements ------------------------------------------------------------------

    def links_measured(self, stats: Mapping[str, LinkStats | None], now: float) -> None:
        """What this node's links measured (``LinkManager.link_stats`` of each peer), about
        once a second: kept, and sent to every member with this node's other figures in a
        LinkReport (docs/placement.md)."""
        self._port.now = now
        self.coordinator.links_measured(stats, now)
        self._port.changed()

    def entry_work_measured(self, ms_per_token: float) -> None:
        """One decode token's work on this node as its entry (embed, head, sample), as the
        driver timed it on the worker: it replaces the start-up figure once there are a few."""
        self.coordinator.entry_work_measured(ms_per_token)

    # -- inputs: messages ----------------------------------------------------------------------

    def receive(self, sender: str, msg: wire.Message, now: float) -> None:
        """Everything that arrives from a peer. A message its sender may not send (or that
        does not fit) is refused: logged once per peer and kind, counted (`refusals`), and
        dropped; anything else a handler raises is the driver's to catch."""
        self._port.now = now
        handler = self._remote.get(type(msg))
        if handler is None:
            log.debug("ignoring %s from %s", type(msg).__name__, sender)
            return
        try:
            if type(msg) in _OWN_WORD and msg.node_id != sender:  # type: ignore[attr-defined]
                raise ValueError(_OWN_WORD[type(msg)])
            what = _FROM_COORDINATOR.get(type(msg))
            if what is not None and type(msg) is not wire.Plan:
                _check_from_coordinator(self.election, sender, msg.term, what)  # type: ignore[attr-defined]
            handler(sender, msg, now)
        except (WireError, ValueError) as e:
            self.refusals.refused(sender, type(msg).__name__, str(e))

    def _on_plan(self, sender: str, msg: wire.Plan, now: float) -> None:
        self.coordinator.plan_seen(sender, msg)  # even a plan refused here: see `Coordinator.plan_seen`
        _check_from_coordinator(self.election, sender, msg.term, _FROM_COORDINATOR[wire.Plan])
        if sender == self.node_id:
            raise ValueError("a plan from this node's own id over a link")
        self.transition.on_plan(sender, msg, now)

    # -- inputs: timers and jobs -----------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        self._port.now = now
        self.coordinator.handle_timer(now)
        self.transition.handle_timer(now)
        self.entry.handle_timer(now)

    def job_done(self, job_id: int, result: Computed | Loaded | None, now: float) -> None:
        """A job issued by `jobs()` finished; `result` for a `Compute` or `RebuildPart` job
        (a `Computed`) and for a `LoadSpan` job (a `Loaded`)."""
        self._port.now = now
        if self.transition.job_done(job_id, result) or self.stage.job_done(job_id, result):
            return
        if isinstance(result, Computed):
            self.entry.job_done(job_id, result, now)

    def job_failed(self, job_id: int, reason: str, now: float) -> None:
        self._port.now = now
        if not (self.transition.job_failed(job_id, reason) or self.stage.job_failed(job_id, reason)):
            self.entry.job_failed(job_id, reason, now)

    # -- inputs: answers typed here ----------------------------------------------------------------

    def open_session(self, session: Session, now: float) -> str:
        """Start answering `session` (this node is its entry node); its id."""
        self._port.now = now
        self.coordinator.tokens.opened(now)
        return self.entry.open(session, now)

    def cancel_session(self, session_id: str, now: float) -> None:
        self._port.now = now
        self.entry.cancel(session_id, now)

    def close_session(self, session_id: str) -> None:
        self.entry.close(session_id)


def _check_from_coordinator(election: el.Election, sender: str, term: int, what: str) -> None:
    if sender != election.coordinator_id or term != election.term:
        raise ValueError(f"{what} for term {term} from {sender}, which is not its coordinator")


class CorePort:
    """The core's side of the port (`meshllm.mesh.port.Port`): its output queues, its job
    ids, the time of the input being handled, the dispatch of what this node sends itself,
    and views of what the core keeps."""

    def __init__(self, core: MeshCore) -> None:
        self._core = core
        self.node_id = core.node_id
        self.settings = core.settings
        self.spec = core.spec
        self.limits = core.limits
        self.stats = core.stats
        self.now = 0.0
        self.sends: list[Send] = []
        self.jobs: list[Job] = []
        self.events: list[Event] = []
        self.local: dict[type, Handler] = {}
        """The role each message this node sends itself is for (the core fills it in)."""
        self._job_ids = 0

    @property
    def hello(self) -> wire.Hello:
        return self._core.hello

    @property
    def members(self) -> Mapping[str, wire.Hello]:
        return self._core.members

    @property
    def term(self) -> int:
        return self._core.election.term

    @property
    def coordinator_id(self) -> str | None:
        return self._core.election.coordinator_id

    @property
    def is_coordinator(self) -> bool:
        return self._core.election.coordinator_id == self.node_id

    @property
    def plans(self) -> PlansView:
        return self._core.transition.book

    @property
    def span(self) -> tuple[int, int]:
        return self._core.transition.span

    @property
    def placement_error(self) -> str | None:
        return self._core.transition.placement_error

    def name_of(self, node_id: str) -> str:
        return self._core.name_of(node_id)

    def send(self, dest: str, msg: wire.Message, *, channel: Channel = "control", positions: int = 0) -> None:
        if dest == self.node_id:
            handler = self.local.get(type(msg))
            if handler is not None:
                handler(self.node_id, msg, self.now)
        elif dest in self._core.members:
            self.sends.append(Send(dest, msg, channel, positions))
        elif isinstance(msg, (wire.Forward, wire.Rebuild)) and msg.route:
            # no link to the next stage (yet, or any more): the step is lost; say so at once
            # rather than let its entry node wait out the step timeout
            refuse(self, msg, "stale_plan", f"no link from {self.node_id} to {dest}")

    def add_job(self, job: Job) -> None:
        self.jobs.append(job)

    def emit(self, event: Event) -> None:
        tokens = self._core.coordinator.tokens
        if isinstance(event, SessionOutput):
            item = event.item
            if isinstance(item, Token) and item.id >= 0 and item.finish_reason != "cancelled":
                tokens.token(event.session_id, self.now)
            else:
                tokens.pause(event.session_id)
        elif isinstance(event, SessionEnded):
            tokens.pause(event.session_id)
        self.events.append(event)

    def log(self, kind: LogKind, message: str) -> None:
        self.events.append(Logged(kind, message))

    def changed(self) -> None:
        self.events.append(StatusChanged())

    def next_job_id(self) -> int:
        self._job_ids += 1
        return self._job_ids
