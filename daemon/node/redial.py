"""When to dial a peer's address again after a failed dial: exponential backoff per address.

A peer that died leaves its mDNS record behind for a while, and a `--join` address may point
at a node that is down. Dialling such an address again after 1 s, then 2, 4, 8, 16 and at
most every 30 s costs little; a success forgets the failures. Each run of failures is worth
one line in the event log (the first), and the success that ends it another; the failures in
between are only debug lines. Sans-IO: every input carries ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0


@dataclass
class _Failures:
    count: int
    next_dial_at: float


class DialBackoff:
    """The failures of each address since its last successful dial."""

    def __init__(self, first_delay_s: float = FIRST_DELAY_S, max_delay_s: float = MAX_DELAY_S) -> None:
        if not 0 < first_delay_s <= max_delay_s:
            raise ValueError("need 0 < first_delay_s <= max_delay_s")
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._failing: dict[str, _Failures] = {}

    def may_dial(self, address: str, now: float) -> bool:
        """True when `address` has no failure waiting out its delay."""
        return self.wait_s(address, now) == 0.0

    def wait_s(self, address: str, now: float) -> float:
        """Seconds until `address` may be dialled again (0: now)."""
        failures = self._failing.get(address)
        return 0.0 if failures is None else max(0.0, failures.next_dial_at - now)

    def failed(self, address: str, now: float) -> bool:
        """A dial of `address` failed at `now`. True when this is the first failure since the
        address last linked (the one to report)."""
        failures = self._failing.get(address)
        count = 1 if failures is None else failures.count + 1
        self._failing[address] = _Failures(count, now + self.delay_after(count))
        return count == 1

    def succeeded(self, address: str) -> int:
        """A dial of `address` linked: its failures are forgotten. How many there were (a
        non-zero count is worth reporting: the address links again)."""
        failures = self._failing.pop(address, None)
        return 0 if failures is None else failures.count

    def delay_after(self, failures: int) -> float:
        """The wait after `failures` failures in a row: 1 s, 2, 4, ... at most `max_delay_s`."""
        if failures < 1:
            return 0.0
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** min(failures - 1, 62))
