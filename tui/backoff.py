"""How long to wait before the next try to reach a daemon that went away (sans-IO)."""

from __future__ import annotations


class Backoff:
    """Exponential delays: ``initial_s``, then times ``factor`` each try, never above ``max_s``.

    ``reset()`` once the daemon answers again, so the next outage starts from short delays.
    """

    def __init__(self, *, initial_s: float = 0.5, max_s: float = 10.0, factor: float = 2.0) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1:
            raise ValueError("need 0 < initial_s <= max_s and factor >= 1")
        self._initial_s = initial_s
        self._max_s = max_s
        self._factor = factor
        self._next_s = initial_s
        self.attempts = 0
        """Tries since the last reset."""

    def next_delay_s(self) -> float:
        """The wait before the next try; each call counts one try."""
        delay_s = self._next_s
        self._next_s = min(self._max_s, self._next_s * self._factor)
        self.attempts += 1
        return delay_s

    def reset(self) -> None:
        self._next_s = self._initial_s
        self.attempts = 0
