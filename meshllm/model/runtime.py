"""What a mesh node runs on its worker thread: the entry side (embed, head, sample) and one span.

Hidden states cross this boundary as numpy float32 arrays `(positions, hidden)`, the form
the wire's tensor codecs take, so nothing above this module handles torch tensors.
"""

from __future__ import annotations

import logging
import time

import torch

from meshllm.mesh.jobs import Compute, Computed
from meshllm.model.cache import PreparedModel
from meshllm.model.engine import Engine, shard_ms_per_layer
from meshllm.model.sampling import Sampler
from meshllm.model.lean import LeanShard
from meshllm.model.shard import Shard, open_shard

log = logging.getLogger(__name__)


class Runtime:
    """The model side of one node: tokenizer and entry pieces always, layers of one span.

    Every method runs on the node's worker thread (torch work; `inference_mode` is entered
    by the worker).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.prepared: PreparedModel = engine.prepared
        self.shard: Shard | LeanShard = engine.shards[0]
        self.hidden_size = engine.info.hidden_size

    @classmethod
    def load(cls, prepared: PreparedModel, device: str = "cpu", weights: str = "f32") -> "Runtime":
        """Start holding no layers: only what an entry node needs (embedding, norm, head)."""
        return cls(Engine(prepared, spans=[], device=device, weights=weights))

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def span(self) -> tuple[int, int]:
        return (self.shard.start_layer, self.shard.end_layer)

    def load_span(self, start_layer: int, end_layer: int) -> None:
        """Hold layers [start_layer, end_layer) from now on; every KV cache is dropped."""
        if (start_layer, end_layer) == self.span:
            for sid in self.shard.session_ids:
                self.shard.drop(sid)
            return
        t0 = time.perf_counter()
        self.shard = open_shard(self.prepared, start_layer, end_layer, weights=self.engine.weights,
                                device=self.device)
        log.info("loaded layers [%d, %d) in %.0f ms", start_layer, end_layer, (time.perf_counter() - t0) * 1000)

    def compute(self, job: Compute, sampler: Sampler | None = None, delay_s: float = 0.0) -> Computed:
        """One mesh job: embed or take the hidden state, run the span, then hand the hidden
        state on, or sample with the head (`sampler`), or drop it (meshllm.mesh.jobs).

        `delay_s` is the testing aid of a slow device: a sleep before the layers, counted in
        their time."""
        if job.token_ids is not None:
            x = self.shard.embed(list(job.token_ids))  # (1, positions, hidden)
        else:
            assert job.hidden is not None
            x = torch.from_numpy(job.hidden).unsqueeze(0)
        span_ms = 0.0
        if job.run_span:
            t0 = time.perf_counter()
            if delay_s:
                time.sleep(delay_s)
            x = self.shard.forward(job.session_id, x, job.start_pos)
            span_ms = (time.perf_counter() - t0) * 1000
        if job.finish == "sample":
            if sampler is None:
                raise RuntimeError(f"no sampler for session {job.session_id}: the answer is over")
            return Computed(token_id=sampler.sample(self.shard.head(x)), span_ms=span_ms)
        if job.finish == "discard":
            return Computed(span_ms=span_ms)
        return Computed(hidden=x[0].cpu().numpy().copy(), span_ms=span_ms)

    def drop(self, session_id: str) -> None:
        self.shard.drop(session_id)

    def measure_ms_per_layer(self, layers: int = 2, steps: int = 8) -> float:
        """ms per decoder layer per token, measured on a throwaway shard of a few layers."""
        n = min(layers, self.engine.info.num_layers)
        return shard_ms_per_layer(open_shard(self.prepared, 0, n, weights=self.engine.weights,
                                             device=self.device), steps)
