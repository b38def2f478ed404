"""The coordinator role (meshllm.mesh.coordinator) on the simulator: the election and its
glue, planning and re-planning on joins, leaves, losses and refusals, balancing, and plans
from measured links and latency targets (docs/placement.md).

Each scenario checks what a user sees: the answer is the one a single node gives, token for
token; the mesh ends with one coordinator and one plan; an impossible request ends with a
clear error, never a hang.
"""

from __future__ import annotations

import pytest

from meshllm import wire
from meshllm.mesh import LoadSpan, MeshSettings
from meshllm.placement.balance import BalanceSettings
from tests.unit.meshsim import (
    EMBED_HEAD_BYTES, LAYER_BYTES, LAYERS, NEED_BYTES, OTHER_PROMPT, PROMPT, SLOW_LINK_MS, Net, kill_when, placed,
    reference, settled, short_of_memory, slow_links, three_nodes,
)


def test_three_nodes_elect_one_coordinator_and_every_entry_node_answers_exactly() -> None:
    net = three_nodes()
    assert len({n.core.coordinator_id for n in net.nodes.values()}) == 1
    plan = net.nodes["a"].core.book.active
    assert plan is not None and plan.stages[0].start_layer == 0 and plan.stages[-1].end_layer == LAYERS
    want = reference(PROMPT, 24)
    for n in "abc":
        answer = net.answer(n, PROMPT, 24)
        assert answer.error is None and answer.tokens == want and answer.finish_reason == "length"


def test_the_coordinator_lost_mid_answer_a_new_one_replans_and_the_answer_is_unchanged() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    entry = next(n for n in "abc" if n != coordinator)
    answer, victim = kill_when(net, entry, lambda net: coordinator, 7)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    net.settle()
    survivors = {n.core.coordinator_id for n in net.nodes.values()}
    assert len(survivors) == 1 and victim not in survivors


def test_a_partition_that_heals_leaves_one_coordinator_and_one_plan() -> None:
    net = Net()
    for n in "abcd":
        net.add(n)
    net.connect_all()
    net.settle()
    net.partition({"a", "b"}, {"c", "d"})
    net.run_for(3.0)
    # each side now answers on its own, exactly
    assert net.answer("a", PROMPT, 12).tokens == reference(PROMPT, 12)
    assert net.answer("d", PROMPT, 12).tokens == reference(PROMPT, 12)
    net.connect_all()
    net.settle()
    assert len({n.core.coordinator_id for n in net.nodes.values()}) == 1
    assert len({n.core.election.term for n in net.nodes.values()}) == 1
    assert net.answer("b", OTHER_PROMPT, 12).tokens == reference(OTHER_PROMPT, 12)


def test_nodes_that_each_coordinated_alone_merge_into_one_active_plan() -> None:
    """Nodes that start apart each win term 1 alone and publish their own plans; when they
    link, the winner's next plan must outrank every plan of that term, or no plan activates."""
    net = Net()
    net.add("a")
    net.add("b")
    net.add("z", ms_per_layer=0.5)  # faster: it wins, and its plan differs from a and b's
    net.run_for(1.0)  # each one alone: coordinator of term 1, plan 1.1
    net.connect("a", "b")
    net.run_for(1.0)  # a and b: one of them publishes plan 1.2
    net.connect("a", "z")
    net.connect("b", "z")  # z outranks both and publishes its second plan
    net.run_for(1.0)
    net.settle()
    coordinators = {n.core.coordinator_id for n in net.nodes.values()}
    assert coordinators == {"z"}
    assert {n.core.book.active.coordinator_id for n in net.nodes.values()} == {"z"}  # type: ignore[union-attr]
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_node_that_coordinated_alone_takes_the_plan_of_the_mesh_it_joins() -> None:
    """Alone, a node plans term 1 for itself (plan 1.1); the mesh it then joins has its own
    plan 1.1. Same key, other plan: the newcomer must take its new coordinator's."""
    net = Net()
    net.add("a")
    net.add("b")
    net.connect("a", "b")
    net.settle()
    net.add("0", ms_per_layer=4.0)  # slower: it ranks last, and the mesh needs none of its layers
    net.run_for(1.0)  # alone: its own plan 1.1
    net.connect("0", "a")
    net.connect("0", "b")
    net.run_for(1.0)
    net.settle()
    plans = {n.core.book.active.stages for n in net.nodes.values()}  # type: ignore[union-attr]
    assert len(plans) == 1
    assert net.answer("0", PROMPT, 6).tokens == reference(PROMPT, 6)


def test_a_clean_leave_hands_the_layers_over_before_the_node_goes() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    leaver = next(n for n in "abc" if n != coordinator and n != "a")
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 12)
    assert net.nodes[leaver].core.leave(net.now)
    net.run_until(lambda: net.nodes[leaver].core.leave_settled)
    net.nodes[leaver].core.stop_loading()
    net.kill(leaver)  # only after the others hold its layers
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    plan = net.nodes["a"].core.book.active
    assert plan is not None and leaver not in plan.node_ids
    assert any("is leaving" in e.message for e in net.nodes[coordinator].log)


def test_a_lone_node_with_nobody_to_hand_over_to_just_goes() -> None:
    net = Net()
    net.add("solo")
    net.settle()
    assert net.nodes["solo"].core.leave(net.now) is False


def test_too_little_memory_fails_fast_with_the_shortfall_then_recovers_when_a_node_joins() -> None:
    net = short_of_memory()
    answer = net.answer("a", PROMPT, 8)
    assert answer.error is not None and "bytes" in answer.error
    net.add("c", mem_budget_bytes=NEED_BYTES)
    net.connect_all()
    net.settle()
    assert net.answer("b", PROMPT, 8).tokens == reference(PROMPT, 8)


def test_a_late_joiner_learns_the_plan_can_ask_and_does_not_break_an_answer_in_progress() -> None:
    net = three_nodes()
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    net.add("d")
    net.connect_all()
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    net.settle()
    assert net.nodes["d"].core.book.active is not None
    assert net.answer("d", OTHER_PROMPT, 10).tokens == reference(OTHER_PROMPT, 10)


def test_a_stage_that_turns_slow_is_given_fewer_layers_mid_answer() -> None:
    fast = BalanceSettings(min_reports=3, min_drift_s=0.3, min_interval_s=0.5, min_steps=3)
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, report_interval_s=0.1, balance=fast)
    net = Net()
    for n in "abc":
        net.add(n, settings=settings)
    net.connect_all()
    net.settle()
    before = net.nodes["a"].core.book.active
    assert before is not None
    slow = before.node_ids[1]
    layers_before = before.span_of(slow)[1] - before.span_of(slow)[0]
    net.nodes[slow].slow_factor = 8.0  # another program took the device
    answer = net.answer("a", PROMPT, 200)
    assert answer.tokens == reference(PROMPT, 200)  # re-planned mid-answer, and still exact
    after = net.nodes["a"].core.book.active
    assert after is not None and after.key != before.key
    assert after.span_of(slow)[1] - after.span_of(slow)[0] < layers_before
    assert any("rebalancing" in e.message for n in net.nodes.values() for e in n.log)


def test_a_latency_target_leaves_the_node_with_slow_links_out_and_without_it_is_back() -> None:
    # one token: 6 layers x 1 ms of compute, ~2 ms a hop between b and c, ~17 ms a hop to or from a
    net = placed(target_ms_per_token=15.0)
    plan = net.nodes["b"].core.book.active
    assert plan is not None and set(plan.node_ids) == {"b", "c"}
    assert net.answer("b", PROMPT, 24).tokens == reference(PROMPT, 24)
    net.run_measuring(1.0, slow_links("a"))  # b's report says it is an entry node now
    status = net.nodes["b"].core.status_view()["latency"]
    assert status["target_ms_per_token"] == 15.0 and status["miss_ms_per_token"] == 0.0  # type: ignore[index]
    assert status["predicted_ms_per_token"] < 15.0 and status["entry_ids"] == ["b"]  # type: ignore[index,operator]
    # every node shows the same prediction and the coordinator's target
    assert {n.core.status_view()["latency"]["predicted_ms_per_token"] for n in net.nodes.values()} \
        == {status["predicted_ms_per_token"]}  # type: ignore[index]
    assert any("meets the targets" in e.message for n in net.nodes.values() for e in n.log)

    net = placed(target_ms_per_token=None)  # the throughput objective: every node takes a share
    plan = net.nodes["b"].core.book.active
    assert plan is not None and set(plan.node_ids) == {"a", "b", "c"}
    assert net.answer("b", PROMPT, 24).tokens == reference(PROMPT, 24)
    assert net.nodes["b"].core.status_view()["latency"]["miss_ms_per_token"] is None  # type: ignore[index]


def test_a_target_missed_for_long_re_plans_from_fresh_measurements() -> None:
    fast = BalanceSettings(min_reports=3, min_drift_s=2.0, min_interval_s=3.0, min_steps=3)
    net = Net()
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, target_ms_per_token=15.0, balance=fast)
    for n in "abc":
        net.add(n, mem_budget_bytes=EMBED_HEAD_BYTES + 4 * LAYER_BYTES, settings=settings)
    net.connect_all()
    net.settle()
    net.run_measuring(2.0, slow_links("c"))
    net.settle()
    plan = net.nodes["a"].core.book.active
    assert plan is not None and set(plan.node_ids) == {"a", "b"}
    # the link between the plan's two nodes turns slow, but its figures do not show it (yet)
    net.extra_latency_s = lambda sender, dest, msg: 0.02 if {sender, dest} == {"a", "b"} else 0.0
    net.ask("a", PROMPT, 400)
    net.run_measuring(12.0, slow_links("c"))
    said = [e.message for n in net.nodes.values() for e in n.log if "re-planning from fresh measurements" in e.message]
    assert len(said) == 1 and said[0].startswith("a measures")  # said once a plan; re-planned each time


def test_the_entry_nodes_in_use_are_planned_for_once_known() -> None:
    """Before anyone asked, every node is a possible entry: the fastest node holds the model,
    although its links are slow (on average it still wins). Once answers are typed at b, the
    plan is made for b: the model moves off the far node."""
    net = Net()
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, target_ms_per_token=12.0)
    for n, speed in (("a", 0.1), ("b", 3.0), ("c", 3.0)):
        net.add(n, ms_per_layer=speed, settings=settings)
    net.extra_latency_s = lambda sender, dest, msg: SLOW_LINK_MS / 2000 if "a" in (sender, dest) else 0.0
    net.connect_all()
    net.settle()
    net.run_measuring(3.0, slow_links("a"))
    net.settle()
    plan = net.nodes["b"].core.book.active
    assert plan is not None and plan.node_ids == ("a",)
    answer = net.ask("b", PROMPT, 800)
    net.run_measuring(15.0, slow_links("a"))
    plan = net.nodes["b"].core.book.active
    assert plan is not None and plan.node_ids == ("b",)
    net.run_until(lambda: answer.done, max_s=120)
    assert answer.error is None and answer.tokens == reference(PROMPT, 800)


def test_a_plan_from_a_node_that_does_not_coordinate_is_refused_but_its_epoch_is_outranked() -> None:
    """A plan is taken only from the coordinator of its term; yet every plan seen counts when
    the coordinator numbers its next one (nodes that started apart each numbered plans)."""
    net = settled("abc")
    coordinator = net.nodes["a"].core.coordinator_id
    assert coordinator is not None
    other, leaver = [n for n in "abc" if n != coordinator]
    core = net.nodes[coordinator].core
    term = core.election.term
    core.receive(other, wire.Plan(term, 50, (wire.Stage(other, 0, LAYERS),), "f32"), net.now)
    assert not [j for j in core.jobs() if isinstance(j, LoadSpan)]
    assert core.book.active is not None and core.book.active.key[1] < 50
    assert net.nodes[leaver].core.leave(net.now)  # a re-plan in the same term
    net.run_until(lambda: net.nodes[leaver].core.leave_settled)
    assert core.book.active is not None and core.book.active.key == (term, 51)


def test_election_messages_count_only_for_their_sender() -> None:
    net = settled("abc")
    core = net.nodes["a"].core
    term, coordinator = core.election.term, core.coordinator_id
    impostor = next(n for n in "bc" if n != coordinator)
    core.receive(impostor, wire.Coordinator(term + 5, "zz"), net.now)  # claims another node
    core.receive(impostor, wire.Election(term + 5, "zz", 1e9), net.now)
    assert core.election.term == term and core.coordinator_id == coordinator
    net.run_for(2.0)
    assert {n.core.coordinator_id for n in net.nodes.values()} == {coordinator}


def test_a_refusal_to_plan_reaches_every_node_and_fails_answers_at_once_everywhere() -> None:
    net = short_of_memory()
    errors = {n.core.placement_error for n in net.nodes.values()}
    assert len(errors) == 1 and "bytes" in errors.pop()  # type: ignore[operator]
    for n in "ab":  # the coordinator's own answers too
        started = net.now
        answer = net.answer(n, PROMPT, 4)
        assert answer.error is not None and "cannot hold the model" in answer.error and net.now == started
    coordinator = net.nodes["a"].core.coordinator_id
    assert any("cannot place the model" in e.message for e in net.nodes[coordinator].log)


def test_a_newcomer_left_out_of_the_plan_still_learns_it() -> None:
    net = settled("ab")
    key = net.nodes["a"].core.book.active.key  # type: ignore[union-attr]
    net.add("z", mem_budget_bytes=EMBED_HEAD_BYTES)  # holds no layers: the plan stays as it is
    net.connect_all()
    net.settle()
    assert net.nodes["z"].core.book.active.key[1] >= key[1]  # type: ignore[union-attr]
    assert "z" not in net.nodes["z"].core.book.active.node_ids  # type: ignore[union-attr]
    assert net.answer("z", OTHER_PROMPT, 8).tokens == reference(OTHER_PROMPT, 8)


def test_a_leaving_node_that_the_others_cannot_do_without_is_let_go_with_the_refusal() -> None:
    need = LAYERS * LAYER_BYTES + EMBED_HEAD_BYTES
    net = Net()
    net.add("a", mem_budget_bytes=need // 2)
    net.add("b", mem_budget_bytes=need)
    net.connect_all()
    net.settle()
    leaver = "b"
    assert net.nodes[leaver].core.leave(net.now)
    net.run_until(lambda: net.nodes[leaver].core.leave_settled)
    assert net.nodes[leaver].core.placement_error is not None  # settled by the refusal, not a plan
    assert any("is leaving" in e.message for n in net.nodes.values() for e in n.log)


def test_void_reports_name_a_plan_key_and_anything_else_is_refused() -> None:
    from meshllm.mesh.coordinator import void_key, void_state

    assert void_key(void_state((3, 17))) == (3, 17)
    assert void_key("ready") is None and void_key("leaving") is None
    for bad in ("void", "void 3", "void 3.", "void .4", "void -1.2", "void 1.2.3", "void 9" * 5):
        with pytest.raises(ValueError):
            void_key(bad)


def test_a_restarted_node_that_outranks_the_coordinator_of_the_first_term_takes_over_in_a_new_term() -> None:
    """Seen in a chaos run: a node restarted (with a new, higher speed measurement) declared
    itself coordinator of term 1 before it heard of anyone, while another node coordinated term
    1. Its followers switched to it within term 1, and its plans, numbered from scratch, never
    outranked the term's plans they had seen: no plan for 30 s. A new term settles it."""
    net = settled("abc")
    coordinator = net.nodes["a"].core.coordinator_id
    assert coordinator is not None and net.nodes["a"].core.election.term == 1
    follower, victim = [n for n in "abc" if n != coordinator]
    net.kill(victim)
    net.settle()
    net.add(victim, mem_budget_bytes=4 * 10**6)  # back, and now the highest-ranked node
    net.run_for(1.0)  # alone, it coordinates "term 1" by itself
    assert net.nodes[victim].core.coordinator_id == victim and net.nodes[victim].core.election.term == 1
    net.connect(victim, follower)
    net.connect(victim, coordinator)
    net.settle()
    terms = {n.core.election.term for n in net.nodes.values()}
    assert len(terms) == 1 and terms.pop() > 1
    assert {n.core.coordinator_id for n in net.nodes.values()} == {victim}
    answer = net.answer(follower, PROMPT, 12)
    assert answer.error is None and answer.tokens == reference(PROMPT, 12)


@pytest.mark.parametrize("kind", ["coordinator", "election"])
def test_a_claim_for_the_last_possible_term_is_ignored_and_crashes_nobody(kind: str) -> None:
    """A member claimed term 2^63-1: each receiver adopted it, then failed to build its own
    election message for the next term (a WireError out of the timer: the daemon ended). Terms
    grow by one an election; one that far off is refused."""
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    sender = next(n for n in "abc" if n != coordinator)
    huge = 2**63 - 1
    msg = wire.Coordinator(huge, sender) if kind == "coordinator" else wire.Election(huge, sender, 1e9)
    for nid, node in net.nodes.items():
        if nid != sender:
            node.core.receive(sender, msg, net.now)
    net.run_for(5.0)  # timers: elections would start here
    assert {n.core.election.term for n in net.nodes.values()} == {1}
    assert net.answer("a", PROMPT, 8).tokens == reference(PROMPT, 8)
