"""What one token costs this node besides its layers, measured once at start (on the worker).

The planner predicts a token's time as the entry node's own work (embedding, final norm,
lm_head, sampling: ``head_ms``) plus every stage's layers plus the hops, and the first
token's as the same with a typical prompt (``prefill_ms_per_layer``); see docs/placement.md.
``Runtime.measure_ms_per_layer`` gives the layers' decode speed; this module the rest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.shard import open_shard
from meshllm.placement.planner import PREFILL_POSITIONS


@dataclass(frozen=True)
class EntryCosts:
    head_ms: float
    """Embed one token, then final norm, lm_head and a greedy sample: ms per token."""
    prefill_ms_per_layer: float
    """One decoder layer over PREFILL_POSITIONS positions at once, ms."""


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_entry_costs(runtime: Runtime, *, steps: int = 8, layers: int = 2) -> EntryCosts:
    """Time the entry pieces (the median of ``steps`` tokens) and a prefill through a
    throwaway shard of ``layers`` layers (the better of two). Runs on the worker thread."""
    shard = runtime.shard
    sampler = Sampler(SamplingParams())
    device = runtime.device
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x = shard.embed([1 + i])
        sampler.sample(shard.head(x))
        _synchronize(device)
        if i:  # the first warms up
            times.append((time.perf_counter() - t0) * 1000)
    head_ms = statistics.median(times)
    n = min(layers, runtime.num_layers)
    probe = open_shard(runtime.prepared, 0, n, weights=runtime.engine.weights, device=device)
    prompt = [1 + (i % 100) for i in range(PREFILL_POSITIONS)]
    best = float("inf")
    for attempt in range(2):
        session_id = f"measure-prefill-{attempt}"
        x = probe.embed(prompt)
        _synchronize(device)
        t0 = time.perf_counter()
        probe.forward(session_id, x, 0)
        _synchronize(device)
        best = min(best, (time.perf_counter() - t0) * 1000)
        probe.drop(session_id)
    return EntryCosts(head_ms=head_ms, prefill_ms_per_layer=best / max(1, n))
