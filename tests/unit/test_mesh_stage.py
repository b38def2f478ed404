"""The stage role (meshllm.mesh.stage) on the simulator: the checks of every step a peer
forwards, the bound on queued work, refusals told at once, the caches handed over to a stage,
and rebuilds of lost layers from what the stages kept and logged (docs/operations.md)."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm import wire
from meshllm.mesh import Compute, DropSessions
from meshllm.mesh.jobs import Computed, ImportCache, RebuildPart
from tests.unit.meshsim import (
    HIDDEN, LAYERS, PROMPT, Net, forward, kill_when, rebuild_logs, reference, settled, three_nodes,
)


def refusals(net: Net, node: str) -> list[wire.StepFailed]:
    return [m for m in net.nodes[node].sent if isinstance(m, wire.StepFailed)]


def test_bad_steps_from_a_peer_are_refused_and_the_mesh_carries_on() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    peer, stage, last = plan.node_ids  # the entry node `peer` holds the first stage
    route = (last, peer)
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN + 1), np.float32), route=route)  # wrong width
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN), np.float32), route=("intruder", peer))
    forward(net, peer, stage, hidden=np.zeros((1, HIDDEN), np.float32), session="someone-else/1", route=route)
    net.nodes[stage].core.receive(peer, wire.Plan(0, 0, (wire.Stage(peer, 0, 2),), "f32"), net.now)  # short plan
    refused = [(s.dest, s.message) for s in net.nodes[stage].core.sends() if isinstance(s.message, wire.StepFailed)]
    # told to the entry node; nothing to "someone-else" or to an "intruder"
    assert [(dest, m.code) for dest, m in refused] == [(peer, "bad_step"), (peer, "bad_step")]
    assert not [j for j in net.nodes[stage].core.jobs() if isinstance(j, Compute)]
    assert net.nodes[stage].core.status_view()["refused"] == {"Forward": 1, "Plan": 1}
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


def test_a_step_whose_next_stage_went_away_while_it_ran_is_refused_at_once() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None and len(plan.node_ids) == 3
    entry, middle, last = plan.node_ids
    core = net.nodes[middle].core
    forward(net, entry, middle, hidden=np.zeros((1, HIDDEN), np.float32), session=f"{entry}/77",
            route=(last, entry))
    (job,) = [j for j in core.jobs() if isinstance(j, Compute)]
    core.link_down(last, "heartbeat timeout", net.now)
    core.job_done(job.job_id, Computed(hidden=np.zeros((1, HIDDEN), np.float32), span_ms=1.0), net.now)
    failed = [(s.dest, s.message) for s in core.sends() if isinstance(s.message, wire.StepFailed)]
    assert failed == [(entry, wire.StepFailed(f"{entry}/77", 0, "stale_plan", f"no link from {middle} to {last}"))]


def test_a_flood_of_rebuild_parts_is_refused_as_busy_beyond_the_queue_bound() -> None:
    net = settled("ab", max_queued_rebuild_parts=3)
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    stage, peer = plan.node_ids[-1], plan.node_ids[0]
    core = net.nodes[stage].core
    hidden = (wire.encode_tensor(np.zeros((4, HIDDEN), np.float32), "f32"),)
    for i in range(10):
        core.receive(peer, wire.Rebuild(f"{peer}/{100 + i}", 0, plan.key[0], plan.key[1], 4, 4, 0, 4, hidden,
                                        (peer,), False), net.now)
    sent = core.sends()
    busy = [s.message for s in sent if isinstance(s.message, wire.StepFailed) and s.message.code == "busy"]
    assert len(busy) == 7 and all(s.dest == peer for s in sent)
    assert len([j for j in core.jobs() if isinstance(j, RebuildPart)]) == 3


def test_only_a_sessions_entry_node_frees_its_caches_on_a_stage() -> None:
    net = three_nodes()
    answer = net.ask("a", PROMPT, 30)
    net.run_until(lambda: len(answer.tokens) >= 4)
    (session,) = net.nodes["a"].answers
    stage = next(n for n in net.nodes["a"].core.book.active.node_ids if n != "a")  # type: ignore[union-attr]
    other = next(n for n in "bc" if n != stage)
    core = net.nodes[stage].core
    assert session in core.stage.sessions
    core.receive(other, wire.DropSession(session), net.now)
    assert not [j for j in core.jobs() if isinstance(j, DropSessions)] and session in core.stage.sessions
    core.receive("a", wire.DropSession(session), net.now)
    assert [j.session_ids for j in core.jobs() if isinstance(j, DropSessions)] == [(session,)]
    assert session not in core.stage.sessions


def test_a_cache_hand_over_for_an_old_plan_outside_the_model_or_from_no_giver_is_refused() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    stage, peer = plan.node_ids[1], plan.node_ids[0]
    core = net.nodes[stage].core
    term, epoch = plan.key

    def handover(key: tuple[int, int], layer: int, positions: int = 3) -> wire.CacheHandover:
        kv = wire.encode_tensor(np.ones((1, positions, HIDDEN), np.float32), "f32")
        return wire.CacheHandover(f"{peer}/5", key[0], key[1], layer, kv, kv)

    given = plan.stages[0].start_layer  # a layer `peer` holds now, handed over under the next plan
    mine = plan.stages[1].start_layer
    for bad in (handover((term, epoch - 1), given), handover((term, epoch + 1), LAYERS),
                handover((term, epoch + 1), given, positions=net.nodes[stage].core.limits.max_positions + 1),
                handover((term, epoch + 1), mine)):  # a layer `peer` never held
        core.receive(peer, bad, net.now)
        assert not core.jobs()
    core.receive(peer, handover((term, epoch + 1), given), net.now)
    (job,) = core.jobs()
    assert isinstance(job, ImportCache) and job.layer == given and f"{peer}/5" in core.stage.sessions


def test_a_step_past_the_context_window_is_refused() -> None:
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    peer, stage, last = plan.node_ids  # the entry node `peer` holds the first stage
    start = net.nodes[stage].core.limits.max_positions
    msg = wire.Forward(f"{peer}/3", 0, plan.key[0], plan.key[1], start,
                       wire.encode_tensor(np.zeros((1, HIDDEN), np.float32), "f32"), (last, peer))
    net.nodes[stage].core.receive(peer, msg, net.now)
    net._collect(stage)
    assert [(m.code, m.message) for m in refusals(net, stage)] == [
        ("bad_step", "step runs past the model's context window")]


def _middle_hop(net: Net, entry: str) -> tuple[str, str]:
    plan = net.nodes[entry].core.book.active
    assert plan is not None
    hops = [(x, y) for x, y in zip(plan.node_ids, plan.node_ids[1:]) if entry not in (x, y)]
    assert hops, plan.node_ids
    return hops[0]


def _drop_link_with_a_step_on_it(net: Net, sender: str, dest: str) -> float:
    """Run until `sender` has a step on its way to `dest`, then drop that one link (the two
    nodes stay linked to everyone else, as when a link is re-made or fails on its own)."""
    net.run_until(lambda: any(s == sender and d == dest for _, _, s, d, _ in net.in_flight))
    net.disconnect(sender, dest)
    return net.now


@pytest.mark.parametrize("relink_after_s", [0.5, 3.0])
def test_a_step_lost_with_a_link_between_two_stages_is_retried_at_once(relink_after_s: float) -> None:
    """The chaos run's 120 s waits: a middle stage's link to the next stage went down with a
    step on it, while both stayed linked to the entry node and the coordinator. The entry node
    saw nothing and waited out the step timeout; the middle stage's copy of the plan was void,
    and nobody re-planned. Now the middle stage tells the entry node at once, and asks the
    coordinator for the plan again."""
    net = three_nodes()
    answer = net.ask("a", PROMPT, 30)
    net.run_until(lambda: len(answer.tokens) >= 4)
    middle, nxt = _middle_hop(net, "a")
    lost_at = _drop_link_with_a_step_on_it(net, middle, nxt)
    told = [m for m in net.nodes[middle].sent if isinstance(m, wire.StepFailed)]
    assert told and "went down" in told[-1].message
    net.run_for(relink_after_s)
    net.connect(middle, nxt)
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)
    assert net.now - lost_at < relink_after_s + 5.0  # not the 120 s step timeout
    net.settle()
    assert net.one_active_plan()


def test_a_stage_whose_copy_of_the_plan_went_void_gets_the_plan_again() -> None:
    """A link between two stages went down while the coordinator still sees both: the plan
    in force stays the best one, so the coordinator would not re-plan, and the stage whose copy
    went void would refuse every step. It asks; the coordinator publishes the plan again."""
    net = settled("abcd")
    coordinator = net.nodes["a"].core.coordinator_id
    assert coordinator is not None
    answer = net.ask(coordinator, PROMPT, 30)
    net.run_until(lambda: len(answer.tokens) >= 4)
    middle, nxt = _middle_hop(net, coordinator)
    before = net.nodes[coordinator].core.book.active
    assert before is not None
    _drop_link_with_a_step_on_it(net, middle, nxt)
    assert net.nodes[middle].core.book.active is None
    net.run_for(1.0)
    again = net.nodes[middle].core.book.active
    assert again is not None and again.key > before.key and again.stages == before.stages
    assert any("publishing the plan again" in e.message for e in net.nodes[coordinator].log)
    net.connect(middle, nxt)
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)


def test_a_step_whose_output_cannot_be_sent_is_refused_and_the_stage_carries_on() -> None:
    """What a peer forwarded made the stage's layers overflow (NaN): the step is refused to
    its entry node instead of raising out of the job's outcome."""
    net = three_nodes()
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    entry, middle, last = plan.node_ids
    core = net.nodes[middle].core
    forward(net, entry, middle, hidden=np.zeros((1, HIDDEN), np.float32), session=f"{entry}/77", route=(last, entry))
    (job,) = [j for j in core.jobs() if isinstance(j, Compute)]
    core.job_done(job.job_id, Computed(hidden=np.full((1, HIDDEN), np.nan, np.float32), span_ms=1.0), net.now)
    failed = [(s.dest, s.message.code) for s in core.sends() if isinstance(s.message, wire.StepFailed)]
    assert failed == [(entry, "bad_step")]
