"""Layer placement: which node holds which decoder layers, as one pure function (the front).

The coordinator calls :func:`plan_layers` with the model's sizes and every node's memory
budget and measured speed; it gets back a :class:`Plan`, a chain of stages whose half-open
spans cover ``[0, num_layers)`` exactly, or ``[K, num_layers - K)`` when every node keeps K
private layers at each end for its own answers (`ModelSpec.private_layers`: the plan is made
for the layers between, counted from 0, and shifted). Nothing here reads the clock or does I/O.

The pieces: `meshllm.placement.cost` (the cost model and the types below),
`meshllm.placement.search` (the ring search and sticky re-plans), `meshllm.placement.targets`
(the entry-aware search and latency targets). This module holds `plan_layers` and names the
public types.

Cost model (see ``docs/election.md`` for the long form):

- A stage that holds ``n`` layers on a node that takes ``ms_per_layer`` costs
  ``n * ms_per_layer`` milliseconds per token.
- The chain is a ring: a token goes stage 1 -> stage 2 -> ... -> stage k and back to where it
  started. A chain of ``k >= 2`` stages pays ``k`` hops (the ``k - 1`` hops between
  consecutive stages plus the return hop from the last stage to the first); a single stage
  pays none. The entry node is modelled as the first stage's node: it is not known when the
  plan is made, and any node can be one.
- ``objective="throughput"`` (the default, `DEFAULT_OBJECTIVE`: the mesh's one default)
  minimises the slowest stage's compute (what limits a pipeline that has several sessions in
  flight), then latency among plans with that slowest stage. ``objective="latency"``
  minimises one token's trip: compute plus hops.
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

from collections.abc import Iterable, Mapping, Sequence

from meshllm.placement.cost import (
    DEFAULT_HOP_MS,
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    PREFILL_POSITIONS,
    HopCosts,
    ModelSpec,
    NodeCapacity,
    Objective,
    Plan,
    Stage,
    chain_cost_ms,
    hop_costs,
    layers_moved,
    predict_plan,
)
from meshllm.placement.search import EXACT_PAIRWISE_MAX_NODES, Problem, layer_capacity
from meshllm.placement.targets import Judge, Targets

__all__ = [
    "DEFAULT_HOP_MS", "DEFAULT_OBJECTIVE", "EXACT_PAIRWISE_MAX_NODES", "OBJECTIVES", "PREFILL_POSITIONS",
    "HopCosts", "ModelSpec", "NodeCapacity", "Objective", "Plan", "Stage", "chain_cost_ms", "layer_capacity",
    "layers_moved", "plan_layers", "predict_plan",
]


def plan_layers(
    spec: ModelSpec,
    nodes: Sequence[NodeCapacity],
    *,
    objective: Objective = DEFAULT_OBJECTIVE,
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
    ``objective``: ``throughput`` (`DEFAULT_OBJECTIVE`) or ``latency`` (module doc).
    ``target_ms_per_token`` / ``target_ttft_ms``: latency targets (module doc). The returned
    plan carries its predictions and how far it misses the targets.
    """
    if spec.private_layers:
        # the private layers stay on every entry node: place the rest, counted from 0
        k = spec.private_layers
        placed = plan_layers(spec.placed, nodes, objective=objective, hop_ms=hop_ms, default_hop_ms=default_hop_ms,
                             previous=None if previous is None or not previous.stages or previous.stages[0].start_layer != k
                             else previous.shifted(-k), tolerance=tolerance,
                             prefill_hop_ms=prefill_hop_ms, default_prefill_hop_ms=default_prefill_hop_ms,
                             entry_ids=entry_ids, target_ms_per_token=target_ms_per_token,
                             target_ttft_ms=target_ttft_ms, entry_mean=entry_mean)
        return placed.shifted(k)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'latency' or 'throughput', got {objective!r}")
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    targets = Targets(target_ms_per_token, target_ttft_ms)
    hops, prefill_hops = hop_costs(hop_ms, default_hop_ms, prefill_hop_ms, default_prefill_hop_ms)
    problem = Problem.build(spec, nodes, hops)
    entries = None
    if entry_ids is not None:
        entries = tuple(sorted(set(entry_ids) & set(problem.ids))) or None
    judge = Judge(problem, entries, prefill_hops, targets, entry_mean=entry_mean)
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
