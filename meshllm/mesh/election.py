"""Coordinator election: a sans-IO bully election with terms.

One :class:`Election` per node. The daemon feeds it what happens (``start``, ``peer_up``,
``peer_lost``, ``receive``, ``handle_timer``), each with ``now`` in seconds, and drains it:
``outbox()`` (messages to send), ``next_timer()`` (when to call ``handle_timer``) and
``events()`` (what changed). It never reads the clock and never does I/O.

Rules, in short (``docs/election.md`` has the long form):

- Candidates are ranked by ``(score, node_id)``; higher wins. A peer's score is the one given
  with ``peer_up`` (from its hello, bounded: ``meshllm.mesh.settings.election_score``), never
  the one its messages carry.
- A peer cannot push the terms far or fast: a term more than ``MAX_TERM_STEP`` above the
  highest seen is refused, and so are its messages that would raise the term or start an
  election here beyond ``MAX_ELECTIONS`` in ``ELECTION_WINDOW_S``.
- A node with no coordinator (after a grace period at start, or when its coordinator is lost,
  or when no one claims the term it is waiting on) starts an election: ``term + 1``, an
  :class:`ElectionMsg` to every higher-ranked peer it knows.
- A higher-ranked node that gets an :class:`ElectionMsg` answers (:class:`AnswerMsg`) and runs
  in that term itself. A candidate that hears no answer within ``timeout_s`` (or knows no
  higher-ranked peer) declares itself coordinator for its term and broadcasts
  :class:`CoordinatorMsg`; one that was answered waits ``timeout_s`` for that claim and
  otherwise starts over with a higher term.
- Terms only grow. Anything with a term below the highest seen is ignored; a higher term is
  adopted at once (and a coordinator of an older term is dropped). A claim for the current
  term from a lower-ranked node makes a higher-ranked node take over with ``term + 1``, so
  after a partition heals one coordinator remains, the highest-ranked, with the highest term.
- A coordinator re-broadcasts its claim every ``announce_interval_s`` and sends it to every
  peer that comes up, which repairs lost messages and tells stale nodes the current term.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

MAX_TERM = 2**53
"""The highest term a node takes up. Terms grow by one an election; a claim beyond this is a
hostile or broken peer's (taking it up, the next term would not even encode)."""

MAX_TERM_STEP = 2**16
"""How far above the highest term this node has seen a message's term may be: honest terms
grow by one or two an election, so only a mesh that held 65,536 elections since this node
last heard of it sends more. With `MAX_ELECTIONS` a rogue member needs about 2,000 years to
push the terms to `MAX_TERM`."""

FAR_CLAIM_S = 10.0
"""A claim to coordinate a term beyond `MAX_TERM_STEP` (but within twice that) that its sender
keeps making for this long (its announcements) is taken up: a node that a rogue pushed to
the bound, and whose next election went one beyond it, is not cut off for good."""

MAX_ELECTIONS = 4
ELECTION_WINDOW_S = 2.0
"""A peer may make this node raise its term, or start an election, at most `MAX_ELECTIONS`
times in any `ELECTION_WINDOW_S` (two elections a second); its messages beyond that are
refused (ValueError), so that an election storm from one member leaves a stable coordinator."""

BROADCAST: Final = "*"
"""Destination in :meth:`Election.outbox` meaning "every peer that is up"."""


# ---- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElectionMsg:
    """"I am running for coordinator in ``term``": sent to higher-ranked peers."""

    term: int
    candidate_id: str
    score: float
    """The candidate's score as it says it; a receiver ranks it by the score it has for it
    (from its hello) instead."""


@dataclass(frozen=True)
class AnswerMsg:
    """"I outrank you and I am alive; I take over": the reply to an :class:`ElectionMsg`."""

    term: int
    """The answerer's term (at least the election's)."""
    node_id: str


@dataclass(frozen=True)
class CoordinatorMsg:
    """"I am the coordinator for ``term``": always sent by the coordinator itself."""

    term: int
    node_id: str


Message = ElectionMsg | AnswerMsg | CoordinatorMsg


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TermRaised:
    """The highest term this node has seen grew."""

    term: int
    """The new term."""


@dataclass(frozen=True)
class ElectionStarted:
    """This node runs for coordinator in ``term``."""

    term: int


@dataclass(frozen=True)
class CoordinatorElected:
    """This node now follows ``node_id`` (possibly itself) as coordinator for ``term``."""

    term: int
    node_id: str


@dataclass(frozen=True)
class CoordinatorLost:
    """This node has no coordinator any more (lost, or its term was superseded)."""

    term: int
    """The current term when it happened."""
    node_id: str
    """The coordinator that was dropped."""


Event = TermRaised | ElectionStarted | CoordinatorElected | CoordinatorLost


class Role(enum.StrEnum):
    MEMBER = "member"
    CANDIDATE = "candidate"
    COORDINATOR = "coordinator"


class _Timer(enum.Enum):
    WAIT_FOR_COORDINATOR = enum.auto()
    """No coordinator: start an election if none is claimed by the deadline."""
    WAIT_FOR_ANSWERS = enum.auto()
    """Candidate: declare victory if no higher-ranked peer answers by the deadline."""
    ANNOUNCE = enum.auto()
    """Coordinator: re-broadcast the claim."""


Rank = tuple[float, str]


class _PeerBounds:
    """What each peer may make this node do: `MAX_ELECTIONS` in `ELECTION_WINDOW_S`, and a
    far claim only once kept for `FAR_CLAIM_S`."""

    def __init__(self) -> None:
        self._elections: dict[str, deque[float]] = {}
        """When each peer last made this node raise its term or start an election."""
        self._far: dict[str, tuple[int, float]] = {}
        """A peer's claim of a term beyond `MAX_TERM_STEP`, and since when it makes it."""

    def charge(self, sender_id: str, now: float) -> None:
        """`sender_id` makes this node raise its term or start an election: one of its
        `MAX_ELECTIONS` in `ELECTION_WINDOW_S`; ValueError beyond them."""
        seen = self._elections.setdefault(sender_id, deque())
        while seen and now - seen[0] >= ELECTION_WINDOW_S:
            seen.popleft()
        if len(seen) >= MAX_ELECTIONS:
            raise ValueError(f"more than {MAX_ELECTIONS} elections in {ELECTION_WINDOW_S:g} s from {sender_id}")
        seen.append(now)

    def far_claim_kept(self, sender_id: str, msg: Message, term: int, now: float) -> bool:
        """A claim beyond `MAX_TERM_STEP` above `term` (within twice that) that its sender has
        kept making for `FAR_CLAIM_S` (see there)."""
        if not isinstance(msg, CoordinatorMsg) or msg.term > term + 2 * MAX_TERM_STEP:
            return False
        claimed, since = self._far.get(sender_id, (-1, now))
        if claimed != msg.term:
            self._far[sender_id] = (msg.term, now)
            return False
        if now - since < FAR_CLAIM_S:
            return False
        del self._far[sender_id]
        return True

    def forget(self, sender_id: str) -> None:
        self._elections.pop(sender_id, None)
        self._far.pop(sender_id, None)


class Election:
    """The election state machine of one node."""

    def __init__(
        self,
        node_id: str,
        score: float,
        *,
        timeout_s: float = 1.0,
        announce_interval_s: float = 5.0,
    ) -> None:
        if timeout_s <= 0 or announce_interval_s <= 0:
            raise ValueError("timeout_s and announce_interval_s must be > 0")
        self.node_id = node_id
        self.score = score
        self.timeout_s = timeout_s
        self.announce_interval_s = announce_interval_s
        self._term = 0
        self._role = Role.MEMBER
        self._coordinator: str | None = None
        self._peers: dict[str, float] = {}
        self._timer: _Timer | None = None
        self._deadline: float | None = None
        self._outbox: list[tuple[str, Message]] = []
        self._events: list[Event] = []
        self._bounds = _PeerBounds()
        self._claims: dict[str, int] = {}
        """The highest term each peer claimed to coordinate (claims overruled here included)."""

    # ---- what the daemon reads ---------------------------------------------------------------

    @property
    def term(self) -> int:
        """The highest term this node has seen."""
        return self._term

    @property
    def coordinator_id(self) -> str | None:
        """The coordinator this node follows in the current term, or None during an election."""
        return self._coordinator

    @property
    def role(self) -> Role:
        return self._role

    @property
    def rank(self) -> Rank:
        return (self.score, self.node_id)

    @property
    def peers(self) -> dict[str, float]:
        """Peers that are up, with their scores (a copy)."""
        return dict(self._peers)

    def claimed(self, node_id: str) -> int:
        """The highest term `node_id` claimed to coordinate, as heard here (0: none)."""
        if node_id == self.node_id:
            return self._term if self._role is Role.COORDINATOR else 0
        return self._claims.get(node_id, 0)

    def accepts_term(self, term: int) -> bool:
        """Whether something stamped with ``term`` (a plan) may be acted on: not below the max."""
        return term >= self._term

    def outbox(self) -> list[tuple[str, Message]]:
        """Messages to send, as ``(destination node id or BROADCAST, message)``; clears them."""
        out, self._outbox = self._outbox, []
        return out

    def next_timer(self) -> float | None:
        """When ``handle_timer`` should next be called, or None."""
        return self._deadline

    def events(self) -> list[Event]:
        """What changed since the last call; clears them."""
        out, self._events = self._events, []
        return out

    # ---- what the daemon feeds ---------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: wait ``timeout_s`` to hear a coordinator, then run if none was heard."""
        if self._coordinator is None and self._timer is None:
            self._arm(_Timer.WAIT_FOR_COORDINATOR, now + self.timeout_s)

    def peer_up(self, node_id: str, score: float, now: float) -> None:
        """A peer is reachable (or its score changed). Messages from unknown peers are ignored."""
        if node_id == self.node_id:
            return
        self._peers[node_id] = score
        if self._role is Role.COORDINATOR:
            self._send(node_id, CoordinatorMsg(self._term, self.node_id))
        elif self._timer is _Timer.WAIT_FOR_ANSWERS and (score, node_id) > self.rank:
            self._send(node_id, ElectionMsg(self._term, self.node_id, self.score))

    def peer_lost(self, node_id: str, now: float) -> None:
        """A peer is gone; losing the coordinator starts an election."""
        self._peers.pop(node_id, None)
        self._bounds.forget(node_id)
        self._claims.pop(node_id, None)
        if node_id == self._coordinator and node_id != self.node_id:
            self._drop_coordinator()
            self._start_election(now)

    def receive(self, sender_id: str, msg: Message, now: float) -> None:
        """A message from ``sender_id``. Refused (ValueError): a term above `MAX_TERM` (no
        honest node gets there, one election at a time, and the next term must stay
        encodable), a term more than `MAX_TERM_STEP` above the highest seen here, and a
        message that would raise the term, or start an election here, beyond the sender's
        `MAX_ELECTIONS` in `ELECTION_WINDOW_S`. A candidate is ranked by the score this node
        has for it (`peer_up`: from its hello), never by the score its message carries."""
        if sender_id not in self._peers:
            log.debug("%s: ignoring %r from unknown peer %s", self.node_id, msg, sender_id)
            return
        if msg.term > MAX_TERM:
            raise ValueError(f"term {msg.term} is beyond {MAX_TERM}")
        if msg.term > self._term + MAX_TERM_STEP and not self._bounds.far_claim_kept(sender_id, msg, self._term, now):
            raise ValueError(f"term {msg.term} is more than {MAX_TERM_STEP} above {self._term}, the highest seen here")
        if msg.term > self._term:
            self._bounds.charge(sender_id, now)
        if isinstance(msg, ElectionMsg):
            self._on_election(sender_id, msg, now)
        elif isinstance(msg, AnswerMsg):
            self._on_answer(msg, now)
        elif isinstance(msg, CoordinatorMsg):
            self._on_coordinator(sender_id, msg, now)
        else:
            raise TypeError(f"not an election message: {msg!r}")

    def handle_timer(self, now: float) -> None:
        """Act on the timer if its deadline has passed (early calls do nothing)."""
        if self._deadline is None or now < self._deadline:
            return
        timer = self._timer
        self._disarm()
        if timer is _Timer.WAIT_FOR_COORDINATOR:
            self._start_election(now)
        elif timer is _Timer.WAIT_FOR_ANSWERS:
            self._declare(now)
        elif timer is _Timer.ANNOUNCE:
            self._send(BROADCAST, CoordinatorMsg(self._term, self.node_id))
            self._arm(_Timer.ANNOUNCE, now + self.announce_interval_s)

    # ---- message handlers --------------------------------------------------------------------

    def _on_election(self, sender_id: str, msg: ElectionMsg, now: float) -> None:
        self._observe_term(msg.term, now)
        if self._peer_rank(sender_id) >= self.rank:
            return  # a higher-ranked candidate: it will win; nothing to answer
        self._send(sender_id, AnswerMsg(self._term, self.node_id))
        if self._role is Role.COORDINATOR:
            # Our claim is for a term >= msg.term (a higher one would have dropped it).
            self._send(sender_id, CoordinatorMsg(self._term, self.node_id))
        elif self._role is Role.CANDIDATE:
            pass  # already running in this term
        elif self._coordinator is None or self._peer_rank(self._coordinator) < self.rank:
            self._run(now)
        # else: we follow a live, higher-ranked coordinator of this term; it answers the candidate.

    def _on_answer(self, msg: AnswerMsg, now: float) -> None:
        self._observe_term(msg.term, now)
        if self._timer is _Timer.WAIT_FOR_ANSWERS and msg.term == self._term:
            # A higher-ranked node takes over; wait for its claim.
            self._arm(_Timer.WAIT_FOR_COORDINATOR, now + self.timeout_s)

    def _on_coordinator(self, sender_id: str, msg: CoordinatorMsg, now: float) -> None:
        if msg.node_id != sender_id:
            log.debug("%s: ignoring a claim for %s relayed by %s",
                      self.node_id, msg.node_id, sender_id)
            return
        if msg.term < self._term:
            if self._role is Role.COORDINATOR:  # tell the stale one the current term
                self._send(sender_id, CoordinatorMsg(self._term, self.node_id))
            return
        charged = msg.term > self._term  # `receive` counted it already
        self._claims[sender_id] = max(self._claims.get(sender_id, 0), msg.term)
        self._observe_term(msg.term, now)
        claimant = self._peer_rank(sender_id)
        current = self._coordinator
        if current is not None and current != sender_id:
            if self._peer_rank(current) > claimant:
                # Two claims for one term: keep the higher-ranked one; if that is us, say so.
                if current == self.node_id:
                    self._send(sender_id, CoordinatorMsg(self._term, self.node_id))
                return
            # A higher-ranked claim for a term that already has a coordinator here (a node that
            # restarted and declared before it heard of it): the plans of the term so far
            # would outrank the newcomer's, so a new term settles it, and the highest-ranked
            # node wins it.
            if not charged:
                self._bounds.charge(sender_id, now)
            self._start_election(now)
            return
        if claimant < self.rank:
            # A lower-ranked claim and no higher coordinator: the bully takes over, in a new term.
            if not charged:
                self._bounds.charge(sender_id, now)
            self._start_election(now)
            return
        self._follow(sender_id)

    # ---- transitions -------------------------------------------------------------------------

    def _observe_term(self, term: int, now: float) -> None:
        """Adopt a higher term; a coordinator of an older term is no longer one."""
        if term <= self._term:
            return
        self._term = term
        self._events.append(TermRaised(term))
        if self._coordinator is not None:
            self._drop_coordinator()
        self._role = Role.MEMBER
        self._arm(_Timer.WAIT_FOR_COORDINATOR, now + self.timeout_s)

    def _start_election(self, now: float) -> None:
        self._term += 1
        self._events.append(TermRaised(self._term))
        self._run(now)

    def _run(self, now: float) -> None:
        """Run for coordinator in the current term."""
        if self._coordinator is not None:
            self._drop_coordinator()
        self._role = Role.CANDIDATE
        self._events.append(ElectionStarted(self._term))
        higher = sorted(
            peer_id for peer_id, score in self._peers.items() if (score, peer_id) > self.rank
        )
        if not higher:
            self._declare(now)
            return
        for peer_id in higher:
            self._send(peer_id, ElectionMsg(self._term, self.node_id, self.score))
        self._arm(_Timer.WAIT_FOR_ANSWERS, now + self.timeout_s)

    def _declare(self, now: float) -> None:
        self._role = Role.COORDINATOR
        self._coordinator = self.node_id
        self._events.append(CoordinatorElected(self._term, self.node_id))
        log.info("%s: coordinator for term %d", self.node_id, self._term)
        self._send(BROADCAST, CoordinatorMsg(self._term, self.node_id))
        self._arm(_Timer.ANNOUNCE, now + self.announce_interval_s)

    def _follow(self, coordinator_id: str) -> None:
        if self._coordinator == coordinator_id and self._role is Role.MEMBER:
            return  # a repeated claim
        self._role = Role.MEMBER
        self._coordinator = coordinator_id
        self._disarm()
        self._events.append(CoordinatorElected(self._term, coordinator_id))

    def _drop_coordinator(self) -> None:
        assert self._coordinator is not None
        self._events.append(CoordinatorLost(self._term, self._coordinator))
        self._coordinator = None
        if self._role is Role.COORDINATOR:
            self._role = Role.MEMBER
            self._disarm()

    # ---- plumbing ----------------------------------------------------------------------------

    def _peer_rank(self, node_id: str) -> Rank:
        if node_id == self.node_id:
            return self.rank
        return (self._peers.get(node_id, float("-inf")), node_id)

    def _send(self, dest: str, msg: Message) -> None:
        self._outbox.append((dest, msg))

    def _arm(self, timer: _Timer, deadline: float) -> None:
        self._timer, self._deadline = timer, deadline

    def _disarm(self) -> None:
        self._timer, self._deadline = None, None
