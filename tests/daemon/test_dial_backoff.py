"""A peer that died is dialled again with backoff and reported once (daemon/node/redial.py):
the policy alone (sans-IO, with `now`), then the mesh driver dialling a peer whose record
lingers."""

from __future__ import annotations


import pytest

from daemon.node.driver import MeshDriver
from daemon.node.redial import DialBackoff
from meshllm import wire
from tests.waiting import async_wait_until
from tests.daemon.stand_ins import hello, stand_in_runtime

ADDRESS = "192.0.2.7:8471"


# -- the policy ------------------------------------------------------------------------------------


def test_the_waits_double_from_one_second_up_to_thirty() -> None:
    backoff = DialBackoff()
    assert [backoff.delay_after(n) for n in range(1, 9)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay_after(10_000) == 30.0


def test_an_address_that_never_failed_may_be_dialled_at_once() -> None:
    backoff = DialBackoff()
    assert backoff.may_dial(ADDRESS, 100.0) and backoff.wait_s(ADDRESS, 100.0) == 0.0


def test_each_failure_waits_longer_and_only_the_first_is_reported() -> None:
    backoff = DialBackoff()
    now, reported = 100.0, []
    for expected_wait in (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0):
        reported.append(backoff.failed(ADDRESS, now))
        assert not backoff.may_dial(ADDRESS, now)
        assert backoff.wait_s(ADDRESS, now) == expected_wait
        assert not backoff.may_dial(ADDRESS, now + expected_wait - 0.01)
        now += expected_wait
        assert backoff.may_dial(ADDRESS, now)
    assert reported == [True] + [False] * 6


def test_a_success_forgets_the_failures_and_says_how_many_there_were() -> None:
    backoff = DialBackoff()
    for t in (0.0, 1.0, 3.0):
        backoff.failed(ADDRESS, t)
    assert backoff.succeeded(ADDRESS) == 3
    assert backoff.may_dial(ADDRESS, 3.0)  # no wait left
    assert backoff.succeeded(ADDRESS) == 0  # nothing to report: it was not failing
    assert backoff.failed(ADDRESS, 10.0) is True  # a new run of failures is reported again
    assert backoff.wait_s(ADDRESS, 10.0) == 1.0  # and starts from the first delay


def test_addresses_back_off_on_their_own() -> None:
    backoff = DialBackoff()
    backoff.failed(ADDRESS, 0.0)
    backoff.failed(ADDRESS, 1.0)
    assert backoff.may_dial("192.0.2.8:8471", 1.0)
    assert backoff.failed("192.0.2.8:8471", 1.0) is True


def test_the_delays_must_make_sense() -> None:
    with pytest.raises(ValueError):
        DialBackoff(first_delay_s=0.0)
    with pytest.raises(ValueError):
        DialBackoff(first_delay_s=5.0, max_delay_s=1.0)


# -- the driver ------------------------------------------------------------------------------------


class Refused(Exception):
    """Stands for the link layer's error."""


class DeadPeerLinks:
    """A link layer whose dials fail until `alive`; then they link."""

    def __init__(self) -> None:
        self.alive = False
        self.dials = 0
        self.linked: dict[str, wire.Hello] = {}

    async def connect(self, address: str) -> str:
        self.dials += 1
        if not self.alive:
            raise Refused("connection refused")
        self.linked["b"] = hello("b")
        return "b"

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int:
        raise Refused("no link")

    def drop(self, peer_id: str, reason: str) -> None:
        self.linked.pop(peer_id, None)

    def peers(self) -> dict[str, wire.Hello]:
        return dict(self.linked)

    def rtt_ms(self, peer_id: str) -> float | None:
        return None

    def link_stats(self, peer_id: str) -> None:
        return None


def driver(links: DeadPeerLinks, logs: list[tuple[str, str]]) -> MeshDriver:
    return MeshDriver(hello("a"), stand_in_runtime(), worker=None, links=links,  # type: ignore[arg-type]
                      log_event=lambda kind, message: logs.append((kind, message)),
                      link_error=Refused, dial_backoff=DialBackoff(first_delay_s=0.01, max_delay_s=0.04))


async def test_a_dead_peer_whose_record_lingers_is_redialled_with_backoff_and_reported_once() -> None:
    links, logs = DeadPeerLinks(), []
    mesh = driver(links, logs)
    mesh.peer_seen("b-node", ADDRESS, hello("b"))  # "a" < "b": this node dials
    await async_wait_until(lambda: links.dials >= 6, 10, "dials again and again")
    errors = [message for kind, message in logs if kind == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"cannot link to {ADDRESS}: connection refused")
    links.alive = True  # it comes back: linked, and said so once
    await async_wait_until(lambda: "b" in links.linked and any("again" in m for _, m in logs), 10, "linked again")
    assert [m for _, m in logs if "again" in m and m.startswith("linked")] \
        == [f"linked to {ADDRESS} again after {links.dials - 1} failed tries"]


async def test_dialling_stops_once_discovery_no_longer_sees_the_peer() -> None:
    links, logs = DeadPeerLinks(), []
    mesh = driver(links, logs)
    mesh.peer_seen("b-node", ADDRESS, hello("b"))
    await async_wait_until(lambda: links.dials >= 2, 10, "dials")
    assert mesh.dialling == {"b"}
    mesh.peer_gone("b-node", "b")  # its record expired: the task that dials it ends
    await async_wait_until(lambda: not mesh.dialling, 10, "the dialling task ends")


async def test_the_higher_node_id_waits_to_be_dialled() -> None:
    links = DeadPeerLinks()
    mesh = MeshDriver(hello("c"), stand_in_runtime(), worker=None, links=links,  # type: ignore[arg-type]
                      link_error=Refused, dial_backoff=DialBackoff(first_delay_s=0.01, max_delay_s=0.04))
    mesh.peer_seen("b-node", ADDRESS, hello("b"))
    assert mesh.dialling == frozenset()  # no task dials "b": it dials "c"
    assert links.dials == 0
