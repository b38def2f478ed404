"""The status role of one node: the mesh's part of GET /v1/status (docs/api.md), read-only.

It shows the election, the plan in force (or pending), every member with its span, links and
measured figures, and the plan's predicted and measured times against the coordinator's
latency targets. It changes nothing: it reads the port, the transition (plans, ready
stages) and the coordinator role (measurements, and the planner's inputs for predictions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.mesh import measured as ms
from meshllm.mesh.coordinator import Coordinator
from meshllm.mesh.port import Port
from meshllm.mesh.transition import Transition


@dataclass(frozen=True)
class _Latency:
    """What status shows of predictions and measurements (see `MeshStatus._latency`)."""

    planning: ms.Planning
    targets: tuple[float | None, float | None] | None
    """The coordinator's targets (None: not known here yet)."""
    per_entry: dict[str, float]
    """Predicted ms per token of the plan in force for each member as the entry node."""
    measured: dict[str, float]
    """Measured ms per token of the entry nodes (this plan)."""
    predicted: tuple[float, float] | None
    """(ms per token, ms to first token) at the worst entry node in use (or the ring)."""


class MeshStatus:
    def __init__(self, port: Port, transition: Transition, coordinator: Coordinator) -> None:
        self._port = port
        self._transition = transition
        self._coordinator = coordinator

    def view(self, rtt_ms: Callable[[str], float | None] = lambda _peer: None) -> dict[str, object]:
        """The mesh's part of GET /v1/status (docs/api.md)."""
        port = self._port
        latency = self._latency()
        return {
            "term": port.term,
            "coordinator_id": port.coordinator_id,
            "plan": self._plan(),
            "latency": self._latency_view(latency),
            "nodes": self._nodes(rtt_ms, latency),
            "codec": port.settings.codec,
            "placement_error": port.placement_error,
            "stats": port.stats.as_json(),
        }

    def _latency(self) -> _Latency:
        """Predictions for the plan in force with the latest measurements, beside what the
        entry nodes measured, and the coordinator's targets."""
        port, coordinator = self._port, self._coordinator
        measurements = coordinator.measurements
        plan = port.plans.active
        if port.is_coordinator:
            targets: tuple[float | None, float | None] | None = (
                port.settings.target_ms_per_token, port.settings.target_ttft_ms)
        else:
            targets = measurements.targets(port.coordinator_id)
        planning = coordinator.planning(targets or (None, None))
        if plan is None:
            return _Latency(planning, targets, {}, {}, None)
        caps = coordinator.predicting_caps(plan.key)
        per_entry: dict[str, float] = {}
        measured: dict[str, float] = {}
        for nid in port.members:
            predicted = planning.predict(plan.stages, caps, entry_ids=[nid])
            if predicted is not None:
                per_entry[nid] = predicted[0]
            figure = coordinator.tokens.ms_per_token if nid == port.node_id else measurements.ms_per_token(nid, plan.key)
            if figure is not None:
                measured[nid] = figure
        return _Latency(planning, targets, per_entry, measured, planning.predict(plan.stages, caps))

    def _nodes(self, rtt_ms: Callable[[str], float | None], latency: _Latency) -> list[dict[str, object]]:
        port = self._port
        me = port.node_id
        measurements = self._coordinator.measurements
        active = port.plans.active
        plan = active or port.plans.pending
        hop = latency.planning.hop_ms or {}
        rows = []
        for nid, h in sorted(port.members.items(), key=lambda kv: (kv[0] != me, kv[0])):
            span = plan.span_of(nid) if plan is not None else (0, 0)
            own = measurements.own_links.get(nid) if nid != me else None
            report = measurements.reports.get(nid)
            rows.append({
                "id": nid,
                "name": h.name,
                "is_self": nid == me,
                "role": "coordinator" if nid == port.coordinator_id else "member",
                "state": "ready" if nid in self._transition.ready_nodes or (
                    active is not None and nid not in active.node_ids) else "loading",
                "mem_budget_bytes": h.mem_budget_bytes,
                "ms_per_layer": h.ms_per_layer,
                "span": list(span) if span != (0, 0) else None,
                # every node holds the embedding and head, plus the layers of its span
                "weight_bytes": (span[1] - span[0]) * port.spec.layer_bytes + port.spec.embed_head_bytes,
                "rtt_ms": None if nid == me else rtt_ms(nid),
                "link": None if own is None or own.rtt_ms is None else {
                    "rtt_ms": _round(own.rtt_ms, 2),
                    "small_mb_s": _round(own.small_mb_s, 1),
                    "large_mb_s": _round(own.large_mb_s, 1),
                    "decode_hop_ms": _round(hop.get((me, nid)), 2),
                    "prefill_hop_ms": _round((latency.planning.prefill_hop_ms or {}).get((me, nid)), 1),
                },
                "head_ms": _round(report.head_ms, 2) if report is not None else None,
                "prefill_ms_per_layer": _round(report.prefill_ms_per_layer or None, 2) if report is not None else None,
                "predicted_ms_per_token": _round(latency.per_entry.get(nid), 2),
                "measured_ms_per_token": _round(latency.measured.get(nid), 2),
                "address": None,  # the status board fills in this node's own API address
            })
        return rows

    def _plan(self) -> dict[str, object] | None:
        active = self._port.plans.active
        plan = active or self._port.plans.pending
        if plan is None:
            return None
        return {
            "term": plan.key[0],
            "epoch": plan.key[1],
            "state": "active" if plan is active else "pending",
            "stages": [{"node_id": s.node_id, "start_layer": s.start_layer, "end_layer": s.end_layer}
                       for s in plan.stages],
            "codec": plan.codec,
        }

    def _latency_view(self, latency: _Latency) -> dict[str, object] | None:
        """The active plan's predicted and measured times against the targets."""
        if self._port.plans.active is None:
            return None
        target_ms, target_ttft = latency.targets or (None, None)
        predicted_ms, predicted_ttft = latency.predicted or (None, None)
        measured_ms = max(latency.measured.values(), default=None)
        return {
            "entry_ids": list(latency.planning.entry_ids or ()),
            "entry_mean": latency.planning.entry_mean,
            "predicted_ms_per_token": _round(predicted_ms, 2),
            "predicted_ttft_ms": _round(predicted_ttft, 1),
            "measured_ms_per_token": _round(measured_ms, 2),
            "target_ms_per_token": target_ms,
            "target_ttft_ms": target_ttft,
            "miss_ms_per_token": _round(ms.miss_ms(predicted_ms, target_ms), 2),
            "measured_miss_ms_per_token": _round(ms.miss_ms(measured_ms, target_ms), 2),
            "miss_ttft_ms": _round(ms.miss_ms(predicted_ttft, target_ttft), 1),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
