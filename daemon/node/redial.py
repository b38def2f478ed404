"""Where and when to dial a peer again: the addresses discovery gives, and backoff per address.

`DialBackoff`: a peer that died leaves its mDNS record behind for a while, and a `--join`
address may point at a node that is down. Dialling such an address again after 1 s, then 2,
4, 8, 16 and at most every 30 s costs little; a success forgets the failures. Each run of
failures is worth one line in the event log (the first), and the success that ends it
another; the failures in between are only debug lines. Sans-IO: every input carries ``now``.

`PeerAddresses`: mDNS is unauthenticated, so anyone on the LAN can send a goodbye or a record
with another address for a node. Such a record never touches a link that is up (heartbeats
and `Bye` decide when a link ends) and never redirects the dials to that peer while it is
linked: an address seen then is only tried after the link is gone, in turn with the address
that last linked, and becomes the peer's address only once a dial there reached that very
node (the offer is signed for its node id, and with a mesh key the answer proves it).
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


class PeerAddresses:
    """The signaling address of each compatible peer that discovery sees, by node id.

    ``linked`` in each call: whether the peer has a link that is up now."""

    def __init__(self) -> None:
        self._address: dict[str, str] = {}
        """The address to dial: the last one seen while the peer was not linked, or the
        last one a dial reached it at."""
        self._other: dict[str, str] = {}
        """An address seen while the peer was linked, not confirmed yet."""
        self._turn: dict[str, int] = {}

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._address or peer_id in self._other

    def seen(self, peer_id: str, address: str, *, linked: bool) -> None:
        """Discovery reports the peer at ``address``."""
        known = self._address.get(peer_id)
        if known is None and not linked:
            self._address[peer_id] = address
        elif address == known:
            self._other.pop(peer_id, None)
        elif linked:
            self._other[peer_id] = address  # tried only once the link is gone
        else:
            self._address[peer_id] = address
            self._other.pop(peer_id, None)

    def gone(self, peer_id: str, *, linked: bool) -> bool:
        """Discovery says the peer left (a goodbye, or its record expired). Forgotten unless
        it is linked (then the link decides); True when forgotten."""
        if linked:
            return False
        self.forget(peer_id)
        return True

    def forget(self, peer_id: str) -> None:
        """The peer left for sure (it said `Bye`): dial it no more until it is seen again."""
        self._address.pop(peer_id, None)
        self._other.pop(peer_id, None)
        self._turn.pop(peer_id, None)

    def next_address(self, peer_id: str) -> str | None:
        """The address to dial the peer at now: the known one and an unconfirmed one in
        turn, if there is one; None: discovery no longer sees the peer."""
        candidates = [a for a in (self._address.get(peer_id), self._other.get(peer_id)) if a is not None]
        if not candidates:
            return None
        turn = self._turn.get(peer_id, 0)
        self._turn[peer_id] = turn + 1
        return candidates[turn % len(candidates)]

    def reached(self, peer_id: str, address: str) -> None:
        """A dial of ``address`` linked to ``peer_id``: that is its address now."""
        if peer_id not in self:
            return
        self._address[peer_id] = address
        if self._other.get(peer_id) == address:
            del self._other[peer_id]
        self._turn.pop(peer_id, None)  # next time, this address first
