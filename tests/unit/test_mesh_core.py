"""The mesh logic as pure tests: cores wired in memory, a fake clock, a toy model, no torch.

Each scenario checks what a user sees: the answer is the one a single node gives, token for
token; the mesh ends with one coordinator and one plan; an impossible request ends with a
clear error, never a hang.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from collections.abc import Callable

from meshllm import wire
from meshllm.placement.balance import BalanceSettings
from meshllm.placement.linkstats import LinkStats
from meshllm.mesh import Compute, LoadSpan, MeshSettings
from meshllm.mesh.jobs import RebuildPart
from meshllm.placement.planner import Plan as PlannerPlan
from tests.fixtures.wire_strategies import messages
from tests.unit.meshsim import HIDDEN, LAYER_BYTES, EMBED_HEAD_BYTES, LAYERS, Net, reference

PROMPT = (5, 6, 7, 8, 9)
OTHER_PROMPT = (11, 3, 42)


def test_the_mesh_logic_needs_no_torch() -> None:
    import subprocess  # other tests may have loaded torch here: check in a fresh interpreter

    code = "import sys, meshllm.mesh; assert 'torch' not in sys.modules and 'asyncio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def settled(names: str = "abc", **settings: float) -> Net:
    """Nodes linked to each other, with one active plan; `settings` override MeshSettings."""
    net = Net()
    for n in names:
        net.add(n, settings=MeshSettings(**{"election_timeout_s": 0.2, "plan_wait_s": 10.0, **settings}))
    net.connect_all()
    net.settle()
    return net


def three_nodes() -> Net:
    return settled("abc")


def test_three_nodes_elect_one_coordinator_and_every_entry_node_answers_exactly() -> None:
    net = three_nodes()
    assert len({n.core.coordinator_id for n in net.nodes.values()}) == 1
    plan = net.nodes["a"].core.book.active
    assert plan is not None and plan.stages[0].start_layer == 0 and plan.stages[-1].end_layer == LAYERS
    want = reference(PROMPT, 24)
    for n in "abc":
        answer = net.answer(n, PROMPT, 24)
        assert answer.error is None and answer.tokens == want and answer.finish_reason == "length"


def test_a_lone_node_answers_each_token_with_one_job_and_sends_nothing() -> None:
    net = Net()
    node = net.add("solo")
    net.settle()
    node.jobs_run.clear()
    answer = net.answer("solo", PROMPT, 16)
    assert answer.tokens == reference(PROMPT, 16)
    computes = [j for j in node.jobs_run if isinstance(j, Compute)]
    assert len(computes) == 16  # the prompt, then one per generated token after the first
    assert all(j.token_ids is not None and j.run_span and j.finish == "sample" for j in computes)
    assert node.sent == []


def test_the_entry_node_fuses_its_own_first_and_last_stages() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    for entry in (plan.node_ids[0], plan.node_ids[-1]):
        node = net.nodes[entry]
        node.jobs_run.clear()
        assert net.answer(entry, PROMPT, 8).tokens == reference(PROMPT, 8)
        mine = [j for j in node.jobs_run if isinstance(j, Compute) and j.session_id.startswith(f"{entry}/")]
        assert len(mine) == 2 * 8  # per step: one job going out, one coming back; never a third
        if entry == plan.node_ids[0]:
            assert all(j.run_span for j in mine if j.token_ids is not None)  # embed + layers
        else:
            assert all(j.run_span and j.finish == "sample" for j in mine if j.token_ids is None)  # layers + head


def test_two_answers_from_two_entry_nodes_at_once() -> None:
    net = three_nodes()
    first = net.ask("a", PROMPT, 20)
    second = net.ask("c", OTHER_PROMPT, 20)
    net.run_until(lambda: first.done and second.done)
    assert first.tokens == reference(PROMPT, 20)
    assert second.tokens == reference(OTHER_PROMPT, 20)


def kill_when(net: Net, answer_node: str, victim_of, tokens: int, max_tokens: int = 40):  # type: ignore[no-untyped-def]
    answer = net.ask(answer_node, PROMPT, max_tokens)
    net.run_until(lambda: len(answer.tokens) >= tokens)
    victim = victim_of(net)
    net.kill(victim)
    net.run_until(lambda: answer.done)
    return answer, victim


def test_a_stage_lost_mid_answer_is_replanned_and_the_answer_is_unchanged() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id

    def a_stage(net: Net) -> str:
        return next(n for n in ("b", "c") if n != coordinator)

    answer, victim = kill_when(net, "a", a_stage, 10)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert answer.states == ["replanning", "running"]
    plan = net.nodes["a"].core.book.active
    assert plan is not None and victim not in plan.node_ids


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
    need = LAYERS * LAYER_BYTES + EMBED_HEAD_BYTES
    net = Net()
    net.add("a", mem_budget_bytes=need // 3)
    net.add("b", mem_budget_bytes=need // 3)
    net.connect_all()
    net.run_until(lambda: all(n.core.placement_error for n in net.nodes.values()))
    answer = net.answer("a", PROMPT, 8)
    assert answer.error is not None and "bytes" in answer.error
    net.add("c", mem_budget_bytes=need)
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


def test_a_step_that_always_fails_ends_the_answer_with_an_error_not_a_hang() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    broken = next(n for n in plan.node_ids if n != "a")

    def refuse(job: Compute):  # type: ignore[no-untyped-def]
        raise ValueError("this stage is broken")

    net.nodes[broken].shard.run = refuse  # type: ignore[method-assign]
    answer = net.answer("a", PROMPT, 8)
    assert answer.error is not None and "keep failing" in answer.error


def lose_one_step(net: Net, after_seq: int = -1) -> list[wire.Message]:
    """The network loses the first step output that the last stage other than node a sends
    after step `after_seq`; the list holds it once lost."""
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    last = plan.node_ids[-1] if plan.node_ids[-1] != "a" else plan.node_ids[-2]
    dropped: list[wire.Message] = []

    def lose(sender: str, dest: str, msg: wire.Message) -> bool:
        if sender == last and not dropped and isinstance(msg, (wire.Result, wire.Forward)) and msg.seq > after_seq:
            dropped.append(msg)
            return True
        return False

    net.lose = lose
    return dropped


def test_a_step_with_no_result_times_out_and_is_retried() -> None:
    net = settled("abc", step_timeout_s=2.0)
    dropped = lose_one_step(net)
    answer = net.answer("a", PROMPT, 8)
    assert dropped and answer.error is None and answer.tokens == reference(PROMPT, 8)


def test_a_cancelled_answer_ends_with_a_cancelled_token_and_frees_every_stage() -> None:
    net = three_nodes()
    answer = net.ask("a", PROMPT, 100)
    net.run_until(lambda: len(answer.tokens) >= 5)
    sid = next(iter(net.nodes["a"].answers))
    net.nodes["a"].core.cancel_session(sid, net.now)
    net.run_until(lambda: answer.done)
    assert answer.finish_reason == "cancelled" and answer.error is None
    net.run_for(0.5)
    assert all(sid not in n.shard.caches for n in net.nodes.values())


def test_no_plan_in_time_is_a_clear_error() -> None:
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=1.0)
    net = Net()
    net.add("a", settings=settings)
    net.add("b", settings=settings).frozen = True  # hangs: never loads its layers
    net.connect_all()
    answer = net.answer("a", PROMPT, 4, max_s=5.0)
    assert answer.error is not None and "no active plan" in answer.error
    assert answer.states == ["replanning"]


# -- bad input from peers -------------------------------------------------------------------


def forward(net: Net, sender: str, target: str, *, hidden: np.ndarray, session: str | None = None,
            route: tuple[str, ...] | None = None) -> None:
    plan = net.nodes[target].core.book.active
    assert plan is not None
    msg = wire.Forward(session or f"{sender}/99", 0, plan.key[0], plan.key[1], 0,
                       wire.encode_tensor(hidden, "f32"), route or (sender,))
    net.nodes[target].core.receive(sender, msg, net.now)


def refusals(net: Net, node: str) -> list[wire.StepFailed]:
    return [m for m in net.nodes[node].sent if isinstance(m, wire.StepFailed)]


def test_bad_steps_from_a_peer_are_refused_and_the_mesh_carries_on() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    stage = plan.node_ids[1]
    peer = next(n for n in "abc" if n != stage)
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN + 1), np.float32))  # wrong width
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN), np.float32), session="someone-else/1")
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN), np.float32), route=("intruder",))
    net.nodes[stage].core.receive(peer, wire.Plan(0, 0, (wire.Stage(peer, 0, 2),), "f32"), net.now)  # short plan
    refused = [s.message for s in net.nodes[stage].core.sends() if isinstance(s.message, wire.StepFailed)]
    assert [m.code for m in refused] == ["bad_step", "bad_step"]  # nothing is sent to an unknown "intruder"
    assert not [j for j in net.nodes[stage].core.jobs() if isinstance(j, Compute)]
    for n in "abc":
        assert net.answer(n, PROMPT, 10).tokens == reference(PROMPT, 10)


def test_a_flood_of_steps_is_refused_as_busy_beyond_the_queue_bound() -> None:
    net = settled("ab", max_queued_steps=4)
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    stage, peer = plan.node_ids[-1], plan.node_ids[0]
    assert stage != peer  # two equal nodes split the layers
    for i in range(10):
        forward(net, peer, stage, hidden=np.zeros((1, HIDDEN), np.float32), session=f"{peer}/{100 + i}")
    sent = net.nodes[stage].core.sends()
    busy = [s.message for s in sent if isinstance(s.message, wire.StepFailed) and s.message.code == "busy"]
    assert len(busy) == 6
    assert len([j for j in net.nodes[stage].core.jobs() if isinstance(j, Compute)]) == 4


def test_a_node_only_loads_plans_not_below_what_it_has_seen() -> None:
    net = three_nodes()
    node = net.nodes["b"]
    key = node.core.book.active.key  # type: ignore[union-attr]
    old = wire.Plan(key[0], key[1], (wire.Stage("a", 0, LAYERS),), "f32")
    node.core.receive("a", old, net.now)
    assert not [j for j in node.core.jobs() if isinstance(j, LoadSpan)]
    assert node.core.book.active is not None and node.core.book.active.key == key


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


@pytest.mark.parametrize("plan_late_s", [1.0, 5.0])
def test_an_entry_node_that_hears_of_a_new_plan_late_waits_instead_of_giving_up(plan_late_s: float) -> None:
    """The stages already refuse the old plan ("stale_plan") while the entry node's copy of
    the new plan is still on its way: that is the mesh moving, not a failing mesh. Elections
    and joins after several restarts can keep it stale for seconds (five refusals 0.5 s apart
    used to end the answer): it waits up to plan_wait_s."""
    net = three_nodes()
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 10)
    net.extra_latency_s = lambda sender, dest, msg: plan_late_s if dest == "a" and isinstance(msg, wire.Plan) else 0.0
    net.add("d", ms_per_layer=0.5)
    net.connect_all()
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)


@settings(max_examples=150, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.sampled_from("abc"))
def test_no_message_from_a_peer_breaks_a_node(batch: list[wire.Message], sender_of: str) -> None:
    """Anything a peer may send (every message type, any valid field values) is handled or
    refused without an exception, and the mesh still answers exactly afterwards."""
    net = three_nodes()
    target = next(n for n in "abc" if n != sender_of)
    for msg in batch:
        net.nodes[target].core.receive(sender_of, msg, net.now)  # must not raise
    net._collect(target)
    net.run_for(2.0)
    net.settle()
    assert net.answer("a", PROMPT, 6).tokens == reference(PROMPT, 6)


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


def test_an_entry_node_that_is_a_middle_stage_hears_its_own_refusal_at_once() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    middle = plan.node_ids[1]
    node = net.nodes[middle]
    original = node.shard.run
    failed: list[Compute] = []

    def fail_once(job: Compute):  # type: ignore[no-untyped-def]
        if job.token_ids is None and job.finish == "send" and not failed:
            failed.append(job)
            raise ValueError("a cache out of step")
        return original(job)

    node.shard.run = fail_once  # type: ignore[method-assign]
    start = net.now
    answer = net.answer(middle, PROMPT, 8)
    assert failed and answer.error is None and answer.tokens == reference(PROMPT, 8)
    assert net.now - start < 5.0  # not after the 120 s step timeout


# -- recovery: kept caches and rebuilds from logs (docs/operations.md) ---------------------------


def rebuild_logs(net: Net) -> list[str]:
    return [e.message for n in net.nodes.values() for e in n.log if e.message.startswith("rebuilt session")]


def test_a_lost_stage_is_rebuilt_from_the_logs_only_for_the_lost_layers() -> None:
    """Whatever stage is lost (not the entry node), the stages recompute only its layers,
    from the logs, with no full replay."""
    for victim_pick in (0, 1):
        net = three_nodes()
        plan = net.nodes["a"].core.book.active
        assert plan is not None
        victims = [n for n in plan.node_ids if n != "a"]
        victim = victims[victim_pick % len(victims)]
        answer, _ = kill_when(net, "a", lambda net: victim, 15)
        assert answer.error is None and answer.tokens == reference(PROMPT, 40)
        new_plan = net.nodes["a"].core.book.active
        assert new_plan is not None
        stats = [n.core.stats for n in net.nodes.values()]
        lost = plan.span_of(victim)
        # layers that moved between live nodes were handed over: only the lost ones are recomputed
        assert sum(s.rebuilt_layers for s in stats) == lost[1] - lost[0], rebuild_logs(net)
        assert sum(s.kept_layers for s in stats) == LAYERS - (lost[1] - lost[0])
        assert sum(s.full_replays for s in stats) == 0


def test_an_unchanged_stage_keeps_its_caches_across_a_replan() -> None:
    net = settled("abcd")
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    victim = next(n for n in plan.node_ids if n not in ("a", net.nodes["a"].core.coordinator_id))
    answer, _ = kill_when(net, "a", lambda net: victim, 12)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    new_plan = net.nodes["a"].core.book.active
    assert new_plan is not None
    unchanged = [n for n in new_plan.node_ids if new_plan.span_of(n) == plan.span_of(n)]
    for nid in unchanged:  # a stage whose span did not move recomputed nothing
        stats = net.nodes[nid].core.stats
        assert stats.rebuilds >= 1 and stats.rebuilt_layers == 0, nid


def test_two_neighbouring_stages_lost_at_once_are_rebuilt_in_a_chain_exactly() -> None:
    """The lost run of layers starts where a live stage's log is: the new owners rebuild it
    one after the other, streaming parts."""
    net = settled("abcd")
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    coordinator = net.nodes["a"].core.coordinator_id
    ids = plan.node_ids
    pairs = [(ids[i], ids[i + 1]) for i in range(len(ids) - 1) if not {ids[i], ids[i + 1]} & {"a", coordinator}]
    assert pairs, ids
    x, y = pairs[0]
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 14)
    net.kill(x)
    net.kill(y)
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert sum(n.core.stats.full_replays for n in net.nodes.values()) == 0


def test_a_stage_lost_when_the_log_it_needs_is_gone_falls_back_to_a_whole_rebuild() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    coordinator = net.nodes["a"].core.coordinator_id
    # a stage below the first: the first stage's input is the embedding, which needs no log
    victim = next(n for n in plan.node_ids if plan.span_of(n)[0] > 0 and n not in (coordinator, "a"))
    for node in net.nodes.values():  # logs over the memory cap are dropped
        node.shard.logs.cap_bytes = 0
    answer, _ = kill_when(net, "a", lambda net: victim, 14)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    # the stages without logs recomputed their whole spans, streamed from the embedding
    assert net.nodes["a"].core.stats.whole_rebuilds == 1
    assert net.nodes["a"].core.stats.full_replays == 0
    assert answer.states == ["replanning", "running"]


def test_a_lost_step_is_followed_by_a_rebuild_that_keeps_every_cache() -> None:
    net = settled("abc", step_timeout_s=2.0)
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    dropped = lose_one_step(net, after_seq=6)
    answer = net.answer("a", PROMPT, 12)
    assert dropped and answer.error is None and answer.tokens == reference(PROMPT, 12)
    stats = [n.core.stats for n in net.nodes.values()]
    assert sum(s.rebuilds for s in stats) == len(plan.node_ids)
    assert sum(s.rebuilt_layers for s in stats) == 0 and sum(s.full_replays for s in stats) == 0


def test_a_clean_leave_hands_its_caches_over_and_nothing_is_recomputed() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    leaver = next(n for n in plan.node_ids if n not in (coordinator, "a"))
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
    plan = net.nodes["a"].core.book.active
    assert plan is not None and "c" in plan.node_ids
    assert net.nodes["c"].core.stats.rebuilds == 1  # it took its layers mid-answer, caches included
    assert net.nodes["c"].core.stats.kept_layers == plan.span_of("c")[1] - plan.span_of("c")[0]
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


@pytest.mark.parametrize("invariant", [False, True])
def test_a_rebuild_runs_in_one_pass_where_the_numerics_are_batch_invariant(invariant: bool) -> None:
    """Kernels that give a position the same bits in any chunk (MeshSettings.batch_invariant,
    from the runtime): the entry node sends the rebuild as one part and each stage recomputes
    its lost layers in one call. Otherwise the original chunking: the prompt's step, then one
    position at a time. The answer is the same either way."""
    net = settled("abc", batch_invariant=invariant)
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    coordinator = net.nodes["a"].core.coordinator_id
    victim = next(n for n in plan.node_ids if n not in ("a", coordinator))
    answer, _ = kill_when(net, "a", lambda net: victim, 15)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert sum(n.core.stats.full_replays for n in net.nodes.values()) == 0
    parts = [j for nid, n in net.nodes.items() if nid != victim for j in n.jobs_run if isinstance(j, RebuildPart)]
    runs = [r for nid, n in net.nodes.items() if nid != victim for r in n.shard.rebuild_runs]
    assert parts and runs, rebuild_logs(net)  # the lost layers were recomputed
    position = parts[0].position
    assert position >= len(PROMPT) + 14 and all(j.position == position for j in parts)
    if invariant:
        assert {(j.start_pos, j.positions) for j in parts} == {(0, position)}  # one part
        assert {(start, n) for _sid, start, n, _lo, _hi in runs} == {(0, position)}  # one pass each
        assert len(runs) <= 2 * len(plan.node_ids)  # at most a range below and one above the kept layers
        assert any(" in 1 pass, in " in m or " in 2 passes, in " in m for m in rebuild_logs(net)), rebuild_logs(net)
    else:
        assert {(j.start_pos, j.positions) for j in parts} >= {(0, len(PROMPT)), (len(PROMPT), position - len(PROMPT))}
        assert {(start, n) for _sid, start, n, _lo, _hi in runs if start == 0} == {(0, len(PROMPT))}
        assert all(n == 1 for _sid, start, n, _lo, _hi in runs if start > 0)
        assert len(runs) >= position - len(PROMPT) + 1


@pytest.mark.parametrize("invariant", [False, True])
def test_a_full_replay_merges_its_steps_only_where_the_numerics_are_batch_invariant(invariant: bool) -> None:
    """When even the entry node cannot rebuild (its job fails), the answer is replayed from
    the start: in the original steps, or with invariant numerics in one step of every
    position so far."""
    net = settled("abc", batch_invariant=invariant)
    answer = net.ask("a", PROMPT, 40)
    net.run_until(lambda: len(answer.tokens) >= 12)
    entry = net.nodes["a"]
    run = entry.shard.run
    failed: list[RebuildPart] = []

    def failing_rebuild(job):  # type: ignore[no-untyped-def]
        if isinstance(job, RebuildPart) and not failed:
            failed.append(job)
            raise RuntimeError("this node cannot run its part")
        return run(job)

    entry.shard.run = failing_rebuild  # type: ignore[method-assign]
    victim = next(n for n in "bc" if n != entry.core.coordinator_id)
    net.kill(victim)
    net.run_until(lambda: answer.done)
    assert failed and answer.error is None and answer.tokens == reference(PROMPT, 40)
    assert entry.core.stats.full_replays == 1
    position = failed[0].position
    after = entry.jobs_run[entry.jobs_run.index(failed[0]) + 1:]
    replayed = [(j.start_pos, j.positions) for j in after if isinstance(j, Compute) and j.start_pos < position]
    if invariant:
        assert replayed == [(0, position)]
    else:
        assert replayed == [(0, len(PROMPT))] + [(p, 1) for p in range(len(PROMPT), position)]


def test_rebuild_parts_and_steps_follow_the_numerics() -> None:
    from meshllm.mesh.rebuild import INVARIANT_PART_POSITIONS as BIG, PART_POSITIONS as SMALL, parts, steps

    assert parts(70, 5) == [(0, 5), (5, 5 + SMALL), (5 + SMALL, 5 + 2 * SMALL), (5 + 2 * SMALL, 70)]
    assert parts(70, 5, invariant=True) == [(0, 70)]
    assert parts(BIG + 30, 5, invariant=True) == [(0, BIG), (BIG, BIG + 30)]
    # the first part holds at least the prompt's chunk, which ran in one pass already
    assert parts(BIG + 300, BIG + 100, invariant=True) == [(0, BIG + 100), (BIG + 100, BIG + 300)]
    for position, prefill in ((1, 1), (300, 7), (3 * BIG + 1, 40), (BIG, BIG)):
        for invariant in (False, True):
            cut = parts(position, prefill, invariant)
            assert cut[0][0] == 0 and cut[-1][1] == position and cut[0][1] >= prefill
            assert all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
            assert all(e - s <= (BIG if invariant else SMALL) for s, e in cut[1:])
    assert list(steps(0, 9, 5)) == [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
    assert list(steps(0, 9, 5, invariant=True)) == [(0, 9)]
    assert list(steps(40, 72, 5, invariant=True)) == [(40, 72)]


def test_a_replay_merges_steps_only_when_asked_and_keeps_the_original_history() -> None:
    from meshllm.mesh.session import Session

    session = Session("s/0", PROMPT, 40, frozenset({0}))
    for token in (7, 8, 9, 10):
        session.accept(token)
    history = session.history()
    session.restart()
    assert [session.next_step().token_ids for _ in range(1)] == [PROMPT]
    session.restart(merge_positions=7)
    step = session.next_step()
    assert step is not None and step.replay and step.token_ids == PROMPT + (7, 8) and step.start_pos == 0
    session.step_done()
    step = session.next_step()
    assert step is not None and step.token_ids == (9,) and step.start_pos == 7
    session.step_done()
    assert not session.replaying() and session.history() == history
    assert session.next_step() == type(step)((10,), 8)


# -- placement by measured links and a latency target (docs/placement.md) -----------------------

SLOW_LINK_MS = 30.0


def slow_links(slow: str) -> Callable[[str, str], LinkStats]:
    """Loopback-like links, except that every link of ``slow`` has SLOW_LINK_MS more round trip
    (what its peers and itself measure when it runs with --debug-link-delay-ms)."""
    def stats(node: str, peer: str) -> LinkStats:
        rtt = 1.0 + (SLOW_LINK_MS if slow in (node, peer) else 0.0)
        return LinkStats(rtt_ms=rtt, small_mb_s=20.0, large_mb_s=40.0, samples=2, rtt_samples=16)
    return stats


def placed(target_ms_per_token: float | None) -> Net:
    """Three nodes that can each hold 4 of the 6 layers (so at least two are needed); a's links
    are slow, as the sim delivers them and as the links measure them. Before the first
    measurement every pair looks alike, and the plan takes a."""
    net = Net()
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, target_ms_per_token=target_ms_per_token)
    for n in "abc":
        net.add(n, mem_budget_bytes=EMBED_HEAD_BYTES + 4 * LAYER_BYTES, settings=settings)
    net.extra_latency_s = lambda sender, dest, msg: SLOW_LINK_MS / 2000 if "a" in (sender, dest) else 0.0
    net.connect_all()
    net.settle()
    plan = net.nodes["b"].core.book.active
    assert plan is not None and "a" in plan.node_ids
    net.run_measuring(3.0, slow_links("a"))
    net.settle()
    return net


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


def test_status_shows_the_links_the_prediction_and_what_the_entry_node_measured() -> None:
    net = placed(target_ms_per_token=15.0)
    net.ask("b", PROMPT, 60)
    net.run_measuring(2.0, slow_links("a"))
    view = net.nodes["b"].core.status_view()
    plan, nodes = view["latency"], {n["id"]: n for n in view["nodes"]}  # type: ignore[union-attr,index]
    assert nodes["b"]["link"] is None and nodes["c"]["link"]["rtt_ms"] == 1.0  # type: ignore[index]
    assert nodes["a"]["link"]["rtt_ms"] == 31.0 and nodes["a"]["link"]["small_mb_s"] == 20.0  # type: ignore[index]
    assert nodes["a"]["link"]["decode_hop_ms"] > nodes["c"]["link"]["decode_hop_ms"] + 10  # type: ignore[index]
    measured, predicted = plan["measured_ms_per_token"], plan["predicted_ms_per_token"]  # type: ignore[index]
    assert measured is not None and nodes["b"]["measured_ms_per_token"] == measured
    assert plan["entry_ids"] == ["b"] and plan["entry_mean"] is False  # type: ignore[index]
    # the sim's token: 6 ms of compute + two 1 ms hops; the model adds its per-hop overhead
    assert abs(measured - 8.0) < 0.5 and predicted == nodes["b"]["predicted_ms_per_token"]
    # the other nodes see what b measured through its reports
    assert net.nodes["c"].core.status_view()["latency"]["measured_ms_per_token"] == measured  # type: ignore[index]


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
    coordinator()._publish(PlannerPlan(pending.stages, 0.0))  # the same layout again, under a new key
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
    sent: list[tuple[str, str, wire.Message]] = []
    net.lose = lambda sender, dest, msg: sent.append((sender, dest, msg)) is not None
    net.add("d")
    net.connect_all()
    net.settle()
    plan = net.nodes["a"].core.book.active
    assert plan is not None and plan.key[0] >= 2  # the joiner's term
    told = {(s, d) for s, d, m in sent if isinstance(m, wire.HandoverDone) and (m.term, m.epoch) == plan.key}
    assert told >= {(s, d) for s in plan.node_ids for d in plan.node_ids if s != d}


def test_an_entry_node_outside_a_one_stage_plan_rebuilds_that_stage() -> None:
    """The entry node holds no layers; a rebalance puts every layer on one other node. The
    rebuild must go to that stage (the entry only embeds): seen on a loaded machine as
    'KV cache holds -1 positions' on every step after a rebalance onto one node."""
    net = Net()
    net.add("a", mem_budget_bytes=EMBED_HEAD_BYTES)  # room for no layer: an entry node only
    for n in "bc":
        net.add(n, settings=MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0))
    net.connect_all()
    net.settle()
    answer = net.ask("a", PROMPT, 30)
    net.run_until(lambda: len(answer.tokens) >= 8)
    coordinator = net.nodes[net.nodes["a"].core.coordinator_id].core
    holder = "b" if "b" != coordinator.node_id else "c"
    coordinator._publish(PlannerPlan((wire.Stage(holder, 0, LAYERS),), 0.0))  # every layer on one node
    net.run_until(lambda: answer.done)
    after = net.nodes["a"].core.book.active
    assert after is not None and after.node_ids == (holder,)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)
