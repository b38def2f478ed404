"""What every shard shares, whatever its layers: a span, per-session KV caches, and the rules
a step must follow to use them."""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

CacheT = TypeVar("CacheT")


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

    def _cached_positions(self, cache: CacheT) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

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
