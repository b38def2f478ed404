"""The entry-aware planner: measured link costs, entry nodes, head work, latency targets.

Checked against brute force over every subset, order and split on small cases.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.placement.planner import (
    EXACT_PAIRWISE_MAX_NODES,
    PREFILL_POSITIONS,
    ModelSpec,
    NodeCapacity,
    Plan,
    Stage,
    layers_moved,
    plan_layers,
    predict_plan,
)

REL = 1e-9
STRESS = int(os.environ.get("MESHLLM_PLANNER_STRESS", "1"))
"""Multiplies every example count (e.g. 10 for a long search for counter-examples)."""
Hops = dict[tuple[str, str], float]


def node(node_id: str, layers: int, ms: float, spec: ModelSpec, *, head_ms: float = 0.0,
         prefill_ms: float | None = None) -> NodeCapacity:
    """A node whose budget holds the embedding/head plus exactly ``layers`` layers."""
    return NodeCapacity(node_id, spec.embed_head_bytes + layers * spec.layer_bytes, ms,
                        head_ms=head_ms, prefill_ms_per_layer=prefill_ms)


def trip(order: list[str], entry: str, hops: Hops, default: float) -> float:
    """Written out again (not the planner's): entry -> stages -> entry, no hop to itself."""
    path = [entry, *order, entry]
    return sum(hops.get((a, b), default) for a, b in itertools.pairwise(path) if a != b)


def predictions(stages: list[Stage], nodes: list[NodeCapacity], entries: list[str] | None,
                hops: Hops, prefill_hops: Hops, default: float) -> tuple[float, float, float]:
    """(ms per token, ttft, slowest stage) of a chain at its worst entry."""
    by_id = {n.node_id: n for n in nodes}
    order = [s.node_id for s in stages]
    heads = entries if entries is not None else [order[0]]
    compute = [s.num_layers * by_id[s.node_id].ms_per_layer for s in stages]
    prefill = sum(s.num_layers * by_id[s.node_id].prefill_ms for s in stages)
    decode = sum(compute) + max(by_id[e].head_ms + trip(order, e, hops, default) for e in heads)
    ttft = prefill + max(by_id[e].head_ms + trip(order, e, prefill_hops, default * 10) for e in heads)
    return decode, ttft, max(compute)


def every_plan(spec: ModelSpec, nodes: list[NodeCapacity]):
    budgets = {n.node_id: n.mem_budget_bytes for n in nodes}
    for k in range(1, min(len(nodes), spec.num_layers) + 1):
        for order in itertools.permutations([n.node_id for n in nodes], k):
            for cuts in itertools.combinations(range(1, spec.num_layers), k - 1):
                bounds = (0, *cuts, spec.num_layers)
                stages = [Stage(order[i], bounds[i], bounds[i + 1]) for i in range(k)]
                if all(s.num_layers * spec.layer_bytes + spec.embed_head_bytes <= budgets[s.node_id]
                       for s in stages):
                    yield stages


def relative_miss(decode: float, ttft: float, target_decode: float | None,
                  target_ttft: float | None) -> float:
    worst = -math.inf
    if target_decode is not None:
        worst = max(worst, (decode - target_decode) / target_decode)
    if target_ttft is not None:
        worst = max(worst, (ttft - target_ttft) / target_ttft)
    return worst


@st.composite
def problems(draw: st.DrawFn, max_nodes: int = 4, max_layers: int = 6, entries_given: bool = False):
    num_layers = draw(st.integers(1, max_layers))
    spec = ModelSpec(num_layers, draw(st.integers(1, 50)), draw(st.integers(0, 50)))
    count = draw(st.integers(1, max_nodes))
    prefill_factor = draw(st.sampled_from([None, 3.0]))  # one factor for all: exact search
    room = [draw(st.integers(0, num_layers)) for _ in range(count)]
    while sum(room) < num_layers:  # enough room in all (no filtering)
        i = draw(st.integers(0, count - 1))
        room[i] = min(num_layers, room[i] + 1)
    nodes = []
    for i in range(count):
        ms = draw(st.integers(1, 12)) / 4
        nodes.append(node(f"n{i}", room[i], ms, spec, head_ms=draw(st.integers(0, 8)) / 4,
                          prefill_ms=None if prefill_factor is None else ms * prefill_factor))
    ids = [n.node_id for n in nodes]
    hops = {(a, b): draw(st.integers(0, 40)) / 4 for a in ids for b in ids if a != b}
    prefill_hops = {pair: ms * 10 + draw(st.integers(0, 8)) for pair, ms in hops.items()}
    some = st.lists(st.sampled_from(ids), min_size=1, unique=True)
    entries = draw(some if entries_given else st.one_of(st.none(), some))
    return spec, nodes, hops, prefill_hops, entries


def plan_with(spec, nodes, hops, prefill_hops, entries, **kwargs) -> Plan:
    return plan_layers(spec, nodes, hop_ms=hops, prefill_hop_ms=prefill_hops, default_hop_ms=1.0,
                       default_prefill_hop_ms=10.0, entry_ids=entries,
                       **{"objective": "latency", **kwargs})


def check_plan(plan: Plan, spec, nodes, hops, prefill_hops, entries) -> tuple[float, float, float]:
    assert plan.stages[0].start_layer == 0 and plan.stages[-1].end_layer == spec.num_layers
    for before, after in itertools.pairwise(plan.stages):
        assert before.end_layer == after.start_layer
    budgets = {n.node_id: n.mem_budget_bytes for n in nodes}
    for stage in plan.stages:
        assert stage.num_layers >= 1
        assert stage.num_layers * spec.layer_bytes + spec.embed_head_bytes <= budgets[stage.node_id]
    got = predictions(list(plan.stages), nodes, entries, hops, prefill_hops, 1.0)
    assert plan.predicted_ms_per_token == pytest.approx(got[0])
    assert plan.predicted_ttft_ms == pytest.approx(got[1])
    assert (plan.predicted_ms_per_token, plan.predicted_ttft_ms) == pytest.approx(predict_plan(
        plan.stages, nodes, hop_ms=hops, prefill_hop_ms=prefill_hops, default_hop_ms=1.0,
        default_prefill_hop_ms=10.0, entry_ids=entries))
    return got


# ---- against brute force ---------------------------------------------------------------------


@settings(max_examples=120 * STRESS, deadline=None)
@given(problems(entries_given=True), st.sampled_from(["latency", "throughput"]))
def test_without_targets_the_objective_decides_at_the_worst_entry(problem, objective) -> None:
    spec, nodes, hops, prefill_hops, entries = problem
    plan = plan_with(spec, nodes, hops, prefill_hops, entries, objective=objective)
    decode, _, slowest = check_plan(plan, spec, nodes, hops, prefill_hops, entries)
    assert plan.meets_targets and plan.miss_ms_per_token == 0.0
    every = [predictions(s, nodes, entries, hops, prefill_hops, 1.0) for s in every_plan(spec, nodes)]
    if objective == "latency":
        assert decode == pytest.approx(min(d for d, _, _ in every), rel=REL, abs=1e-9)
    else:
        least = min(s for _, _, s in every)
        assert slowest == pytest.approx(least, rel=REL, abs=1e-9)
        assert decode == pytest.approx(min(d for d, _, s in every if s <= least * (1 + REL)),
                                       rel=REL, abs=1e-9)


@settings(max_examples=150 * STRESS, deadline=None)
@given(problems(), st.data())
def test_targets_pick_the_fewest_stages_that_meet_them_then_the_most_headroom(problem, data) -> None:
    spec, nodes, hops, prefill_hops, entries = problem
    every = [(s, predictions(s, nodes, entries, hops, prefill_hops, 1.0)) for s in every_plan(spec, nodes)]
    # targets drawn around what the plans can do, so that some meet them and some do not
    decodes = sorted(p[0] for _, p in every)
    ttfts = sorted(p[1] for _, p in every)
    target_decode = data.draw(st.one_of(st.none(), st.sampled_from(decodes).map(lambda d: d * 1.05)))
    target_ttft = data.draw(st.one_of(st.none(), st.sampled_from(ttfts).map(lambda t: t + 1.0)))
    if target_decode is None and target_ttft is None:
        target_decode = decodes[0] * 0.5  # none can meet it
    objective = data.draw(st.sampled_from(["latency", "throughput"]))

    plan = plan_with(spec, nodes, hops, prefill_hops, entries, objective=objective,
                     target_ms_per_token=target_decode, target_ttft_ms=target_ttft)

    decode, ttft, _ = check_plan(plan, spec, nodes, hops, prefill_hops, entries)
    miss = relative_miss(decode, ttft, target_decode, target_ttft)
    misses = [(relative_miss(p[0], p[1], target_decode, target_ttft), len(s)) for s, p in every]
    meeting = [(size, m) for m, size in misses if m <= REL]
    if meeting:
        assert plan.meets_targets
        fewest = min(size for size, _ in meeting)
        assert len(plan.stages) == fewest
        assert miss == pytest.approx(min(m for size, m in meeting if size == fewest), rel=1e-7, abs=1e-9)
    else:
        assert not plan.meets_targets
        assert miss == pytest.approx(min(m for m, _ in misses), rel=1e-7, abs=1e-9)
        if target_decode is not None:
            assert plan.miss_ms_per_token == pytest.approx(max(0.0, decode - target_decode))
        if target_ttft is not None:
            assert plan.miss_ttft_ms == pytest.approx(max(0.0, ttft - target_ttft))


@settings(max_examples=60 * STRESS, deadline=None)
@given(problems(max_nodes=5, max_layers=5), st.data())
def test_uneven_prefill_speeds_still_give_valid_plans_with_true_predictions(problem, data) -> None:
    spec, nodes, hops, prefill_hops, entries = problem
    uneven = [NodeCapacity(n.node_id, n.mem_budget_bytes, n.ms_per_layer, head_ms=n.head_ms,
                           prefill_ms_per_layer=data.draw(st.integers(1, 40)) / 4) for n in nodes]
    plan = plan_with(spec, uneven, hops, prefill_hops, entries, target_ttft_ms=50.0,
                     target_ms_per_token=20.0)
    check_plan(plan, spec, uneven, hops, prefill_hops, entries)


# ---- a slowed node ---------------------------------------------------------------------------


def slowed_mesh(rng: random.Random, fast: int = 3, delay_ms: float = 30.0):
    """``fast`` nodes with random links among them, one node ``slow`` whose every link costs
    ``delay_ms`` more; the fast nodes together hold the model, none alone, and so does slow."""
    spec = ModelSpec(12, 10, 5)
    ids = [f"f{i}" for i in range(fast)] + ["slow"]
    nodes = [node(i, 8, 1.0 + rng.random() * 0.2, spec, head_ms=0.5) for i in ids]
    hops: Hops = {}
    for a, b in itertools.combinations(ids, 2):
        base = rng.uniform(0.2, 3.0)
        extra = delay_ms if "slow" in (a, b) else 0.0
        hops[(a, b)] = hops[(b, a)] = base + extra
    prefill_hops = {pair: ms + rng.uniform(5.0, 20.0) for pair, ms in hops.items()}
    return spec, nodes, hops, prefill_hops


@settings(max_examples=40 * STRESS, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([2, 3]), st.booleans())
def test_a_slowed_node_is_left_out_under_a_target_and_back_without_one(seed, fast, fast_entries) -> None:
    rng = random.Random(seed)
    spec, nodes, hops, prefill_hops = slowed_mesh(rng, fast)
    fast_ids = [n.node_id for n in nodes if n.node_id != "slow"]
    entries = fast_ids if fast_entries else None
    kwargs = dict(hop_ms=hops, prefill_hop_ms=prefill_hops, entry_ids=entries)
    # the best the fast nodes can do alone, by brute force; the target just above it
    fast_nodes = [n for n in nodes if n.node_id != "slow"]
    best_fast = min(predictions(s, nodes, entries, hops, prefill_hops, 1.0)[0]
                    for s in every_plan(spec, fast_nodes))
    target = best_fast * 1.02

    planned = plan_layers(spec, nodes, objective="throughput", target_ms_per_token=target, **kwargs)

    assert "slow" not in planned.node_ids
    assert planned.meets_targets and planned.predicted_ms_per_token <= target
    # Without the target, the throughput objective spreads the layers over every node again.
    spread = plan_layers(spec, nodes, objective="throughput", **kwargs)
    assert "slow" in spread.node_ids
    assert spread.est_slowest_stage_ms < planned.est_slowest_stage_ms
    # The latency objective routes around it even without a target.
    assert "slow" not in plan_layers(spec, nodes, objective="latency", **kwargs).node_ids


def test_the_ring_visits_a_slowed_node_once_next_to_the_entry() -> None:
    # All four nodes are needed (3 layers each). The slow node's links cost 30 ms more; an
    # order that enters and leaves it once pays 60; the best order also starts at the entry.
    spec = ModelSpec(12, 10, 0)
    nodes = [node(i, 3, 1.0, spec) for i in ("a", "b", "c", "slow")]
    hops = {(x, y): (31.0 if "slow" in (x, y) else 1.0) for x in "abc" for y in ("a", "b", "c", "slow") if x != y}
    hops.update({(y, x): ms for (x, y), ms in list(hops.items())})
    plan = plan_layers(spec, nodes, hop_ms=hops, entry_ids=["b"], objective="latency")
    order = list(plan.node_ids)
    assert sorted(order) == ["a", "b", "c", "slow"]
    assert plan.predicted_ms_per_token == pytest.approx(12 + 31 + 31 + 1 + 1)
    assert order[0] == "b" or order[-1] == "b"  # the entry holds an end of the chain


# ---- targets that cannot be met, ttft, stickiness ------------------------------------------------


def test_a_target_nobody_meets_gives_the_best_plan_and_the_miss() -> None:
    spec = ModelSpec(10, 1, 0)
    nodes = [node("a", 10, 2.0, spec, head_ms=1.0), node("b", 10, 3.0, spec)]
    plan = plan_layers(spec, nodes, target_ms_per_token=15.0, entry_ids=["a"], objective="latency")
    assert plan.node_ids == ("a",)
    assert plan.predicted_ms_per_token == pytest.approx(21.0)
    assert plan.miss_ms_per_token == pytest.approx(6.0) and not plan.meets_targets
    assert plan.target_ms_per_token == 15.0 and plan.target_ttft_ms is None
    # the time to first token: a pessimistic guess without a prefill figure
    assert plan.predicted_ttft_ms == pytest.approx(1.0 + 20.0 * PREFILL_POSITIONS)


def test_a_ttft_target_can_need_more_nodes_than_decode() -> None:
    # b decodes slowly but prefills fast (a GPU, say); a tight ttft target brings it in.
    spec = ModelSpec(10, 1, 0)
    nodes = [node("a", 10, 1.0, spec, prefill_ms=20.0), node("b", 10, 1.5, spec, prefill_ms=2.0)]
    alone = plan_layers(spec, nodes, target_ms_per_token=20.0, objective="latency")
    assert alone.node_ids == ("a",)
    both = plan_layers(spec, nodes, target_ms_per_token=20.0, target_ttft_ms=100.0, objective="latency")
    assert both.meets_targets and "b" in both.node_ids
    assert both.predicted_ttft_ms <= 100.0 and both.predicted_ms_per_token <= 20.0


def test_plans_without_targets_or_entries_carry_predictions_too() -> None:
    spec = ModelSpec(6, 1, 0)
    nodes = [node("a", 3, 1.0, spec, head_ms=2.0), node("b", 3, 1.0, spec)]
    plan = plan_layers(spec, nodes, default_hop_ms=0.5, objective="latency")
    assert plan.est_ms_per_token == pytest.approx(6 + 1.0)  # unchanged: no head
    first = plan.stages[0].node_id
    assert plan.predicted_ms_per_token == pytest.approx(6 + 1.0 + (2.0 if first == "a" else 0.0))
    assert plan.meets_targets and plan.target_ms_per_token is None


def test_bad_targets_are_refused() -> None:
    spec = ModelSpec(2, 1, 0)
    nodes = [node("a", 2, 1.0, spec)]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="target_ms_per_token"):
            plan_layers(spec, nodes, target_ms_per_token=bad, objective="latency")
    with pytest.raises(ValueError, match="head_ms"):
        NodeCapacity("a", 1, 1.0, head_ms=-1.0)
    unknown = plan_layers(spec, nodes, entry_ids=["ghost"], objective="latency")
    assert unknown.node_ids == ("a",)  # unknown: ignored


@settings(max_examples=60 * STRESS, deadline=None)
@given(problems(max_nodes=4, max_layers=6, entries_given=True), st.data())
def test_entry_aware_re_plans_are_sticky(problem, data) -> None:
    spec, nodes, hops, prefill_hops, entries = problem
    objective = data.draw(st.sampled_from(["latency", "throughput"]))
    target = data.draw(st.one_of(st.none(), st.floats(1.0, 60.0)))
    kwargs = dict(objective=objective, target_ms_per_token=target)
    first = plan_with(spec, nodes, hops, prefill_hops, entries, **kwargs)
    again = plan_with(spec, nodes, hops, prefill_hops, entries, previous=first, **kwargs)
    assert again.stages == first.stages  # nothing changed: nothing moves
    # one node gone (if the rest can hold the model): no more moves than a fresh plan
    gone = data.draw(st.sampled_from([n.node_id for n in nodes]))
    rest = [n for n in nodes if n.node_id != gone]
    room = sum(min(spec.num_layers, (n.mem_budget_bytes - spec.embed_head_bytes) // spec.layer_bytes)
               for n in rest)
    if room < spec.num_layers:
        return
    fresh = plan_with(spec, rest, hops, prefill_hops, entries, **kwargs)
    sticky = plan_with(spec, rest, hops, prefill_hops, entries, previous=first, tolerance=0.05, **kwargs)
    check_plan(sticky, spec, rest, hops, prefill_hops,
               [e for e in entries if e != gone] or None)
    assert layers_moved(first, sticky) <= layers_moved(first, fresh)
    if target is not None and fresh.meets_targets:
        assert sticky.meets_targets and len(sticky.stages) <= len(fresh.stages)


def test_many_nodes_use_the_heuristic_and_still_route_around_a_slow_one() -> None:
    rng = random.Random(5)
    count = EXACT_PAIRWISE_MAX_NODES + 3
    spec, nodes, hops, prefill_hops = slowed_mesh(rng, fast=count - 1)
    plan = plan_layers(spec, nodes, hop_ms=hops, prefill_hop_ms=prefill_hops,
                       target_ms_per_token=18.0, entry_ids=["f0", "f1"], objective="latency")
    assert "slow" not in plan.node_ids
    assert plan.meets_targets and len(plan.stages) == 2  # 8 layers each: two are enough


@pytest.mark.parametrize("count", [4, 6, EXACT_PAIRWISE_MAX_NODES + 2])
def test_sticky_throughput_re_plans_with_uneven_nodes(count: int) -> None:
    # Regression: a sticky throughput re-plan searched only the caps relaxed by the
    # tolerance, where no plan had the least slowest stage, and found no best plan at all.
    rng = random.Random(count)
    spec = ModelSpec(30, 10, 50)
    nodes = [NodeCapacity(f"n{i}", 50 + 10 * rng.randint(5, 30), rng.uniform(0.5, 2), head_ms=1.0)
             for i in range(count)]
    ids = [n.node_id for n in nodes]
    hops = {(a, b): rng.uniform(0.3, 3) for a in ids for b in ids if a != b}
    first = plan_layers(spec, nodes, objective="throughput", hop_ms=hops, entry_ids=ids)
    again = plan_layers(spec, nodes, objective="throughput", hop_ms=hops, entry_ids=ids, previous=first)
    assert again.stages == first.stages
    rest = nodes[1:]
    fresh = plan_layers(spec, rest, objective="throughput", hop_ms=hops, entry_ids=ids)
    sticky = plan_layers(spec, rest, objective="throughput", hop_ms=hops, entry_ids=ids,
                         previous=first, tolerance=0.05)
    assert sticky.est_slowest_stage_ms <= fresh.est_slowest_stage_ms * 1.05 + 1e-9
    assert layers_moved(first, sticky) <= layers_moved(first, fresh)


def test_possible_entries_count_on_average_so_a_lone_stage_goes_where_the_many_are() -> None:
    """Before anyone typed, every node is a possible entry. With the worst entry, a node whose
    every link is slow makes every plan as bad as another; on average, the plan that serves the
    others well wins, and predict_plan says the same."""
    spec = ModelSpec(num_layers=12, layer_bytes=1000, embed_head_bytes=500)
    nodes = [node(n, 12, 1.0, spec, head_ms=2.0) for n in "abc"]
    hops: Hops = {(x, y): (17.0 if "c" in (x, y) else 2.0) for x in "abc" for y in "abc" if x != y}
    plan = plan_layers(spec, nodes, hop_ms=hops, entry_ids="abc", entry_mean=True, target_ms_per_token=20.0,
                       objective="latency")
    assert len(plan.stages) == 1 and plan.node_ids != ("c",)
    alone = plan.node_ids[0]
    mean = (14.0 + 14.0 + 4.0 + 14.0 + 34.0) / 3  # head + compute from each entry, + its trip
    assert plan.predicted_ms_per_token == pytest.approx(mean)
    assert predict_plan(plan.stages, nodes, hop_ms=hops, entry_ids="abc", entry_mean=True)[0] == pytest.approx(mean)
    assert predict_plan(plan.stages, nodes, hop_ms=hops, entry_ids=alone)[0] == pytest.approx(14.0)
    # the worst entry is c whatever the plan: a lone c is as good as any
    worst = plan_layers(spec, nodes, hop_ms=hops, entry_ids="abc", target_ms_per_token=20.0, objective="latency")
    assert worst.predicted_ms_per_token == pytest.approx(14.0 + 34.0)
