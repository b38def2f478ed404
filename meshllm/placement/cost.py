"""The placement cost model: what the planner is given, what a chain of stages costs and predicts.

Given: a model's sizes (`ModelSpec`), each node's memory budget and measured speeds
(`NodeCapacity`), and what one hop between two nodes costs (`HopCosts`). A `Plan` is a chain
of stages covering ``[0, num_layers)``; `chain_cost_ms` is its cost on the ring (every stage's
compute plus the hops of the ring), `predict_plan` its predicted ms per token and time to
first token at its entry nodes, `layers_moved` how many layers change holder between two
plans. The long form is the module doc of `meshllm.placement.planner`. Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from meshllm.wire.messages import Stage  # the one Stage type: plans, the wire, status

Objective = Literal["latency", "throughput"]

OBJECTIVES: tuple[Objective, ...] = ("latency", "throughput")

DEFAULT_OBJECTIVE: Objective = "throughput"
"""The one default objective of the mesh: the planner's, the balancer's, the mesh settings' and
the node config's. A mesh serving several conversations is limited by its slowest stage, and
spreading the layers lets every device work (latency: ``objective="latency"``)."""

DEFAULT_HOP_MS = 1.0
"""One hop's cost when no measurement is given: a LAN data-channel round trip is ~0.7 ms."""

PREFILL_POSITIONS = 256
"""The typical prompt behind the time-to-first-token figures. A node without a measured
``prefill_ms_per_layer`` is assumed to take ``ms_per_layer`` for each of these positions
(no gain from batching: pessimistic)."""

REL_EPS = 1e-9
"""Relative slack under which two costs count as equal."""


@dataclass(frozen=True)
class ModelSpec:
    """The sizes the planner needs to know about a model."""

    num_layers: int
    """Number of decoder layers."""
    layer_bytes: int
    """Bytes of weights of one decoder layer."""
    embed_head_bytes: int
    """Bytes of embedding + final norm + lm_head, which every node holds."""
    private_layers: int = 0
    """K: every node runs decoder layers ``[0, K)`` and ``[num_layers - K, num_layers)`` of
    its own answers itself (``--private-layers``), so the plan places only
    ``[plan_start, plan_end) = [K, num_layers - K)``, and every node holds ``2K`` layers
    besides its stage (docs/security.md)."""

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.layer_bytes < 0 or self.embed_head_bytes < 0:
            raise ValueError("layer_bytes and embed_head_bytes must be >= 0")
        if not 0 <= 2 * self.private_layers < self.num_layers:
            raise ValueError(f"private_layers must leave a layer to place: 0 <= 2 * "
                             f"{self.private_layers} < {self.num_layers}")

    @property
    def plan_start(self) -> int:
        """The first layer a plan places."""
        return self.private_layers

    @property
    def plan_end(self) -> int:
        """One past the last layer a plan places."""
        return self.num_layers - self.private_layers

    @property
    def placed(self) -> "ModelSpec":
        """The part a plan places, counted from 0: its layers, and every node's fixed bytes
        (embedding, norm, head and the private layers)."""
        k = self.private_layers
        return ModelSpec(self.num_layers - 2 * k, self.layer_bytes, self.embed_head_bytes + 2 * k * self.layer_bytes)


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
    """A chain of stages covering ``[0, num_layers)`` in order (``[K, num_layers - K)`` with
    K private layers: `ModelSpec.plan_start`), and what it should cost."""

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

    def shifted(self, by: int) -> "Plan":
        """The same plan with every span moved by `by` layers."""
        if by == 0:
            return self
        stages = tuple(Stage(s.node_id, s.start_layer + by, s.end_layer + by) for s in self.stages)
        return replace(self, stages=stages)

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
    hops, prefill_hops = hop_costs(hop_ms, default_hop_ms, prefill_hop_ms, default_prefill_hop_ms)
    order = [stage.node_id for stage in stages]
    decode = sum(stage.num_layers * by_id[stage.node_id].ms_per_layer for stage in stages)
    prefill = sum(stage.num_layers * by_id[stage.node_id].prefill_ms for stage in stages)
    pick = mean if entry_mean else max
    return (
        decode + pick([by_id[e].head_ms + trip_ms(order, e, hops) for e in entries]),
        prefill + pick([by_id[e].head_ms + trip_ms(order, e, prefill_hops) for e in entries]),
    )


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def trip_ms(order: Sequence[str], entry: str, hops: Callable[[str, str], float]) -> float:
    """The hops of a token from ``entry`` through ``order`` and back (none to itself)."""
    total = 0.0
    at = entry
    for node_id in order:
        if node_id != at:
            total += hops(at, node_id)
        at = node_id
    return total + (hops(at, entry) if at != entry else 0.0)


def hop_costs(
    hop_ms: Mapping[tuple[str, str], float] | None,
    default_hop_ms: float,
    prefill_hop_ms: Mapping[tuple[str, str], float] | None,
    default_prefill_hop_ms: float | None,
) -> tuple[HopCosts, HopCosts]:
    """(decode hops, prefill hops); the prefill figures default to the decode ones."""
    return HopCosts(hop_ms, default_hop_ms), HopCosts(
        prefill_hop_ms if prefill_hop_ms is not None else hop_ms,
        default_prefill_hop_ms if default_prefill_hop_ms is not None else default_hop_ms,
    )
