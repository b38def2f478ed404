"""The private layers: the first and last K decoder layers that an entry node runs for its own
answers, so that what crosses a link is neither a prompt token's embedding nor the hidden
state the head reads (``--private-layers K``; docs/security.md).

With K private layers a plan places only ``[K, L - K)``. The entry node of an answer runs
``[0, K)`` after the embedding, before anything leaves it, and ``[L - K, L)`` before its head,
after the last stage's result came back. Every node holds both ends, for its own answers only:
their KV caches are those of its own sessions and never move. The arithmetic is the same
layers' in the same order, so an answer is token for token what one node answers.

A rebuild (meshllm.mesh.rebuild) needs the input of the plan's first layer again, for positions
whose private caches are intact: `rebuild_input` recomputes it in a scratch cache, in the
original steps, so the first stage gets the very bits it got the first time.
"""

from __future__ import annotations

import numpy as np
import torch

from meshllm.mesh.rebuild import steps
from meshllm.model.adapter import Adapter
from meshllm.model.span import ShardLike

SCRATCH_SUFFIX = "#private-rebuild"
"""The scratch session of a rebuild's recomputation: `session_id + SCRATCH_SUFFIX`."""


def private_layers_for(num_layers: int, wanted: int) -> int:
    """The private layers a model of `num_layers` layers can keep: `wanted`, but at most as
    many as leave one layer between the two ends for the mesh to place."""
    if wanted < 0:
        raise ValueError(f"private layers must be >= 0, got {wanted}")
    return min(wanted, (num_layers - 1) // 2)


class PrivateLayers:
    """Layers ``[0, K)`` (`head_end`) and ``[L - K, L)`` (`tail_end`) with their sessions' caches."""

    def __init__(self, head_end: ShardLike, tail_end: ShardLike) -> None:
        layers = int(tail_end.config.num_hidden_layers)
        if head_end.start_layer != 0 or tail_end.end_layer != layers or \
                head_end.num_span_layers != tail_end.num_span_layers:
            raise ValueError(f"private layers must be [0, K) and [{layers} - K, {layers}), got "
                             f"{head_end.span} and {tail_end.span}")
        self.head_end = head_end
        self.tail_end = tail_end

    @property
    def count(self) -> int:
        """K: layers at each end."""
        return self.head_end.end_layer

    def into(self, session_id: str, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The embedded step `x` (1, positions, hidden) through layers ``[0, K)``."""
        return _step(self.head_end, session_id, x, start_pos)

    def out_of(self, session_id: str, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The plan's output `x` through layers ``[L - K, L)``, for the head."""
        return _step(self.tail_end, session_id, x, start_pos)

    def into_batch(self, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
        """`into` for the steps (session id, x, start) of several sessions, in one forward."""
        return _batch(self.head_end, steps)

    def out_of_batch(self, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
        """`out_of` for the steps of several sessions, in one forward."""
        return _batch(self.tail_end, steps)

    def rebuild_input(self, session_id: str, x: np.ndarray, start_pos: int, position: int, prefill: int) -> np.ndarray:
        """Layers ``[0, K)`` over the embedded positions ``[start_pos, start_pos + len(x))`` of
        a rebuild of `position` positions whose first step ran `prefill`: recomputed in a scratch
        cache (the session's own caches hold these positions already), step by step as the
        answer ran them unless the layers are batch-invariant. Parts come in order; the scratch
        cache goes with the last one."""
        scratch = session_id + SCRATCH_SUFFIX
        end = start_pos + x.shape[0]
        outs = []
        for s, e in steps(start_pos, end, prefill, self.head_end.batch_invariant):
            step = torch.from_numpy(np.ascontiguousarray(x[s - start_pos:e - start_pos])).unsqueeze(0)
            outs.append(self.head_end.forward(scratch, step, s)[0].float().cpu().numpy())
        if end >= position:
            self.head_end.drop(scratch)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def drop(self, session_id: str) -> None:
        for shard in (self.head_end, self.tail_end):
            shard.drop(session_id)
        self.head_end.drop(session_id + SCRATCH_SUFFIX)

    def set_adapter(self, adapter: Adapter | None) -> None:
        for shard in (self.head_end, self.tail_end):
            shard.set_adapter(adapter)


def _step(shard: ShardLike, session_id: str, x: torch.Tensor, start_pos: int) -> torch.Tensor:
    """One step of a session's own: a step sent again after it was lost further on (its
    rebuild, or a retry) ran here already, and runs again on the caches as they were before
    it, which gives the same bits."""
    _rewind(shard, session_id, start_pos)
    return shard.forward(session_id, x, start_pos)


def _batch(shard: ShardLike, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
    for session_id, _x, start_pos in steps:
        _rewind(shard, session_id, start_pos)
    return shard.forward_batch(steps)


def _rewind(shard: ShardLike, session_id: str, start_pos: int) -> None:
    if 0 < start_pos < shard.cache_length(session_id):
        shard.keep_layers(session_id, 0, shard.num_span_layers, start_pos)
