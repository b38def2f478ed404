"""Who may send what: the checks of a message against its sender's role, and the bookkeeping
of what was refused and of a peer's faults (pure, sans-IO).

- A session id names its entry node: ``<entry node id>/<counter>`` (`session_entry`).
- A step (`Forward`, `Rebuild`) comes to a stage only from the stage before it in the plan,
  or, to the first stage, from the session's entry node; it carries the rest of the plan's
  chain and then the entry node as its route (`step_sources`).
- What a peer sends that its role does not allow is refused: logged once per peer and kind
  of message, and counted by kind (`Refusals`, in the mesh status as ``refused``).
- What a peer's message makes a handler raise unexpectedly is counted against that peer's
  budget of bad frames (`PeerFaults`, kept by the driver): too many end its link.
"""

from __future__ import annotations

import logging
from collections import deque

from meshllm.mesh.plans import PlanView

log = logging.getLogger(__name__)


def session_entry(session_id: str) -> str | None:
    """The entry node a session id names (``node/counter``), or None for a malformed id."""
    entry, slash, counter = session_id.rpartition("/")
    return entry if slash and entry and counter.isdigit() else None


def step_sources(plan: PlanView, me: str, entry: str) -> dict[str, tuple[str, ...]]:
    """Who may send `me` a step of a session entered at `entry` under `plan`, each with the
    route the step then carries: the stage before `me` (for the first stage: the entry node),
    and the stages after `me`, then the entry node (where the result goes)."""
    ids = plan.node_ids
    sources: dict[str, tuple[str, ...]] = {}
    for i, node in enumerate(ids):
        previous = ids[i - 1] if i > 0 else entry
        if node == me and previous != me:
            sources[previous] = ids[i + 1:] + (entry,)
    return sources


class Refusals:
    """Messages refused for their sender's role (or their content), by kind of message: each
    is logged once per peer and kind (then only at debug level: no log flood), and counted."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.counts: dict[str, int] = {}
        self._said: set[tuple[str, str]] = set()

    def refused(self, peer: str, kind: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if (peer, kind) in self._said:
            log.debug("%s: refused %s from %s: %s", self.node_id, kind, peer, reason)
            return
        self._said.add((peer, kind))
        log.warning("%s: refused %s from %s: %s (more of these from it are only counted)",
                    self.node_id, kind, peer, reason)

    def forget(self, peer: str) -> None:
        """The peer's link went down: a new one is logged afresh."""
        self._said = {said for said in self._said if said[0] != peer}

    def as_json(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class PeerFaults:
    """What each peer's messages made a handler raise, in a sliding window (the link layer's
    bad-frame budget: 5 in 10 s by default). Each is logged (with its traceback the first
    time per peer and kind of error); `failed` says when a peer is over the budget."""

    def __init__(self, limit: int = 5, window_s: float = 10.0) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("need limit >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._seen: dict[str, deque[float]] = {}
        self._logged: set[tuple[str, str]] = set()

    def failed(self, peer: str, kind: str, error: Exception, now: float) -> bool:
        """A `kind` message from `peer` made a handler raise `error` at `now`; True when the
        peer is over its budget (then its count starts afresh)."""
        first = (peer, type(error).__name__) not in self._logged
        self._logged.add((peer, type(error).__name__))
        log.warning("%s from %s failed here (%s: %s)%s", kind, peer, type(error).__name__, error,
                    "" if first else " again", exc_info=error if first else None)
        seen = self._seen.setdefault(peer, deque())
        seen.append(now)
        while seen and now - seen[0] > self.window_s:
            seen.popleft()
        if len(seen) < self.limit:
            return False
        del self._seen[peer]
        return True

    def count(self, peer: str) -> int:
        """The peer's faults in the window (as of its last one)."""
        return len(self._seen.get(peer, ()))
