"""mDNS discovery in loopback mode: real zeroconf instances on 127.0.0.1 (multicast on lo);
and what the mesh driver makes of what discovery reports, with a stand-in link layer: a
goodbye or another address never touches a link that is up (daemon/node/redial.py).

Other test runs on this machine may be announcing on lo at the same time, so node ids are
random per run and the assertions look only at this run's nodes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from daemon.net.discovery import (
    SERVICE_TYPE,
    BadRecord,
    Discovery,
    DiscoveryEvent,
    PeerGone,
    PeerSeen,
    hello_from_txt,
    instance_name,
    parse_txt,
    txt_for,
)
from daemon.net.loopback import accept_only_from_loopback
from daemon.node.driver import MeshDriver
from daemon.node.redial import DialBackoff, PeerAddresses
from meshllm.wire import Hello
from tests.daemon.stand_ins import stand_in_runtime
from tests.waiting import async_wait_until


RUN = secrets.token_hex(5)
MDNS_WAIT_S = 15.0
"""A bound for a failing test: announcements on a loaded machine can take seconds."""


def make_hello(index: int, *, ms_per_layer: float = 1.5, name: str | None = None) -> Hello:
    return Hello(
        node_id=f"n-{index:06x}{RUN}",
        name=name if name is not None else f"node{index}",
        protocol_version=1,
        mesh_name="default",
        model_id="9f86d081884c7d65",
        api_port=8400 + index,
        mem_budget_bytes=4_000_000_000,
        ms_per_layer=ms_per_layer,
        can_coordinate=index % 2 == 1,
    )


Started = tuple[Discovery, list[DiscoveryEvent]]


@pytest.fixture
async def start_discovery() -> AsyncIterator[Callable[[Hello], Awaitable[Started]]]:
    running: list[Discovery] = []

    async def start(hello: Hello) -> Started:
        events: list[DiscoveryEvent] = []
        discovery = Discovery(hello, host="127.0.0.1", port=hello.api_port, loopback=True,
                              on_event=events.append)
        await discovery.start()
        running.append(discovery)
        return discovery, events

    yield start
    await asyncio.gather(*(discovery.close() for discovery in running))


def seen(events: list[DiscoveryEvent], node_id: str) -> list[PeerSeen]:
    return [e for e in events if isinstance(e, PeerSeen) and e.node_id == node_id]


async def test_two_nodes_see_each_other_and_a_goodbye(start_discovery) -> None:
    hello_a, hello_b = make_hello(1), make_hello(2)
    a, events_a = await start_discovery(hello_a)
    b, events_b = await start_discovery(hello_b)

    await async_wait_until(lambda: seen(events_a, hello_b.node_id) and seen(events_b, hello_a.node_id),
                           MDNS_WAIT_S, "a and b see each other")

    peer_b = seen(events_a, hello_b.node_id)[-1]
    assert peer_b.address == "127.0.0.1:8402"
    assert peer_b.name == instance_name(hello_b) == f"node2-{hello_b.node_id[-6:]}"
    assert peer_b.txt == {
        "pv": "1", "id": hello_b.node_id, "mesh": "default", "port": "8402",
        "mem": "4000000000", "ms": "1.5", "model": "9f86d081884c7d65", "coord": "0",
        "key": "open",  # no key_id given: the id of an open mesh
    }
    assert seen(events_b, hello_a.node_id)[-1].txt["coord"] == "1"
    # Nobody reports itself.
    assert not seen(events_a, hello_a.node_id) and not seen(events_b, hello_b.node_id)
    assert all(e.address == "127.0.0.1:" + e.txt["port"] for e in events_a if isinstance(e, PeerSeen))

    await b.close()

    await async_wait_until(lambda: any(isinstance(e, PeerGone) and e.node_id == hello_b.node_id
                                       for e in events_a), MDNS_WAIT_S, "a sees b's goodbye")
    assert [e for e in events_a if isinstance(e, PeerGone) and e.name == instance_name(hello_b)] == [
        PeerGone(name=instance_name(hello_b), node_id=hello_b.node_id)
    ]


async def test_an_update_is_seen_with_the_new_record(start_discovery) -> None:
    a, events_a = await start_discovery(make_hello(1))
    b, _ = await start_discovery(make_hello(2))
    await async_wait_until(lambda: seen(events_a, make_hello(2).node_id), MDNS_WAIT_S, "a sees b")

    await b.update(make_hello(2, ms_per_layer=3.25))

    await async_wait_until(lambda: seen(events_a, make_hello(2).node_id)[-1].txt["ms"] == "3.25",
                           MDNS_WAIT_S, "a sees b's new speed")
    assert seen(events_a, make_hello(2).node_id)[-1].address == "127.0.0.1:8402"


async def test_a_malformed_record_is_logged_and_ignored(
    start_discovery, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.net.discovery")
    a, events_a = await start_discovery(make_hello(1))
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    try:
        bad_txt = txt_for(make_hello(9), 8409) | {"port": "eighty", "mem": "-1"}
        bad = AsyncServiceInfo(
            SERVICE_TYPE, f"bad-{RUN}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton("127.0.0.1")], port=8409,
            properties=bad_txt, server=f"bad-{RUN}.local.",
        )
        await zc.async_register_service(bad, cooperating_responders=True)
        await async_wait_until(lambda: any(f"malformed mDNS record of bad-{RUN}" in r.getMessage()
                                           for r in caplog.records), MDNS_WAIT_S, "the malformed record logged")

        b, _ = await start_discovery(make_hello(2))
        await async_wait_until(lambda: seen(events_a, make_hello(2).node_id), MDNS_WAIT_S, "a sees b")
    finally:
        await zc.async_close()

    ours = [e.node_id for e in events_a if isinstance(e, PeerSeen) and e.node_id.endswith(RUN)]
    assert ours == [make_hello(2).node_id]


def test_txt_round_trips_to_the_hello() -> None:
    hello = make_hello(3, name="my laptop.local")
    txt = parse_txt({k.encode(): v.encode() for k, v in txt_for(hello, 8403).items()})
    assert hello_from_txt(txt, instance_name(hello)).mem_budget_bytes == hello.mem_budget_bytes
    assert hello_from_txt(txt, instance_name(hello)).can_coordinate is True
    assert instance_name(hello) == "my-laptop-local-" + hello.node_id[-6:]
    assert instance_name(make_hello(4, name="x" * 64)).endswith("-" + RUN[-6:])
    assert len(instance_name(make_hello(4, name="x" * 64))) <= 63


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({b"id": None}, "lacks 'id'"),
        ({b"port": b"0"}, "port out of range"),
        ({b"pv": b"1e3"}, "pv is not"),
        ({b"ms": b"nan"}, "ms out of range"),
        ({b"ms": b"-1"}, "ms out of range"),
        ({b"coord": b"yes"}, "coord"),
        ({b"mesh": b""}, "mesh"),
        ({b"model": b"m" * 200}, "model"),
        ({b"id": b"\xff\xfe"}, "not text"),
        ({b"k%d" % i: b"v" for i in range(40)}, "TXT keys"),
        ({b"x" * 40: b"v"}, "too long"),
    ],
)
def test_malformed_txt_records_are_refused(change: dict[bytes, bytes | None], fragment: str) -> None:
    properties: dict[bytes, bytes | None] = {
        k.encode(): v.encode() for k, v in txt_for(make_hello(5), 8405).items()
    }
    properties.update(change)
    with pytest.raises(BadRecord, match=fragment):
        parse_txt(properties)


def test_the_loopback_socket_filter_drops_datagrams_from_other_sources() -> None:
    """What keeps zeroconf's wildcard mDNS socket deaf to anything but 127.0.0.1."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    senders = []
    try:
        receiver.bind(("0.0.0.0", 0))
        assert accept_only_from_loopback(receiver)
        receiver.settimeout(0.2)
        port = receiver.getsockname()[1]
        for source in ("127.0.0.2", "127.0.0.1"):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            senders.append(sender)
            sender.bind((source, 0))
            sender.sendto(source.encode(), ("127.0.0.1", port))
        data, (host, _) = receiver.recvfrom(64)
        assert (data, host) == (b"127.0.0.1", "127.0.0.1")
        with pytest.raises(TimeoutError):
            receiver.recvfrom(64)
    finally:
        receiver.close()
        for sender in senders:
            sender.close()


# --- what a record may change: never a link that is up ----------------------------------------

HOME = "192.0.2.7:8471"
"""Where the peer really is."""
ELSEWHERE = "192.0.2.66:8471"
"""What a spoofed record says."""


def test_addresses_seen_while_unlinked_are_used_at_once() -> None:
    book = PeerAddresses()
    book.seen("b", HOME, linked=False)
    assert "b" in book and book.next_address("b") == HOME
    book.seen("b", ELSEWHERE, linked=False)  # it moved while not linked: dial the new one
    assert [book.next_address("b") for _ in range(2)] == [ELSEWHERE, ELSEWHERE]
    assert book.gone("b", linked=False) and "b" not in book and book.next_address("b") is None


def test_a_record_seen_while_linked_changes_nothing_until_a_dial_confirms_it() -> None:
    book = PeerAddresses()
    book.seen("b", HOME, linked=False)
    book.seen("b", ELSEWHERE, linked=True)   # spoofed, or the peer moved
    assert not book.gone("b", linked=True)   # a goodbye while linked: kept
    # once the link is gone: the address that linked first, the new one in turn
    assert [book.next_address("b") for _ in range(3)] == [HOME, ELSEWHERE, HOME]
    book.reached("b", ELSEWHERE)  # a dial there reached b itself: its address now
    assert [book.next_address("b") for _ in range(2)] == [ELSEWHERE, ELSEWHERE]
    book.seen("b", HOME, linked=True)
    book.forget("b")  # it said Bye
    assert "b" not in book and book.next_address("b") is None


def test_a_peer_first_seen_while_linked_is_dialled_there_only_after_the_link() -> None:
    book = PeerAddresses()
    book.seen("b", ELSEWHERE, linked=True)
    assert "b" in book and book.next_address("b") == ELSEWHERE
    book.reached("c", HOME)  # not a peer discovery sees: nothing to remember
    assert "c" not in book


class Unreachable(Exception):
    """Stands for the link layer's error."""


class StandInLinks:
    """A link layer where the peer "b" answers at HOME only; records drops and dials."""

    def __init__(self) -> None:
        self.linked: dict[str, Hello] = {}
        self.dialled: list[str] = []
        self.dropped: list[tuple[str, str]] = []
        self.on_up: Callable[[str, Hello], None] = lambda peer_id, hello: None

    async def connect(self, address: str) -> str:
        self.dialled.append(address)
        if address != HOME:
            raise Unreachable(f"nobody with the mesh key at {address}")
        self.linked["b"] = peer_hello("b")
        self.on_up("b", self.linked["b"])
        return "b"

    async def send(self, peer_id: str, msg: Any, *, channel: str = "control") -> int:
        raise Unreachable("no link")

    def drop(self, peer_id: str, reason: str) -> None:
        self.dropped.append((peer_id, reason))
        self.linked.pop(peer_id, None)

    def peers(self) -> dict[str, Hello]:
        return dict(self.linked)

    def rtt_ms(self, peer_id: str) -> float | None:
        return None

    def link_stats(self, peer_id: str) -> None:
        return None


def peer_hello(node_id: str) -> Hello:
    return Hello(node_id, node_id, 1, "test", "model0123", 8000, 10**9, 1.0, True)


def stand_in_driver(links: StandInLinks) -> MeshDriver:
    """A mesh driver of node "a" (it dials "b": the lower id dials) with no model."""
    mesh = MeshDriver(peer_hello("a"), stand_in_runtime(), worker=None, links=links,  # type: ignore[arg-type]
                      link_error=Unreachable, dial_backoff=DialBackoff(first_delay_s=0.01, max_delay_s=0.04))
    links.on_up = mesh.on_link_up  # a member of its mesh once linked
    return mesh


async def test_a_spoofed_goodbye_or_address_never_touches_a_link_that_is_up() -> None:
    links = StandInLinks()
    mesh = stand_in_driver(links)
    mesh.peer_seen("b-node", HOME, peer_hello("b"))
    await async_wait_until(lambda: "b" in links.linked and not mesh.dialling, 10, "a links to b")

    mesh.peer_gone("b-node", "b")                           # a spoofed goodbye (TTL 0)
    mesh.peer_seen("b-node", ELSEWHERE, peer_hello("b"))    # a spoofed record
    assert links.dropped == [] and "b" in links.linked      # the link stays
    assert mesh.dialling == frozenset() and links.dialled == [HOME]  # nothing dials elsewhere

    # The link is lost (heartbeats decide): the address that linked is dialled first and links.
    links.linked.pop("b")
    mesh.on_link_down("b", "heartbeat timeout")
    await async_wait_until(lambda: "b" in links.linked and not mesh.dialling, 10, "a links to b again")
    assert links.dialled == [HOME, HOME]


async def test_a_peer_that_moved_is_reached_at_its_new_address_once_its_link_is_gone() -> None:
    links = StandInLinks()
    mesh = stand_in_driver(links)
    mesh.peer_seen("b-node", ELSEWHERE, peer_hello("b"))  # where it was
    await async_wait_until(lambda: len(links.dialled) >= 2, 10, "a dials b where it was")
    mesh.peer_gone("b-node", "b")
    await async_wait_until(lambda: not mesh.dialling, 10, "dialling ends with the goodbye")
    mesh.peer_seen("b-node", HOME, peer_hello("b"))       # not linked: the new record counts
    await async_wait_until(lambda: "b" in links.linked, 10, "a links to b where it is")
    assert links.dialled[-1] == HOME


async def test_a_peer_that_said_bye_is_not_dialled_again_though_its_goodbye_came_first() -> None:
    links = StandInLinks()
    mesh = stand_in_driver(links)
    mesh.peer_seen("b-node", HOME, peer_hello("b"))
    await async_wait_until(lambda: "b" in links.linked and not mesh.dialling, 10, "a links to b")
    mesh.peer_gone("b-node", "b")  # a stopping node says goodbye on mDNS first, then Bye
    links.linked.pop("b")
    mesh.on_link_down("b", "bye")
    assert mesh.dialling == frozenset() and links.dialled == [HOME]


async def test_a_node_listed_as_of_another_key_is_no_longer_listed_once_it_links() -> None:
    """It came back with the mesh's key (an invite), and dialled this node before its new
    record reached it: a link proves the key, the old record's reason is stale."""
    links = StandInLinks()
    mesh = stand_in_driver(links)
    mesh.peer_seen("b-node", HOME, peer_hello("b"), refused="another mesh key")
    assert [e["reason"] for e in mesh.status_view()["incompatible"]] == ["another mesh key"]
    mesh.on_link_up("b", peer_hello("b"))
    assert mesh.status_view()["incompatible"] == []


async def test_a_stale_record_of_a_linked_member_does_not_list_it_as_incompatible() -> None:
    links = StandInLinks()
    mesh = stand_in_driver(links)
    mesh.peer_seen("b-node", HOME, peer_hello("b"))
    await async_wait_until(lambda: "b" in links.linked and not mesh.dialling, 10, "a links to b")
    mesh.peer_seen("b-old", HOME, peer_hello("b"), refused="another mesh key")  # its record before an invite
    assert mesh.status_view()["incompatible"] == [] and "b" in links.linked
