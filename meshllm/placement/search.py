"""The ring search: the best plan, and the stickiest one, under the ring cost model.

`Problem` is one planning problem (the nodes sorted by id, the layers each can hold, the hop
costs). `Problem.best_latency` finds the chain with the lowest ms per token (exact: every
subset, its layers to its fastest nodes, its best ring order; with many nodes and per-link
hops, spans by a mean hop and then the ring order); `Problem.best_throughput` the chain whose
slowest stage is fastest; `Problem.sticky` the chain that moves the fewest layers from the
previous plan within a tolerance of the best. The entry node is modelled as the first stage's
(`meshllm.placement.targets` searches with real entry nodes and latency targets). Pure.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshllm.errors import PlacementError
from meshllm.placement.cost import (
    REL_EPS, HopCosts, ModelSpec, NodeCapacity, Objective, Plan, Stage, chain_cost_ms, layers_moved,
)

log = logging.getLogger("meshllm.placement.planner")

EXACT_PAIRWISE_MAX_NODES = 6
"""With per-link latencies, search every subset and ring order up to this many nodes."""

EXACT_RING_MAX_NODES = 9
"""Order a chosen set of stages exactly (Held-Karp) up to this many; 2-opt beyond."""

MAX_STICKY_HOLES = 2
"""Sticky re-plans try new nodes in the places of at most this many lost stages."""

_MIB = 1024 * 1024


@dataclass(frozen=True)
class _Candidate:
    counts: dict[str, int]
    order: tuple[str, ...]
    latency_ms: float


class Problem:
    """One planning problem: nodes sorted by id, each with the layers it can hold."""

    def __init__(
        self, spec: ModelSpec, nodes: list[NodeCapacity], caps: dict[str, int], hops: HopCosts
    ) -> None:
        self.spec = spec
        self.ids = [node.node_id for node in nodes]
        self.nodes = {node.node_id: node for node in nodes}
        self.ms = {node.node_id: node.ms_per_layer for node in nodes}
        self.caps = caps
        self.hops = hops
        self.uniform = hops.is_uniform(self.ids)
        self.flat_hop_ms = hops.uniform_ms(self.ids)

    @classmethod
    def build(cls, spec: ModelSpec, nodes: Sequence[NodeCapacity], hops: HopCosts) -> Problem:
        ordered = sorted(nodes, key=lambda node: node.node_id)
        for a, b in itertools.pairwise(ordered):
            if a.node_id == b.node_id:
                raise ValueError(f"node {a.node_id!r} is listed twice")
        caps = {node.node_id: layer_capacity(spec, node) for node in ordered}
        room = sum(caps.values())
        if room < spec.num_layers:
            raise _placement_error(spec, ordered, room)
        return cls(spec, ordered, caps, hops)

    # ---- fresh plans ---------------------------------------------------------------------

    def best_latency(self, caps: dict[str, int]) -> Plan:
        """The plan with the lowest ms per token, each node holding at most ``caps[node]``."""
        if self.uniform or len(self.ids) <= EXACT_PAIRWISE_MAX_NODES:
            candidate = self._best_exact(caps)
        else:
            candidate = self._best_flat_then_ring(caps)
        return self._to_plan(candidate.order, candidate.counts)

    def best_throughput(self) -> Plan:
        """The plan whose slowest stage is fastest; among those, the lowest ms per token."""
        slowest = min_max_stage_ms(self.ids, self.ms, self.caps, self.spec.num_layers)
        return self.best_latency(self.caps_under(slowest))

    def caps_under(self, stage_ms: float) -> dict[str, int]:
        """Caps tightened so that no stage's compute exceeds ``stage_ms``."""
        limit = stage_ms * (1 + REL_EPS) + 1e-12
        caps = {}
        for node_id, cap in self.caps.items():
            ms = self.ms[node_id]
            caps[node_id] = cap if ms == 0 else min(cap, int(limit / ms))
        return caps

    def _best_exact(self, caps: dict[str, int]) -> _Candidate:
        if self.uniform:
            counts = self.flat_hop_counts(caps)
            return _Candidate(counts, tuple(self.ids), self._latency(tuple(self.ids), counts))
        best: _Candidate | None = None
        usable = [node_id for node_id in self.ids if caps[node_id] > 0]
        for size in range(1, min(len(usable), self.spec.num_layers) + 1):
            for subset in itertools.combinations(usable, size):
                counts = greedy_counts(subset, self.ms, caps, self.spec.num_layers)
                if counts is None:
                    continue
                ring_ms, order = best_ring(subset, self.hops)
                latency = sum(counts[n] * self.ms[n] for n in subset) + ring_ms
                if best is None or latency < best.latency_ms * (1 - REL_EPS):
                    best = _Candidate(counts, order, latency)
        assert best is not None, "capacity was checked before the search"
        return best

    def _best_flat_then_ring(self, caps: dict[str, int]) -> _Candidate:
        """Many nodes with per-link latencies: choose spans with the mean hop, then order them."""
        counts = self.flat_hop_counts(caps)
        used = [node_id for node_id in self.ids if counts.get(node_id, 0) > 0]
        _, order = best_ring(used, self.hops)
        return _Candidate(counts, order, self._latency(order, counts))

    def flat_hop_counts(self, caps: Mapping[str, int]) -> dict[str, int]:
        return _fixed_charge_counts(self.ids, self.ms, caps, self.spec.num_layers, self.flat_hop_ms)

    def _latency(self, order: Sequence[str], counts: Mapping[str, int]) -> float:
        used = [node_id for node_id in order if counts.get(node_id, 0) > 0]
        return sum(counts[n] * self.ms[n] for n in used) + self.hops.ring_ms(used)

    def _to_plan(self, order: Sequence[str], counts: Mapping[str, int]) -> Plan:
        stages = []
        start = 0
        for node_id in order:
            count = counts.get(node_id, 0)
            if count > 0:
                stages.append(Stage(node_id, start, start + count))
                start += count
        assert start == self.spec.num_layers, (start, self.spec.num_layers)
        latency, slowest = chain_cost_ms(stages, self.ms, self.hops)
        return Plan(tuple(stages), latency, slowest)

    # ---- sticky re-plans -------------------------------------------------------------------

    def sticky(
        self, previous: Plan, best: Plan, objective: Objective, tolerance: float
    ) -> Plan | None:
        """The plan that moves fewest layers from ``previous`` within ``tolerance`` of ``best``.

        Searched exactly along a few chain orders that keep the surviving stages in their ring
        order (see ``_sticky_orders``); None when ``best`` itself moves fewest.
        """
        moved_limit = layers_moved(previous, best)
        if moved_limit == 0:
            return best
        if objective == "throughput":
            caps = self.caps_under(best.est_slowest_stage_ms * (1 + tolerance))
            budget_ms = math.inf
        else:
            caps = self.caps
            budget_ms = best.est_ms_per_token * (1 + tolerance) * (1 + REL_EPS) + 1e-12
        old_spans = {s.node_id: (s.start_layer, s.end_layer) for s in previous.stages}
        choice: tuple[int, float, Plan] | None = None

        def consider(plan: Plan) -> None:
            nonlocal choice
            moved = layers_moved(previous, plan)
            if plan.est_ms_per_token <= budget_ms and moved < moved_limit:
                if choice is None or (moved, plan.est_ms_per_token) < choice[:2]:
                    choice = (moved, plan.est_ms_per_token, plan)

        for node_id in self.ids:  # single-stage plans: the search below charges every stage a hop
            if caps[node_id] >= self.spec.num_layers:
                consider(self._to_plan([node_id], {node_id: self.spec.num_layers}))
        for order in self._sticky_orders(previous):
            searched = _sticky_counts(
                order, self.ms, caps, old_spans, self.spec.num_layers, hop_ms=self.flat_hop_ms,
                budget_ms=budget_ms, moved_limit=moved_limit - 1 if choice is None else choice[0],
            )
            for counts in searched:
                consider(self._to_plan(order, counts))
        if choice is None:
            return None
        log.debug("sticky re-plan moves %d layers (a fresh plan: %d)", choice[0], moved_limit)
        return choice[2]

    def _sticky_orders(self, previous: Plan) -> list[list[str]]:
        """Chain orders worth searching for a sticky re-plan.

        The surviving stages keep their ring order. Nodes that held no layers before go, as a
        block the search may use any of, where a lost stage was (or at the end if none was
        lost). A ring's hops do not depend on where it is cut, but the layers moved do: a lost
        first stage's layers can go to the last stage only if the cut moves one stage back,
        so both cuts are tried.
        """
        present = set(self.ids)
        newcomers = [node_id for node_id in self.ids if node_id not in previous.node_ids]
        chain = list(previous.node_ids)
        lost = [i for i, node_id in enumerate(chain) if node_id not in present]
        holes = lost[:MAX_STICKY_HOLES] if newcomers and lost else [len(chain)]
        orders: list[list[str]] = []
        for hole in holes:
            ring: list[list[str]] = []
            for i, node_id in enumerate(chain):
                if i == hole:
                    ring.append(newcomers)
                if node_id in present:
                    ring.append([node_id])
            if hole == len(chain):
                ring.append(newcomers)
            ring = [group for group in ring if group]
            for cut in (ring, ring[-1:] + ring[:-1]):
                order = [node_id for group in cut for node_id in group]
                if order not in orders:
                    orders.append(order)
        return orders


def layer_capacity(spec: ModelSpec, node: NodeCapacity) -> int:
    """Whole layers ``node`` can hold besides the embedding and head (capped at the model's)."""
    room = node.mem_budget_bytes - spec.embed_head_bytes
    if room < 0:
        return 0
    if spec.layer_bytes == 0:
        return spec.num_layers
    return min(spec.num_layers, room // spec.layer_bytes)


def _placement_error(
    spec: ModelSpec, nodes: Sequence[NodeCapacity], room_layers: int
) -> PlacementError:
    missing_layers = spec.num_layers - room_layers
    shortfall = missing_layers * spec.layer_bytes
    message = (
        f"the mesh cannot hold the model: {spec.num_layers} layers of {spec.layer_bytes} bytes "
        f"({spec.num_layers * spec.layer_bytes / _MIB:.1f} MiB) plus {spec.embed_head_bytes} bytes "
        f"({spec.embed_head_bytes / _MIB:.1f} MiB) of embedding and head on every node; "
        f"{len(nodes)} node(s) have room for {room_layers} layers; short by {shortfall} bytes "
        f"({shortfall / _MIB:.1f} MiB): {missing_layers} more layers, e.g. one more node with "
        f"a budget of {shortfall + spec.embed_head_bytes} bytes "
        f"({(shortfall + spec.embed_head_bytes) / _MIB:.1f} MiB)"
    )
    return PlacementError(message, shortfall)


def min_max_stage_ms(
    ids: Sequence[str], ms: Mapping[str, float], caps: Mapping[str, int], num_layers: int
) -> float:
    """The least possible slowest-stage compute: give each layer where it ends up cheapest."""
    counts = dict.fromkeys(ids, 0)
    for _ in range(num_layers):
        pick = min(
            (node_id for node_id in ids if counts[node_id] < caps[node_id]),
            key=lambda node_id: ((counts[node_id] + 1) * ms[node_id], node_id),
        )
        counts[pick] += 1
    return max(counts[node_id] * ms[node_id] for node_id in ids)


def greedy_counts(
    subset: Sequence[str], ms: Mapping[str, float], caps: Mapping[str, int], num_layers: int
) -> dict[str, int] | None:
    """Cheapest compute when every node of ``subset`` holds >= 1 layer, or None if impossible."""
    if len(subset) > num_layers or any(caps[n] < 1 for n in subset):
        return None
    if sum(caps[n] for n in subset) < num_layers:
        return None
    counts = dict.fromkeys(subset, 1)
    left = num_layers - len(subset)
    for node_id in sorted(subset, key=lambda n: (ms[n], n)):
        extra = min(left, caps[node_id] - 1)
        counts[node_id] += extra
        left -= extra
    return counts


def _fixed_charge_counts(
    ids: Sequence[str],
    ms: Mapping[str, float],
    caps: Mapping[str, int],
    num_layers: int,
    hop_ms: float,
) -> dict[str, int]:
    """Exact minimum of compute + ``hop_ms`` per stage (no hop for a single stage).

    A knapsack over nodes and layers in which using a node costs one hop: a ring of k >= 2
    stages pays exactly k hops. Single-stage plans, over-charged there, are compared on their own.
    Ties keep the plan with fewer stages, then the one found first (lower node ids).

    A node's cost is linear in its layers, so the best "give it some layers" choice for every
    total is a sliding-window minimum (a monotone deque): O(nodes * layers) in all.
    """
    cost: list[float] = [0.0] + [math.inf] * num_layers  # best cost of placing this many layers
    stages: list[int] = [0] * (num_layers + 1)  # ... and its number of stages
    choices: list[list[int]] = []
    for node_id in ids:
        cap, node_ms = caps[node_id], ms[node_id]
        new_cost, new_stages = cost[:], stages[:]
        choice = [0] * (num_layers + 1)
        window: deque[int] = deque()  # earlier totals k, best (cost[k] - k * node_ms) first

        def key(k: int, node_ms: float = node_ms) -> tuple[float, int]:
            return (cost[k] - k * node_ms, stages[k])

        for layers in range(1, num_layers + 1 if cap > 0 else 1):
            if cost[layers - 1] < math.inf:
                while window and key(window[-1]) >= key(layers - 1):
                    window.pop()
                window.append(layers - 1)
            while window and window[0] < layers - cap:
                window.popleft()
            if not window:
                continue
            k = window[0]
            value, count = cost[k] + (layers - k) * node_ms + hop_ms, stages[k] + 1
            top = new_cost[layers]
            if value < top * (1 - REL_EPS) or (
                value <= top * (1 + REL_EPS) and count < new_stages[layers]
            ):
                new_cost[layers], new_stages[layers] = value, count
                choice[layers] = layers - k
        cost, stages = new_cost, new_stages
        choices.append(choice)
    counts: dict[str, int] = {}
    layers = num_layers
    for node_id, choice in zip(reversed(ids), reversed(choices), strict=True):
        counts[node_id] = choice[layers]
        layers -= choice[layers]
    assert layers == 0
    multi_ms = cost[num_layers]
    singles = [(num_layers * ms[n], n) for n in ids if caps[n] >= num_layers]
    if singles:
        single_ms, single_id = min(singles)
        if sum(1 for c in counts.values() if c) == 1 or single_ms <= multi_ms * (1 + REL_EPS):
            return {single_id: num_layers}
    return {n: c for n, c in counts.items() if c}


def best_ring(node_ids: Sequence[str], hops: HopCosts) -> tuple[float, tuple[str, ...]]:
    """The cheapest ring order over ``node_ids``, starting at the lowest id."""
    ids = sorted(node_ids)
    if len(ids) <= 2:
        return hops.ring_ms(ids), tuple(ids)
    if len(ids) <= EXACT_RING_MAX_NODES:
        return _held_karp(ids, hops)
    return _two_opt(ids, hops)


def _held_karp(ids: list[str], hops: HopCosts) -> tuple[float, tuple[str, ...]]:
    start, rest = ids[0], ids[1:]
    n = len(rest)
    # table[(mask, j)] = (cost of a path start -> ... -> rest[j] visiting mask, previous j)
    table: dict[tuple[int, int], tuple[float, int]] = {
        (1 << j, j): (hops(start, rest[j]), -1) for j in range(n)
    }
    for mask in range(1, 1 << n):
        for j in range(n):
            entry = table.get((mask, j))
            if entry is None:
                continue
            for k in range(n):
                if mask & (1 << k):
                    continue
                key = (mask | (1 << k), k)
                value = entry[0] + hops(rest[j], rest[k])
                if key not in table or value < table[key][0]:
                    table[key] = (value, j)
    full = (1 << n) - 1
    cost, last = min((table[(full, j)][0] + hops(rest[j], start), j) for j in range(n))
    order = []
    mask = full
    while last != -1:
        order.append(rest[last])
        previous = table[(mask, last)][1]
        mask &= ~(1 << last)
        last = previous
    return cost, (start, *reversed(order))


def _two_opt(ids: list[str], hops: HopCosts) -> tuple[float, tuple[str, ...]]:
    order = [ids[0]]
    left = set(ids[1:])
    while left:
        nxt = min(left, key=lambda n: (hops(order[-1], n), n))
        order.append(nxt)
        left.remove(nxt)
    cost = hops.ring_ms(order)
    improved = True
    while improved:
        improved = False
        for i in range(1, len(order) - 1):
            for j in range(i + 1, len(order)):
                trial = order[:i] + order[i : j + 1][::-1] + order[j + 1 :]
                trial_cost = hops.ring_ms(trial)
                if trial_cost < cost * (1 - REL_EPS):
                    order, cost, improved = trial, trial_cost, True
    return cost, tuple(order)


def _sticky_counts(
    order: Sequence[str],
    ms: Mapping[str, float],
    caps: Mapping[str, int],
    old_spans: Mapping[str, tuple[int, int]],
    num_layers: int,
    *,
    hop_ms: float,
    budget_ms: float,
    moved_limit: int,
) -> list[dict[str, int]]:
    """Layer counts along ``order`` (a count of 0 skips a node) ranked by layers moved.

    A search over (node position, layers placed) that keeps, for each number of layers moved
    so far, the cheapest partial chain (a Pareto front). Partial chains that cannot finish
    within ``budget_ms`` (compute + ``hop_ms`` per stage) or within ``moved_limit`` moves
    (lower bounds on both for the rest of the chain) are dropped; with no budget (``inf``)
    only the fewest moves are kept. Returns, for each reachable moved count, the cheapest
    complete counts, fewest moves first; the caller checks each against the exact cost.
    """
    n = len(order)
    # floor[i][r]: a lower bound on placing r layers on order[i:] (fastest first, + one hop).
    floor = [[math.inf] * (num_layers + 1) for _ in range(n + 1)]
    floor[n][0] = 0.0
    for i in range(n - 1, -1, -1):
        rest = sorted(order[i:], key=lambda node_id: ms[node_id])
        for r in range(num_layers + 1):
            left, total = r, 0.0
            for node_id in rest:
                take = min(left, caps[node_id])
                total += take * ms[node_id]
                left -= take
            floor[i][r] = math.inf if left else total + (hop_ms if r else 0.0)
    # must_move[i][b]: layers in [b, num_layers) whose old holder is not in order[i:] move anyway.
    old_holder: list[str | None] = [None] * num_layers
    for holder, (start, stop) in old_spans.items():
        for layer in range(start, min(stop, num_layers)):
            old_holder[layer] = holder
    must_move = [[0] * (num_layers + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        later = set(order[i:])
        row = must_move[i]
        for b in range(num_layers - 1, -1, -1):
            row[b] = row[b + 1] + (old_holder[b] not in later)
    # fronts[i][b] = {moved: (cost, count given to order[i-1], moved before)}
    fronts: list[list[dict[int, tuple[float, int, int]]]] = [
        [{} for _ in range(num_layers + 1)] for _ in range(n + 1)
    ]
    fronts[0][0][0] = (0.0, 0, 0)
    no_budget = budget_ms == math.inf
    for i, node_id in enumerate(order):
        cap, node_ms = caps[node_id], ms[node_id]
        start, stop = old_spans.get(node_id, (0, 0))
        for placed in range(num_layers + 1):
            items = list(fronts[i][placed].items())  # fewest moves (and highest cost) first
            if not items:
                continue
            fewest_moved, lowest_cost = items[0][0], items[-1][1][0]
            for count in range(0, min(cap, num_layers - placed) + 1):
                end = placed + count
                # moving one more layer onto this node never un-moves one: this only grows
                extra_moved = count - max(0, min(end, stop) - max(placed, start))
                if fewest_moved + extra_moved > moved_limit:
                    break
                moves_left = moved_limit - must_move[i + 1][end]
                bound = floor[i + 1][num_layers - end]
                if bound == math.inf:
                    continue  # the nodes after this one cannot hold the rest
                extra_ms = count * node_ms + hop_ms if count else 0.0
                cost_limit = budget_ms - bound - extra_ms
                if lowest_cost > cost_limit:
                    continue
                target = fronts[i + 1][end]
                for moved, (cost, _, _) in items:
                    new_moved = moved + extra_moved
                    if new_moved > moves_left:
                        break
                    if cost > cost_limit:
                        continue
                    held = target.get(new_moved)
                    if held is None or cost + extra_ms < held[0]:
                        target[new_moved] = (cost + extra_ms, count, moved)
        for placed in range(num_layers + 1):
            fronts[i + 1][placed] = _prune(fronts[i + 1][placed], fewest_moves_only=no_budget)
    results = []
    for moved in sorted(fronts[n][num_layers]):
        counts: dict[str, int] = {}
        placed, at = num_layers, moved
        for i in range(n, 0, -1):
            _, count, before = fronts[i][placed][at]
            counts[order[i - 1]] = count
            placed, at = placed - count, before
        results.append(counts)
    return results


def _prune(
    front: dict[int, tuple[float, int, int]], *, fewest_moves_only: bool
) -> dict[int, tuple[float, int, int]]:
    """Keep only entries that no entry with fewer moves beats on cost.

    Without a cost budget only the fewest moves matter (cost breaks ties), so one entry is kept.
    """
    kept: dict[int, tuple[float, int, int]] = {}
    best = math.inf
    for moved in sorted(front):
        entry = front[moved]
        if entry[0] < best:
            kept[moved] = entry
            best = entry[0]
            if fewest_moves_only:
                break
    return kept
