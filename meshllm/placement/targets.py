"""The entry-aware search: predictions at the entry nodes, and latency targets.

Used when ``entry_ids`` or a target is given (see the module doc of
`meshllm.placement.planner`). `Targets` holds the latency targets and how far a prediction
misses them; `Judge` predicts a chain's ms per token and time to first token at the worst (or
mean) entry node, searches the plans that fit in memory (exact up to
``EXACT_PAIRWISE_MAX_NODES`` nodes, by removing nodes one at a time above) and picks by the
targets, then the objective, then (re-plans) the fewest layers moved. Pure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from meshllm.placement.cost import (
    REL_EPS, HopCosts, Objective, Plan, Stage, chain_cost_ms, layers_moved, mean, trip_ms,
)
from meshllm.placement.search import (
    EXACT_PAIRWISE_MAX_NODES, Problem, best_ring, greedy_counts, min_max_stage_ms,
)

EXACT_ORDER_MAX_STAGES = 6
"""The entry-aware search tries every order of up to this many stages; a few ring orders above."""


@dataclass(frozen=True)
class Targets:
    ms_per_token: float | None
    ttft_ms: float | None

    def __post_init__(self) -> None:
        for name, value in (("target_ms_per_token", self.ms_per_token),
                            ("target_ttft_ms", self.ttft_ms)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and > 0, got {value}")

    @property
    def given(self) -> bool:
        return self.ms_per_token is not None or self.ttft_ms is not None

    def miss(self, decode_ms: float, ttft_ms: float) -> float:
        """The worst relative miss over the targets: > 0 misses, <= 0 meets (minus headroom)."""
        worst = -math.inf
        if self.ms_per_token is not None:
            worst = max(worst, (decode_ms - self.ms_per_token) / self.ms_per_token)
        if self.ttft_ms is not None:
            worst = max(worst, (ttft_ms - self.ttft_ms) / self.ttft_ms)
        return worst


@dataclass(frozen=True)
class _Option:
    """One plan the entry-aware search met: a chain order and the layers of each node."""

    order: tuple[str, ...]
    counts: tuple[int, ...]
    decode_ms: float
    ttft_ms: float
    slowest_ms: float

    @property
    def size(self) -> int:
        return len(self.order)

    def stages(self) -> tuple[Stage, ...]:
        out = []
        start = 0
        for node_id, count in zip(self.order, self.counts, strict=True):
            out.append(Stage(node_id, start, start + count))
            start += count
        return tuple(out)


class Judge:
    """Predictions for chains, and the entry-aware search (see the module doc)."""

    def __init__(self, problem: Problem, entries: tuple[str, ...] | None,
                 prefill_hops: HopCosts, targets: Targets, *, entry_mean: bool = False) -> None:
        self.problem = problem
        self.entries = entries
        self.pick: Callable[[Sequence[float]], float] = mean if entry_mean else max
        self.targets = targets
        ids = problem.ids
        self.decode_hop = {(a, b): problem.hops(a, b) for a in ids for b in ids if a != b}
        self.prefill_hop = {(a, b): prefill_hops(a, b) for a in ids for b in ids if a != b}
        self.prefill_hops = prefill_hops
        self.head = {node_id: problem.nodes[node_id].head_ms for node_id in ids}
        self.prefill_ms = {node_id: problem.nodes[node_id].prefill_ms for node_id in ids}

    # ---- predictions ---------------------------------------------------------------------

    def trips(self, order: Sequence[str]) -> tuple[float, float]:
        """Worst (or mean) entry's head work + hops of its trip: (decode, prefill)."""
        entries = self.entries if self.entries is not None else (order[0],)
        decode = self.pick([self.head[e] + trip_ms(order, e, self._decode) for e in entries])
        prefill = self.pick([self.head[e] + trip_ms(order, e, self._prefill) for e in entries])
        return decode, prefill

    def _decode(self, a: str, b: str) -> float:
        return self.decode_hop[(a, b)]

    def _prefill(self, a: str, b: str) -> float:
        return self.prefill_hop[(a, b)]

    def option(self, order: Sequence[str], counts: Sequence[int],
               trips: tuple[float, float] | None = None) -> _Option:
        decode_trip, prefill_trip = trips if trips is not None else self.trips(order)
        ms, pms = self.problem.ms, self.prefill_ms
        compute = [count * ms[n] for n, count in zip(order, counts, strict=True)]
        prefill = sum(count * pms[n] for n, count in zip(order, counts, strict=True))
        return _Option(tuple(order), tuple(counts), sum(compute) + decode_trip,
                       prefill + prefill_trip, max(compute))

    def annotate(self, plan: Plan) -> Plan:
        """``plan`` with its predictions and target misses filled in."""
        order = [stage.node_id for stage in plan.stages]
        option = self.option(order, [stage.num_layers for stage in plan.stages])
        return self._with_predictions(plan, option)

    def _with_predictions(self, plan: Plan, option: _Option) -> Plan:
        targets = self.targets
        return replace(
            plan,
            predicted_ms_per_token=option.decode_ms,
            predicted_ttft_ms=option.ttft_ms,
            target_ms_per_token=targets.ms_per_token,
            target_ttft_ms=targets.ttft_ms,
            miss_ms_per_token=max(0.0, option.decode_ms - targets.ms_per_token)
            if targets.ms_per_token is not None else 0.0,
            miss_ttft_ms=max(0.0, option.ttft_ms - targets.ttft_ms)
            if targets.ttft_ms is not None else 0.0,
        )

    def to_plan(self, option: _Option) -> Plan:
        stages = option.stages()
        latency, slowest = chain_cost_ms(stages, self.problem.ms, self.problem.hops)
        return self._with_predictions(Plan(stages, latency, slowest), option)

    # ---- the search ----------------------------------------------------------------------

    def search(self, objective: Objective, previous: Plan | None, tolerance: float) -> Plan:
        problem = self.problem
        num_layers = problem.spec.num_layers
        sticky = previous is not None and previous.num_layers == num_layers
        caps = problem.caps
        slowest_limit = math.inf
        key = self._key(objective)
        if objective == "throughput" and not self.targets.given:
            slowest = min_max_stage_ms(problem.ids, problem.ms, problem.caps, num_layers)
            slowest_limit = slowest * (1 + REL_EPS) + 1e-12
            best = min(self._options(problem.caps_under(slowest), key, keep_all=False), key=key)
            if not sticky:
                return self.to_plan(best)
            # a sticky re-plan may take any plan whose slowest stage is within tolerance
            caps = problem.caps_under(slowest * (1 + tolerance))
            options = [best, *self._options(caps, key, keep_all=True)]
        else:
            options = self._options(caps, key, keep_all=sticky)
            best = min(options, key=key)
            if not sticky:
                return self.to_plan(best)
        assert previous is not None
        extra = [previous]
        ring_best = (problem.best_latency(problem.caps) if objective == "latency"
                     else problem.best_throughput())
        extra.append(ring_best)
        ring_sticky = problem.sticky(previous, ring_best, objective, tolerance)
        if ring_sticky is not None:
            extra.append(ring_sticky)
        for plan in extra:
            option = self._option_of(plan, caps)
            if option is not None:
                options.append(option)
        good = [o for o in options if self._close_to(o, best, objective, tolerance, slowest_limit)]
        choice = min(good, key=lambda o: (layers_moved(previous, Plan(o.stages(), 0.0)), key(o)))
        return self.to_plan(choice)

    def _key(self, objective: Objective) -> Callable[[_Option], tuple[float, ...]]:
        targets = self.targets
        if targets.given:
            def key(o: _Option) -> tuple[float, ...]:
                miss = targets.miss(o.decode_ms, o.ttft_ms)
                tail = (o.slowest_ms,) if objective == "throughput" else ()
                if miss <= REL_EPS:
                    return (0.0, o.size, miss, *tail, o.decode_ms, o.ttft_ms)
                return (1.0, miss, o.size, *tail, o.decode_ms, o.ttft_ms)
            return key
        return lambda o: (o.decode_ms, o.size, o.ttft_ms)

    def _close_to(self, o: _Option, best: _Option, objective: Objective, tolerance: float,
                  slowest_limit: float) -> bool:
        """Whether ``o`` is as good as ``best`` within ``tolerance`` (sticky re-plans)."""
        targets = self.targets
        if targets.given:
            best_miss = targets.miss(best.decode_ms, best.ttft_ms)
            miss = targets.miss(o.decode_ms, o.ttft_ms)
            if best_miss <= REL_EPS:
                return miss <= REL_EPS and o.size <= best.size
            return miss <= best_miss + tolerance + REL_EPS
        if objective == "throughput":
            return o.slowest_ms <= (slowest_limit - 1e-12) * (1 + tolerance) + 1e-12
        return o.decode_ms <= best.decode_ms * (1 + tolerance) * (1 + REL_EPS) + 1e-12

    def _option_of(self, plan: Plan, caps: Mapping[str, int]) -> _Option | None:
        """``plan`` as an option, if its nodes are all here and within ``caps``."""
        if not plan.stages or plan.num_layers != self.problem.spec.num_layers:
            return None
        order = [stage.node_id for stage in plan.stages]
        counts = [stage.num_layers for stage in plan.stages]
        if len(set(order)) != len(order) or any(
            node_id not in caps or count < 1 or count > caps[node_id]
            for node_id, count in zip(order, counts, strict=True)
        ):
            return None
        return self.option(order, counts)

    def _options(self, caps: Mapping[str, int], key: Callable[[_Option], tuple[float, ...]],
                 *, keep_all: bool) -> list[_Option]:
        """Options over the subsets worth trying; for each, its orders (all of them, or the
        few that no other order beats on both trips) and the layers to its fastest nodes."""
        problem = self.problem
        num_layers = problem.spec.num_layers
        usable = [node_id for node_id in problem.ids if caps[node_id] > 0]
        if len(usable) <= EXACT_PAIRWISE_MAX_NODES:
            subsets: Iterable[Sequence[str]] = (
                subset for size in range(1, min(len(usable), num_layers) + 1)
                for subset in itertools.combinations(usable, size)
            )
        else:
            subsets = self._heuristic_subsets(usable, caps, key)
        options: list[_Option] = []
        for subset in subsets:
            options.extend(self._subset_options(subset, caps, keep_all=keep_all))
        assert options, "capacity was checked before the search"
        return options

    def _subset_options(self, subset: Sequence[str], caps: Mapping[str, int], *,
                        keep_all: bool, quick: bool = False) -> list[_Option]:
        num_layers = self.problem.spec.num_layers
        by_decode = greedy_counts(subset, self.problem.ms, caps, num_layers)
        if by_decode is None:
            return []
        by_prefill = greedy_counts(subset, self.prefill_ms, caps, num_layers)
        layouts = [by_decode] if by_prefill in (None, by_decode) else [by_decode, by_prefill]
        trips = [(self.trips(order), order) for order in self._orders(subset, quick=quick)]
        if not keep_all:
            trips = _pareto(trips)
        return [
            self.option(order, [counts[n] for n in order], trip)
            for counts in layouts for trip, order in trips
        ]

    def _orders(self, subset: Sequence[str], *, quick: bool = False) -> list[tuple[str, ...]]:
        """Every order of a few stages; else (or ``quick``) the best rings by decode and by
        prefill hops, each cut at every stage, both ways round."""
        if len(subset) <= EXACT_ORDER_MAX_STAGES and not quick:
            return list(itertools.permutations(subset))
        orders: set[tuple[str, ...]] = set()
        for hops in (self.problem.hops, self.prefill_hops):
            _, ring = best_ring(subset, hops)
            for turned in (ring, ring[::-1]):
                for cut in range(len(turned)):
                    orders.add(turned[cut:] + turned[:cut])
        return sorted(orders)

    def _heuristic_subsets(self, usable: list[str], caps: Mapping[str, int],
                           key: Callable[[_Option], tuple[float, ...]]) -> list[tuple[str, ...]]:
        """All usable nodes, then one node fewer at a time (the removal whose best option
        ranks first), plus the subset of the flat-hop optimum and every single node that
        holds the whole model."""
        num_layers = self.problem.spec.num_layers
        flat = self.problem.flat_hop_counts(caps)
        subsets: list[tuple[str, ...]] = [tuple(n for n in usable if flat.get(n, 0) > 0)]
        subsets.extend((n,) for n in usable if caps[n] >= num_layers)
        # at most one node per layer: the roomiest (then fastest) when there are more
        roomiest = sorted(usable, key=lambda n: (-caps[n], self.problem.ms[n], n))[:num_layers]
        current = tuple(n for n in usable if n in roomiest)
        subsets.append(current)
        while len(current) > 1:
            ranked = []
            for drop in current:
                rest = tuple(n for n in current if n != drop)
                found = self._subset_options(rest, caps, keep_all=False, quick=True)
                if found:
                    ranked.append((key(min(found, key=key)), rest))
            if not ranked:
                break
            current = min(ranked)[1]
            subsets.append(current)
        return list(dict.fromkeys(subset for subset in subsets if subset))


def _pareto(
    trips: list[tuple[tuple[float, float], tuple[str, ...]]],
) -> list[tuple[tuple[float, float], tuple[str, ...]]]:
    """The orders that no other beats on both trips (decode, prefill), first found kept on ties."""
    kept: list[tuple[tuple[float, float], tuple[str, ...]]] = []
    best_prefill = math.inf
    for trip, order in sorted(trips, key=lambda item: item[0]):
        if trip[1] < best_prefill * (1 - REL_EPS) or not kept:
            kept.append((trip, order))
            best_prefill = trip[1]
    return kept
