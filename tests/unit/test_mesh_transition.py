"""The transition role (meshllm.mesh.transition): plans adopted, loaded, handed over, ready and
active. First alone, on a port stub, through the races of a mesh on the move (a plan
superseded mid-load, a late hand-over, a giver whose link dropped); then on the simulator."""

from __future__ import annotations

import numpy as np

from meshllm import wire
from meshllm.mesh import LoadSpan, MeshSettings
from meshllm.mesh.jobs import Loaded
from meshllm.mesh.plans import PlanView
from meshllm.mesh.port import PlanFollower
from meshllm.mesh.transition import Phase, Transition
from meshllm.placement.planner import Plan as PlannerPlan
from tests.unit.meshsim import HIDDEN, LAYERS, PROMPT, PortStub, kill_when, reference, settled


class Followers(PlanFollower):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def plan_changed(self, now: float) -> None:
        self.calls.append(("changed", now))

    def plan_active(self, plan: PlanView, now: float) -> None:
        self.calls.append(("active", plan.key))

    def span_loaded(self, span: tuple[int, int]) -> None:
        self.calls.append(("span", span))


def alone(node_id: str, members: str = "abc", **settings: float) -> tuple[Transition, PortStub, Followers]:
    """A transition on its own: node `node_id` among `members`, coordinated by a."""
    port = PortStub(node_id, tuple(members), MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, **settings))
    port.coordinator_id = "a"
    followers = Followers()
    transition = Transition(port, followers=[followers])
    port.plans = transition.book
    return transition, port, followers


def plan(key: tuple[int, int], *stages: tuple[str, int, int]) -> wire.Plan:
    return wire.Plan(key[0], key[1], tuple(wire.Stage(*s) for s in stages), "f32")


def loads(port: PortStub) -> list[LoadSpan]:
    return [j for j in port.jobs if isinstance(j, LoadSpan)]


def caches(*layers: int, session: str = "a/0") -> Loaded:
    """What a load gave up: one session's caches of `layers`."""
    kv = np.ones((1, 3, HIDDEN), np.float32)
    return Loaded(tuple((session, layer, kv, kv) for layer in layers))


def sent(port: PortStub, kind: type) -> list[tuple[str, wire.Message]]:
    return [(dest, m) for dest, m in port.sent if isinstance(m, kind)]


P1 = plan((1, 1), ("a", 0, 3), ("b", 3, LAYERS))
P2 = plan((1, 2), ("a", 0, 2), ("b", 2, 4), ("c", 4, LAYERS))
"""c joins: it takes layers 4 and 5 from b."""


def loaded_p1(node_id: str, **settings: float) -> tuple[Transition, PortStub, Followers]:
    """`node_id` loaded plan 1.1 and the coordinator activated it."""
    transition, port, followers = alone(node_id, **settings)
    transition.on_plan("a", P1, 0.0)
    (job,) = loads(port)
    assert transition.job_done(job.job_id, Loaded())
    transition.on_plan_active("a", wire.PlanActive(1, 1), 0.0)
    assert transition.state((1, 1)).phase is Phase.ACTIVE  # type: ignore[union-attr]
    port.drain()
    followers.calls.clear()
    return transition, port, followers


# -- alone: the way to one plan --------------------------------------------------------------------


def test_a_taker_waits_for_its_givers_caches_then_reports_ready() -> None:
    transition, port, followers = loaded_p1("c")
    transition.on_plan("a", P2, 1.0)
    state = transition.state((1, 2))
    assert state is not None and state.phase is Phase.LOADING and state.givers == {"b"}
    assert state.deadline == 1.0 + port.settings.handover_wait_s
    assert followers.calls == [("changed", 1.0)]
    (job,) = loads(port)
    assert (job.start_layer, job.end_layer) == (4, LAYERS)
    port.drain()
    transition.job_done(job.job_id, Loaded())
    assert state.phase is Phase.AWAITING and transition.span == (4, LAYERS)
    # it tells every other stage its own hand-over is done (it gave nothing up)
    assert {dest for dest, _ in sent(port, wire.HandoverDone)} == {"a", "b"}
    assert not sent(port, wire.StageReady)
    transition.on_handover_done("b", wire.HandoverDone(1, 2, "b"), 1.5)
    assert state.phase is Phase.READY and state.deadline is None
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "c"))]
    transition.on_plan_active("a", wire.PlanActive(1, 2), 2.0)
    assert state.phase is Phase.ACTIVE and transition.ready_nodes == {"a", "b", "c"}
    assert followers.calls[-1] == ("active", (1, 2))


def test_a_giver_sends_the_caches_it_gave_up_to_their_new_owners_under_the_new_plan() -> None:
    transition, port, _ = loaded_p1("b")
    transition.on_plan("a", P2, 1.0)
    assert transition.state((1, 2)).givers == {"a"}  # type: ignore[union-attr]  # layer 2 was a's
    (job,) = loads(port)
    port.drain()
    transition.job_done(job.job_id, caches(4, 5))
    handed = sent(port, wire.CacheHandover)
    assert [(dest, m.layer, (m.term, m.epoch)) for dest, m in handed] == [("c", 4, (1, 2)), ("c", 5, (1, 2))]
    assert {dest for dest, _ in sent(port, wire.HandoverDone)} == {"a", "c"}
    assert not sent(port, wire.StageReady)  # layer 2's caches come from a first
    transition.on_handover_done("a", wire.HandoverDone(1, 2, "a"), 1.2)
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "b"))]


def test_a_node_outside_the_plan_loads_nothing_and_reports_nothing() -> None:
    transition, port, followers = alone("c")
    transition.on_plan("a", P1, 0.0)
    (job,) = loads(port)
    assert (job.start_layer, job.end_layer) == (0, 0)
    transition.job_done(job.job_id, Loaded())
    assert ("span", (0, 0)) in followers.calls
    assert transition.state((1, 1)).phase is Phase.READY  # type: ignore[union-attr]
    assert not sent(port, wire.StageReady)


def test_a_node_that_stops_loading_adopts_plans_without_loading_them() -> None:
    transition, port, _ = loaded_p1("b")
    transition.loading = False
    transition.on_plan("a", P2, 1.0)
    assert transition.book.pending is not None and transition.book.pending.key == (1, 2)
    assert transition.state((1, 2)).phase is Phase.ADOPTED  # type: ignore[union-attr]
    assert not loads(port)


def test_a_refusal_fails_answers_until_the_next_plan() -> None:
    transition, port, followers = alone("b")
    transition.on_plan_refused("a", wire.PlanRefused(1, "short by 100 bytes"), 1.0)
    assert transition.placement_error == "short by 100 bytes" and followers.calls == [("changed", 1.0)]
    transition.on_plan("a", P1, 2.0)
    assert transition.placement_error is None


def test_the_coordinator_activates_a_plan_once_every_stage_is_ready() -> None:
    transition, port, _ = alone("a")
    transition.on_plan("a", P1, 0.0)
    port.drain()
    transition.on_stage_ready("a", wire.StageReady(1, 1, "a"), 0.1)
    assert not port.sent
    transition.on_stage_ready("b", wire.StageReady(1, 1, "b"), 0.2)
    assert {dest for dest, m in port.sent if m == wire.PlanActive(1, 1)} == {"a", "b", "c"}
    follower, fport, _ = alone("b")
    follower.on_plan("a", P1, 0.0)
    fport.drain()
    follower.on_stage_ready("b", wire.StageReady(1, 1, "b"), 0.1)  # not its coordinator: ignored
    assert not fport.sent


# -- alone: the races --------------------------------------------------------------------------------


def test_a_plan_superseded_mid_load_hands_its_caches_over_under_the_newer_plan() -> None:
    """b gives layers 4 and 5 up under 1.2; plan 1.3 (the same layout, re-published) comes
    while the load of 1.2 runs. The takers refuse caches under 1.2, so they go out under 1.3,
    with the span b held before either load."""
    transition, port, _ = loaded_p1("b")
    transition.on_plan("a", P2, 1.0)
    p3 = plan((1, 3), ("a", 0, 2), ("b", 2, 4), ("c", 4, LAYERS))
    transition.on_plan("a", p3, 1.1)
    first, second = loads(port)
    assert transition.state((1, 2)) is None  # superseded: nothing of it is awaited any more
    port.drain()
    transition.job_done(first.job_id, caches(4, 5))
    assert transition.span == (2, 4) and transition.unhanded is not None
    assert not port.sent  # nothing under 1.2
    transition.job_done(second.job_id, Loaded())
    handed = sent(port, wire.CacheHandover)
    assert [(dest, m.layer, (m.term, m.epoch)) for dest, m in handed] == [("c", 4, (1, 3)), ("c", 5, (1, 3))]
    assert {dest for dest, m in sent(port, wire.HandoverDone) if (m.term, m.epoch) == (1, 3)} == {"a", "c"}
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 3, "b"))]
    assert transition.unhanded is None and transition.state((1, 3)).phase is Phase.READY  # type: ignore[union-attr]


def test_a_load_that_completes_after_its_plan_went_void_keeps_its_caches_for_the_next_plan() -> None:
    transition, port, _ = loaded_p1("b")
    transition.on_plan("a", P2, 1.0)
    (job,) = loads(port)
    port.members.pop("c")
    assert transition.peer_lost("c")  # c was in 1.2: the plan is void
    transition.job_done(job.job_id, caches(4))
    assert transition.unhanded is not None and not sent(port, wire.CacheHandover)
    transition.on_plan("a", plan((1, 3), ("a", 0, 3), ("b", 3, LAYERS)), 2.0)
    (_, again) = loads(port)
    port.drain()
    transition.job_done(again.job_id, Loaded())
    # layer 4 is b's again under 1.3: nothing to send, but every stage hears b is done
    assert not sent(port, wire.CacheHandover) and [d for d, _ in sent(port, wire.HandoverDone)] == ["a"]
    assert transition.unhanded is None


def test_a_plan_of_the_same_key_from_another_coordinator_replaces_the_one_loading() -> None:
    transition, port, _ = loaded_p1("b")
    transition.on_plan("a", P2, 1.0)
    other = plan((1, 2), ("z", 0, 3), ("b", 3, LAYERS))
    port.members["z"] = port.members["a"]
    transition.on_plan("z", other, 1.1)
    first, second = loads(port)
    assert transition.book.pending is not None and transition.book.pending.coordinator_id == "z"
    port.drain()
    transition.job_done(first.job_id, caches(4, 5))
    assert not port.sent and transition.state((1, 2)).phase is Phase.LOADING  # type: ignore[union-attr]
    transition.job_done(second.job_id, Loaded())
    assert sent(port, wire.StageReady) == [("z", wire.StageReady(1, 2, "b"))]
    assert not sent(port, wire.CacheHandover)  # b keeps layers 4 and 5 under z's plan


def test_a_hand_over_done_before_the_plan_is_adopted_here_still_counts() -> None:
    """The giver may load the plan and say so before the taker even hears of it."""
    transition, port, _ = loaded_p1("c")
    transition.on_handover_done("b", wire.HandoverDone(1, 2, "b"), 0.9)
    assert transition.state((1, 2)).phase is Phase.HEARD  # type: ignore[union-attr]
    transition.on_handover_done("b", wire.HandoverDone(1, 0, "b"), 0.9)  # below the plans seen: ignored
    assert transition.state((1, 0)) is None
    transition.on_plan("a", P2, 1.0)
    (job,) = loads(port)
    port.drain()
    transition.job_done(job.job_id, Loaded())
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "c"))]


def test_a_hand_over_that_comes_after_the_wait_changes_nothing() -> None:
    transition, port, _ = loaded_p1("c", handover_wait_s=2.0)
    transition.on_plan("a", P2, 1.0)
    (job,) = loads(port)
    transition.job_done(job.job_id, Loaded())
    assert transition.next_timer() == 3.0
    port.drain()
    transition.handle_timer(2.9)
    assert not port.sent
    transition.handle_timer(3.0)
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "c"))]
    assert any("no cache hand-over from b" in getattr(e, "message", "") for e in port.events)
    assert transition.next_timer() is None
    port.drain()
    transition.on_handover_done("b", wire.HandoverDone(1, 2, "b"), 4.0)  # late
    assert not port.sent and transition.state((1, 2)).phase is Phase.READY  # type: ignore[union-attr]


def test_a_giver_whose_link_dropped_is_not_waited_for() -> None:
    """b leaves cleanly: c takes its layers. b's link drops before its caches came: they are
    gone with it, and c reports ready at once rather than after the wait."""
    transition, port, _ = loaded_p1("c")
    leave = plan((1, 2), ("a", 0, 3), ("c", 3, LAYERS))
    transition.on_plan("a", leave, 1.0)
    assert transition.state((1, 2)).givers == {"b"}  # type: ignore[union-attr]
    (job,) = loads(port)
    transition.job_done(job.job_id, Loaded())
    assert not sent(port, wire.StageReady)
    port.members.pop("b")
    assert not transition.peer_lost("b")  # b is not in the plan: it stays
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "c"))]


def test_a_giver_that_drops_and_comes_back_while_the_load_runs_is_not_waited_for() -> None:
    transition, port, _ = loaded_p1("c")
    transition.on_plan("a", plan((1, 2), ("a", 0, 3), ("c", 3, LAYERS)), 1.0)
    (job,) = loads(port)
    hello = port.members.pop("b")
    transition.peer_lost("b")
    port.members["b"] = hello  # back, without the caches it held
    transition.job_done(job.job_id, Loaded())
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(1, 2, "c"))]


def test_a_giver_whose_link_dropped_and_came_back_since_holds_no_caches() -> None:
    transition, port, _ = loaded_p1("c")
    hello = port.members.pop("b")
    assert transition.peer_lost("b")  # b was in the active plan
    port.members["b"] = hello  # a new incarnation: it lost its caches
    port.term = 2
    port.drain()
    transition.on_plan("a", plan((2, 1), ("a", 0, 3), ("c", 3, 5), ("b", 5, LAYERS)), 2.0)
    state = transition.state((2, 1))
    assert state is not None and state.givers == set() and state.deadline is None
    (job,) = loads(port)
    transition.job_done(job.job_id, Loaded())
    assert sent(port, wire.StageReady) == [("a", wire.StageReady(2, 1, "c"))]


# -- on the simulator --------------------------------------------------------------------------------


def test_a_node_only_loads_plans_not_below_what_it_has_seen() -> None:
    net = settled("abc")
    node = net.nodes["b"]
    key = node.core.book.active.key  # type: ignore[union-attr]
    old = wire.Plan(key[0], key[1], (wire.Stage("a", 0, LAYERS),), "f32")
    node.core.receive("a", old, net.now)
    assert not [j for j in node.core.jobs() if isinstance(j, LoadSpan)]
    assert node.core.book.active is not None and node.core.book.active.key == key


def test_a_clean_leave_hands_its_caches_over_and_nothing_is_recomputed() -> None:
    net = settled("abc")
    coordinator = net.nodes["a"].core.coordinator_id
    plan_ = net.nodes["a"].core.book.active
    assert plan_ is not None
    leaver = next(n for n in plan_.node_ids if n not in (coordinator, "a"))
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 12)
    assert net.nodes[leaver].core.leave(net.now)
    net.run_until(lambda: net.nodes[leaver].core.leave_settled)
    net.nodes[leaver].core.stop_loading()
    net.kill(leaver)
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    stats = [n.core.stats for n in net.nodes.values()]
    assert sum(s.rebuilds for s in stats) >= 1
    assert sum(s.rebuilt_layers for s in stats) == 0 and sum(s.full_replays for s in stats) == 0


def test_a_joiner_takes_layers_with_their_caches_and_nothing_is_recomputed() -> None:
    net = settled("ab")
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    net.add("c")
    net.connect_all()
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    net.settle()
    plan_ = net.nodes["a"].core.book.active
    assert plan_ is not None and "c" in plan_.node_ids
    assert net.nodes["c"].core.stats.rebuilds == 1  # it took its layers mid-answer, caches included
    assert net.nodes["c"].core.stats.kept_layers == plan_.span_of("c")[1] - plan_.span_of("c")[0]
    stats = [n.core.stats for n in net.nodes.values()]
    assert sum(s.rebuilt_layers for s in stats) == 0 and sum(s.full_replays for s in stats) == 0


def test_a_handover_that_never_comes_is_waited_for_at_most_a_while() -> None:
    net = settled("ab", handover_wait_s=1.0)
    answer = net.ask("a", PROMPT, 30)
    net.run_until(lambda: len(answer.tokens) >= 8)
    net.lose = lambda sender, dest, msg: isinstance(msg, (wire.CacheHandover, wire.HandoverDone))
    net.add("c", settings=MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, handover_wait_s=1.0))
    net.connect_all()
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)
    assert any("no cache hand-over" in e.message for n in net.nodes.values() for e in n.log)


def test_caches_handed_over_after_the_wait_do_not_change_the_answer() -> None:
    """The hand-over comes, but late: the taker reported ready without it and the answer
    rebuilt the layers; the caches that come then must not replace the rebuilt ones."""
    net = settled("ab", handover_wait_s=0.5)
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    net.extra_latency_s = lambda sender, dest, msg: 2.0 if isinstance(msg, (wire.CacheHandover,
                                                                            wire.HandoverDone)) else 0.0
    net.add("c", settings=MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, handover_wait_s=0.5))
    net.connect_all()
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert any("no cache hand-over" in e.message for n in net.nodes.values() for e in n.log)
    assert net.answer("c", PROMPT, 12).tokens == reference(PROMPT, 12)


def test_a_giver_that_vanishes_mid_hand_over_is_not_waited_for() -> None:
    """A node leaves cleanly, but vanishes before its caches reach the nodes that take its
    layers: they report ready at once (its caches are gone with it) rather than after the
    wait, and the answer rebuilds those layers, unchanged."""
    net = settled("abc", handover_wait_s=30.0)
    coordinator = net.nodes["a"].core.coordinator_id
    leaver = next(n for n in "bc" if n != coordinator)
    net.lose = lambda sender, dest, msg: sender == leaver and isinstance(msg, (wire.CacheHandover,
                                                                               wire.HandoverDone))
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    assert net.nodes[leaver].core.leave(net.now)

    def waiting_for_the_leaver() -> bool:
        for node_id, node in net.nodes.items():
            pending = node.core.book.pending
            state = node.core.transition.state(pending.key) if pending is not None else None
            if state is not None and leaver in state.waiting() and state.phase is Phase.AWAITING:
                return True
        return False

    net.run_until(waiting_for_the_leaver)
    started = net.now
    net.kill(leaver)
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert net.now - started < 5.0
    assert not any("no cache hand-over" in e.message for n in net.nodes.values() for e in n.log)
    assert sum(n.core.stats.rebuilt_layers for n in net.nodes.values()) > 0  # its caches were gone


def test_a_plan_superseded_while_loading_still_gets_its_caches_handed_over() -> None:
    """A coordinator that wins a new term publishes its plan again at once (seen on a loaded
    machine: plans 2.1 and 3.2 a millisecond apart). A node giving layers up loads for both;
    it must hand them over under the plan it ends with, or their taker waits for nothing."""
    net = settled("ab", handover_wait_s=30.0)
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    net.add("c", settings=MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, handover_wait_s=30.0))
    net.connect_all()

    def coordinator():  # type: ignore[no-untyped-def]
        return net.nodes[net.nodes["c"].core.coordinator_id or "c"].core

    net.run_until(lambda: coordinator().book.pending is not None and "c" in coordinator().book.pending.node_ids)
    pending = coordinator().book.pending
    coordinator().coordinator.publish(PlannerPlan(pending.stages, 0.0))  # the same layout again, under a new key
    started = net.now
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert not any("no cache hand-over" in e.message for n in net.nodes.values() for e in n.log)
    assert net.now - started < 5.0
    stats = [n.core.stats for n in net.nodes.values()]
    assert sum(s.rebuilt_layers for s in stats) == 0 and sum(s.full_replays for s in stats) == 0


def test_every_stage_of_a_new_plan_hears_from_every_other_that_its_hand_over_is_done() -> None:
    """A taker expects hand-overs from the nodes the plan before gave its new layers to, and
    a node may never have loaded that plan (superseded first, or refused from a coordinator
    it did not follow: seen on a loaded machine, a taker then waited 5 s for nothing). So
    every node that loads a plan tells every other stage of it, whatever it held."""
    net = settled("abc")
    sent_: list[tuple[str, str, wire.Message]] = []
    net.lose = lambda sender, dest, msg: sent_.append((sender, dest, msg)) is not None
    net.add("d")
    net.connect_all()
    net.settle()
    plan_ = net.nodes["a"].core.book.active
    assert plan_ is not None and plan_.key[0] >= 2  # the joiner's term
    told = {(s, d) for s, d, m in sent_ if isinstance(m, wire.HandoverDone) and (m.term, m.epoch) == plan_.key}
    assert told >= {(s, d) for s in plan_.node_ids for d in plan_.node_ids if s != d}


def test_every_node_ends_a_re_plan_with_its_plan_active_and_nothing_awaited() -> None:
    net = settled("abc")
    kill_when(net, "a", lambda net: next(n for n in "bc" if n != net.nodes["a"].core.coordinator_id), 8)
    net.settle()
    for node in net.nodes.values():
        active = node.core.book.active
        assert active is not None
        state = node.core.transition.state(active.key)
        assert state is not None and state.phase is Phase.ACTIVE and state.deadline is None
        assert node.core.transition.next_timer() is None and not node.core.transition.loads
