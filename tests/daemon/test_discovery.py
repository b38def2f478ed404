"""mDNS discovery in loopback mode: real zeroconf instances on 127.0.0.1 (multicast on lo).

Other test runs on this machine may be announcing on lo at the same time, so node ids are
random per run and the assertions look only at this run's nodes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

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
from meshllm.wire import Hello
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
