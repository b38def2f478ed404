"""A hostile member (issue 20): a node of the mesh, with its key, that forges messages. It
cannot steer the election with a score claim, push the terms far or fast, nor touch another
member's answers: forged steps, results, refusals and caches for a session it has no part in
change nothing, and the answer finishes exactly as one node alone gives it."""

from __future__ import annotations

import heapq
import logging

import numpy as np
import pytest

from meshllm import wire
from meshllm.mesh.election import ELECTION_WINDOW_S, MAX_ELECTIONS, MAX_TERM_STEP
from meshllm.mesh.settings import MAX_ELECTION_SCORE, election_score
from meshllm.mesh.transition import MAX_HEARD_PLANS
from tests.unit.meshsim import HIDDEN, LAYERS, PROMPT, Net, reference

ROGUE = "r"


def with_rogue(can_coordinate: bool = True) -> Net:
    """Honest a, b and c with one active plan, and a member `r` that holds no layers (no
    memory to offer) and has no part in anyone's answer."""
    net = Net()
    for n in "abc":
        net.add(n)
    net.add(ROGUE, mem_budget_bytes=0, can_coordinate=can_coordinate)
    net.connect_all()
    net.settle()
    plan = net.nodes["a"].core.book.active
    assert plan is not None and ROGUE not in plan.node_ids
    return net


def inject(net: Net, dest: str, msg: wire.Message, delay_s: float = 0.0) -> None:
    """`msg` from the rogue to `dest`, on the wire like any message (delivered first when due
    at once: before what honest nodes sent at the same time)."""
    net._seq += 1
    heapq.heappush(net.in_flight, (net.now + delay_s, -net._seq, ROGUE, dest, wire.encode(msg)))


def garbage(rows: int = 1) -> wire.TensorPayload:
    return wire.encode_tensor(np.full((rows, HIDDEN), 0.25, np.float32), "f32")


def coordinators(net: Net) -> set[str | None]:
    return {n.core.coordinator_id for nid, n in net.nodes.items() if nid != ROGUE}


# -- the election ------------------------------------------------------------------------------


def test_the_score_comes_from_the_reported_budget_and_speed_within_bounds() -> None:
    def hello(budget: int, ms: float) -> wire.Hello:
        return wire.Hello("x", "x", wire.PROTOCOL_VERSION, "m", "model", 1, budget, ms, True)

    assert election_score(hello(8 * 10**9, 2.0)) == 4.0  # GB per ms of a layer
    assert election_score(hello(2**62, 0.0)) == MAX_ELECTION_SCORE  # an absurd claim is bounded
    assert election_score(hello(2**62, 0.0)) == election_score(hello(2**42, 0.01))


def test_a_score_claimed_in_an_election_message_does_not_make_a_rogue_coordinator() -> None:
    net = with_rogue()
    term = net.nodes["a"].core.election.term
    for dest in "abc":
        inject(net, dest, wire.Election(term + 1, ROGUE, 1e300))
        inject(net, dest, wire.Coordinator(term + 1, ROGUE), delay_s=0.0001)
    net.run_for(5.0)
    net.settle()
    assert coordinators(net) == {"c"}  # the highest-ranked by the hellos
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_term_far_above_the_highest_seen_is_refused() -> None:
    net = with_rogue()
    term = net.nodes["a"].core.election.term
    for dest in "abc":
        inject(net, dest, wire.Coordinator(term + MAX_TERM_STEP + 1, ROGUE))
        inject(net, dest, wire.Election(2**53, ROGUE, 0.0))
    net.run_for(3.0)
    assert {n.core.election.term for n in net.nodes.values()} == {term}
    assert all(net.nodes[n].core.status_view()["refused"] == {"Coordinator": 1, "Election": 1} for n in "abc")
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_node_pushed_to_the_bound_alone_is_not_cut_off() -> None:
    """The rogue pushes a alone as far as it may: a's next election is one beyond what the
    others take from it; a's claims, repeated, are taken up after a while, and one mesh with
    one coordinator remains."""
    net = with_rogue()
    term = net.nodes["a"].core.election.term
    inject(net, "a", wire.Coordinator(term + MAX_TERM_STEP, ROGUE))
    net.run_for(1.0)
    assert net.nodes["a"].core.election.term > term + MAX_TERM_STEP  # a is past what b and c take
    net.run_for(30.0)
    net.settle()
    assert coordinators(net) == {"c"} and len({n.core.election.term for n in net.nodes.values()}) == 1
    assert net.answer("b", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_an_election_storm_from_one_member_leaves_a_stable_coordinator() -> None:
    net = with_rogue()
    term = net.nodes["a"].core.election.term
    answer = net.ask("a", PROMPT, 60)
    storm_s, every_s = 10.0, 0.02
    count = int(storm_s / every_s)
    for i in range(count):  # every 20 ms, a term above the last, and a claim to it
        for dest in "abc":
            inject(net, dest, wire.Election(term + 1 + i, ROGUE, 0.0), delay_s=i * every_s)
            inject(net, dest, wire.Coordinator(term + 1 + i, ROGUE), delay_s=i * every_s + 0.005)
    net.run_until(lambda: answer.done and not any(s == ROGUE for _, _, s, _, _ in net.in_flight), max_s=120)
    assert answer.error is None and answer.tokens == reference(PROMPT, 60)
    elected = {e.message.split(" is coordinator")[0] for n in "abc" for e in net.nodes[n].log if e.kind == "election"}
    assert elected == {"c"}  # never anyone else, for all the storm
    # a took up at most MAX_ELECTIONS of the rogue's raises in any window, and each costs an
    # election or two (without the bound: one every 20 ms, 500)
    elections = [e for e in net.nodes["a"].log if e.kind == "election"]
    assert len(elections) <= 2 * MAX_ELECTIONS * (storm_s / ELECTION_WINDOW_S + 1)
    net.settle()
    assert coordinators(net) == {"c"}
    assert net.answer("b", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_burst_of_claims_leaves_every_node_with_the_plan_in_force() -> None:
    """100 elections and claims at once, each a term higher: the honest coordinator answers
    them with terms of its own, which its peers charge to it and refuse for a while, plans
    included. Once they follow it again, each asks for the plan of its term and gets it."""
    net = with_rogue(can_coordinate=False)
    term = net.nodes["a"].core.election.term
    for d, dest in enumerate("abc"):  # one daemon after the other, as over three links
        for i in range(100):
            inject(net, dest, wire.Election(term + 1 + i, ROGUE, float(i)), delay_s=d * 0.01 + i * 0.0002)
            inject(net, dest, wire.Coordinator(term + 1 + i, ROGUE), delay_s=d * 0.01 + i * 0.0002 + 0.0001)
    net.run_until(lambda: len(coordinators(net)) == 1 and None not in coordinators(net)
                  and all(net.nodes[n].core.book.active is not None
                          and net.nodes[n].core.book.active.key[0] == net.nodes[n].core.election.term
                          for n in "abc"), max_s=60)
    assert net.answer("b", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_member_that_claims_room_and_speed_it_never_loads_stalls_no_one() -> None:
    """It gets every layer of the next plan (its hello says so) and never reports ready: the
    coordinator plans again without it, and answers go on; it is planned with again once it
    does report a stage ready."""
    net = with_rogue()
    boaster = net.add("z", mem_budget_bytes=10**12, ms_per_layer=0.001, can_coordinate=False)
    boaster.frozen = True  # its jobs never run: it loads nothing
    for n in ("a", "b", "c", ROGUE):
        net.connect(n, "z")
    net.run_until(lambda: any("did not load its layers" in e.message for n in "abc" for e in net.nodes[n].log),
                  max_s=60)
    net.run_until(lambda: all(net.nodes[n].core.book.active is not None
                              and "z" not in net.nodes[n].core.book.active.node_ids for n in "abc"), max_s=60)
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)


# -- other members' answers ------------------------------------------------------------------------


def test_forged_steps_results_and_refusals_for_another_members_answer_change_nothing() -> None:
    """Whenever a step of a's answer goes out, the rogue sends, ahead of it, the same step with
    another hidden state to its stage, a result and a refusal of it to a, a rebuild part and
    a rebuild's end: all refused, and the answer is exactly a lone node's."""
    net = with_rogue()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    first, middle, last = plan.node_ids
    assert first == "a"  # a's answers start with its own layers
    forged: list[int] = []

    def forge(sender: str, dest: str, msg: wire.Message) -> bool:
        if sender == "a" and dest == middle and isinstance(msg, wire.Forward):
            rows = msg.hidden.shape[0]
            inject(net, middle, wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos,
                                             garbage(rows), msg.route))
            inject(net, last, wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos,
                                           garbage(rows), (first,)))
            inject(net, "a", wire.Result(msg.session_id, msg.seq, garbage(rows)))
            inject(net, "a", wire.StepFailed(msg.session_id, msg.seq, "stale_plan", "forged"))
            inject(net, "a", wire.Rebuilt(msg.session_id, msg.seq))
            inject(net, middle, wire.Rebuild(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos + rows,
                                             1, 0, 1, (garbage(1),), msg.route, False))
            forged.append(msg.seq)
        return False

    net.lose = forge
    answer = net.answer("a", PROMPT, 30)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)
    assert len(forged) >= 30
    assert answer.states == []  # not even a pause: no step was lost
    refused = {n: net.nodes[n].core.status_view()["refused"] for n in (first, middle, last)}
    assert refused["a"] == {"Result": len(forged), "StepFailed": len(forged)}  # Rebuilt: no rebuild runs
    assert refused[middle] == {"Forward": len(forged), "Rebuild": len(forged)}
    assert refused[last] == {"Forward": len(forged)}


def test_forged_cache_hand_overs_for_another_members_answer_change_nothing() -> None:
    """A stage leaves mid-answer and hands its layers over with their caches; the rogue, which
    never held a layer, hands the takers caches of every layer of that answer first: refused."""
    net = with_rogue()
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    (session,) = net.nodes["a"].answers
    term, epoch = net.nodes["a"].core.book.active.key  # type: ignore[union-attr]
    kv = wire.encode_tensor(np.full((1, 200, HIDDEN), 0.5, np.float32), "f32")
    for key in ((term, epoch + 1), (term, epoch + 2), (term + 1, 1)):
        for layer in range(LAYERS):
            for dest in "ac":
                inject(net, dest, wire.CacheHandover(session, *key, layer, kv, kv))
    assert net.nodes["b"].core.leave(net.now)
    net.run_until(lambda: answer.done)
    assert "b" not in net.nodes["a"].core.book.active.node_ids  # type: ignore[union-attr]
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert sum(n.core.stats.kept_layers for n in net.nodes.values()) > 0  # b's caches were taken up
    assert all(net.nodes[n].core.status_view()["refused"].get("CacheHandover") for n in "ac")


# -- what a member can make a node keep or log --------------------------------------------------


def test_refusals_are_logged_once_per_peer_and_kind_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    net = with_rogue()
    core = net.nodes["a"].core
    term, epoch = core.book.active.key  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, logger="meshllm.mesh.checks"):
        for _ in range(5):
            core.receive(ROGUE, wire.NodeReport("b", term, 10**6, 1.0, 0, 0, "leaving"), net.now)
            core.receive(ROGUE, wire.StageReady(term, epoch, "b"), net.now)
    assert len(caplog.records) == 2
    assert core.status_view()["refused"] == {"NodeReport": 5, "StageReady": 5}


def test_hand_over_records_for_plans_to_come_are_bounded() -> None:
    net = with_rogue()
    core = net.nodes["a"].core
    term, epoch = core.book.active.key  # type: ignore[union-attr]
    for i in range(1000):
        core.receive(ROGUE, wire.HandoverDone(term + 1 + i, 0, ROGUE), net.now)
    assert len(core.transition.states) <= MAX_HEARD_PLANS + 1  # the plan in force, and a few to come
    assert net.nodes["b"].core.leave(net.now)  # a re-plan, with hand-overs, still goes through
    net.run_until(lambda: net.nodes["b"].core.leave_settled)
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_speed_report_for_layers_the_sender_does_not_hold_is_refused() -> None:
    net = with_rogue()
    coordinator = net.nodes["c"].core
    plan = coordinator.book.active
    assert plan is not None and coordinator.is_coordinator
    start, end = plan.span_of("a")
    coordinator.receive("b", wire.NodeReport("b", plan.key[0], 10**6, 1e6, start, end, "ready"), net.now)
    assert coordinator.status_view()["refused"] == {"NodeReport": 1}
