"""The coordinator role of one node: election glue, planning, balancing, and re-plans from
what the members measured (sans-IO).

Every node runs it: it follows the bully election (`meshllm.mesh.election`) and keeps every
member's measurements (`LinkReport`s, this node's own included, docs/placement.md); on the
node that won the election it also plans (`plan_layers`, sticky to what the nodes hold),
re-plans on joins, leaves and losses, on links that changed much, when a latency target
stays missed, and when a stage runs off its planned speed (`Balancer`). A stage reports its
measured decode speed to the coordinator from here too (`NodeReport`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping

from meshllm import wire
from meshllm.errors import PlacementError
from meshllm.mesh import election as el
from meshllm.mesh import measured as ms
from meshllm.mesh.plans import PlanView
from meshllm.mesh.port import PlanFollower, Port, broadcast
from meshllm.mesh.settings import election_score
from meshllm.placement.balance import Balancer
from meshllm.placement.linkstats import LinkStats
from meshllm.placement.planner import NodeCapacity, Plan as PlannerPlan, layer_capacity, plan_layers

log = logging.getLogger(__name__)

VOID_STATE = "void"
"""`NodeReport.state` of a member whose copy of the plan in force went void because its link to
a node of the plan went down, while the coordinator may still see that node: ``void T.E``."""


def void_state(key: tuple[int, int]) -> str:
    return f"{VOID_STATE} {key[0]}.{key[1]}"


def void_key(state: str) -> tuple[int, int] | None:
    """The plan key of a ``void T.E`` report; None for any other state. ValueError when
    malformed (the message is rejected)."""
    word, _, key = state.partition(" ")
    if word != VOID_STATE:
        return None
    term, dot, epoch = key.partition(".")
    if not (dot and term.isdigit() and epoch.isdigit() and len(term) <= 20 and len(epoch) <= 20):
        raise ValueError(f"bad void report {state!r}")
    return int(term), int(epoch)


PLAN_TOLERANCE = 0.05
"""A re-plan keeps what the nodes hold when that is within this fraction of the best plan."""


class Coordinator(PlanFollower):
    """The election, the measurements, and (while this node coordinates) the plans."""

    def __init__(self, port: Port, election: el.Election, measurements: ms.Measurements,
                 tokens: ms.TokenClock) -> None:
        self._port = port
        self.election = election
        self.measurements = measurements
        self.tokens = tokens
        """Times between the tokens of the answers entered here."""
        self.leaving: set[str] = set()
        """Nodes that asked to leave; planned around, then let go."""
        self.unready: dict[str, float] = {}
        """Stages that did not load their span in time (`_ready_timer`): planned around until
        then (ten times `stage_ready_s`), or until they report a stage ready or link again."""
        self._published_at: float | None = None
        """When the plan published here is due to be ready (`MeshSettings.stage_ready_s`)."""
        self.balancer = Balancer(port.spec, objective=port.settings.objective,  # type: ignore[arg-type]
                                 settings=port.settings.balance)
        self.planning_stopped = False
        """This node is on its way out: it plans no more."""
        self._planned_hops: Mapping[tuple[str, str], float] | None = None
        """The decode hop table the coordinator last planned with."""
        self._planned_entries: tuple[str, ...] = ()
        """...and the entry nodes in use then."""
        self._links_replan_at = -math.inf
        self._trips_seen: dict[str, int] = {}
        """Token gaps of each entry node's reports already judged (this plan)."""
        self._target_miss_said: tuple[int, int] | None = None
        self._entry_work: deque[float] = deque(maxlen=ms.ENTRY_WORK_WINDOW)
        """This node's own work per token as an entry node, timed on its answers."""
        self._epoch = 0
        self._seen_plan_key: tuple[int, int] = (0, 0)
        """The highest (term, epoch) of any plan seen, adopted or not."""
        self._seen_stages: tuple[wire.Stage, ...] | None = None
        """The stages of the highest plan seen from a node that claimed its term..."""
        self._seen_key: tuple[int, int] = (0, 0)
        """...and its key."""
        self._published: wire.Plan | None = None
        self._replan_due: float | None = None
        self._replan_soft = False
        self._republish = False
        """A member's copy of the plan in force went void: publish it again even unchanged."""
        """The re-plan due is for measurements only (see `schedule_replan`)."""
        self._next_report = 0.0
        self._reported = (0, 0.0)

    # -- election glue -----------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.election.start(now)
        self._next_report = now + self._port.settings.report_interval_s
        self._flush_election(now)

    def peer_up(self, peer_id: str, hello: wire.Hello, now: float) -> None:
        port = self._port
        self.election.peer_up(peer_id, election_score(hello), now)
        port.log("join", f"{hello.name or peer_id} joined")
        self._flush_election(now)  # a coordinator announces itself first: plans come from it
        if port.is_coordinator and self._published is not None and self._published.term == self.election.term:
            # a newcomer that the next plan leaves out must still learn the plan in force
            port.send(peer_id, self._published)
            active = port.plans.active
            if active is not None and active.key == (self._published.term, self._published.epoch):
                port.send(peer_id, wire.PlanActive(*active.key))
        self.schedule_replan(now)

    def peer_lost(self, peer_id: str, now: float) -> None:
        self.leaving.discard(peer_id)
        self.unready.pop(peer_id, None)
        self.balancer.forget(peer_id)
        self.measurements.forget(peer_id)
        self._trips_seen.pop(peer_id, None)
        self.election.peer_lost(peer_id, now)

    def membership_changed(self, now: float) -> None:
        self._flush_election(now)
        self.schedule_replan(now)

    def on_election(self, sender: str, msg: wire.Message, now: float) -> None:
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
        port = self._port
        for dest, m in self.election.outbox():
            if isinstance(m, el.ElectionMsg):
                msg: wire.Message = wire.Election(m.term, m.candidate_id, m.score)
            elif isinstance(m, el.AnswerMsg):
                msg = wire.Answer(m.term, m.node_id)
            else:
                msg = wire.Coordinator(m.term, m.node_id)
            if dest == el.BROADCAST:
                broadcast(port, msg, include_self=False)
            else:
                port.send(dest, msg)
        for event in self.election.events():
            if isinstance(event, el.CoordinatorElected):
                port.log("election", f"{port.name_of(event.node_id)} is coordinator (term {event.term})")
                if event.node_id == port.node_id:
                    self.schedule_replan(now, at_once=True)
                elif port.plans.highest_key[0] < event.term:
                    # no plan of its term here (its plans may have been refused while a storm of
                    # claims made it look like one): ask for the one it has published, if any
                    port.send(event.node_id, wire.NodeReport(
                        port.node_id, event.term, port.hello.mem_budget_bytes, port.hello.ms_per_layer,
                        *port.span, void_state((event.term, 0))))
            port.changed()

    # -- timers ------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        deadlines = [self.election.next_timer(), self._replan_due, self._published_at]
        span = self._port.span
        if self._port.plans.active is not None and span[1] > span[0]:
            deadlines.append(self._next_report)
        return min((d for d in deadlines if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        timer = self.election.next_timer()
        if timer is not None and timer <= now:
            self.election.handle_timer(now)
            self._flush_election(now)
        if self._replan_due is not None and self._replan_due <= now:
            self._replan_due = None
            self._replan(now)
        if self._published_at is not None and self._published_at <= now:
            self._ready_timer(now)
        if self._next_report <= now:
            self._report_speed(now)

    # -- planning ----------------------------------------------------------------------------

    def plan_seen(self, sender: str, msg: wire.Plan) -> None:
        """Every plan that arrives, even one refused here, tells a future coordinator which
        epochs this term used (up to `el.MAX_TERM`: the next epoch must stay encodable), and,
        from a node that claimed to coordinate its term (`Election.claimed`), what the nodes
        hold (its first plan keeps that: nothing moves for nothing)."""
        if msg.term > el.MAX_TERM or msg.epoch > el.MAX_TERM:
            return
        if (msg.term, msg.epoch) > self._seen_key and self.election.claimed(sender) == msg.term \
                and msg.stages[0].start_layer == self._port.spec.plan_start \
                and msg.stages[-1].end_layer == self._port.spec.plan_end:
            self._seen_key, self._seen_stages = (msg.term, msg.epoch), msg.stages
        self._seen_plan_key = max(self._seen_plan_key, (msg.term, msg.epoch))

    @property
    def seen_plan(self) -> tuple[tuple[int, int], tuple[wire.Stage, ...]] | None:
        """The key and stages of the highest plan seen from a node that claimed its term."""
        return None if self._seen_stages is None else (self._seen_key, self._seen_stages)

    def schedule_replan(self, now: float, at_once: bool = False, *, measured: bool = False) -> None:
        """A re-plan soon. ``measured``: only because measurements changed; such a re-plan
        moves layers only for a gain of ``balance.min_gain`` (hysteresis), unless a re-plan for
        another reason (membership) comes with it."""
        if not self._port.is_coordinator:
            return
        if not measured:
            self._replan_soft = False
        elif self._replan_due is None:
            self._replan_soft = True
        due = now + (0.0 if at_once else self._port.settings.replan_debounce_s)
        if self._replan_due is None or due < self._replan_due:
            self._replan_due = due

    def _advertised(self) -> list[NodeCapacity]:
        """Every member that stays: its budget, its advertised speed and the entry costs it
        reported (without the members that did not load their span in time, where the others
        can hold the model: `_ready_timer`)."""
        caps = [self.measurements.capacity(NodeCapacity(nid, h.mem_budget_bytes, h.ms_per_layer))
                for nid, h in sorted(self._port.members.items()) if nid not in self.leaving]
        now = self._port.now
        self.unready = {n: until for n, until in self.unready.items() if until > now}
        trusted = [c for c in caps if c.node_id not in self.unready]
        placed = self._port.spec.placed
        room = sum(layer_capacity(placed, c) for c in trusted)
        return trusted if self.unready and room >= placed.num_layers else caps

    def _ready_timer(self, now: float) -> None:
        """The plan published here is still pending after `stage_ready_s`: plan without the
        stages that did not report ready."""
        pending = self._port.plans.pending
        published, self._published_at = self._published, None
        if not self._port.is_coordinator or pending is None or published is None \
                or pending.key != (published.term, published.epoch):
            return
        late = [n for n in pending.node_ids if n != self._port.node_id and n not in self._port.plans.ready]
        if late:
            self.unready.update({n: now + 10 * self._port.settings.stage_ready_s for n in late})
            self._port.log("replan", f"{', '.join(self._port.name_of(n) for n in late)} did not load its layers "
                                     f"within {self._port.settings.stage_ready_s:g} s: planning without it")
            self.schedule_replan(now, at_once=True)

    def stage_ready_heard(self, sender: str, now: float) -> None:
        """A stage reported ready: one left out for being late is planned with again."""
        if self.unready.pop(sender, None) is not None:
            self.schedule_replan(now)

    def planning(self, targets: tuple[float | None, float | None] | None = None) -> ms.Planning:
        """The planner's inputs from what the members measured: hop tables (none before the
        first measurement), the entry nodes in use, and the targets (this node's own)."""
        port = self._port
        members = [nid for nid in sorted(port.members) if nid not in self.leaving]
        target_ms, target_ttft = targets if targets is not None else (
            port.settings.target_ms_per_token, port.settings.target_ttft_ms)
        return ms.planning(self.measurements.link_stats(members), codec=port.settings.codec,
                           hidden_size=port.limits.hidden_size, members=members,
                           entry_ids=self._entries(members),
                           target_ms_per_token=target_ms, target_ttft_ms=target_ttft)

    def _entries(self, members: list[str]) -> tuple[str, ...]:
        """The members that entered answers lately (this node: as of now, not its last report)."""
        me = self._port.node_id
        others = [nid for nid in self.measurements.entries(members) if nid != me]
        if me in members and self.tokens.is_entry(self._port.now):
            others.append(me)
        return tuple(sorted(others))

    def _replan(self, now: float, *, soft: bool | None = None) -> None:
        """Plan (or re-plan, sticky to what the nodes hold); ``soft``: a re-plan for measurements
        only, within ``balance.min_gain`` of the best rather than PLAN_TOLERANCE."""
        port = self._port
        soft = self._replan_soft if soft is None else soft
        self._replan_soft = False
        if not port.is_coordinator or self.planning_stopped:
            return
        caps = self.balancer.capacities(self._advertised())
        current = port.plans.active or port.plans.pending
        # sticky: keep what the nodes hold, even under a new coordinator (one that just joined
        # knows the plan in force only from the plans it saw and refused)
        stages = current.stages if current is not None else self._seen_stages
        previous = PlannerPlan(stages, 0.0) if stages is not None else None
        planning = self.planning()
        try:
            if not caps:
                raise PlacementError("no node is left to hold the model", 0)
            planned = plan_layers(port.spec, caps, objective=port.settings.objective,  # type: ignore[arg-type]
                                  previous=previous, **planning.kwargs(),  # type: ignore[arg-type]
                                  tolerance=port.settings.balance.min_gain if soft else PLAN_TOLERANCE)
            self._planned_hops = planning.hop_ms
            self._planned_entries = planning.entries_in_use
        except PlacementError as e:
            port.log("error", f"cannot place the model: {e}")
            # the others first: this node's own copy fails its answers at once, and their
            # next steps must not reach a peer before the refusal does
            refusal = wire.PlanRefused(self.election.term, str(e)[:1000])
            broadcast(port, refusal, include_self=False)
            port.send(port.node_id, refusal)
            return
        republish, self._republish = self._republish, False
        if previous is not None and planned.stages == previous.stages and current is not None \
                and current.key[0] == self.election.term and not republish:
            return  # the plan in force (made in this term) is still the best one
        self.publish(planned)

    def publish(self, planned: PlannerPlan) -> None:
        """Broadcast `planned` as the next plan of this term (this node adopts it first)."""
        port = self._port
        # Nodes that started apart may each have coordinated this term alone: the new plan
        # must outrank every plan of the term seen here, or the others would ignore it.
        term, seen_epoch = max(port.plans.highest_key, self._seen_plan_key)
        self._epoch = max(self._epoch, seen_epoch if term == self.election.term else 0) + 1
        msg = wire.Plan(self.election.term, self._epoch, tuple(planned.stages), port.settings.codec)
        self._published = msg
        self._published_at = port.now + port.settings.stage_ready_s
        spans = ", ".join(f"{port.name_of(s.node_id)} [{s.start_layer}, {s.end_layer})" for s in msg.stages)
        summary = ms.plan_summary(planned) if self._planned_hops or (
            port.settings.target_ms_per_token or port.settings.target_ttft_ms) else ""
        port.log("replan", f"plan {self.election.term}.{self._epoch}: {spans}" + (f" ({summary})" if summary else ""))
        broadcast(port, msg)

    def plan_active(self, plan: PlanView, now: float) -> None:
        if self._port.is_coordinator:
            self.balancer.plan_active(PlannerPlan(plan.stages, 0.0), now)
        self.tokens.new_plan()
        self._trips_seen.clear()
        stats = self._port.stats
        self._reported = (stats.decode_steps, stats.decode_compute_ms)

    # -- balancing ---------------------------------------------------------------------------

    def on_report(self, sender: str, msg: wire.NodeReport, now: float) -> None:
        """A node leaves (planned around), a member's copy of the plan in force went void (it
        is published again), or a stage's measured speed (balanced)."""
        port = self._port
        void = void_key(msg.state)
        if void is not None and void[1] == 0:  # a follower of this term without its plan
            published = self._published
            if port.is_coordinator and published is not None and void[0] == published.term == self.election.term:
                port.send(sender, published)
                active = port.plans.active
                if active is not None and active.key == (published.term, published.epoch):
                    port.send(sender, wire.PlanActive(*active.key))
        elif void is not None:
            current = port.plans.active or port.plans.pending
            if port.is_coordinator and current is not None and current.key == void:
                port.log("replan", f"{port.name_of(sender)} lost a link of plan {void[0]}.{void[1]}: "
                                   "publishing the plan again")
                self._republish = True
                self.schedule_replan(now)
        elif msg.state == "leaving" and sender not in self.leaving:
            self.leaving.add(sender)
            port.log("leave", f"{port.name_of(sender)} is leaving: handing its layers over")
            self.schedule_replan(now, at_once=True)
        elif msg.state == "ready" and port.is_coordinator and port.plans.active is not None:
            if sender != port.node_id and (msg.span_start, msg.span_end) != port.plans.active.span_of(sender):
                raise ValueError(f"a speed report for layers [{msg.span_start}, {msg.span_end}), which "
                                 f"{sender} does not hold")
            layers = msg.span_end - msg.span_start
            self.balancer.observe(sender, msg.ms_per_layer * layers, layers,
                                  steps=port.settings.balance.min_steps, now=now)
            planning = self.planning()
            rebalance = self.balancer.check(self._advertised(), now, **planning.kwargs())
            if rebalance is not None:
                self._planned_hops = planning.hop_ms
                names = ", ".join(port.name_of(n) for n in rebalance.changed)
                port.log("replan", f"rebalancing: {names} runs off its planned speed "
                                   f"({100 * rebalance.gain:.0f}% better plan)")
                self.publish(rebalance.plan)

    def _report_speed(self, now: float) -> None:
        """Stage side: tell the coordinator how fast this node's span really runs, once a few
        decode steps ran since the last report, so that each report averages real work."""
        port = self._port
        self._next_report = now + port.settings.report_interval_s
        start, end = port.span
        coordinator = self.election.coordinator_id
        steps, total_ms = port.stats.decode_steps, port.stats.decode_compute_ms
        d_steps, d_ms = steps - self._reported[0], total_ms - self._reported[1]
        if port.plans.active is None or coordinator is None or end == start \
                or d_steps < port.settings.balance.min_steps:
            return
        self._reported = (steps, total_ms)
        report = wire.NodeReport(port.node_id, self.election.term, port.members[port.node_id].mem_budget_bytes,
                                 d_ms / d_steps / (end - start), start, end, "ready")
        if coordinator == port.node_id:
            self.on_report(port.node_id, report, now)
        else:
            port.send(coordinator, report)

    # -- measurements ------------------------------------------------------------------------

    def links_measured(self, stats: Mapping[str, LinkStats | None], now: float) -> None:
        """What this node's links measured: kept, and sent to every member with this node's
        other figures in a LinkReport (docs/placement.md)."""
        port = self._port
        self.measurements.own_links = {peer: figures for peer, figures in stats.items()
                                       if figures is not None and peer in port.members and peer != port.node_id}
        report = self._own_report(now)
        self.measurements.reports[port.node_id] = report
        broadcast(port, report, include_self=False)
        self._judge(port.node_id, report, now)

    def on_link_report(self, sender: str, msg: wire.LinkReport, now: float) -> None:
        self.measurements.reports[sender] = msg
        self._judge(sender, msg, now)

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
        return self._port.settings.head_ms

    def _own_report(self, now: float) -> wire.LinkReport:
        port = self._port
        active = port.plans.active
        term, epoch = active.key if active is not None else (0, 0)
        links = [figures for figures in (ms.figures_of(peer, stats)
                                         for peer, stats in sorted(self.measurements.own_links.items()))
                 if figures is not None][:wire.messages.MAX_LINKS]
        cap = wire.messages.MAX_REPORT_MS

        def ms_or_0(value: float | None) -> float:
            return min(cap, value) if value is not None and value >= 0 and math.isfinite(value) else 0.0

        settings = port.settings
        span_ms = port.stats.span_ms_per_layer(port.span, settings.balance.min_steps)
        return wire.LinkReport(
            port.node_id, term, epoch, ms_or_0(self.head_ms), ms_or_0(settings.prefill_ms_per_layer),
            ms_or_0(span_ms), ms_or_0(self.tokens.ms_per_token), self.tokens.count, self.tokens.is_entry(now),
            ms_or_0(settings.target_ms_per_token), ms_or_0(settings.target_ttft_ms), tuple(links))

    def _judge(self, sender: str, report: wire.LinkReport, now: float) -> None:
        """Coordinator: re-plan when links changed much since the last plan (at most once per
        ``min_interval_s``), or when an entry node's measured ms per token keeps missing the
        target although the plan predicted better (the balancer's hysteresis rules)."""
        port = self._port
        if not port.is_coordinator or self.planning_stopped:
            return
        planning = self.planning()
        moved = ms.hops_moved(self._planned_hops, planning.hop_ms)
        news = [f"{port.name_of(a)}->{port.name_of(b)}" for a, b in moved[:4]]
        if planning.has_targets and planning.entries_in_use != self._planned_entries:
            news.append("entry nodes " + (", ".join(map(port.name_of, planning.entries_in_use)) or "none"))
        everyone = all(nid in self.measurements.reports for nid in port.members if nid not in self.leaving)
        if news and everyone and now >= self._links_replan_at + port.settings.balance.min_interval_s:
            self._links_replan_at = now
            log.info("measured: %s: re-planning", "; ".join(news))
            self._planned_hops = planning.hop_ms
            self._planned_entries = planning.entries_in_use
            self.schedule_replan(now, measured=True)
        active = port.plans.active
        target = port.settings.target_ms_per_token
        if target is None or active is None or (report.term, report.epoch) != active.key \
                or report.ms_per_token <= 0 or not report.entry:
            return
        if report.tokens - self._trips_seen.get(sender, 0) < port.settings.balance.min_steps:
            return
        self._trips_seen[sender] = report.tokens
        caps = self.predicting_caps(active.key)
        predicted = planning.predict(active.stages, caps, entry_ids=[sender])
        if predicted is None:
            return
        self.balancer.observe_trip(sender, report.ms_per_token, predicted[0], target, now)
        missed = self.balancer.target_missed(now)
        if missed is None:
            return
        self.balancer.refresh(now)
        message = (f"{port.name_of(missed)} measures {report.ms_per_token:.1f} ms per token against a target of "
                   f"{target:g} ms (predicted {predicted[0]:.1f}): re-planning from fresh measurements")
        if self._target_miss_said != active.key:  # once a plan in the event log
            self._target_miss_said = active.key
            port.log("replan", message)
        log.info("%s", message)
        self._replan(now, soft=True)

    def predicting_caps(self, key: tuple[int, int]) -> list[NodeCapacity]:
        """Members as predictions see them: advertised (or balancer) speeds, replaced by what
        each stage measured under plan ``key``, with their entry costs."""
        caps = self.balancer.capacities(self._advertised()) if self._port.is_coordinator else self._advertised()
        return [self.measurements.measured_speed(cap, key) for cap in caps]
