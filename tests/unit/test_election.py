"""The bully election with terms, stepped with a fake clock over an in-memory network."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.mesh.election import (
    BROADCAST,
    AnswerMsg,
    CoordinatorElected,
    CoordinatorMsg,
    Election,
    ElectionMsg,
    ElectionStarted,
    Message,
    Role,
    TermRaised,
)

TIMEOUT_S = 1.0
ANNOUNCE_S = 5.0


@dataclass(order=True)
class _InFlight:
    deliver_at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    msg: Message = field(compare=False)


class Net:
    """Election nodes wired together in memory: links, partitions, drops, delays, a fake clock."""

    def __init__(
        self,
        scores: dict[str, float],
        *,
        rng: random.Random | None = None,
        drop_rate: float = 0.0,
        max_delay_s: float = 0.0,
    ) -> None:
        self.now = 0.0
        self.rng = rng or random.Random(0)
        self.drop_rate = drop_rate
        self.max_delay_s = max_delay_s
        self.scores = dict(scores)
        self.nodes = {
            node_id: Election(node_id, score, timeout_s=TIMEOUT_S, announce_interval_s=ANNOUNCE_S)
            for node_id, score in scores.items()
        }
        self.links: set[frozenset[str]] = set()
        self.in_flight: list[_InFlight] = []
        self.seq = itertools.count()
        self.max_term_seen = dict.fromkeys(scores, 0)
        self.claims: dict[int, set[str]] = {}  # term -> nodes that declared themselves for it
        for a, b in itertools.combinations(sorted(scores), 2):
            self.link_up(a, b)

    # -- topology --
    def link_up(self, a: str, b: str) -> None:
        if frozenset((a, b)) in self.links:
            return
        self.links.add(frozenset((a, b)))
        self.nodes[a].peer_up(b, self.scores[b], self.now)
        self.nodes[b].peer_up(a, self.scores[a], self.now)

    def link_down(self, a: str, b: str) -> None:
        if frozenset((a, b)) not in self.links:
            return
        self.links.discard(frozenset((a, b)))
        self.nodes[a].peer_lost(b, self.now)
        self.nodes[b].peer_lost(a, self.now)

    def partition(self, *groups: set[str]) -> None:
        side = {node_id: i for i, group in enumerate(groups) for node_id in group}
        for link in list(self.links):
            a, b = sorted(link)
            if side[a] != side[b]:
                self.link_down(a, b)

    def heal(self) -> None:
        for a, b in itertools.combinations(sorted(self.nodes), 2):
            self.link_up(a, b)

    def kill(self, node_id: str) -> None:
        for other in sorted(self.nodes):
            if other != node_id:
                self.link_down(node_id, other)
        del self.nodes[node_id]

    def neighbours(self, node_id: str) -> list[str]:
        return sorted(other for other in self.nodes if frozenset((node_id, other)) in self.links)

    # -- running --
    def start(self) -> None:
        for node in self.nodes.values():
            node.start(self.now)

    def _collect(self) -> None:
        for node_id, node in self.nodes.items():
            for dest, msg in node.outbox():
                targets = self.neighbours(node_id) if dest == BROADCAST else [dest]
                for target in targets:
                    if self.rng.random() < self.drop_rate:
                        continue
                    delay = self.rng.uniform(0, self.max_delay_s)
                    packet = _InFlight(self.now + delay, next(self.seq), node_id, target, msg)
                    self.in_flight.append(packet)
            for event in node.events():
                if isinstance(event, CoordinatorElected) and event.node_id == node_id:
                    self.claims.setdefault(event.term, set()).add(node_id)
            assert node.term >= self.max_term_seen[node_id], "a term went down"
            self.max_term_seen[node_id] = node.term

    def run(self, duration_s: float) -> None:
        end = self.now + duration_s
        while True:
            self._collect()
            timers = [t for node in self.nodes.values() if (t := node.next_timer()) is not None]
            next_msg = min(self.in_flight) if self.in_flight else None
            candidates = timers + ([next_msg.deliver_at] if next_msg else [])
            if not candidates or min(candidates) > end:
                break
            if next_msg is not None and next_msg.deliver_at <= min(timers, default=float("inf")):
                self.in_flight.remove(next_msg)
                self.now = max(self.now, next_msg.deliver_at)
                alive = next_msg.dst in self.nodes and next_msg.src in self.nodes
                if alive and frozenset((next_msg.src, next_msg.dst)) in self.links:
                    self.nodes[next_msg.dst].receive(next_msg.src, next_msg.msg, self.now)
            else:
                self.now = max(self.now, min(timers))
                for node in self.nodes.values():
                    node.handle_timer(self.now)
        self.now = max(self.now, end)

    # -- checks --
    def assert_one_coordinator(self, group: set[str] | None = None) -> Election:
        members = [self.nodes[n] for n in sorted(group or self.nodes)]
        coordinators = [node for node in members if node.role is Role.COORDINATOR]
        views = {n.node_id: (n.role, n.coordinator_id, n.term) for n in members}
        assert len(coordinators) == 1, views
        leader = coordinators[0]
        assert leader.rank == max(node.rank for node in members), "the highest-ranked node must win"
        for node in members:
            assert node.coordinator_id == leader.node_id
            assert node.term == leader.term
        return leader


def test_three_nodes_elect_the_highest_ranked() -> None:
    net = Net({"a": 1.0, "b": 3.0, "c": 2.0})
    net.start()
    net.run(10)
    leader = net.assert_one_coordinator()
    assert leader.node_id == "b"
    assert leader.term >= 1
    assert net.nodes["a"].role is Role.MEMBER


def test_equal_scores_are_broken_by_node_id() -> None:
    net = Net({"n-1": 5.0, "n-3": 5.0, "n-2": 5.0})
    net.start()
    net.run(10)
    assert net.assert_one_coordinator().node_id == "n-3"


def test_a_single_node_becomes_coordinator_after_the_grace_period() -> None:
    node = Election("solo", 1.0, timeout_s=2.0)
    node.start(now=100.0)
    assert node.next_timer() == 102.0
    node.handle_timer(101.0)  # too early: nothing happens
    assert node.coordinator_id is None
    node.handle_timer(102.0)
    assert node.role is Role.COORDINATOR and node.coordinator_id == "solo" and node.term == 1
    assert node.events() == [TermRaised(1), ElectionStarted(1), CoordinatorElected(1, "solo")]
    assert node.outbox() == [(BROADCAST, CoordinatorMsg(1, "solo"))]


def test_message_exchange_between_two_nodes() -> None:
    low, high = Election("low", 1.0), Election("high", 2.0)
    low.peer_up("high", 2.0, 0.0)
    high.peer_up("low", 1.0, 0.0)
    low.start(0.0)
    low.handle_timer(1.0)
    assert low.role is Role.CANDIDATE
    assert low.outbox() == [("high", ElectionMsg(1, "low", 1.0))]
    high.receive("low", ElectionMsg(1, "low", 1.0), 1.0)
    sent = high.outbox()
    assert sent[0] == ("low", AnswerMsg(1, "high"))
    assert sent[1] == (BROADCAST, CoordinatorMsg(1, "high"))
    low.receive("high", AnswerMsg(1, "high"), 1.0)
    assert low.next_timer() == 2.0  # now waits for the claim
    low.receive("high", CoordinatorMsg(1, "high"), 1.0)
    assert low.coordinator_id == "high" and low.role is Role.MEMBER and low.next_timer() is None


def test_coordinator_loss_leads_to_a_new_election_with_a_higher_term() -> None:
    net = Net({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    net.start()
    net.run(10)
    first = net.assert_one_coordinator()
    assert first.node_id == "d"
    net.kill("d")
    net.run(10)
    second = net.assert_one_coordinator()
    assert second.node_id == "c"
    assert second.term > first.term


def test_a_claim_with_a_lower_term_is_never_accepted() -> None:
    node = Election("a", 1.0)
    node.peer_up("x", 9.0, 0.0)
    node.receive("x", CoordinatorMsg(5, "x"), 0.0)
    assert node.coordinator_id == "x" and node.term == 5
    node.peer_up("y", 8.0, 0.0)
    node.receive("y", CoordinatorMsg(3, "y"), 0.0)
    assert node.coordinator_id == "x" and node.term == 5
    assert node.accepts_term(5) and node.accepts_term(6) and not node.accepts_term(4)


def test_messages_from_unknown_peers_are_ignored() -> None:
    node = Election("a", 1.0)
    node.receive("stranger", CoordinatorMsg(7, "stranger"), 0.0)
    assert node.term == 0 and node.coordinator_id is None


def test_partition_elects_on_each_side_and_heal_leaves_one_with_the_highest_term() -> None:
    net = Net({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0})
    net.start()
    net.run(10)
    assert net.assert_one_coordinator().node_id == "e"
    net.partition({"a", "b"}, {"c", "d", "e"})
    net.run(10)
    minority = net.assert_one_coordinator({"a", "b"})
    majority = net.assert_one_coordinator({"c", "d", "e"})
    assert minority.node_id == "b" and majority.node_id == "e"
    assert minority.term > majority.term  # the side that lost its coordinator moved on
    terms_before_heal = {node_id: node.term for node_id, node in net.nodes.items()}
    net.heal()
    net.run(20)
    leader = net.assert_one_coordinator()
    assert leader.node_id == "e"
    assert leader.term > max(terms_before_heal.values())
    assert all(leader.term >= node.term for node in net.nodes.values())


def test_partition_that_splits_off_the_coordinator_heals_to_one() -> None:
    net = Net({"a": 1.0, "b": 2.0, "c": 3.0})
    net.start()
    net.run(10)
    net.partition({"c"}, {"a", "b"})
    net.run(10)
    assert net.assert_one_coordinator({"c"}).node_id == "c"
    assert net.assert_one_coordinator({"a", "b"}).node_id == "b"
    net.heal()
    net.run(20)
    assert net.assert_one_coordinator().node_id == "c"


def test_a_higher_ranked_joiner_takes_over_and_a_lower_one_just_follows() -> None:
    net = Net({"a": 1.0, "b": 2.0, "c": 3.0})
    net.kill("c")  # c is not there at first
    net.start()
    net.run(10)
    assert net.assert_one_coordinator().node_id == "b"
    term = net.nodes["b"].term

    # a lower-ranked node joins: nothing changes for the others
    net.scores["a0"] = 0.5
    net.nodes["a0"] = Election("a0", 0.5, timeout_s=TIMEOUT_S, announce_interval_s=ANNOUNCE_S)
    net.max_term_seen["a0"] = 0
    net.link_up("a0", "a")
    net.link_up("a0", "b")
    net.nodes["a0"].start(net.now)
    net.run(10)
    assert net.assert_one_coordinator().node_id == "b"
    assert net.nodes["b"].term == term

    # a higher-ranked node joins: the bully takes over in a new term
    net.nodes["c"] = Election("c", 3.0, timeout_s=TIMEOUT_S, announce_interval_s=ANNOUNCE_S)
    net.nodes["c"].start(net.now)
    net.heal()
    net.run(10)
    leader = net.assert_one_coordinator()
    assert leader.node_id == "c" and leader.term > term


def test_lost_messages_are_repaired_by_the_coordinators_announcements() -> None:
    net = Net({"a": 1.0, "b": 2.0, "c": 3.0}, rng=random.Random(7), drop_rate=0.5)
    net.start()
    net.run(30)
    net.drop_rate = 0.0
    net.run(2 * ANNOUNCE_S + 2 * TIMEOUT_S)
    assert net.assert_one_coordinator().node_id == "c"


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.integers(0, 3), min_size=3, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    drop_rate=st.sampled_from([0.0, 0.1, 0.3]),
    max_delay_s=st.sampled_from([0.0, 0.3, 2.5]),
    cut=st.lists(st.booleans(), min_size=5, max_size=5),
    kill_leader=st.booleans(),
)
def test_random_delivery_partition_and_heal_converge(
    scores: list[int],
    seed: int,
    drop_rate: float,
    max_delay_s: float,
    cut: list[bool],
    kill_leader: bool,
) -> None:
    node_scores = {f"n{i}": float(score) for i, score in enumerate(scores)}
    net = Net(node_scores, rng=random.Random(seed), drop_rate=drop_rate, max_delay_s=max_delay_s)
    net.start()
    net.run(8)
    side_a = {n for n, flag in zip(sorted(node_scores), cut, strict=False) if flag}
    net.partition(side_a, set(node_scores) - side_a)
    net.run(8)
    net.heal()
    net.run(4)
    if kill_leader:
        leader = next((n for n in net.nodes.values() if n.role is Role.COORDINATOR), None)
        if leader is not None:
            net.kill(leader.node_id)
        net.run(4)
    # a reliable, timely network from here on must settle on one coordinator
    net.drop_rate, net.max_delay_s = 0.0, 0.0
    net.run(3 * ANNOUNCE_S)
    leader = net.assert_one_coordinator()
    assert leader.term == max(net.max_term_seen[n] for n in net.nodes)


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.integers(0, 3), min_size=3, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    kills=st.integers(0, 2),
)
def test_one_coordinator_per_term_when_messages_arrive_in_time(
    scores: list[int], seed: int, kills: int
) -> None:
    node_scores = {f"n{i}": float(score) for i, score in enumerate(scores)}
    net = Net(node_scores, rng=random.Random(seed), max_delay_s=0.4 * TIMEOUT_S)
    net.start()
    net.run(8)
    terms = []
    for _ in range(kills):
        leader = net.assert_one_coordinator()
        terms.append(leader.term)
        net.kill(leader.node_id)
        net.run(8)
    terms.append(net.assert_one_coordinator().term)
    assert terms == sorted(set(terms)), "each new coordinator must have a higher term"
    for term, claimants in net.claims.items():
        assert len(claimants) == 1, (term, claimants)
