"""What one node computed and sent: for `meshllm bench` and for runtime balancing."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

SPAN_WINDOW = 8
"""A span's measured decode speed is the median of this many recent steps."""


@dataclass
class StageStats:
    """Decode steps (one position) are kept apart from prefill steps (many positions)."""

    decode_steps: int = 0
    decode_compute_ms: float = 0.0
    prefill_steps: int = 0
    prefill_compute_ms: float = 0.0
    prefill_positions: int = 0
    decode_hops_sent: int = 0
    decode_bytes_sent: int = 0
    prefill_bytes_sent: int = 0
    recent_decode_ms: list[float] = field(default_factory=list)
    """The last few decode compute times (ms), newest last."""
    rebuilds: int = 0
    """Sessions this node rebuilt on a new plan (docs/operations.md), as a stage."""
    rebuilt_layers: int = 0
    """Layers recomputed in those rebuilds, summed over sessions."""
    kept_layers: int = 0
    """Layers whose caches those rebuilds kept, summed over sessions."""
    rebuild_compute_ms: float = 0.0
    whole_rebuilds: int = 0
    """Rebuilds of answers entered here in which the stages without a log recomputed their
    whole span (a log a rebuild needed was gone)."""
    full_replays: int = 0
    """Answers entered here that fell back to replaying every step (even a whole rebuild failed)."""
    measured_span: tuple[int, int] = (0, 0)
    """The span whose decode steps ``span_decode_ms`` holds."""
    span_decode_ms: list[float] = field(default_factory=list)

    def computed(self, positions: int, ms: float) -> None:
        if positions == 1:
            self.decode_steps += 1
            self.decode_compute_ms += ms
            self.recent_decode_ms = (self.recent_decode_ms + [ms])[-32:]
            self.span_decode_ms = (self.span_decode_ms + [ms])[-SPAN_WINDOW:]
        else:
            self.prefill_steps += 1
            self.prefill_positions += positions
            self.prefill_compute_ms += ms

    def span_ms_per_layer(self, span: tuple[int, int], min_steps: int = 3) -> float | None:
        """Recent decode compute per layer of ``span`` (the span this node holds now), or None
        before ``min_steps`` steps of it. A new span starts a new measurement."""
        if span != self.measured_span:
            self.measured_span = span
            self.span_decode_ms = []
            return None
        layers = span[1] - span[0]
        if layers < 1 or len(self.span_decode_ms) < min_steps:
            return None
        return statistics.median(self.span_decode_ms) / layers

    def rebuilt(self, kept_layers: int, rebuilt_layers: int, ms: float) -> None:
        self.rebuilds += 1
        self.kept_layers += kept_layers
        self.rebuilt_layers += rebuilt_layers
        self.rebuild_compute_ms += ms

    def sent(self, positions: int, nbytes: int) -> None:
        if positions == 1:
            self.decode_hops_sent += 1
            self.decode_bytes_sent += nbytes
        else:
            self.prefill_bytes_sent += nbytes

    def as_json(self) -> dict[str, float | int]:
        return {
            "decode_steps": self.decode_steps,
            "decode_compute_ms_avg": round(self.decode_compute_ms / self.decode_steps, 4) if self.decode_steps else 0.0,
            "prefill_steps": self.prefill_steps,
            "prefill_positions": self.prefill_positions,
            "prefill_compute_ms": round(self.prefill_compute_ms, 3),
            "decode_hops_sent": self.decode_hops_sent,
            "decode_bytes_per_hop": round(self.decode_bytes_sent / self.decode_hops_sent, 1) if self.decode_hops_sent else 0.0,
            "prefill_bytes_sent": self.prefill_bytes_sent,
            "rebuilds": self.rebuilds,
            "rebuilt_layers": self.rebuilt_layers,
            "kept_layers": self.kept_layers,
            "rebuild_compute_ms": round(self.rebuild_compute_ms, 3),
            "whole_rebuilds": self.whole_rebuilds,
            "full_replays": self.full_replays,
        }
