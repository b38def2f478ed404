"""Tokens per second of an answer as it streams (sans-IO: the caller passes ``now``)."""

from __future__ import annotations


class TokenRate:
    """Counts tokens; the rate runs from the first token to the latest one.

    Time to the first token (prompt processing, queueing) is left out, so the rate is the
    decode speed a person watches.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self._first_s: float | None = None
        self._last_s: float | None = None

    def add(self, tokens: int, now: float) -> None:
        if tokens <= 0:
            return
        if self._first_s is None:
            self._first_s = now
        self.tokens += tokens
        self._last_s = now

    def settle(self, total_tokens: int, now: float) -> None:
        """The answer is over and the daemon counted ``total_tokens``: that is the true total.

        Text pieces undercount: a piece can join several tokens (a character split across
        tokens shows with the last one), and the end-of-sequence token shows no text. The
        rate then runs from the first token to ``now``, the end of the answer.
        """
        self.tokens = max(0, total_tokens)
        if self._first_s is not None:
            self._last_s = now

    def per_s(self) -> float | None:
        """None until two tokens have arrived some time apart."""
        if self._first_s is None or self._last_s is None or self._last_s <= self._first_s:
            return None
        return (self.tokens - 1) / (self._last_s - self._first_s)
