"""Layer placement: exact optimum (checked by brute force), budgets, shortfall, stickiness."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshllm.errors import PlacementError
from meshllm.placement.balance import Balancer
from meshllm.placement.planner import (
    DEFAULT_OBJECTIVE,
    HopCosts,
    ModelSpec,
    NodeCapacity,
    Plan,
    Stage,
    chain_cost_ms,
    layers_moved,
    plan_layers,
)

MIB = 1024 * 1024
REL = 1e-9


def node(node_id: str, layers: int, ms: float, spec: ModelSpec, spare: int = 0) -> NodeCapacity:
    """A node whose budget holds the embedding/head plus exactly ``layers`` layers."""
    return NodeCapacity(node_id, spec.embed_head_bytes + layers * spec.layer_bytes + spare, ms)


def assert_valid(plan: Plan, spec: ModelSpec, nodes: list[NodeCapacity]) -> None:
    budgets = {n.node_id: n.mem_budget_bytes for n in nodes}
    assert plan.stages, "a plan has at least one stage"
    assert plan.stages[0].start_layer == 0
    assert plan.stages[-1].end_layer == spec.num_layers
    for before, after in itertools.pairwise(plan.stages):
        assert before.end_layer == after.start_layer
    for stage in plan.stages:
        assert stage.end_layer > stage.start_layer, "no empty stages"
        need = stage.num_layers * spec.layer_bytes + spec.embed_head_bytes
        assert need <= budgets[stage.node_id], "a stage must fit its node's budget"
    assert len(set(plan.node_ids)) == len(plan.stages), "a node appears once"


def brute_force(
    spec: ModelSpec, nodes: list[NodeCapacity], hops: HopCosts, objective: str
) -> tuple[float, float]:
    """(ms per token, slowest stage ms) of the best plan over every order and every split.

    For latency the slowest stage is that of a plan with the lowest ms per token.
    """
    ms = {n.node_id: n.ms_per_layer for n in nodes}
    budgets = {n.node_id: n.mem_budget_bytes for n in nodes}
    scores = []
    for k in range(1, min(len(nodes), spec.num_layers) + 1):
        for order in itertools.permutations([n.node_id for n in nodes], k):
            for cuts in itertools.combinations(range(1, spec.num_layers), k - 1):
                bounds = (0, *cuts, spec.num_layers)
                stages = [Stage(order[i], bounds[i], bounds[i + 1]) for i in range(k)]
                if all(
                    s.num_layers * spec.layer_bytes + spec.embed_head_bytes <= budgets[s.node_id]
                    for s in stages
                ):
                    scores.append(chain_cost_ms(stages, ms, hops))
    assert scores
    if objective == "latency":
        return min(scores)
    slowest = min(s for _, s in scores)
    return min(lat for lat, s in scores if s <= slowest * (1 + REL)), slowest


@st.composite
def problems(
    draw: st.DrawFn, max_nodes: int = 4, max_layers: int = 6
) -> tuple[ModelSpec, list[NodeCapacity], dict[tuple[str, str], float] | None, float]:
    num_layers = draw(st.integers(1, max_layers))
    spec = ModelSpec(num_layers, draw(st.integers(1, 50)), draw(st.integers(0, 50)))
    count = draw(st.integers(1, max_nodes))
    nodes = [
        node(
            f"n{i}",
            draw(st.integers(0, num_layers)),
            draw(st.integers(1, 12)) / 4,  # quarters: ties happen often
            spec,
            spare=draw(st.integers(0, max(0, spec.layer_bytes - 1))),
        )
        for i in range(count)
    ]
    assume(sum(min(num_layers, (n.mem_budget_bytes - spec.embed_head_bytes) // spec.layer_bytes)
               for n in nodes) >= num_layers)
    hop_ms = None
    if draw(st.booleans()):  # measured per-link hops, or one default for every hop
        hop_ms = {
            (a.node_id, b.node_id): draw(st.integers(0, 8)) / 4
            for a in nodes for b in nodes if a.node_id != b.node_id
        }
    default_hop_ms = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    return spec, nodes, hop_ms, default_hop_ms


# ---- the cost model and the optimum ----------------------------------------------------------


def test_cost_is_compute_plus_one_hop_per_stage_around_the_ring() -> None:
    ms = {"a": 1.0, "b": 2.0, "c": 0.5}
    hops = HopCosts({("a", "b"): 0.3, ("b", "c"): 0.4}, default_ms=1.0)
    stages = [Stage("a", 0, 10), Stage("b", 10, 15), Stage("c", 15, 30)]
    latency, slowest = chain_cost_ms(stages, ms, hops)
    # compute 10 + 10 + 7.5; hops a->b 0.3, b->c 0.4, c->a (unmeasured) 1.0
    assert latency == pytest.approx(27.5 + 1.7)
    assert slowest == pytest.approx(10.0)
    assert chain_cost_ms([Stage("a", 0, 30)], ms, hops) == (30.0, 30.0)  # one stage: no hop


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from(["latency", "throughput"]))
def test_plans_match_brute_force_over_all_orders_and_splits(problem, objective) -> None:
    spec, nodes, hop_ms, default_hop_ms = problem
    plan = plan_layers(
        spec, nodes, objective=objective, hop_ms=hop_ms, default_hop_ms=default_hop_ms
    )
    assert_valid(plan, spec, nodes)
    hops = HopCosts(hop_ms, default_hop_ms)
    latency, slowest = chain_cost_ms(plan.stages, {n.node_id: n.ms_per_layer for n in nodes}, hops)
    assert plan.est_ms_per_token == pytest.approx(latency)
    assert plan.est_slowest_stage_ms == pytest.approx(slowest)
    want = brute_force(spec, nodes, hops, objective)
    if objective == "latency":
        assert plan.est_ms_per_token == pytest.approx(want[0], rel=REL, abs=1e-9)
    else:
        assert plan.est_slowest_stage_ms == pytest.approx(want[1], rel=REL, abs=1e-9)
        assert plan.est_ms_per_token == pytest.approx(want[0], rel=REL, abs=1e-9)


def test_latency_puts_everything_on_the_fastest_node_when_it_fits() -> None:
    spec = ModelSpec(30, 10 * MIB, 50 * MIB)
    nodes = [node("slow", 30, 2.0, spec), node("fast", 30, 1.0, spec)]
    plan = plan_layers(spec, nodes, default_hop_ms=0.0, objective="latency")
    assert plan.stages == (Stage("fast", 0, 30),)
    assert plan.est_ms_per_token == pytest.approx(30.0)


def test_throughput_gives_spans_in_proportion_to_speed() -> None:
    spec = ModelSpec(30, 10 * MIB, 50 * MIB)
    nodes = [node("a", 30, 1.0, spec), node("b", 30, 2.0, spec)]  # a is twice as fast
    plan = plan_layers(spec, nodes, objective="throughput")
    spans = {s.node_id: s.num_layers for s in plan.stages}
    assert spans == {"a": 20, "b": 10}
    assert plan.est_slowest_stage_ms == pytest.approx(20.0)

    three = [node("x", 60, 1.0, spec), node("y", 60, 2.0, spec), node("z", 60, 4.0, spec)]
    plan = plan_layers(ModelSpec(56, 10 * MIB, 50 * MIB), three, objective="throughput")
    assert {s.node_id: s.num_layers for s in plan.stages} == {"x": 32, "y": 16, "z": 8}


def test_memory_forces_a_split_even_for_latency() -> None:
    spec = ModelSpec(30, 10 * MIB, 50 * MIB)
    nodes = [node("fast", 12, 1.0, spec), node("mid", 30, 1.5, spec), node("slow", 30, 3.0, spec)]
    plan = plan_layers(spec, nodes, objective="latency")
    # the fast node fills up first; the rest goes to the next fastest; the slow one is left out
    assert {s.node_id: s.num_layers for s in plan.stages} == {"fast": 12, "mid": 18}
    assert "slow" not in plan.node_ids
    assert_valid(plan, spec, nodes)


def test_hops_are_worth_paying_only_when_compute_saves_more() -> None:
    spec = ModelSpec(10, 1, 0)
    nodes = [node("a", 10, 1.0, spec), node("b", 10, 1.0, spec)]
    assert len(plan_layers(spec, nodes, default_hop_ms=0.5, objective="latency").stages) == 1
    assert len(plan_layers(spec, nodes, objective="throughput", default_hop_ms=0.5).stages) == 2


def test_the_default_objective_is_the_one_mesh_default_throughput() -> None:
    spec = ModelSpec(10, 1, 0)
    nodes = [node("a", 10, 1.0, spec), node("b", 10, 1.0, spec)]
    assert DEFAULT_OBJECTIVE == "throughput"
    assert plan_layers(spec, nodes, default_hop_ms=0.5) == plan_layers(
        spec, nodes, default_hop_ms=0.5, objective="throughput")
    assert Balancer(spec).objective == DEFAULT_OBJECTIVE


def test_with_link_latencies_the_ring_takes_the_cheap_links() -> None:
    spec = ModelSpec(4, 1, 0)
    nodes = [node(n, 1, 1.0, spec) for n in "abcd"]  # memory forces all four
    slow = 10.0
    hop_ms = {(a, b): slow for a in "abcd" for b in "abcd" if a != b}
    for a, b in [("a", "c"), ("c", "b"), ("b", "d"), ("d", "a")]:
        hop_ms[(a, b)] = hop_ms[(b, a)] = 1.0
    plan = plan_layers(spec, nodes, hop_ms=hop_ms, objective="latency")
    assert plan.est_ms_per_token == pytest.approx(4 + 4 * 1.0)
    ring = plan.node_ids
    for i in range(4):
        assert hop_ms[(ring[i], ring[(i + 1) % 4])] == 1.0


def test_many_nodes_and_layers_still_give_a_valid_plan() -> None:
    rng = random.Random(3)
    spec = ModelSpec(80, 100 * MIB, 500 * MIB)
    nodes = [
        NodeCapacity(
            f"node-{i:02d}", 500 * MIB + rng.randint(4, 30) * 100 * MIB, rng.uniform(0.5, 3.0)
        )
        for i in range(16)
    ]
    hop_ms = {(a.node_id, b.node_id): rng.uniform(0.3, 2.0) for a in nodes for b in nodes if a != b}
    for objective in ("latency", "throughput"):
        for hops in (None, hop_ms):
            plan = plan_layers(spec, nodes, objective=objective, hop_ms=hops)
            assert_valid(plan, spec, nodes)
            smaller = [n for n in nodes if n.node_id != plan.stages[0].node_id]
            again = plan_layers(spec, smaller, objective=objective, hop_ms=hops, previous=plan)
            assert_valid(again, spec, smaller)


# ---- determinism and ties --------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    problems(max_nodes=5, max_layers=8), st.sampled_from(["latency", "throughput"]), st.randoms()
)
def test_same_input_in_any_order_gives_the_same_plan(problem, objective, rnd) -> None:
    spec, nodes, hop_ms, default_hop_ms = problem
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    kwargs = dict(objective=objective, hop_ms=hop_ms, default_hop_ms=default_hop_ms)
    assert plan_layers(spec, nodes, **kwargs) == plan_layers(spec, shuffled, **kwargs)


def test_ties_go_to_the_lower_node_id() -> None:
    spec = ModelSpec(8, 1, 0)
    twins = [node("n-b", 8, 1.0, spec), node("n-a", 8, 1.0, spec), node("n-c", 8, 1.0, spec)]
    assert plan_layers(spec, twins, objective="latency").stages == (Stage("n-a", 0, 8),)
    halves = [node("n-b", 4, 1.0, spec), node("n-a", 4, 1.0, spec), node("n-c", 4, 1.0, spec)]
    assert plan_layers(spec, halves, objective="latency").node_ids == ("n-a", "n-b")


# ---- not enough memory -----------------------------------------------------------------------


def test_placement_error_names_the_shortfall_in_bytes_and_mib() -> None:
    spec = ModelSpec(30, 10 * MIB, 50 * MIB)
    nodes = [node("a", 10, 1.0, spec, spare=5 * MIB), node("b", 12, 1.0, spec)]
    with pytest.raises(PlacementError) as caught:
        plan_layers(spec, nodes)
    # 22 of 30 layers fit (the spare 5 MiB is not a whole layer): 8 layers are missing
    assert caught.value.shortfall_bytes == 8 * 10 * MIB
    message = str(caught.value)
    assert str(8 * 10 * MIB) in message and "80.0 MiB" in message


def test_a_node_below_the_embedding_size_holds_nothing() -> None:
    spec = ModelSpec(4, 100, 1000)
    with pytest.raises(PlacementError) as caught:
        plan_layers(spec, [NodeCapacity("tiny", 999, 1.0)])
    assert caught.value.shortfall_bytes == 400
    with pytest.raises(PlacementError) as caught:
        plan_layers(spec, [])
    assert caught.value.shortfall_bytes == 400


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 40), st.integers(1, 1000), st.integers(0, 1000),
    st.lists(st.integers(0, 50_000), min_size=1, max_size=6),
)
def test_the_shortfall_is_exactly_what_one_more_node_must_bring(
    layers, layer_bytes, head_bytes, budgets
) -> None:
    """shortfall = layer_bytes * (num_layers - whole layers the nodes have room for).

    A node has room for ``(budget - embed_head_bytes) // layer_bytes`` layers (0 if negative).

    So a node with ``embed_head_bytes + shortfall_bytes`` more makes the model fit, and a byte
    less does not.
    """
    spec = ModelSpec(layers, layer_bytes, head_bytes)
    nodes = [NodeCapacity(f"n{i}", budget, 1.0) for i, budget in enumerate(budgets)]
    room = sum(min(layers, (b - head_bytes) // layer_bytes) for b in budgets if b >= head_bytes)
    if room >= layers:
        assert_valid(plan_layers(spec, nodes), spec, nodes)
        return
    with pytest.raises(PlacementError) as caught:
        plan_layers(spec, nodes)
    shortfall = caught.value.shortfall_bytes
    assert shortfall == (layers - room) * layer_bytes
    assert plan_layers(spec, [*nodes, NodeCapacity("extra", head_bytes + shortfall, 1.0)])
    with pytest.raises(PlacementError):
        plan_layers(spec, [*nodes, NodeCapacity("extra", head_bytes + shortfall - 1, 1.0)])


# ---- sticky re-plans -------------------------------------------------------------------------


def test_layers_moved_counts_layers_whose_holder_changes() -> None:
    old = Plan((Stage("a", 0, 10), Stage("b", 10, 20), Stage("c", 20, 30)), 0.0)
    new = Plan((Stage("a", 0, 15), Stage("c", 15, 30)), 0.0)
    assert layers_moved(old, new) == 10  # b's layers, 5 to a and 5 to c
    assert layers_moved(old, old) == 0
    assert layers_moved(old, Plan((Stage("a", 0, 20),), 0.0)) == 20  # 10 re-held, 10 gone


def test_losing_a_node_keeps_the_survivors_layers_where_they_are() -> None:
    spec = ModelSpec(32, 10 * MIB, 50 * MIB)
    nodes = [node(n, 11, 1.0, spec) for n in ("a", "b", "c", "d")]
    before = plan_layers(spec, nodes, objective="throughput")
    assert [s.num_layers for s in before.stages] == [8, 8, 8, 8]
    survivors = [n for n in nodes if n.node_id != "c"]
    fresh = plan_layers(spec, survivors, objective="throughput")
    after = plan_layers(spec, survivors, objective="throughput", previous=before, tolerance=0.05)
    assert_valid(after, spec, survivors)
    assert after.est_slowest_stage_ms <= fresh.est_slowest_stage_ms * 1.05
    assert layers_moved(before, after) <= layers_moved(before, fresh)
    kept = {}
    for stage in after.stages:
        old_start, old_end = before.span_of(stage.node_id)
        overlap = min(stage.end_layer, old_end) - max(stage.start_layer, old_start)
        kept[stage.node_id] = max(0, overlap)
    assert all(kept[n] >= 6 for n in ("a", "b", "d")), kept  # each survivor keeps most of its 8
    assert layers_moved(before, after) <= 12  # c's 8 layers plus a little rebalancing


def test_a_spare_node_takes_over_exactly_the_lost_nodes_span() -> None:
    spec = ModelSpec(80, 10 * MIB, 50 * MIB)
    nodes = [node(f"n{i}", 20, 1.0 + i / 100, spec) for i in range(5)]  # memory: 4 stages
    before = plan_layers(spec, nodes, objective="latency")
    assert before.node_ids == ("n0", "n1", "n2", "n3")
    survivors = [n for n in nodes if n.node_id != "n1"]
    after = plan_layers(spec, survivors, previous=before, objective="latency")
    assert after.stages == (Stage("n0", 0, 20), Stage("n4", 20, 40), Stage("n2", 40, 60),
                            Stage("n3", 60, 80))
    assert layers_moved(before, after) == 20
    fresh = plan_layers(spec, survivors, objective="latency")
    assert layers_moved(before, fresh) > 20  # a fresh plan shifts more


def test_an_unchanged_mesh_keeps_its_plan_even_if_a_slightly_better_one_exists() -> None:
    spec = ModelSpec(20, 1, 0)
    nodes = [node("a", 20, 1.0, spec), node("b", 20, 1.02, spec)]
    previous = Plan((Stage("a", 0, 10), Stage("b", 10, 20)), 0.0)
    # the optimum holds all on a (20 ms); the previous plan costs 20.2 ms, within 5%
    kept = plan_layers(spec, nodes, default_hop_ms=0.0, previous=previous, tolerance=0.05, objective="latency")
    assert kept.stages == previous.stages
    moved = plan_layers(spec, nodes, default_hop_ms=0.0, previous=previous, tolerance=0.0, objective="latency")
    assert moved.stages == (Stage("a", 0, 20),)


def test_a_slow_node_gets_relieved_when_its_plan_drifts_past_the_tolerance() -> None:
    spec = ModelSpec(20, 1, 0)
    previous = Plan((Stage("a", 0, 10), Stage("b", 10, 20)), 0.0)
    nodes = [node("a", 20, 1.0, spec), node("b", 20, 3.0, spec)]  # b got three times slower
    after = plan_layers(spec, nodes, objective="throughput", previous=previous)
    assert after.span_of("a")[0] == 0 and after.span_of("a")[1] == 15  # a grows, b's span shrinks
    assert layers_moved(previous, after) == 5


@settings(max_examples=120, deadline=None)
@given(
    problems(max_nodes=5, max_layers=10),
    st.sampled_from(["latency", "throughput"]),
    st.sampled_from([0.0, 0.05, 0.2]),
    st.data(),
)
def test_sticky_plans_stay_within_tolerance_and_never_move_more_than_a_fresh_plan(
    problem, objective, tolerance, data
) -> None:
    spec, nodes, hop_ms, default_hop_ms = problem
    kwargs = dict(objective=objective, hop_ms=hop_ms, default_hop_ms=default_hop_ms)
    previous = plan_layers(spec, nodes, **kwargs)
    change = data.draw(st.sampled_from(["lose", "slow", "join"]))
    if change == "lose":
        gone = data.draw(st.sampled_from(sorted(previous.node_ids)))
        now = [n for n in nodes if n.node_id != gone]
    elif change == "slow":
        victim = data.draw(st.sampled_from(sorted(previous.node_ids)))
        now = [NodeCapacity(n.node_id, n.mem_budget_bytes, n.ms_per_layer * 2 if n.node_id == victim
                            else n.ms_per_layer) for n in nodes]
    else:
        now = [*nodes, node("z-new", spec.num_layers, 0.25, spec)]
    try:
        fresh = plan_layers(spec, now, **kwargs)
    except PlacementError:
        return
    sticky = plan_layers(spec, now, previous=previous, tolerance=tolerance, **kwargs)
    assert_valid(sticky, spec, now)
    if objective == "latency":
        assert sticky.est_ms_per_token <= fresh.est_ms_per_token * (1 + tolerance) + 1e-9
    else:
        assert sticky.est_slowest_stage_ms <= fresh.est_slowest_stage_ms * (1 + tolerance) + 1e-9
    assert layers_moved(previous, sticky) <= layers_moved(previous, fresh)
    if change == "lose":
        lost_layers = previous.stages[previous.node_ids.index(gone)].num_layers
        assert layers_moved(previous, sticky) >= lost_layers


def test_bad_input_is_refused() -> None:
    spec = ModelSpec(4, 1, 0)
    with pytest.raises(ValueError, match="twice"):
        plan_layers(spec, [node("a", 4, 1.0, spec), node("a", 4, 1.0, spec)])
    with pytest.raises(ValueError, match="objective"):
        plan_layers(spec, [node("a", 4, 1.0, spec)], objective="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ModelSpec(0, 1, 0)
    with pytest.raises(ValueError):
        NodeCapacity("a", 10, -1.0)


# -- private layers -----------------------------------------------------------------------------


def test_private_layers_are_left_out_of_the_plan_and_counted_on_every_node() -> None:
    spec = ModelSpec(num_layers=10, layer_bytes=10 * MIB, embed_head_bytes=50 * MIB, private_layers=2)
    # every node holds its 2 + 2 private layers besides its stage: room for 3 more each
    nodes = [NodeCapacity(n, spec.embed_head_bytes + 7 * spec.layer_bytes, 1.0) for n in ("a", "b")]
    plan = plan_layers(spec, nodes)
    assert (plan.stages[0].start_layer, plan.stages[-1].end_layer) == (2, 8)
    assert all(stage.num_layers <= 3 for stage in plan.stages)
    assert sum(stage.num_layers for stage in plan.stages) == 6
    # one node less: 6 layers do not fit in room for 3
    with pytest.raises(PlacementError):
        plan_layers(spec, nodes[:1])


def test_a_replan_with_private_layers_is_sticky_to_the_plan_in_force() -> None:
    spec = ModelSpec(num_layers=12, layer_bytes=MIB, embed_head_bytes=MIB, private_layers=1)
    nodes = [NodeCapacity(n, 100 * MIB, 1.0) for n in ("a", "b", "c")]
    first = plan_layers(spec, nodes)
    again = plan_layers(spec, nodes, previous=first)
    assert again.stages == first.stages


@pytest.mark.parametrize("private_layers", [-1, 5, 6])
def test_private_layers_must_leave_a_layer_to_place(private_layers: int) -> None:
    with pytest.raises(ValueError):
        ModelSpec(num_layers=10, layer_bytes=1, embed_head_bytes=1, private_layers=private_layers)
