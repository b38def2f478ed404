"""The entry role (meshllm.mesh.entry): the answers this node is the entry node of, and their
explicit state as the mesh moves under them (pause, rebuild, whole rebuild, full replay,
retry, cancel, give up). First the state's transitions alone, then scenarios on the
simulator: the answer is always the one a single node gives, token for token."""

from __future__ import annotations

import pytest

from meshllm import wire
from meshllm.mesh import Compute, MeshSettings
from meshllm.mesh.entry import STALE_RETRY_S, AnswerState, Phase, _Answer, _InFlight, _RebuildRun
from meshllm.mesh.jobs import RebuildPart
from meshllm.mesh.plans import PlanView
from meshllm.mesh.session import Session, Step
from meshllm.placement.planner import Plan as PlannerPlan
from tests.unit.meshsim import (
    EMBED_HEAD_BYTES, LAYERS, OTHER_PROMPT, PROMPT, Net, kill_when, lose_one_step, reference, settled, three_nodes,
)


# -- the state alone -------------------------------------------------------------------------------


def answer_state() -> _Answer:
    return _Answer(Session("a/0", PROMPT, 10, frozenset({0})))


def view(key: tuple[int, int]) -> PlanView:
    return PlanView(key, (wire.Stage("a", 0, LAYERS),), "f32", "a")


def in_flight(whole: bool | None = None) -> _InFlight:
    """A step in flight: a rebuild (whole or not) unless `whole` is None."""
    run = None if whole is None else _RebuildRun(5, 5, PROMPT, whole, {})
    return _InFlight(0, Step(PROMPT, 0), view((1, 1)), rebuild=run)


def test_an_answer_says_replanning_once_and_running_again_at_its_next_token() -> None:
    answer = answer_state()
    assert answer.state == AnswerState(Phase.RUNNING)
    assert answer.pause() and not answer.pause()
    assert answer.state.phase is Phase.REPLANNING
    assert answer.token() and answer.state.phase is Phase.RUNNING
    assert not answer.token()


def test_a_failing_rebuild_escalates_to_a_whole_rebuild_then_to_a_full_replay() -> None:
    answer = answer_state()
    answer.plan_key = (1, 1)
    answer.pause()
    answer.lost(in_flight(), Phase.REBUILD)  # a step lost: rebuild before the next
    assert answer.state.phase is Phase.REBUILD
    assert answer.recovery(view((1, 1))) is Phase.REBUILD and answer.state.phase is Phase.REPLANNING
    answer.lost(in_flight(whole=False), Phase.WHOLE_REBUILD)  # the rebuild lacked a log
    assert answer.recovery(view((1, 1))) is Phase.WHOLE_REBUILD
    answer.lost(in_flight(whole=True), Phase.REBUILD)  # the whole rebuild timed out: whole again
    assert answer.state.phase is Phase.WHOLE_REBUILD
    answer.recovery(view((1, 1)))
    answer.lost(in_flight(whole=True), Phase.FULL_REPLAY)  # even that lacked a log
    assert answer.recovery(view((1, 1))) is Phase.FULL_REPLAY and answer.state.phase is Phase.REPLANNING
    assert answer.recovery(view((1, 1))) is None  # taken: nothing more is due


def test_a_new_plan_means_a_rebuild_without_a_word_to_the_user() -> None:
    """The plan moved between two steps (the token came back first): the caches live on the
    old plan's stages, so the next step rebuilds them; nothing was lost, nothing is said."""
    answer = answer_state()
    answer.plan_key, answer.failures = (1, 1), 3
    assert answer.recovery(view((1, 1))) is None
    assert answer.recovery(view((1, 2))) is Phase.REBUILD
    assert answer.state.phase is Phase.RUNNING and answer.failures == 0 and answer.plan_key == (1, 2)


def test_a_cancelled_answer_that_was_replanning_says_running_before_a_last_token() -> None:
    answer = answer_state()
    answer.pause()
    answer.cancel()
    assert answer.state.phase is Phase.CANCELLED_REPLANNING
    answer.lost(in_flight(whole=True), Phase.FULL_REPLAY)  # it ends at the next step boundary anyway
    assert answer.state.phase is Phase.CANCELLED_REPLANNING
    assert answer.token() and answer.state.phase is Phase.CANCELLED
    other = answer_state()
    other.cancel()
    assert other.state.phase is Phase.CANCELLED and other.pause()
    assert other.state.phase is Phase.CANCELLED_REPLANNING


def test_stale_refusals_count_as_failures_only_once_the_mesh_moved_for_too_long() -> None:
    answer = answer_state()
    answer.failures = 1
    answer.refused_as_stale(10.0, plan_wait_s=5.0)
    assert answer.state.since == 10.0 and answer.state.retry_at == 10.0 + STALE_RETRY_S
    assert answer.failures == 0  # the caller's lose counts it back
    answer.refused_as_stale(14.9, plan_wait_s=5.0)
    assert answer.state.since == 10.0 and answer.failures == -1
    answer.refused_as_stale(15.0, plan_wait_s=5.0)
    assert answer.failures == -1  # now it counts
    answer.token()
    assert answer.state.since is None and answer.failures == 0


# -- on the simulator ------------------------------------------------------------------------------


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


def test_a_step_with_no_result_times_out_and_is_retried() -> None:
    net = settled("abc", step_timeout_s=2.0)
    dropped = lose_one_step(net)
    answer = net.answer("a", PROMPT, 8)
    assert dropped and answer.error is None and answer.tokens == reference(PROMPT, 8)


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
    coordinator.coordinator.publish(PlannerPlan((wire.Stage(holder, 0, LAYERS),), 0.0))  # every layer on one node
    net.run_until(lambda: answer.done)
    after = net.nodes["a"].core.book.active
    assert after is not None and after.node_ids == (holder,)
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)


def test_an_answer_is_replanning_while_a_lost_stage_is_rebuilt_then_running_again() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    entry = net.nodes["a"].core.entry
    answer = net.ask("a", PROMPT, 30)
    (session,) = net.nodes["a"].answers
    phases: list[Phase] = []

    def seen() -> None:
        state = entry.state(session)
        if state is not None and (not phases or phases[-1] is not state.phase):
            phases.append(state.phase)

    net.run_until(lambda: seen() or len(answer.tokens) >= 10)  # type: ignore[func-returns-value]
    net.kill(next(n for n in "bc" if n != coordinator))
    net.run_until(lambda: seen() or answer.done)  # type: ignore[func-returns-value]
    assert answer.error is None and answer.tokens == reference(PROMPT, 30)
    # the lost step waits for the new plan as a rebuild due; then the rebuild and the next
    # step run, replanning; the next token runs again
    assert phases == [Phase.RUNNING, Phase.REBUILD, Phase.REPLANNING, Phase.RUNNING]
    assert answer.states == ["replanning", "running"]


def test_a_rebuild_that_keeps_failing_escalates_to_a_whole_rebuild_then_a_full_replay() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    for node_id, node in net.nodes.items():
        if node_id == "a":
            continue
        run = node.shard.run

        def no_rebuild(job, run=run):  # type: ignore[no-untyped-def]
            if isinstance(job, RebuildPart):
                raise RuntimeError("no log here")
            return run(job)

        node.shard.run = no_rebuild  # type: ignore[method-assign]
    answer, _ = kill_when(net, "a", lambda net: next(n for n in "bc" if n != coordinator), 12)
    assert answer.error is None and answer.tokens == reference(PROMPT, 40)
    stats = net.nodes["a"].core.stats
    assert stats.whole_rebuilds == 1 and stats.full_replays == 1
    assert answer.states == ["replanning", "running"]


def test_an_answer_cancelled_while_it_waits_for_a_plan_ends_at_once() -> None:
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=30.0)
    net = Net()
    net.add("a", settings=settings)
    net.add("b", settings=settings).frozen = True  # hangs: never loads its layers
    net.connect_all()
    answer = net.ask("a", PROMPT, 4)
    net.run_until(lambda: net.nodes["a"].core.book.pending is not None)
    assert not answer.done and answer.states == ["replanning"]
    net.nodes["a"].core.cancel_session(next(iter(net.nodes["a"].answers)), net.now)
    net._collect("a")
    assert answer.done and answer.error is None and answer.finish_reason == "cancelled" and answer.tokens == []


def test_a_closed_answer_says_nothing_more_and_frees_every_stage() -> None:
    net = three_nodes()
    answer = net.ask("a", PROMPT, 100)
    net.run_until(lambda: len(answer.tokens) >= 5)
    (session,) = net.nodes["a"].answers
    net.nodes["a"].core.close_session(session)
    net._collect("a")
    tokens = len(answer.tokens)
    net.run_for(1.0)
    assert len(answer.tokens) == tokens and not answer.done
    assert all(session not in n.shard.caches for n in net.nodes.values())
    assert net.nodes["a"].core.entry.state(session) is None


def test_an_answer_on_a_node_that_stops_ends_with_the_reason() -> None:
    net = three_nodes()
    answer = net.ask("a", PROMPT, 100)
    net.run_until(lambda: len(answer.tokens) >= 3)
    net.nodes["a"].core.stop("the daemon is stopping")
    net._collect("a")
    assert answer.done and answer.error == "the daemon is stopping"


def _join_unlinked_with(net: Net, newcomer: str, entry: str) -> None:
    """`newcomer` joins, linked with every member but `entry` (its link to `entry` is still
    being made), and takes the layers of a stage that leaves, in the coordinator's next plan
    (with a little less memory, it does not win the election: as when a restarted node comes
    back while another one goes)."""
    coordinator = net.nodes[entry].core.coordinator_id
    net.add(newcomer, mem_budget_bytes=9 * 10**5)
    for other in list(net.nodes):
        if other not in (newcomer, entry):
            net.connect(newcomer, other)
    net.kill(next(n for n in list(net.nodes) if n not in (newcomer, entry, coordinator)))
    net.run_until(lambda: all(
        (plan := n.core.book.active) is not None and newcomer in plan.node_ids
        for nid, n in net.nodes.items() if nid != entry))


def test_an_answer_waits_for_its_link_to_a_stage_the_coordinator_planned_with() -> None:
    """The chaos run's last 120 s wait: a restarted node was linked with the coordinator but
    not yet with the entry node when the plan took it in; its results could not come back."""
    net = settled("abc")
    coordinator = net.nodes["a"].core.coordinator_id
    entry = next(n for n in "abc" if n != coordinator)
    _join_unlinked_with(net, "d", entry)
    answer = net.ask(entry, PROMPT, 20)
    net.run_for(2.0)
    assert answer.tokens == [] and answer.states == ["replanning"]
    net.connect("d", entry)
    linked_at = net.now
    net.run_until(lambda: answer.done)
    assert answer.error is None and answer.tokens == reference(PROMPT, 20)
    assert net.now - linked_at < 5.0


def test_an_answer_that_never_links_with_a_stage_ends_with_a_clear_error() -> None:
    net = settled("abc")
    coordinator = net.nodes["a"].core.coordinator_id
    entry = next(n for n in "abc" if n != coordinator)
    _join_unlinked_with(net, "d", entry)
    answer = net.ask(entry, PROMPT, 20)
    asked = net.now
    net.run_until(lambda: answer.done, max_s=60.0)
    # the plan with d never becomes the entry node's, or it does and the link never comes:
    # either way the answer ends with an error, within about `plan_wait_s` (10 s here)
    assert answer.error is not None and answer.tokens == []
    assert net.now - asked < 30.0


def test_an_entry_node_without_a_stage_frees_its_own_caches_when_its_answer_ends() -> None:
    """Its private layers hold caches of its own answers even when the plan gives it none."""
    from meshllm.mesh.jobs import DropSessions
    from tests.unit.meshsim import EMBED_HEAD_BYTES, Net

    net = Net()
    for n in "ab":
        net.add(n)
    net.add("c", mem_budget_bytes=EMBED_HEAD_BYTES)  # room for no layer: never a stage
    net.connect_all()
    net.settle()
    assert "c" not in net.nodes["a"].core.book.active.node_ids  # type: ignore[union-attr]
    answer = net.ask("c", PROMPT, 6)
    (sid,) = net.nodes["c"].answers
    net.run_until(lambda: answer.done)
    net.run_until(lambda: any(isinstance(j, DropSessions) and sid in j.session_ids for j in net.nodes["c"].jobs_run))
