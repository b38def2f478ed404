"""Layer placement: which node holds which decoder layers, as one pure function.

The coordinator calls :func:`plan_layers` with the model's sizes and every node's memory
budget and measured speed; it gets back a :class:`Plan`, a chain of stages whose half-open
spans cover ``[0, num_layers)`` exactly. Nothing here reads the clock or does I/O.

Cost model (see ``docs/election.md`` for the long form):

- A stage that holds ``n`` layers on a node that takes ``ms_per_layer`` costs
  ``n * ms_per_layer`` milliseconds per token.
- The chain is a ring: a token goes stage 1 -> stage 2 -> ... -> stage k and back to where it
  started. A chain of ``k >= 2`` stages pays ``k`` hops (the ``k - 1`` hops between
  consecutive stages plus the return hop from the last stage to the first); a single stage
  pays none. The entry node is modelled as the first stage's node: it is not known when the
  plan is made, and any node can be one.
- ``objective="latency"`` (the default) minimises one token's trip: compute plus hops.
  ``objective="throughput"`` minimises the slowest stage's compute (what limits a pipeline
  that has several sessions in flight), then latency among plans with that slowest stage.
- Every node holds the embedding, final norm and lm_head; a stage's
  ``layers * layer_bytes + embed_head_bytes`` must fit its node's budget.

Given the previous plan, a re-plan is sticky: it moves the fewest layers (see
:func:`layers_moved`) among plans within ``tolerance`` of the best plan's objective.

Predictions, entry nodes and latency targets (the *entry-aware* search, used when
``entry_ids`` or a target is given; without them the search above runs unchanged):

- A token's trip starts and ends at its entry node ``e``: ``e -> s1 -> ... -> sk -> e``, one
  hop per change of node (an entry that holds the first or last stage sends nothing to
  itself). ``hop_ms[(a, b)]`` is one decode hop (one position), ``prefill_hop_ms[(a, b)]`` one
  hop of a typical prompt's hidden states (both come from measured links; see
  :mod:`meshllm.placement.linkstats`).
- predicted ms per token = ``head_ms[e]`` (the entry's embed, final norm, lm_head and
  sampling) + every stage's compute + the decode hops of the trip; predicted time to first
  token = ``head_ms[e]`` + every stage's prefill compute + the prefill hops. With several entry
  nodes (``entry_ids``) the worst one counts, or with ``entry_mean`` their average (for entries
  that are only possible: every member, before anyone typed); without ``entry_ids`` the entry
  is modelled as the first stage's node (so the trip is the ring).
- Targets (``target_ms_per_token``, ``target_ttft_ms``): among plans within memory, those whose
  predictions meet every target win; among them the fewest stages (devices not needed stay
  idle), then the most headroom (the least relative slack over the targets). When none
  meets them, the plan that misses by the least (relative) is returned, with the miss in
  ``Plan.miss_ms_per_token`` / ``Plan.miss_ttft_ms``. Without targets the objective decides
  (latency: the lowest prediction; throughput: the fastest slowest stage, then the lowest
  prediction).
- The entry-aware search is exact up to ``EXACT_PAIRWISE_MAX_NODES`` nodes (every subset,
  every order; a subset's layers go to its fastest nodes, by decode or by prefill speed). Above
  that, it tries the subsets met by removing nodes one at a time from all of them, each in a
  few ring orders. Stickiness: among the plans it met (and the previous plan, and the sticky
  plan of the search above), those as good as the best within ``tolerance`` (and meeting
  the targets with as few stages when the best does) are ranked by layers moved.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from meshllm.errors import PlacementError
from meshllm.wire.messages import Stage  # the one Stage type: plans, the wire, status

log = logging.getLogger(__name__)

Objective = Literal["latency", "throughput"]

DEFAULT_HOP_MS = 1.0
"""One hop's cost when no measurement is given: a LAN data-channel round trip is ~0.7 ms."""

PREFILL_POSITIONS = 256
"""The typical prompt behind the time-to-first-token figures. A node without a measured
``prefill_ms_per_layer`` is assumed to take ``ms_per_layer`` for each of these positions
(no gain from batching: pessimistic)."""

EXACT_ORDER_MAX_STAGES = 6
"""The entry-aware search tries every order of up to this many stages; a few ring orders above."""

EXACT_PAIRWISE_MAX_NODES = 6
"""With per-link latencies, search every subset and ring order up to this many nodes."""

EXACT_RING_MAX_NODES = 9
"""Order a chosen set of stages exactly (Held-Karp) up to this many; 2-opt beyond."""

MAX_STICKY_HOLES = 2
"""Sticky re-plans try new nodes in the places of at most this many lost stages."""

_MIB = 1024 * 1024
_REL_EPS = 1e-9


@dataclass(frozen=True)
class ModelSpec:
    """The sizes the planner needs to know about a model."""

    num_layers: int
    """Number of decoder layers."""
    layer_bytes: int
    """Bytes of weights of one decoder layer."""
    embed_head_bytes: int
    """Bytes of embedding + final norm + lm_head, which every node holds."""

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.layer_bytes < 0 or self.embed_head_bytes < 0:
            raise ValueError("layer_bytes and embed_head_bytes must be >= 0")


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers."""

    node_id: str
    mem_budget_bytes: int
    """Bytes this node may use for weights."""
    ms_per_layer: float
    """Measured milliseconds per decoder layer per token."""
    head_ms: float = 0.0
    """This node's own work per token as an entry node: embedding, final norm, lm_head and
    sampling (the part of a token no stage does)."""
    prefill_ms_per_layer: float | None = None
    """Milliseconds per decoder layer for a typical prompt (PREFILL_POSITIONS positions at
    once); None: ``ms_per_layer * PREFILL_POSITIONS``."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if self.mem_budget_bytes < 0:
            raise ValueError(f"{self.node_id}: mem_budget_bytes must be >= 0")
        for name in ("ms_per_layer", "head_ms", "prefill_ms_per_layer"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{self.node_id}: {name} must be finite and >= 0")

    @property
    def prefill_ms(self) -> float:
        """Milliseconds per layer for a typical prompt (measured, or the pessimistic guess)."""
        if self.prefill_ms_per_layer is not None:
            return self.prefill_ms_per_layer
        return self.ms_per_layer * PREFILL_POSITIONS


@dataclass(frozen=True)
class Plan:
    """A chain of stages covering ``[0, num_layers)`` in order, and what it should cost."""

    stages: tuple[Stage, ...]
    est_ms_per_token: float
    """One token's trip through the ring: every stage's compute plus the hops."""
    est_slowest_stage_ms: float = 0.0
    """The slowest stage's compute per token: the pipeline's limit on throughput."""
    predicted_ms_per_token: float | None = None
    """One token at the worst entry node: its head work, every stage's compute, the decode
    hops of its trip (see the module doc). None for plans not made by :func:`plan_layers`."""
    predicted_ttft_ms: float | None = None
    """The first token of a typical prompt at the worst entry node: head work, every stage's
    prefill compute, the prefill hops."""
    target_ms_per_token: float | None = None
    """The target it was planned for (None: none)."""
    target_ttft_ms: float | None = None
    miss_ms_per_token: float = 0.0
    """How far ``predicted_ms_per_token`` is above its target (0 when it meets it or there is none)."""
    miss_ttft_ms: float = 0.0
    """How far ``predicted_ttft_ms`` is above its target (0 when it meets it or there is none)."""

    @property
    def meets_targets(self) -> bool:
        """True when no target is missed (and when there is none)."""
        return self.miss_ms_per_token <= 0 and self.miss_ttft_ms <= 0

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end_layer if self.stages else 0

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(stage.node_id for stage in self.stages)

    def span_of(self, node_id: str) -> tuple[int, int] | None:
        """The half-open span ``node_id`` holds, or None when it holds no layers."""
        for stage in self.stages:
            if stage.node_id == node_id:
                return (stage.start_layer, stage.end_layer)
        return None

    def holders(self) -> list[str]:
        """The node holding each layer, indexed by layer."""
        out: list[str] = []
        for stage in self.stages:
            out.extend([stage.node_id] * stage.num_layers)
        return out


def layers_moved(old: Plan, new: Plan) -> int:
    """How many layers change holder from ``old`` to ``new``.

    A layer that only one of the plans covers (the model changed size) counts as moved.
    """
    before, after = old.holders(), new.holders()
    common = min(len(before), len(after))
    changed = sum(1 for layer in range(common) if before[layer] != after[layer])
    return changed + abs(len(before) - len(after))


class HopCosts:
    """Milliseconds for one hop between two nodes.

    A measured ``(a, b)`` entry wins; otherwise ``(b, a)``; otherwise ``default_ms``.
    """

    def __init__(self, hop_ms: Mapping[tuple[str, str], float] | None, default_ms: float) -> None:
        self._hop_ms = dict(hop_ms or {})
        for pair, ms in [(("default", "default"), default_ms), *self._hop_ms.items()]:
            if not (ms >= 0 and math.isfinite(ms)):
                raise ValueError(f"hop ms for {pair} must be finite and >= 0, got {ms}")
        self._default_ms = default_ms

    def __call__(self, a: str, b: str) -> float:
        got = self._hop_ms.get((a, b))
        if got is None:
            got = self._hop_ms.get((b, a), self._default_ms)
        return got

    def is_uniform(self, node_ids: Sequence[str]) -> bool:
        """True when every hop among ``node_ids`` costs the same (so order does not matter)."""
        costs = {self(a, b) for a in node_ids for b in node_ids if a != b}
        return len(costs) <= 1

    def uniform_ms(self, node_ids: Sequence[str]) -> float:
        """The mean hop among ``node_ids``: the flat cost used where the search must be uniform."""
        costs = [self(a, b) for a in node_ids for b in node_ids if a != b]
        return sum(costs) / len(costs) if costs else self._default_ms

    def ring_ms(self, order: Sequence[str]) -> float:
        """The hops of a ring visiting ``order`` and returning to its start (0 for one stage)."""
        if len(order) < 2:
            return 0.0
        return sum(self(order[i], order[(i + 1) % len(order)]) for i in range(len(order)))


def chain_cost_ms(
    stages: Sequence[Stage], ms_per_layer: Mapping[str, float], hops: HopCosts
) -> tuple[float, float]:
    """``(ms per token, slowest stage ms)`` of a chain under the planner's cost model."""
    compute = [stage.num_layers * ms_per_layer[stage.node_id] for stage in stages]
    latency = sum(compute) + hops.ring_ms([stage.node_id for stage in stages])
    return latency, max(compute, default=0.0)


def plan_layers(
    spec: ModelSpec,
    nodes: Sequence[NodeCapacity],
    *,
    objective: Objective = "latency",
    hop_ms: Mapping[tuple[str, str], float] | None = None,
    default_hop_ms: float = DEFAULT_HOP_MS,
    previous: Plan | None = None,
    tolerance: float = 0.05,
    prefill_hop_ms: Mapping[tuple[str, str], float] | None = None,
    default_prefill_hop_ms: float | None = None,
    entry_ids: Iterable[str] | None = None,
    target_ms_per_token: float | None = None,
    target_ttft_ms: float | None = None,
    entry_mean: bool = False,
) -> Plan:
    """Place ``spec``'s layers on ``nodes``; raise :class:`PlacementError` if they cannot hold it.

    With ``previous``, return the plan that moves the fewest layers (see :func:`layers_moved`)
    among those whose objective is within ``tolerance`` (a fraction) of the best plan's.

    ``hop_ms``: one decode hop (one position's hidden state) per ordered pair of nodes;
    ``prefill_hop_ms``: one hop of a typical prompt's (PREFILL_POSITIONS); unlisted pairs cost
    ``default_hop_ms`` / ``default_prefill_hop_ms`` (None: the decode figures). ``entry_ids``:
    the nodes where users type (ids not among ``nodes`` are ignored); None models the entry as
    the first stage; ``entry_mean``: predict the average over ``entry_ids``, not the worst.
    ``target_ms_per_token`` / ``target_ttft_ms``: latency targets (module doc). The returned
    plan carries its predictions and how far it misses the targets.
    """
    if objective not in ("latency", "throughput"):
        raise ValueError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    targets = _Targets(target_ms_per_token, target_ttft_ms)
    hops = HopCosts(hop_ms, default_hop_ms)
    prefill_hops = HopCosts(
        prefill_hop_ms if prefill_hop_ms is not None else hop_ms,
        default_prefill_hop_ms if default_prefill_hop_ms is not None else default_hop_ms,
    )
    problem = _Problem.build(spec, nodes, hops)
    entries = None
    if entry_ids is not None:
        entries = tuple(sorted(set(entry_ids) & set(problem.ids))) or None
    judge = _Judge(problem, entries, prefill_hops, targets, entry_mean=entry_mean)
    if entries is not None or targets.given:
        return judge.search(objective, previous, tolerance)
    if objective == "latency":
        best = problem.best_latency(problem.caps)
    else:
        best = problem.best_throughput()
    if previous is not None and previous.num_layers == spec.num_layers:
        sticky = problem.sticky(previous, best, objective, tolerance)
        best = sticky if sticky is not None else best
    return judge.annotate(best)


def predict_plan(
    stages: Sequence[Stage],
    nodes: Sequence[NodeCapacity],
    *,
    hop_ms: Mapping[tuple[str, str], float] | None = None,
    default_hop_ms: float = DEFAULT_HOP_MS,
    prefill_hop_ms: Mapping[tuple[str, str], float] | None = None,
    default_prefill_hop_ms: float | None = None,
    entry_ids: Iterable[str] | None = None,
    entry_mean: bool = False,
) -> tuple[float, float]:
    """``(ms per token, time to first token in ms)`` that :func:`plan_layers` predicts for a
    chain of ``stages`` (e.g. the plan in force, with fresh measurements). Every stage's node
    and every entry must be in ``nodes``; ``entry_mean``: the average over the entries, not
    the worst."""
    by_id = {node.node_id: node for node in nodes}
    entries = tuple(entry_ids) if entry_ids is not None else (stages[0].node_id,)
    hops = HopCosts(hop_ms, default_hop_ms)
    prefill_hops = HopCosts(
        prefill_hop_ms if prefill_hop_ms is not None else hop_ms,
        default_prefill_hop_ms if default_prefill_hop_ms is not None else default_hop_ms,
    )
    order = [stage.node_id for stage in stages]
    decode = sum(stage.num_layers * by_id[stage.node_id].ms_per_layer for stage in stages)
    prefill = sum(stage.num_layers * by_id[stage.node_id].prefill_ms for stage in stages)
    pick = _mean if entry_mean else max
    return (
        decode + pick([by_id[e].head_ms + _trip_ms(order, e, hops) for e in entries]),
        prefill + pick([by_id[e].head_ms + _trip_ms(order, e, prefill_hops) for e in entries]),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _trip_ms(order: Sequence[str], entry: str, hops: Callable[[str, str], float]) -> float:
    """The hops of a token from ``entry`` through ``order`` and back (none to itself)."""
    total = 0.0
    at = entry
    for node_id in order:
        if node_id != at:
            total += hops(at, node_id)
        at = node_id
    return total + (hops(at, entry) if at != entry else 0.0)


@dataclass(frozen=True)
class _Targets:
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


class _Judge:
    """Predictions for chains, and the entry-aware search (see the module doc)."""

    def __init__(self, problem: _Problem, entries: tuple[str, ...] | None,
                 prefill_hops: HopCosts, targets: _Targets, *, entry_mean: bool = False) -> None:
        self.problem = problem
        self.entries = entries
        self.pick: Callable[[Sequence[float]], float] = _mean if entry_mean else max
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
        decode = self.pick([self.head[e] + _trip_ms(order, e, self._decode) for e in entries])
        prefill = self.pick([self.head[e] + _trip_ms(order, e, self._prefill) for e in entries])
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
            slowest = _min_max_stage_ms(problem.ids, problem.ms, problem.caps, num_layers)
            slowest_limit = slowest * (1 + _REL_EPS) + 1e-12
            best = min(self._options(problem._caps_under(slowest), key, keep_all=False), key=key)
            if not sticky:
                return self.to_plan(best)
            # a sticky re-plan may take any plan whose slowest stage is within tolerance
            caps = problem._caps_under(slowest * (1 + tolerance))
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
                if miss <= _REL_EPS:
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
            if best_miss <= _REL_EPS:
                return miss <= _REL_EPS and o.size <= best.size
            return miss <= best_miss + tolerance + _REL_EPS
        if objective == "throughput":
            return o.slowest_ms <= (slowest_limit - 1e-12) * (1 + tolerance) + 1e-12
        return o.decode_ms <= best.decode_ms * (1 + tolerance) * (1 + _REL_EPS) + 1e-12

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
        by_decode = _greedy_counts(subset, self.problem.ms, caps, num_layers)
        if by_decode is None:
            return []
        by_prefill = _greedy_counts(subset, self.prefill_ms, caps, num_layers)
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
            _, ring = _best_ring(subset, hops)
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
        flat = self.problem._flat_hop_counts(caps)
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
        if trip[1] < best_prefill * (1 - _REL_EPS) or not kept:
            kept.append((trip, order))
            best_prefill = trip[1]
    return kept


@dataclass(frozen=True)
class _Candidate:
    counts: dict[str, int]
    order: tuple[str, ...]
    latency_ms: float


class _Problem:
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
    def build(cls, spec: ModelSpec, nodes: Sequence[NodeCapacity], hops: HopCosts) -> _Problem:
        ordered = sorted(nodes, key=lambda node: node.node_id)
        for a, b in itertools.pairwise(ordered):
            if a.node_id == b.node_id:
                raise ValueError(f"node {a.node_id!r} is listed twice")
        caps = {node.node_id: _layer_capacity(spec, node) for node in ordered}
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
        slowest = _min_max_stage_ms(self.ids, self.ms, self.caps, self.spec.num_layers)
        return self.best_latency(self._caps_under(slowest))

    def _caps_under(self, stage_ms: float) -> dict[str, int]:
        """Caps tightened so that no stage's compute exceeds ``stage_ms``."""
        limit = stage_ms * (1 + _REL_EPS) + 1e-12
        caps = {}
        for node_id, cap in self.caps.items():
            ms = self.ms[node_id]
            caps[node_id] = cap if ms == 0 else min(cap, int(limit / ms))
        return caps

    def _best_exact(self, caps: dict[str, int]) -> _Candidate:
        if self.uniform:
            counts = self._flat_hop_counts(caps)
            return _Candidate(counts, tuple(self.ids), self._latency(tuple(self.ids), counts))
        best: _Candidate | None = None
        usable = [node_id for node_id in self.ids if caps[node_id] > 0]
        for size in range(1, min(len(usable), self.spec.num_layers) + 1):
            for subset in itertools.combinations(usable, size):
                counts = _greedy_counts(subset, self.ms, caps, self.spec.num_layers)
                if counts is None:
                    continue
                ring_ms, order = _best_ring(subset, self.hops)
                latency = sum(counts[n] * self.ms[n] for n in subset) + ring_ms
                if best is None or latency < best.latency_ms * (1 - _REL_EPS):
                    best = _Candidate(counts, order, latency)
        assert best is not None, "capacity was checked before the search"
        return best

    def _best_flat_then_ring(self, caps: dict[str, int]) -> _Candidate:
        """Many nodes with per-link latencies: choose spans with the mean hop, then order them."""
        counts = self._flat_hop_counts(caps)
        used = [node_id for node_id in self.ids if counts.get(node_id, 0) > 0]
        _, order = _best_ring(used, self.hops)
        return _Candidate(counts, order, self._latency(order, counts))

    def _flat_hop_counts(self, caps: Mapping[str, int]) -> dict[str, int]:
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
            caps = self._caps_under(best.est_slowest_stage_ms * (1 + tolerance))
            budget_ms = math.inf
        else:
            caps = self.caps
            budget_ms = best.est_ms_per_token * (1 + tolerance) * (1 + _REL_EPS) + 1e-12
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


def _layer_capacity(spec: ModelSpec, node: NodeCapacity) -> int:
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


def _min_max_stage_ms(
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


def _greedy_counts(
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
            if value < top * (1 - _REL_EPS) or (
                value <= top * (1 + _REL_EPS) and count < new_stages[layers]
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
        if sum(1 for c in counts.values() if c) == 1 or single_ms <= multi_ms * (1 + _REL_EPS):
            return {single_id: num_layers}
    return {n: c for n, c in counts.items() if c}


def _best_ring(node_ids: Sequence[str], hops: HopCosts) -> tuple[float, tuple[str, ...]]:
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
                if trial_cost < cost * (1 - _REL_EPS):
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
