"""What every shard is, whatever its layers: the interface the runtime and the engine call
(`ShardLike`), and what every kind of shard shares to offer it (`SpanSessions`: a span,
per-session KV caches, and the rules a step must follow to use them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from meshllm.model.adapter import Adapter

CacheT = TypeVar("CacheT")


class ShardLike(Protocol):
    """A shard of any kind: embedding, final norm and head, plus the decoder layers
    [start_layer, end_layer) with a KV cache per session (`meshllm.model.shard.Shard`:
    transformers' f32 layers; `meshllm.model.lean.LeanShard`: the quantized lean decoder).
    Hidden states are (1, positions, hidden). Also the rebuild's `LayerStore`."""

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def weights(self) -> str:
        """The weight format in memory (f32, f16, int8, int4)."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def start_layer(self) -> int: ...

    @property
    def end_layer(self) -> int: ...

    @property
    def span(self) -> tuple[int, int]: ...

    @property
    def num_span_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes of the weights held (an adapter's included)."""
        ...

    @property
    def batch_invariant(self) -> bool:
        """Whether a position's hidden states have the same bits whatever the step computing it."""
        ...

    @property
    def session_ids(self) -> tuple[str, ...]: ...

    def set_adapter(self, adapter: Adapter | None) -> None: ...

    def embed(self, token_ids: list[int]) -> torch.Tensor: ...

    def forward(self, session_id: str, hidden: torch.Tensor, start_pos: int) -> torch.Tensor: ...

    def forward_batch(self, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
        """`forward` for the steps (session id, hidden states, start) of several sessions at
        once, each output in order (one forward where the shard batches, else one by one)."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the last position (vocab,), on the CPU."""
        ...

    def logits_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of every position (positions, vocab), on the CPU."""
        ...

    def cache_length(self, session_id: str) -> int: ...

    def drop(self, session_id: str) -> None: ...

    def export_layers(self, lo: int, hi: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]: ...

    def adopt_sessions(self, old: ShardLike) -> None: ...

    def layer_lengths(self, session_id: str) -> list[int]: ...

    def keep_layers(self, session_id: str, lo: int, hi: int, positions: int) -> None: ...

    def run_layers(self, session_id: str, x: np.ndarray, start_pos: int, lo: int, hi: int) -> np.ndarray: ...

    def install_layer(self, session_id: str, layer: int, k: np.ndarray, v: np.ndarray) -> bool: ...


class SpanSessions(Generic[CacheT]):
    """Layers [start_layer, end_layer) and one KV cache per session, at most `max_sessions`."""

    def __init__(self, start_layer: int, end_layer: int, num_layers: int, max_sessions: int) -> None:
        if not 0 <= start_layer <= end_layer <= num_layers:
            raise ValueError(f"span [{start_layer}, {end_layer}) is outside [0, {num_layers})")
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.max_sessions = max_sessions
        self._caches: dict[str, CacheT] = {}

    # what a shard says about its caches
    def _new_cache(self) -> CacheT:  # pragma: no cover - abstract
        raise NotImplementedError

    def _layer_lengths(self, cache: CacheT) -> list[int]:  # pragma: no cover - abstract
        """Positions cached for each layer of the span (they differ only during a rebuild)."""
        raise NotImplementedError

    def _keep(self, cache: CacheT, lo: int, hi: int, positions: int) -> CacheT:  # pragma: no cover
        """The cache with layers [lo, hi) cut to `positions` and the others emptied."""
        raise NotImplementedError

    def _adopt(self, cache: CacheT, offset: int, old_layers: int) -> CacheT:  # pragma: no cover
        """A cache for this span built from `cache` of another span of `old_layers` layers
        that starts `offset` layers above this one: the layers both hold keep their data."""
        raise NotImplementedError

    def _forward_layers(self, cache: CacheT, hidden: torch.Tensor, start_pos: int, lo: int,
                        hi: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Run span-local layers [lo, hi) on (1, positions, hidden) at start_pos."""
        raise NotImplementedError

    def _layer_kv(self, cache: CacheT, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:  # pragma: no cover
        """Keys and values `(kv_heads, positions, head_dim)` of span-local layer i, or None."""
        raise NotImplementedError

    def _set_layer_kv(self, cache: CacheT, i: int, k: torch.Tensor, v: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _cached_positions(self, cache: CacheT) -> int:
        """Positions every layer holds; -1 when the layers disagree."""
        lengths = set(self._layer_lengths(cache))
        return lengths.pop() if len(lengths) == 1 else (0 if not lengths else -1)

    @property
    def hidden_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_span_layers(self) -> int:
        return self.end_layer - self.start_layer

    def cache_length(self, session_id: str) -> int:
        cache = self._caches.get(session_id)
        return 0 if cache is None else self._cached_positions(cache)

    def drop(self, session_id: str) -> None:
        """Free a session's KV caches. Unknown ids are ignored."""
        self._caches.pop(session_id, None)

    def forward_batch(self, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
        """The steps of several sessions, one by one (a shard whose kernels batch overrides it)."""
        return [self.forward(session_id, hidden, start) for session_id, hidden, start in steps]  # type: ignore[attr-defined]

    # -- the rebuild's view (meshllm.mesh.rebuild.LayerStore) --------------------------------

    @property
    def span(self) -> tuple[int, int]:
        return (self.start_layer, self.end_layer)

    def layer_lengths(self, session_id: str) -> list[int]:
        cache = self._caches.get(session_id)
        return [0] * self.num_span_layers if cache is None else self._layer_lengths(cache)

    def keep_layers(self, session_id: str, lo: int, hi: int, positions: int) -> None:
        cache = self._caches.get(session_id)
        if cache is None:
            if len(self._caches) >= self.max_sessions:
                raise RuntimeError(f"too many sessions on this shard (limit {self.max_sessions})")
            cache = self._new_cache()
        self._caches[session_id] = self._keep(cache, lo, hi, positions)

    def run_layers(self, session_id: str, x: np.ndarray, start_pos: int, lo: int, hi: int) -> np.ndarray:
        cache = self._caches[session_id]
        lengths = self._layer_lengths(cache)
        if any(lengths[i] != start_pos for i in range(lo, hi)):
            raise ValueError(f"session {session_id}: layers [{lo}, {hi}) hold {lengths[lo:hi]} positions, "
                             f"the step starts at {start_pos}")
        hidden = torch.from_numpy(x).unsqueeze(0)
        out = self._forward_layers(cache, hidden, start_pos, lo, hi)
        return out[0].float().cpu().numpy()

    def export_layers(self, lo: int, hi: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
        """(session, layer, keys, values) of global layers [lo, hi) for every session: what a
        node hands over with the layers it gives up."""
        out = []
        for session_id, cache in self._caches.items():
            for layer in range(max(lo, self.start_layer), min(hi, self.end_layer)):
                kv = self._layer_kv(cache, layer - self.start_layer)
                if kv is not None and kv[0].shape[1] > 0:
                    out.append((session_id, layer, kv[0].float().cpu().numpy().copy(),
                                kv[1].float().cpu().numpy().copy()))
        return out

    def install_layer(self, session_id: str, layer: int, k: np.ndarray, v: np.ndarray) -> bool:
        """Take over a layer's keys and values handed over by another node; False when this
        span does not hold the layer or already holds positions of it (a late hand-over never
        replaces what a rebuild made: the rebuild cuts every layer to the session's length)."""
        if not self.start_layer <= layer < self.end_layer:
            return False
        i = layer - self.start_layer
        cache = self._caches.get(session_id)
        if cache is None:
            if len(self._caches) >= self.max_sessions:
                return False
            cache = self._caches[session_id] = self._new_cache()
        if self._layer_lengths(cache)[i] > 0:
            return False
        self._set_layer_kv(cache, i, torch.from_numpy(k), torch.from_numpy(v))
        return True

    def adopt_sessions(self, old: ShardLike) -> None:
        """Take over the caches `old` (another span of the same model, a shard of this kind)
        holds for the layers both spans share: a re-plan keeps what a node already computed."""
        if not isinstance(old, type(self)):
            raise TypeError(f"a {type(self).__name__} cannot take over the caches of a {type(old).__name__}")
        lo, hi = max(self.start_layer, old.start_layer), min(self.end_layer, old.end_layer)
        if lo >= hi:
            return
        for session_id, cache in old._caches.items():
            self._caches[session_id] = self._adopt(cache, old.start_layer - self.start_layer, old.num_span_layers)

    @property
    def session_ids(self) -> tuple[str, ...]:
        return tuple(self._caches)

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
            raise ValueError(f"hidden states must be (1, positions, {self.hidden_size}), got {tuple(hidden.shape)}")

    def _step_cache(self, session_id: str, hidden: torch.Tensor, start_pos: int) -> CacheT:
        """Check a step of hidden states (1, positions, hidden) at `start_pos`; the session's cache.

        The cache must hold exactly `start_pos` positions: prefill starts at 0, each decode
        step continues where the last one ended, and a replay starts again at 0 (a new cache).
        """
        self._check_hidden(hidden)
        cache = None if start_pos == 0 else self._caches.get(session_id)
        if cache is None:
            if start_pos != 0:
                raise ValueError(f"session {session_id} has no KV cache here; it must start at position 0")
            if session_id not in self._caches and len(self._caches) >= self.max_sessions:
                raise RuntimeError(f"too many sessions on this shard (limit {self.max_sessions})")
            cache = self._new_cache()
            self._caches[session_id] = cache
        have = self._cached_positions(cache)
        if have != start_pos:
            raise ValueError(f"session {session_id}: KV cache holds {have} positions, step starts at {start_pos}")
        return cache
