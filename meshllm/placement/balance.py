"""Runtime load balancing: re-plan when a stage stays far slower (or faster) than planned.

The coordinator plans with the speed each node advertised (ms per layer per token, measured
once at start). Speeds change at run time: a laptop throttles, another program takes the
cores, then lets go. :class:`Balancer` watches what the stages really take and says when a
re-plan pays off. It is sans-IO: the caller passes ``now`` and does the sending.

Driving it (the coordinator)::

    balancer = Balancer(spec, objective="throughput")
    caps = balancer.capacities(advertised)      # plan with these, not the advertised ones
    balancer.plan_active(plan, now)             # each time a plan becomes active
    balancer.observe(node_id, decode_ms_per_token, layers, steps=n, now=now)  # every report
    rebalance = balancer.check(advertised, now) # after reports; a Rebalance or None
    balancer.forget(node_id)                    # a node left

A node **drifts** when its last ``min_reports`` reports (or more) are all off the figure it is
planned with, the same way (``drift_factor`` times slower, or that much faster), and the first
of them came at least ``min_drift_s`` ago. Its new figure is the median of the latest
``min_reports`` of them. Every other stage with at least ``min_reports`` reports is re-measured
the same way at that moment, so that the re-plan compares measured figures with measured ones
(advertised speeds come from a start-up benchmark and differ from stage timings by overheads).
A node that recovers drifts back the other way and is planned with its real speed again.

``check`` re-plans with the new figures (sticky to the current plan) and returns a
:class:`Rebalance` only when, costed with the new figures, the new plan beats the current one
by ``min_gain`` on the objective, and no plan became active in the last ``min_interval_s``.
Otherwise the new figures are kept (later re-plans use them) and nothing moves.

A node planned with a measured figure that then holds no layers sends no reports, so it cannot
be seen recovering: after ``probe_after_s`` it is planned with its advertised speed again (if
that gains enough), and measured anew.

With a latency target (docs/placement.md), ``check`` judges plans by their predicted times
against the targets (the worst ratio of prediction to target), and re-plans when that gains
``min_gain`` or when the new plan meets the targets that the current one misses. The entry
nodes' measured ms per token go to ``observe_trip``: a trip is *off* when it misses the target
and is ``min_gain`` above its prediction (the plan was chosen on figures that are wrong). The
same hysteresis as a drift applies: ``min_reports`` off trips in a row from one entry node, the
first at least ``min_drift_s`` ago, and no such re-plan within ``min_interval_s``; then
``target_missed`` names the entry node, and the caller re-plans from fresh measurements
(``refresh`` gives every stage with enough reports its measured figure).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from meshllm.errors import PlacementError
from meshllm.placement.planner import (
    DEFAULT_HOP_MS,
    DEFAULT_OBJECTIVE,
    HopCosts,
    ModelSpec,
    NodeCapacity,
    Objective,
    Plan,
    chain_cost_ms,
    plan_layers,
    predict_plan,
)

log = logging.getLogger(__name__)

MAX_SAMPLES = 64
"""Reports kept per node (since its plan became active); a drift run longer than this counts
from the oldest one kept."""


@dataclass(frozen=True)
class BalanceSettings:
    """The thresholds and the hysteresis of runtime balancing."""

    drift_factor: float = 1.5
    """A report is off when its ms per layer is at least this times the planned figure, or at
    most the planned figure divided by this."""
    min_reports: int = 5
    """Consecutive off reports before a node counts as drifted (also the median's window)."""
    min_drift_s: float = 5.0
    """...and the first of them at least this long ago: a shorter spike never re-plans."""
    min_steps: int = 3
    """Reports that average fewer decode steps than this are ignored as too few samples."""
    min_interval_s: float = 10.0
    """No balancing re-plan sooner than this after a plan became active or after the last one."""
    min_gain: float = 0.15
    """Re-plan only when the new plan's objective is at least this fraction better."""
    probe_after_s: float = 60.0
    """A node with a measured figure and no layers gets its advertised figure back after this."""

    def __post_init__(self) -> None:
        if not self.drift_factor > 1:
            raise ValueError("drift_factor must be > 1")
        if self.min_reports < 1 or self.min_steps < 1:
            raise ValueError("min_reports and min_steps must be >= 1")
        if min(self.min_drift_s, self.min_interval_s, self.probe_after_s) < 0:
            raise ValueError("durations must be >= 0")
        if not 0 <= self.min_gain < 1:
            raise ValueError("min_gain must be in [0, 1)")


@dataclass(frozen=True)
class Rebalance:
    """A re-plan worth doing."""

    plan: Plan
    """What to publish: ``plan_layers`` on the new figures, sticky to the current plan. Its
    ``est_*`` fields are costed with the new figures."""
    ms_per_layer: Mapping[str, float]
    """The figure every node was planned with (as :meth:`Balancer.capacities` gives)."""
    changed: tuple[str, ...]
    """The nodes that drifted (or were probed), sorted: the reason for the re-plan."""
    current_cost_ms: float
    """The current plan's objective (slowest stage or ms per token) under the new figures."""
    new_cost_ms: float
    """The new plan's objective under the new figures."""

    @property
    def gain(self) -> float:
        """The fraction of the objective the re-plan saves."""
        return 1.0 - self.new_cost_ms / self.current_cost_ms if self.current_cost_ms > 0 else 0.0


@dataclass(frozen=True)
class _Sample:
    at_s: float
    ms_per_layer: float


class Balancer:
    """Per-node measured speeds against the active plan; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        objective: Objective = DEFAULT_OBJECTIVE,
        settings: BalanceSettings = BalanceSettings(),
    ) -> None:
        self.spec = spec
        self.objective: Objective = objective
        self.settings = settings
        self._plan: Plan | None = None
        self._layers: dict[str, int] = {}
        self._samples: dict[str, deque[_Sample]] = {}
        self._figures: dict[str, float] = {}
        self._figure_set_at_s: dict[str, float] = {}
        self._quiet_until_s = -math.inf
        self._trips: dict[str, deque[tuple[float, bool]]] = {}
        """Entry nodes' measured trips under the active plan: (when, off)."""

    @property
    def figures(self) -> Mapping[str, float]:
        """Nodes planned with a measured figure instead of their advertised one (ms per layer)."""
        return dict(self._figures)

    def capacities(self, nodes: Sequence[NodeCapacity]) -> list[NodeCapacity]:
        """``nodes`` (with their advertised speeds) as they should be planned."""
        return [
            replace(node, ms_per_layer=self._figures[node.node_id])
            if node.node_id in self._figures else node
            for node in nodes
        ]

    def plan_active(self, plan: Plan, now: float) -> None:
        """``plan`` became active: judge reports against it, and start a quiet interval."""
        self._plan = plan
        self._layers = {stage.node_id: stage.num_layers for stage in plan.stages}
        self._samples.clear()
        self._trips.clear()
        self._quiet_until_s = max(self._quiet_until_s, now + self.settings.min_interval_s)

    def forget(self, node_id: str) -> None:
        """``node_id`` left: drop its reports and its measured figure (it may come back new)."""
        self._samples.pop(node_id, None)
        self._figures.pop(node_id, None)
        self._figure_set_at_s.pop(node_id, None)
        self._trips.pop(node_id, None)

    def observe(
        self, node_id: str, decode_ms_per_token: float, layers: int, *, steps: int, now: float
    ) -> None:
        """A stage's report: ``decode_ms_per_token`` averaged over ``steps`` decode steps of its
        ``layers`` layers. Reports that do not match the active plan (a stale span, a node
        outside it), or average too few steps, are ignored."""
        if (
            self._layers.get(node_id) != layers
            or layers < 1
            or steps < self.settings.min_steps
            or not (decode_ms_per_token >= 0 and math.isfinite(decode_ms_per_token))
        ):
            log.debug("ignoring report from %s: %.3f ms, %d layers, %d steps",
                      node_id, decode_ms_per_token, layers, steps)
            return
        samples = self._samples.setdefault(node_id, deque(maxlen=MAX_SAMPLES))
        samples.append(_Sample(now, decode_ms_per_token / layers))

    def observe_trip(self, node_id: str, measured_ms: float, predicted_ms: float, target_ms: float,
                     now: float) -> None:
        """An entry node's measured ms per token under the active plan (new measurements only),
        with what the plan predicts for it and the target."""
        if self._plan is None or not all(math.isfinite(v) and v >= 0 for v in (measured_ms, predicted_ms)):
            return
        off = measured_ms > target_ms and measured_ms >= predicted_ms * (1 + self.settings.min_gain)
        self._trips.setdefault(node_id, deque(maxlen=MAX_SAMPLES)).append((now, off))

    def target_missed(self, now: float) -> str | None:
        """The entry node whose measured trips kept missing the target (see the module doc),
        or None. Saying so starts a quiet interval and forgets the trips."""
        if self._plan is None or now < self._quiet_until_s:
            return None
        for node_id, trips in sorted(self._trips.items()):
            run = []  # the off trips in a row, newest first
            for at, off in reversed(trips):
                if not off:
                    break
                run.append(at)
            if len(run) >= self.settings.min_reports and now - run[-1] >= self.settings.min_drift_s:
                self._trips.clear()
                self._quiet_until_s = now + self.settings.min_interval_s
                return node_id
        return None

    def refresh(self, now: float) -> tuple[str, ...]:
        """Plan every node with enough recent reports with its measured figure: the stage
        speeds of a re-plan from fresh measurements. The nodes refreshed, sorted."""
        fresh = {node_id: self._recent_ms(node_id) for node_id, samples in self._samples.items()
                 if len(samples) >= self.settings.min_reports}
        for node_id, figure in fresh.items():
            self._set_figure(node_id, figure, now)
        return tuple(sorted(fresh))

    def check(
        self,
        nodes: Sequence[NodeCapacity],
        now: float,
        *,
        hop_ms: Mapping[tuple[str, str], float] | None = None,
        default_hop_ms: float = DEFAULT_HOP_MS,
        **planning: object,
    ) -> Rebalance | None:
        """A re-plan worth doing now, or None. ``nodes``: every member, advertised speeds.
        ``planning``: further arguments of ``plan_layers`` (prefill hops, entries, targets).

        New figures found here are kept even when no re-plan pays off.
        """
        plan = self._plan
        if plan is None or now < self._quiet_until_s:
            return None
        advertised = {node.node_id: node.ms_per_layer for node in nodes}
        if not set(plan.node_ids) <= advertised.keys():
            return None  # a stage left: the membership re-plan comes first
        changed = self._new_figures(advertised, now)
        if not changed:
            return None
        refreshed = {
            node_id: self._recent_ms(node_id) for node_id, samples in self._samples.items()
            if node_id not in changed and len(samples) >= self.settings.min_reports
        }
        for node_id, figure in {**refreshed, **changed}.items():
            self._set_figure(node_id, figure, now)
        caps = self.capacities(nodes)
        figures = {cap.node_id: cap.ms_per_layer for cap in caps}
        hops = HopCosts(hop_ms, default_hop_ms)
        try:
            new = plan_layers(self.spec, caps, objective=self.objective, hop_ms=hop_ms,
                              default_hop_ms=default_hop_ms, previous=plan, **planning)  # type: ignore[arg-type]
        except PlacementError as e:
            log.debug("no rebalance: %s", e)
            return None
        meets_now = False
        targets = (planning.get("target_ms_per_token"), planning.get("target_ttft_ms"))
        if any(t is not None for t in targets):
            current = predict_plan(
                plan.stages, caps, hop_ms=hop_ms, default_hop_ms=default_hop_ms,
                prefill_hop_ms=planning.get("prefill_hop_ms"),  # type: ignore[arg-type]
                default_prefill_hop_ms=planning.get("default_prefill_hop_ms"),  # type: ignore[arg-type]
                entry_ids=planning.get("entry_ids"))  # type: ignore[arg-type]
            current_cost = _target_ratio(current, targets)
            new_cost = _target_ratio((new.predicted_ms_per_token or 0.0, new.predicted_ttft_ms or 0.0), targets)
            meets_now = current_cost > 1 >= new_cost
        else:
            current_cost = self._cost(chain_cost_ms(plan.stages, figures, hops))
            new_cost = self._cost((new.est_ms_per_token, new.est_slowest_stage_ms))
        rebalance = Rebalance(new, figures, tuple(sorted(changed)), current_cost, new_cost)
        if new.stages == plan.stages or (rebalance.gain < self.settings.min_gain and not meets_now):
            log.info("new speed figures %s; no re-plan (gain %.0f%%)",
                     _fmt(figures, changed), 100 * rebalance.gain)
            return None
        log.info("rebalance: new speed figures %s; %s %.2f -> %.2f ms (%.0f%% better)",
                 _fmt(figures, changed), self.objective, current_cost, new_cost,
                 100 * rebalance.gain)
        self._quiet_until_s = now + self.settings.min_interval_s
        return rebalance

    # ---- internals ------------------------------------------------------------------------

    def _new_figures(self, advertised: Mapping[str, float], now: float) -> dict[str, float | None]:
        """Drifted nodes' measured figures; None for nodes to try at their advertised speed."""
        changed: dict[str, float | None] = {}
        for node_id, ms in advertised.items():
            drifted = self._drift(node_id, self._figures.get(node_id, ms), now)
            if drifted is not None:
                changed[node_id] = drifted
            elif (
                node_id in self._figures
                and node_id not in self._layers
                and now - self._figure_set_at_s[node_id] >= self.settings.probe_after_s
            ):
                changed[node_id] = None  # unmeasurable: try it at its advertised speed again
        return changed

    def _drift(self, node_id: str, planned_ms: float, now: float) -> float | None:
        """The node's measured ms per layer if it drifted off ``planned_ms``, else None."""
        run: list[_Sample] = []
        direction = 0
        for sample in reversed(self._samples.get(node_id, ())):
            way = self._direction(sample.ms_per_layer, planned_ms)
            if way == 0 or (direction and way != direction):
                break
            direction = way
            run.append(sample)
        if len(run) < self.settings.min_reports or now - run[-1].at_s < self.settings.min_drift_s:
            return None
        return self._recent_ms(node_id)

    def _recent_ms(self, node_id: str) -> float:
        """The median ms per layer of the node's latest ``min_reports`` reports."""
        recent = list(self._samples[node_id])[-self.settings.min_reports:]
        return statistics.median(sample.ms_per_layer for sample in recent)

    def _direction(self, measured_ms: float, planned_ms: float) -> int:
        """+1 when far slower than planned, -1 when far faster, 0 within the band."""
        factor = self.settings.drift_factor
        if measured_ms >= planned_ms * factor and measured_ms > 0:
            return 1
        if measured_ms * factor <= planned_ms:
            return -1
        return 0

    def _set_figure(self, node_id: str, figure: float | None, now: float) -> None:
        if figure is None:
            self._figures.pop(node_id, None)
        else:
            self._figures[node_id] = figure
        self._figure_set_at_s[node_id] = now
        self._samples.pop(node_id, None)

    def _cost(self, costs: tuple[float, float]) -> float:
        latency_ms, slowest_stage_ms = costs
        return slowest_stage_ms if self.objective == "throughput" else latency_ms


def _target_ratio(predicted: tuple[float, float], targets: tuple[object, object]) -> float:
    """The worst of predicted / target (ms per token, first token) over the targets given."""
    return max(value / float(target) for value, target in zip(predicted, targets)  # type: ignore[arg-type]
               if target is not None)


def _fmt(figures: Mapping[str, float], nodes: Iterable[str]) -> str:
    return ", ".join(f"{node_id} {figures[node_id]:.3g} ms/layer" for node_id in sorted(nodes))
