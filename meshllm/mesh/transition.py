"""The transition of one node from plan to plan: adopt, load, hand over, ready, activate (sans-IO).

A plan arrives from the coordinator (`on_plan`): this node adopts it when its key is new
(`PlanBook.offer`), loads its span of it (a `LoadSpan` job), hands the caches of the layers
it gives up to their new owners (`CacheHandover`, then `HandoverDone` to every other stage),
waits for the caches of the layers it takes from live nodes (at most
`MeshSettings.handover_wait_s`), and reports ready (`StageReady`). The coordinator activates
the plan once every stage is ready (`PlanActive`). A plan can be superseded at any point:
a newer plan comes while this one loads, a node of it is lost, a giver's link drops.

Each plan key has an explicit state here (`PlanTransition`: a `Phase` and what it waits
for); the node as a whole keeps only what crosses plans: the span it holds, the plan it
loaded last and its links then, and the caches a superseded load gave up (`Unhanded`).
Everything the other roles must hear goes to its `PlanFollower`s.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshllm import wire
from meshllm.mesh.jobs import LoadSpan, Loaded
from meshllm.mesh.plans import PlanBook, PlanKey, PlanView
from meshllm.mesh.port import PlanFollower, Port, broadcast

log = logging.getLogger(__name__)

Caches = tuple[tuple[str, int, np.ndarray, np.ndarray], ...]
"""(session, layer, keys, values) of the layers a load gave up."""

MAX_HEARD_PLANS = 4
"""Plan keys this node has only heard of (a stage's `HandoverDone` that came before the plan)
that it keeps; beyond them the highest is forgotten, so a peer cannot grow them."""

RECENT_PLANS = 4
"""The plans adopted last, whose stages tell who may hand this node the caches of a layer."""


class Phase(enum.Enum):
    HEARD = "heard"
    """Not adopted here: only other stages' word that their hand-over under it is done."""
    LOADING = "loading"
    """Adopted: this node loads its span of it."""
    ADOPTED = "adopted"
    """Adopted without loading: this node loads no more plans (it is on its way out)."""
    AWAITING = "awaiting"
    """Loaded and its caches handed over: waits for the caches of the layers it takes."""
    READY = "ready"
    """Reported ready to its coordinator (or holds none of its layers)."""
    ACTIVE = "active"
    """Its coordinator activated it: answers run on it."""
    SUPERSEDED = "superseded"
    """Loaded after a newer plan came (or after a node of it was lost): what its load gave
    up is handed over under the next plan that loads."""
    FAILED = "failed"
    """Its load failed here."""


@dataclass
class PlanTransition:
    """One plan key as this node moves to it."""

    key: PlanKey
    phase: Phase = Phase.HEARD
    view: PlanView | None = None
    """The plan of this key that this node adopted (None while only heard of)."""
    givers: set[str] = field(default_factory=set)
    """The live nodes whose layers this node takes under it: their caches come first."""
    done: set[str] = field(default_factory=set)
    """The nodes that said their hand-over under this key is done."""
    deadline: float | None = None
    """When this node stops waiting for the givers' caches and reports ready without them."""

    def waiting(self, members: set[str] | None = None) -> set[str]:
        """Givers whose caches have not all come (of `members`, when given)."""
        missing = self.givers - self.done
        return missing if members is None else missing & members


@dataclass(frozen=True)
class Unhanded:
    """What a load gave up while its plan was superseded: handed over when the next load of
    the newest plan completes (its takers want the caches under that plan's key)."""

    span: tuple[int, int]
    """The span held before that load."""
    caches: Caches


class Transition:
    """This node's plans: which is pending and active (`book`), and its way to each."""

    def __init__(self, port: Port, followers: Sequence[PlanFollower] = ()) -> None:
        self._port = port
        self.followers = list(followers)
        self.book = PlanBook()
        self.placement_error: str | None = None
        """Why the mesh cannot hold the model, as the coordinator said (None once a plan comes)."""
        self.ready_nodes: set[str] = set()
        """The stages of the active plan (minus those lost since): shown as ready."""
        self.span: tuple[int, int] = (0, 0)
        """The layers this node holds (once loaded)."""
        self.loading = True
        """False once this node loads no more plans (`MeshCore.stop_loading`)."""
        self.states: dict[PlanKey, PlanTransition] = {}
        """Each plan key this node moves to or heard of, from the highest it adopted on."""
        self.loads: dict[int, PlanView] = {}
        """The `LoadSpan` jobs running, with their plans."""
        self.loaded: PlanView | None = None
        """The plan whose span this node loaded last."""
        self.unhanded: Unhanded | None = None
        self.links_down: dict[str, int] = {}
        """How many times each peer's link went down: a peer that came back holds no caches."""
        self.loaded_links: dict[str, int] = {}
        """`links_down` when this node loaded `loaded`."""
        self.adopted: deque[PlanView] = deque(maxlen=RECENT_PLANS)
        """The plans this node adopted last, oldest first."""

    def state(self, key: PlanKey) -> PlanTransition | None:
        return self.states.get(key)

    def next_timer(self) -> float | None:
        return min((s.deadline for s in self.states.values() if s.deadline is not None), default=None)

    # -- plans from the coordinator ----------------------------------------------------------

    def on_plan(self, sender: str, msg: wire.Plan, now: float) -> None:
        """Adopt the plan when its key is new here, and load this node's span of it."""
        port = self._port
        view = PlanView(key=(msg.term, msg.epoch), stages=msg.stages, codec=msg.codec, coordinator_id=sender)
        spec = port.spec
        if view.stages[0].start_layer != spec.plan_start or view.stages[-1].end_layer != spec.plan_end:
            raise ValueError(f"plan does not cover [{spec.plan_start}, {spec.plan_end})")
        before = self.book.active or self.book.pending
        if not self.book.offer(view, port.term):
            log.info("ignoring plan %s from %s (have seen %s)", view.key, sender, self.book.highest_key)
            return
        self.placement_error = None
        self.adopted.append(view)
        for follower in self.followers:
            follower.plan_changed(now)
        self.states = {k: s for k, s in self.states.items() if k >= view.key}  # the others are superseded
        state = self.states.setdefault(view.key, PlanTransition(view.key))
        state.view, state.givers, state.deadline = view, set(), None
        if not self.loading:
            state.phase = Phase.ADOPTED
        else:
            state.phase = Phase.LOADING
            job = LoadSpan(port.next_job_id(), *view.span_of(port.node_id))
            self.loads[job.job_id] = view
            port.add_job(job)
            state.givers = self._givers(view, before)
            if state.givers:
                state.deadline = now + port.settings.handover_wait_s
        port.changed()

    def on_plan_refused(self, sender: str, msg: wire.PlanRefused, now: float) -> None:
        """The coordinator cannot place the model (a refusal from this node's own coordinator
        role included): answers fail at once until a plan comes."""
        self.placement_error = msg.reason
        for follower in self.followers:
            follower.plan_changed(now)
        self._port.changed()

    def on_plan_active(self, sender: str, msg: wire.PlanActive, now: float) -> None:
        plan = self.book.activate((msg.term, msg.epoch))
        if plan is None:
            return
        state = self.states.get(plan.key)
        if state is not None and state.view is plan:
            state.phase = Phase.ACTIVE
            state.deadline = None
        self.ready_nodes = set(plan.node_ids)
        for follower in self.followers:
            follower.plan_active(plan, now)
        self._port.changed()

    def on_stage_ready(self, sender: str, msg: wire.StageReady, now: float) -> None:
        """Coordinator: a stage loaded its span; once every stage did, the plan is active."""
        if self._port.is_coordinator and self.book.mark_ready((msg.term, msg.epoch), msg.node_id):
            broadcast(self._port, wire.PlanActive(msg.term, msg.epoch))

    # -- loads -------------------------------------------------------------------------------

    def _givers(self, view: PlanView, before: PlanView | None) -> set[str]:
        """The live nodes whose layers this node takes under `view`: they hand their caches
        over. Who held what comes from the plan before `view` (a node that just joined loaded
        none of its own); a giver whose link went down since holds none any more."""
        port = self._port
        old = before or self.loaded
        givers: set[str] = set()
        if old is None:
            return givers
        start, end = view.span_of(port.node_id)
        held = self.span
        for stage in old.stages:
            overlap = (max(start, stage.start_layer), min(end, stage.end_layer))
            gains = overlap[0] < overlap[1] and not (held[0] <= overlap[0] and overlap[1] <= held[1])
            same_incarnation = self.links_down.get(stage.node_id) == self.loaded_links.get(stage.node_id)
            if gains and stage.node_id != port.node_id and stage.node_id in port.members and same_incarnation:
                givers.add(stage.node_id)
        return givers

    def job_done(self, job_id: int, result: object) -> bool:
        """True when the job was a load of this node's span."""
        view = self.loads.pop(job_id, None)
        if view is None:
            return False
        loaded = result if isinstance(result, Loaded) else Loaded()
        port = self._port
        old_span, self.span = self.span, view.span_of(port.node_id)
        self.loaded = view
        self.loaded_links = dict(self.links_down)
        for follower in self.followers:
            follower.span_loaded(self.span)
        if self.unhanded is not None:  # what a superseded plan's load gave up goes out now
            old_span = self.unhanded.span
            loaded = Loaded(self.unhanded.caches + loaded.handover)
            self.unhanded = None
        state = self.states.get(view.key)
        if self.book.pending is not view:
            # a newer plan came while loading (or this one went void): its takers want the
            # caches, and the word that they are all sent, under its key; they refuse these
            self.unhanded = Unhanded(old_span, loaded.handover)
            if state is not None and state.view is view:
                state.phase, state.deadline = Phase.SUPERSEDED, None
            return True
        assert state is not None and state.view is view
        self._hand_over(view, old_span, loaded.handover)
        state.phase = Phase.AWAITING
        self._maybe_ready()
        port.changed()
        return True

    def job_failed(self, job_id: int, reason: str) -> bool:
        view = self.loads.pop(job_id, None)
        if view is None:
            return False
        state = self.states.get(view.key)
        if state is not None and state.view is view:
            state.phase, state.deadline = Phase.FAILED, None
        self._port.log("error", f"cannot load layers {view.span_of(self._port.node_id)}: {reason}")
        return True

    def _hand_over(self, view: PlanView, old_span: tuple[int, int], caches: Caches) -> None:
        """Send the caches of the layers this node gave up to their new owners, then tell each
        owner it has them all (a clean leave, a join, a rebalance: nothing to recompute)."""
        port = self._port
        me = port.node_id
        owners = {layer: s.node_id for s in view.stages for layer in range(s.start_layer, s.end_layer)}
        for session_id, layer, keys, values in caches:
            dest = owners.get(layer)
            if dest is not None and dest != me:
                port.send(dest, wire.CacheHandover(session_id, view.key[0], view.key[1], layer,
                                                   wire.encode_tensor(keys, "f32", compress=False),
                                                   wire.encode_tensor(values, "f32", compress=False)),
                          channel="activation")
        # every stage hears it, not only the owners of the layers this node held: a taker
        # expects hand-overs by the plan before, which this node may never have loaded (it was
        # superseded here first, or refused from a coordinator this node did not follow)
        givees = {owners[layer] for layer in range(*old_span) if owners.get(layer, me) != me}
        givees |= {node for node in view.node_ids if node != me}
        for dest in sorted(givees):
            port.send(dest, wire.HandoverDone(view.key[0], view.key[1], me), channel="activation")

    # -- hand-overs to this node ------------------------------------------------------------

    def on_handover_done(self, sender: str, msg: wire.HandoverDone, now: float) -> None:
        """`sender` sent every cache it hands this node under the plan of that key (kept for
        at most `MAX_HEARD_PLANS` keys not adopted yet: the lowest, the next plans)."""
        key = (msg.term, msg.epoch)
        if key < self.book.highest_key:
            return
        if key not in self.states:
            heard = sorted(k for k, s in self.states.items() if s.phase is Phase.HEARD)
            if len(heard) >= MAX_HEARD_PLANS:
                if heard[-1] < key:
                    raise ValueError(f"hand-over done for plan {key[0]}.{key[1]}: {len(heard)} plans to come "
                                     "are heard of already")
                del self.states[heard[-1]]
        self.states.setdefault(key, PlanTransition(key)).done.add(sender)
        self._maybe_ready()

    def check_handover(self, sender: str, key: PlanKey, layer: int,
                       seen: tuple[PlanKey, tuple[wire.Stage, ...]] | None = None) -> None:
        """A cache hand-over under plan `key` comes only from a giver of its layer: a node that
        held the layer under a plan before `key` that this node adopted (or `seen`: the plan
        of a node that claimed to coordinate its term, which this node refused; a node that
        joins a mesh as its new coordinator takes the caches of the plan it was refused); and,
        once this node knows the plan of `key`, only for a layer it holds under it. ValueError
        otherwise."""
        before = [v.stages for v in (*self.adopted, self.loaded) if v is not None and v.key < key]
        if seen is not None and seen[0] < key:
            before.append(seen[1])
        if not any(s.node_id == sender and s.start_layer <= layer < s.end_layer for stages in before for s in stages):
            raise ValueError(f"cache hand-over of layer {layer} from {sender}, which held it under "
                             "no plan before this one")
        state = self.states.get(key)
        mine = state.view.span_of(self._port.node_id) if state is not None and state.view is not None else None
        if mine is not None and not mine[0] <= layer < mine[1]:
            raise ValueError(f"cache hand-over of layer {layer} under plan {key[0]}.{key[1]}, which gives "
                             "it to another node")

    def _maybe_ready(self) -> None:
        """Report the pending plan ready once it is loaded here and its givers' caches came."""
        pending = self.book.pending
        state = self.states.get(pending.key) if pending is not None else None
        if state is None or state.view is not pending or state.phase is not Phase.AWAITING:
            return
        port = self._port
        if state.waiting(set(port.members)):
            return  # caches are still on their way here
        state.phase, state.deadline = Phase.READY, None
        if port.node_id in pending.node_ids:
            port.send(pending.coordinator_id, wire.StageReady(pending.key[0], pending.key[1], port.node_id))

    def handle_timer(self, now: float) -> None:
        for state in list(self.states.values()):
            if state.deadline is None or state.deadline > now:
                continue
            state.deadline = None
            waiting = state.waiting()
            if state.phase is Phase.AWAITING and waiting:
                names = ", ".join(sorted(map(self._port.name_of, waiting)))
                self._port.log("info", f"no cache hand-over from {names} in "
                                       f"{self._port.settings.handover_wait_s:.0f} s: ready without it")
            state.givers = set()
            self._maybe_ready()

    # -- membership --------------------------------------------------------------------------

    def peer_lost(self, peer_id: str) -> bool:
        """A peer's link went down: it holds no caches any more (whatever it gave up is gone
        with it). True when the active or pending plan used it (and is now void)."""
        self.links_down[peer_id] = self.links_down.get(peer_id, 0) + 1
        self.ready_nodes.discard(peer_id)
        for state in self.states.values():
            state.givers.discard(peer_id)
        self._maybe_ready()
        return self.book.forget_node(peer_id)
