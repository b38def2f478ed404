"""Links between real LinkManagers over 127.0.0.1: HTTP signaling, WebRTC data channels,
heartbeats, authentication and hostile peers.

Every node runs a small aiohttp server with the signaling route on an ephemeral 127.0.0.1
port, in loopback mode, so nothing leaves this machine. A ``RawPeer`` is a hand-driven
aiortc peer for the cases a well-behaved LinkManager never produces (garbage frames, replayed
offers, a peer that stops sending heartbeats).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from daemon.net.framing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    URGENT_BACKLOG_BYTES,
    Channel,
    Outbox,
    link_message_bytes,
)
from daemon.net.lifecycle import Link
from daemon.net.links import LinkDown, LinkError, LinkManager, LinkUp, aiortc_tuned
from daemon.net.loopback import loopback_ice, usable_candidates
from daemon.net.signaling import (
    SIGNAL_PATH,
    Authenticator,
    SignalOffer,
    answer_from_json,
    offer_to_json,
)
from meshllm.errors import WireError
from meshllm.placement.linkstats import LinkMeter
from meshllm.wire import (
    DEFAULT_MAX_MESSAGE_BYTES as WIRE_MAX_MESSAGE_BYTES,
)
from meshllm.wire import (
    MAX_FRAME_BYTES,
    CacheHandover,
    Error,
    Forward,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Reassembler,
    Result,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
    split_frames,
)

KEY = b"correct horse battery staple 42!"
OTHER_KEY = b"some other mesh key, not ours!!!"


def make_hello(index: int, *, mesh_name: str = "default") -> Hello:
    return Hello(
        node_id=f"n-{index:016x}",
        name=f"node{index}",
        protocol_version=1,
        mesh_name=mesh_name,
        model_id="model-1",
        api_port=8470,
        mem_budget_bytes=1 << 30,
        ms_per_layer=1.5,
        can_coordinate=True,
    )


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for ``condition`` (a bound to fail the test, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@dataclass
class Node:
    lm: LinkManager
    hello: Hello
    address: str
    messages: list[tuple[str, Message]] = field(default_factory=list)
    ups: list[LinkUp] = field(default_factory=list)
    downs: list[LinkDown] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    def received(self, kind: type) -> list[Message]:
        return [msg for _, msg in self.messages if isinstance(msg, kind)]


MakeNode = Callable[..., Awaitable[Node]]


def link_of(node: Node, peer: Node | RawPeer) -> Link:
    """``node``'s link to ``peer`` (its internals, for the tests that look inside)."""
    return node.lm._table.by_peer[peer.node_id]


async def serve(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"127.0.0.1:{port}"


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    made: list[tuple[Node, web.AppRunner]] = []

    async def make(index: int, *, mesh_key: bytes | None = None,
                   is_compatible: Callable[[Hello], str | None] = lambda hello: None,
                   **options: Any) -> Node:
        hello = make_hello(index)
        node: Node
        lm = LinkManager(
            hello,
            loopback=True,
            mesh_key=mesh_key,
            on_message=lambda peer, msg: node.messages.append((peer, msg)),
            on_link_up=lambda event: node.ups.append(event),
            on_link_down=lambda event: node.downs.append(event),
            is_compatible=is_compatible,
            **options,
        )
        await lm.start()
        runner, address = await serve(lm.signaling_routes())
        node = Node(lm=lm, hello=hello, address=address)
        made.append((node, runner))
        return node

    yield make
    for node, runner in reversed(made):
        await node.lm.close()
        await runner.cleanup()


class RawPeer:
    """A peer driven by hand: it signals itself and sends exactly what a test asks."""

    def __init__(self, hello: Hello, *, mesh_key: bytes | None = None) -> None:
        self.hello = hello
        self.auth = Authenticator(mesh_key)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channels = {
            name: self.pc.createDataChannel(name, negotiated=True, id=channel_id)
            for name, channel_id in (("control", 0), ("activation", 1))
        }
        self.messages: list[Message] = []
        self._reassembler = Reassembler()
        self._next_id = 0
        self.channels["control"].on("message", self._on_piece)

    @property
    def node_id(self) -> str:
        return self.hello.node_id

    def _on_piece(self, piece: bytes) -> None:
        data = self._reassembler.feed(piece, time.monotonic())
        if data is not None:
            self.messages.append(decode(data))

    async def offer(self, to: str) -> SignalOffer:
        """A signed offer for the node ``to``."""
        if self.pc.localDescription is None:
            with loopback_ice():
                await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.auth.sign_offer(self.hello, self.pc.localDescription.sdp, time.time(), to=to)

    async def complete(self, answer_body: object) -> None:
        answer = answer_from_json(answer_body)
        await self.pc.setRemoteDescription(RTCSessionDescription(answer.sdp, "answer"))
        await wait_until(lambda: all(ch.readyState == "open" for ch in self.channels.values()))

    async def link_to(self, node: Node) -> None:
        status, body = await post_json(node.address, offer_to_json(await self.offer(node.node_id)))
        assert status == 200, body
        await self.complete(body)

    def send(self, msg: Message, channel: str = "control") -> None:
        for piece in split_frames(encode(msg), self._next_id):
            self.channels[channel].send(piece)
        self._next_id += 1

    def send_raw(self, piece: bytes | str, channel: str = "control") -> None:
        self.channels[channel].send(piece)

    async def close(self) -> None:
        await self.pc.close()


async def post_json(address: str, body: object, *, raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with session.post(f"http://{address}{SIGNAL_PATH}", **kwargs) as response:
            return response.status, await response.json(content_type=None)


@pytest.fixture
async def raw_peers() -> AsyncIterator[Callable[..., RawPeer]]:
    made: list[RawPeer] = []

    def make(index: int, **options: Any) -> RawPeer:
        peer = RawPeer(make_hello(index), **options)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        await peer.close()


def big_result(size_bytes: int) -> Result:
    rows = -(-size_bytes // (576 * 4))  # at least size_bytes of float32
    hidden = np.random.default_rng(7).standard_normal((rows, 576)).astype(np.float32)
    return Result(session_id="s-big", seq=3, hidden=encode_tensor(hidden, "f32", compress=False))


# --- links that work ------------------------------------------------------------------------


async def test_two_nodes_link_and_talk_on_both_channels(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)

    peer = await a.lm.connect(b.address)

    assert peer == b.node_id
    assert a.ups == [LinkUp(b.node_id, b.hello)]
    await wait_until(lambda: len(b.ups) == 1)
    assert b.ups == [LinkUp(a.node_id, a.hello)]
    assert a.lm.peers() == {b.node_id: b.hello}
    assert b.lm.peers() == {a.node_id: a.hello}

    for seq in range(3):
        await a.lm.send(b.node_id, Error(code="ctl", message=f"control {seq}"))
        await a.lm.send(b.node_id, Error(code="act", message=f"activation {seq}"), channel="activation")
    await b.lm.send(a.node_id, Error(code="back", message="hello a"), channel="activation")

    await wait_until(lambda: len(b.received(Error)) == 6 and len(a.received(Error)) == 1)
    got = [(msg.code, msg.message) for msg in b.received(Error)]
    assert [m for m in got if m[0] == "ctl"] == [("ctl", f"control {i}") for i in range(3)]
    assert [m for m in got if m[0] == "act"] == [("act", f"activation {i}") for i in range(3)]
    assert all(peer == a.node_id for peer, _ in b.messages)
    assert a.received(Error) == [Error(code="back", message="hello a")]


async def test_heartbeats_flow_and_measure_the_round_trip(make_node: MakeNode) -> None:
    a = await make_node(1, heartbeat_interval_s=0.05)
    b = await make_node(2, heartbeat_interval_s=0.05)
    started_s = time.monotonic()
    await a.lm.connect(b.address)

    await wait_until(lambda: a.lm.rtt_ms(b.node_id) is not None and b.received(Heartbeat))

    # Every sample was a heartbeat sent and echoed since the link came up: a real span, and
    # no longer than this test has waited so far (however slow the machine).
    waited_ms = (time.monotonic() - started_s) * 1000.0
    rtt_ms = a.lm.rtt_ms(b.node_id)
    assert rtt_ms is not None and 0.0 < rtt_ms <= waited_ms
    heartbeat = b.received(Heartbeat)[-1]
    assert heartbeat.node_id == a.node_id and heartbeat.term == 0  # reserved, always 0
    assert a.lm.rtt_ms("n-unknown") is None
    assert a.downs == [] and b.downs == []


async def test_a_one_mib_message_arrives_intact_and_send_respects_the_high_water_mark(
    make_node: MakeNode,
) -> None:
    high_water_bytes = 64 * 1024
    a = await make_node(1, send_high_water_bytes=high_water_bytes)
    b = await make_node(2)
    await a.lm.connect(b.address)
    big = big_result(1024 * 1024)
    assert len(encode(big)) > 1024 * 1024
    assert len(split_frames(encode(big), 0)) == 5

    most_buffered = 0
    sending = asyncio.create_task(a.lm.send(b.node_id, big, channel="activation"))
    while not sending.done():
        most_buffered = max(most_buffered, a.lm.buffered_bytes(b.node_id, "activation"))
        await asyncio.sleep(0.001)
    await sending

    # The sender never got further ahead of the channel than one piece over the mark.
    assert most_buffered <= high_water_bytes + MAX_FRAME_BYTES
    assert a.lm.buffered_bytes(b.node_id, "activation") <= high_water_bytes + MAX_FRAME_BYTES
    await wait_until(lambda: len(b.received(Result)) == 1)
    got = b.received(Result)[0]
    assert got == big
    np.testing.assert_array_equal(decode_tensor(got.hidden), decode_tensor(big.hidden))


async def test_loopback_ice_gathers_only_127_0_0_1() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("control", negotiated=True, id=0)
    try:
        with loopback_ice():
            await pc.setLocalDescription(await pc.createOffer())
        candidates = [line.split() for line in pc.localDescription.sdp.splitlines()
                      if line.startswith("a=candidate:")]
        assert candidates
        assert {parts[4] for parts in candidates} == {"127.0.0.1"}
        assert {parts[7] for parts in candidates} == {"host"}
    finally:
        await pc.close()


async def test_a_node_answers_with_127_0_0_1_candidates_only(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    b = await make_node(2)
    status, body = await post_json(b.address, offer_to_json(await raw_peers(1).offer(b.node_id)))
    assert status == 200
    sdp = answer_from_json(body).sdp
    addresses = {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}
    assert addresses == {"127.0.0.1"}


async def test_the_loopback_hook_applies_only_inside_its_block() -> None:
    import aioice.ice

    with loopback_ice():
        inside = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
        inside_task = await asyncio.create_task(_host_addresses_in_task())  # tasks inherit it
    outside = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)

    assert inside == ["127.0.0.1"] and inside_task == ["127.0.0.1"]
    assert "127.0.0.1" not in outside  # aioice's own list, as for a LAN mesh


async def _host_addresses_in_task() -> list[str]:
    import aioice.ice

    return aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)


def test_loopback_mode_removes_remote_candidates_it_must_not_reach() -> None:
    sdp = "\r\n".join([
        "v=0",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
        "a=candidate:2 1 udp 2130706431 192.0.2.7 50001 typ host",
        "a=candidate:3 1 udp 2130706431 0f3a-peer.local 50002 typ host",
        "a=candidate:4 1 udp 1694498815 198.51.100.1 50003 typ srflx raddr 0.0.0.0 rport 0",
        "a=end-of-candidates",
    ]) + "\r\n"

    loopback_sdp, loopback_count = usable_candidates(sdp, loopback=True)
    lan_sdp, lan_count = usable_candidates(sdp, loopback=False)

    assert loopback_count == 1
    assert "127.0.0.1 50000" in loopback_sdp
    assert "192.0.2.7" not in loopback_sdp and ".local" not in loopback_sdp
    assert "198.51.100.1" not in loopback_sdp and "a=end-of-candidates" in loopback_sdp
    assert lan_count == 3 and ".local" not in lan_sdp  # mDNS names are never resolved


# --- links that end -------------------------------------------------------------------------


async def test_bye_ends_the_link_on_the_other_side(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)

    link = link_of(a, b)

    await b.lm.close()

    await wait_until(lambda: len(a.downs) == 1)
    assert a.downs == [LinkDown(b.node_id, "bye")]
    assert b.downs == [LinkDown(a.node_id, "closed")]
    assert a.lm.peers() == {}
    with pytest.raises(LinkError):
        await a.lm.send(b.node_id, Error(code="x", message="anyone there?"))
    # Once the connection is closed (its channels' close events came after the Bye), the
    # link was still reported down once only.
    await wait_until(lambda: link.pc.connectionState == "closed")
    assert len(a.downs) == 1


async def test_a_dropped_link_is_reported_as_channel_closed_by_the_peer(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)

    a.lm.drop(b.node_id, "misbehaving")

    assert a.downs == [LinkDown(b.node_id, "misbehaving")]
    await wait_until(lambda: len(b.downs) == 1)
    assert b.downs == [LinkDown(a.node_id, "channel closed")]
    a.lm.drop(b.node_id, "again")  # no link any more: nothing happens
    assert len(a.downs) == 1


async def test_a_peer_that_stops_sending_heartbeats_is_lost(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    a = await make_node(1, heartbeat_interval_s=0.05, lost_after_s=0.5)
    quiet = raw_peers(2)
    await quiet.link_to(a)
    await wait_until(lambda: len(a.ups) == 1)

    # While its heartbeats flow (for longer than lost_after_s) the link stays up.
    for _ in range(12):
        quiet.send(Heartbeat(node_id=quiet.hello.node_id, term=0, sent_at_s=time.monotonic()))
        await asyncio.sleep(0.05)
    assert a.downs == []
    assert a.lm.peers().keys() == {quiet.hello.node_id}

    # Then they stop (the peer hangs); its connection stays open.
    await wait_until(lambda: len(a.downs) == 1)
    assert a.downs == [LinkDown(quiet.hello.node_id, "heartbeat timeout")]
    assert a.lm.peers() == {}


async def test_a_peer_whose_heartbeats_come_irregularly_is_given_longer(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    floor_s = 0.75
    a = await make_node(1, heartbeat_interval_s=0.05, lost_after_s=floor_s)
    busy = raw_peers(2)
    await busy.link_to(a)
    await wait_until(lambda: len(a.ups) == 1)
    peer = busy.hello.node_id
    detector = a.lm._table.by_peer[peer].heartbeat.detector

    def beat() -> None:
        busy.send(Heartbeat(node_id=peer, term=0, sent_at_s=time.monotonic()))

    # A busy peer: its heartbeats come in pairs, with pauses that grow (each under the floor).
    for pause_s in (0.05, 0.2, 0.35, 0.5, 0.55, 0.55):
        beat()
        await asyncio.sleep(0.05)
        beat()
        await asyncio.sleep(pause_s)
    seen = detector.samples
    beat()
    silent_since = time.monotonic()
    await wait_until(lambda: detector.samples > seen)  # the last heartbeat is in
    learnt_s = detector.lost_after_s()
    assert learnt_s > floor_s + 0.3, (detector.mean_s, detector.std_s)

    # Silence: the peer is lost all the same, and not before the patience it learnt (a
    # link manager that kept to the fixed timeout would drop it after floor_s). A loaded
    # machine only makes the loss later, never sooner.
    await wait_until(lambda: len(a.downs) == 1)
    assert a.downs == [LinkDown(peer, "heartbeat timeout")]
    assert time.monotonic() - silent_since >= learnt_s


async def test_garbage_frames_drop_only_that_link(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture,
) -> None:
    a = await make_node(1, bad_frame_limit=5, lost_after_s=60.0)  # the hostile peer sends no heartbeats
    c = await make_node(3)
    await a.lm.connect(c.address)
    hostile = raw_peers(2)
    await hostile.link_to(a)
    await wait_until(lambda: len(a.ups) == 2)
    caplog.set_level(logging.WARNING, logger="daemon.net")

    hostile.send_raw(b"\x00\x01")                                  # shorter than a header
    hostile.send_raw(b"\x00\x00\x00\x09\x00\x05\x00\x02" + b"x")   # index beyond count
    hostile.send_raw(split_frames(b"\x01\xff\xff\xff", 77)[0])    # a frame of bad CBOR
    hostile.send_raw("a text message")                              # not binary
    hostile.send(Error(code="still", message="here"))
    await wait_until(lambda: len(a.received(Error)) == 1)
    assert a.downs == []  # four bad frames: logged, counted, tolerated

    hostile.send_raw(split_frames(b"\x07", 78)[0])                  # another protocol version

    await wait_until(lambda: len(a.downs) == 1)
    assert a.downs == [LinkDown(hostile.hello.node_id, "too many bad frames")]
    bad_frame_logs = [r for r in caplog.records if "bad frame from " + hostile.hello.node_id in r.getMessage()]
    assert len(bad_frame_logs) == 5
    # The node and its other links carry on.
    await a.lm.send(c.node_id, Error(code="fine", message="still talking"))
    await c.lm.send(a.node_id, Error(code="fine", message="me too"), channel="activation")
    await wait_until(lambda: len(c.received(Error)) == 1 and len(a.received(Error)) == 2)
    assert a.lm.peers().keys() == {c.node_id}


# --- what a peer can make a node hold ------------------------------------------------------


async def test_a_message_over_the_limit_is_refused_and_never_buffered(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture,
) -> None:
    limit = 1024 * 1024
    a = await make_node(1, max_message_bytes=limit, bad_frame_limit=5, lost_after_s=60.0)  # a silent peer
    hostile = raw_peers(2)
    await hostile.link_to(a)
    await wait_until(lambda: len(a.ups) == 1)
    caplog.set_level(logging.WARNING, logger="daemon.net")

    fits = big_result(limit - 64 * 1024)
    assert len(encode(fits)) <= limit
    hostile.send(fits, "activation")
    await wait_until(lambda: a.received(Result) == [fits])
    channel = link_of(a, hostile).channels["activation"]

    hostile.send(big_result(2 * limit), "activation")  # its first piece says it is too large

    await wait_until(lambda: len(a.downs) == 1)
    assert a.downs == [LinkDown(hostile.hello.node_id, "too many bad frames")]
    assert channel.reassembler.buffered_bytes == 0
    assert any(f"could exceed the {limit}-byte limit" in r.getMessage() for r in caplog.records)


def test_a_channel_holds_at_most_its_limit_of_a_peers_messages_in_progress() -> None:
    limit = 1024 * 1024
    channel = Channel("activation", SimpleNamespace(bufferedAmountLowThreshold=0), 0, limit)
    pieces = [split_frames(bytes(900 * 1024), message_id) for message_id in range(3)]  # 4 each
    held: list[int] = []

    def feed(piece: bytes) -> None:
        try:
            channel.feed(piece, 0.0)
        finally:
            held.append(channel.reassembler.buffered_bytes)

    feed(pieces[0][0])
    feed(pieces[1][0])
    with pytest.raises(WireError, match="more than 2 messages in progress"):
        feed(pieces[2][0])
    feed(pieces[0][1])
    feed(pieces[0][2])
    with pytest.raises(WireError, match=f"more than {limit} bytes buffered"):
        feed(pieces[0][3])
    assert max(held) <= limit
    # what is refused is dropped; a message that fits still arrives whole
    whole = encode(Error(code="ok", message="x" * 1000))
    assert channel.feed(split_frames(whole, 7)[0], 0.0) == Error(code="ok", message="x" * 1000)


def test_the_largest_legitimate_messages_fit_the_limit_a_node_sets() -> None:
    # SmolLM2-135M, the default model: hidden 576, 8192 positions, 3 kv heads of 64
    limit = link_message_bytes(576, 8192, 3, 64)
    prompt = np.zeros((8191, 576), dtype=np.float32)  # the longest prompt, in one Forward
    forward = Forward(session_id="s" * 64, seq=1, term=1, epoch=1, start_pos=0,
                      hidden=encode_tensor(prompt, "f32", compress=False),
                      route=tuple(f"n-{i:062x}" for i in range(256)))
    cache = np.zeros((3, 8192, 64), dtype=np.float32)
    handover = CacheHandover(session_id="s" * 64, term=1, epoch=1, layer=29,
                             keys=encode_tensor(cache, "f32", compress=False),
                             values=encode_tensor(cache, "f32", compress=False))
    assert len(encode(forward)) <= limit and len(encode(handover)) <= limit
    assert limit < 20 * 1024 * 1024
    # a small model gets the default bound; a huge one no more than the wire takes at all
    assert link_message_bytes(64, 128, 2, 16) == DEFAULT_MAX_MESSAGE_BYTES
    assert link_message_bytes(8192, 131072, 8, 128) == WIRE_MAX_MESSAGE_BYTES


class StuckChannel:
    """A data channel whose peer stopped reading: what is sent stays queued."""

    def __init__(self) -> None:
        self.bufferedAmount = 0
        self.bufferedAmountLowThreshold = 0
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.bufferedAmount += len(data)


def test_a_peer_that_does_not_read_loses_its_link_not_this_nodes_memory() -> None:
    high_water = 64 * 1024
    ended: list[str] = []
    control, probe = StuckChannel(), StuckChannel()
    channels = {"control": Channel("control", control, 0), "activation": Channel("activation", StuckChannel(), 0)}
    outbox = Outbox(channels, Channel("probe", probe, 0), meter=LinkMeter(), high_water_bytes=high_water,
                    delay_s=0.0, spawn=lambda coro, name: None, fail=ended.append)  # type: ignore[arg-type,return-value]
    ack = HeartbeatAck(node_id="n-1", echo_sent_at_s=1.0)

    bound = high_water + URGENT_BACKLOG_BYTES
    for _ in range(bound):  # the peer keeps sending heartbeats and never reads the acks
        outbox.send_now("control", ack)
        if ended:
            break
    assert ended == ["peer not reading"]
    assert control.bufferedAmount <= high_water + URGENT_BACKLOG_BYTES + len(control.sent[-1])

    ended.clear()
    outbox2 = Outbox(channels, Channel("probe", probe, 0), meter=LinkMeter(), high_water_bytes=high_water,
                     delay_s=0.0, spawn=lambda coro, name: None, fail=ended.append)  # type: ignore[arg-type,return-value]
    for _ in range(bound):  # the same with the echoes of its probes
        outbox2.send_probe(b"A" * 5)
        if ended:
            break
    assert ended == ["peer not reading"]
    assert probe.bufferedAmount <= high_water + URGENT_BACKLOG_BYTES + 5


# --- links that are refused -----------------------------------------------------------------


async def test_wrong_mesh_key_is_refused_on_both_sides(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.net")
    a = await make_node(1, mesh_key=OTHER_KEY)
    b = await make_node(2, mesh_key=KEY)

    with pytest.raises(LinkError, match="wrong mesh key"):
        await a.lm.connect(b.address)

    logs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"refused a link from {a.node_id}") and "wrong mesh key" in m for m in logs)
    assert any(m.startswith(f"{b.address} refused a link") and "wrong mesh key" in m for m in logs)
    # no link is left at either end to come up later
    assert not a.lm._table.every and not b.lm._table.every
    assert a.ups == [] and b.ups == []
    assert a.lm.peers() == {} and b.lm.peers() == {}


@pytest.mark.parametrize(
    ("initiator_key", "responder_key", "reason"),
    [
        (None, KEY, "missing mesh key"),
        (KEY, None, "this node has no mesh key"),
    ],
)
async def test_a_key_on_one_side_only_is_refused(
    make_node: MakeNode, initiator_key: bytes | None, responder_key: bytes | None, reason: str,
) -> None:
    a = await make_node(1, mesh_key=initiator_key)
    b = await make_node(2, mesh_key=responder_key)

    with pytest.raises(LinkError, match=reason):
        await a.lm.connect(b.address)

    assert a.ups == [] and b.ups == []


async def test_matching_keys_link(make_node: MakeNode) -> None:
    a = await make_node(1, mesh_key=KEY)
    b = await make_node(2, mesh_key=KEY)

    assert await a.lm.connect(b.address) == b.node_id
    await a.lm.send(b.node_id, Error(code="k", message="keyed"))
    await wait_until(lambda: len(b.received(Error)) == 1)


async def test_a_swapped_certificate_in_the_answer_is_refused(make_node: MakeNode) -> None:
    """A man in the middle of signaling who changes the answer's DTLS fingerprint."""
    a = await make_node(1, mesh_key=KEY)
    b = await make_node(2, mesh_key=KEY)

    async def tamper(request: web.Request) -> web.Response:
        status, body = await post_json(b.address, await request.json())
        if status == 200:  # (a refusal, e.g. the 421 that tells the initiator b's id, goes as is)
            body["sdp"] = body["sdp"].replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 00:", 1)
        return web.json_response(body, status=status)

    runner, proxy = await serve([web.post(SIGNAL_PATH, tamper)])
    try:
        with pytest.raises(LinkError, match="answer's HMAC does not match"):
            await a.lm.connect(proxy)
    finally:
        await runner.cleanup()
    assert a.ups == []


async def test_a_replayed_or_stale_offer_is_refused(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    b = await make_node(2, mesh_key=KEY)
    peer = raw_peers(1, mesh_key=KEY)
    body = offer_to_json(await peer.offer(b.node_id))

    first_status, _ = await post_json(b.address, body)
    replay_status, replay = await post_json(b.address, body)

    assert first_status == 200
    assert replay_status == 403
    assert "replayed" in replay["error"]["message"]

    stale_offer = peer.auth.sign_offer(peer.hello, peer.pc.localDescription.sdp, time.time() - 120,
                                       to=b.node_id)
    stale_status, stale = await post_json(b.address, offer_to_json(stale_offer))
    assert stale_status == 403
    assert "stale" in stale["error"]["message"]


async def test_an_incompatible_node_is_refused_with_the_reason(make_node: MakeNode) -> None:
    reason = "mesh name 'lab' != 'default'"
    a = await make_node(1)
    b = await make_node(2, is_compatible=lambda hello: reason)

    with pytest.raises(LinkError, match=reason):
        await a.lm.connect(b.address)

    status, body = await post_json(b.address, offer_to_json(await RawPeer(make_hello(3)).offer(b.node_id)))
    assert status == 409 and reason in body["error"]["message"]
    assert a.ups == [] and b.ups == []


async def test_the_initiator_refuses_an_incompatible_responder(make_node: MakeNode) -> None:
    a = await make_node(1, is_compatible=lambda hello: "model id 'x' != 'model-1'")
    b = await make_node(2, connect_timeout_s=1.0)

    with pytest.raises(LinkError, match="model id"):
        await a.lm.connect(b.address)

    assert not a.lm._table.every  # the initiator's attempt is gone
    await wait_until(lambda: not b.lm._table.every, 10.0)  # the responder's, once it timed out
    assert a.ups == [] and b.ups == []


async def test_connecting_to_itself_is_refused(make_node: MakeNode) -> None:
    a = await make_node(1)
    with pytest.raises(LinkError, match="that is this node"):
        await a.lm.connect(a.address)


async def test_loopback_mode_never_dials_another_address(make_node: MakeNode) -> None:
    a = await make_node(1)
    with pytest.raises(LinkError, match="loopback mode"):
        await a.lm.connect("192.0.2.7:8470")
    with pytest.raises(LinkError, match="HOST:PORT"):
        await a.lm.connect("no-port")


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[]", 400, "JSON object"),
        (b'{"hello": {}, "sdp": "v=0", "auth": null, "extra": 1}', 400, "unknown field 'extra'"),
        (b'{"hello": {"node_id": "n-1"}, "sdp": "v=0\\r\\na=fingerprint:sha-256 AA", "auth": null}',
         400, "missing field"),
        (b"x" * (64 * 1024 + 1), 413, "body over"),
    ],
)
async def test_malformed_signaling_requests_are_refused(
    make_node: MakeNode, body: bytes, status: int, fragment: str,
) -> None:
    b = await make_node(2)
    got_status, got = await post_json(b.address, None, raw=body)
    assert got_status == status
    assert fragment in got["error"]["message"]
    assert b.lm.peers() == {}


async def test_a_bad_hello_field_is_refused(make_node: MakeNode, raw_peers: Callable[..., RawPeer]) -> None:
    b = await make_node(2)
    body = offer_to_json(await raw_peers(1).offer(b.node_id))
    body["hello"]["api_port"] = 0
    status, got = await post_json(b.address, body)
    assert status == 400 and "api_port" in got["error"]["message"]


# --- two links to one peer ------------------------------------------------------------------


async def test_both_sides_dialling_at_once_leaves_one_link(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)

    results = await asyncio.gather(a.lm.connect(b.address), b.lm.connect(a.address),
                                   return_exceptions=True)

    assert any(result in (a.node_id, b.node_id) for result in results), results
    await wait_until(lambda: a.lm.peers().keys() == {b.node_id} and b.lm.peers().keys() == {a.node_id})
    await a.lm.send(b.node_id, Error(code="one", message="link"))
    await b.lm.send(a.node_id, Error(code="one", message="link"))
    await wait_until(lambda: len(a.received(Error)) == 1 and len(b.received(Error)) == 1)
    # Every link reported up was either still up or reported down once.
    assert len(a.ups) - len(a.downs) == 1 and len(b.ups) - len(b.downs) == 1


async def test_a_recorded_offer_is_refused_by_another_node_and_again_and_links_carry_on(
    make_node: MakeNode,
) -> None:
    """Finding 5: an offer seen on the network, replayed to another node or again."""
    a = await make_node(1, mesh_key=KEY)
    b = await make_node(2, mesh_key=KEY)
    c = await make_node(3, mesh_key=KEY)
    await a.lm.connect(c.address)
    recorded: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.json()
        recorded.append(body)
        status, answer = await post_json(b.address, body)
        return web.json_response(answer, status=status)

    runner, tap = await serve([web.post(SIGNAL_PATH, record)])
    try:
        assert await a.lm.connect(tap, b.node_id) == b.node_id
    finally:
        await runner.cleanup()
    [offer] = recorded
    assert offer["to"] == b.node_id

    to_c, refused_c = await post_json(c.address, offer)
    to_b, refused_b = await post_json(b.address, offer)

    assert to_c == 421 and f"the offer is for {b.node_id}; this is {c.node_id}" in refused_c["error"]["message"]
    assert to_b == 403 and "replayed" in refused_b["error"]["message"]
    with pytest.raises(LinkError, match=f"the offer is for {c.node_id}; this is {b.node_id}"):
        await a.lm.connect(b.address, c.node_id)  # the node at an address must be the one expected
    assert a.lm.peers().keys() == {b.node_id, c.node_id}
    assert b.lm.peers().keys() == {a.node_id} and c.lm.peers().keys() == {a.node_id}
    for peer in (b, c):
        await peer.lm.send(a.node_id, Error(code="still", message=peer.node_id))
    await wait_until(lambda: len(a.received(Error)) == 2)
    assert a.downs == [] and b.downs == [] and c.downs == []


async def test_an_offer_that_never_completes_leaves_the_live_link_alone(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    """A half-done offer in a linked peer's name (one a key holder can make): the new link
    waits beside the live one, never opens, times out; the live link never notices."""
    a = await make_node(1, mesh_key=KEY)
    c = await make_node(3, mesh_key=KEY, connect_timeout_s=1.0)
    await a.lm.connect(c.address)
    await wait_until(lambda: len(c.ups) == 1)
    live = link_of(c, a)
    impostor = raw_peers(1, mesh_key=KEY)  # a's node id, its own certificate

    status, _ = await post_json(c.address, offer_to_json(await impostor.offer(c.node_id)))

    assert status == 200
    await wait_until(lambda: len(c.lm._table.every) == 1, 10.0)  # the attempt timed out
    assert link_of(c, a) is live and live.state == "up"
    await c.lm.send(a.node_id, Error(code="still", message="here"))
    await a.lm.send(c.node_id, Error(code="me", message="too"))
    await wait_until(lambda: len(a.received(Error)) == 1 and len(c.received(Error)) == 1)
    assert a.downs == [] and c.downs == [] and c.ups == [LinkUp(a.node_id, a.hello)]


async def test_a_peer_that_comes_back_replaces_its_dead_link_once_the_new_one_is_up(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer],
) -> None:
    c = await make_node(3, mesh_key=KEY, lost_after_s=60.0)
    before = raw_peers(2, mesh_key=KEY)
    await before.link_to(c)
    await wait_until(lambda: len(c.ups) == 1)
    dead = link_of(c, before)
    # the peer restarts (same node id, new connection); its old link is still up at c

    after = raw_peers(2, mesh_key=KEY)
    await after.link_to(c)

    await wait_until(lambda: len(c.ups) == 2)
    assert c.downs == [LinkDown(after.hello.node_id, "replaced")] and dead.state == "closed"
    after.send(Error(code="back", message="again"))
    await wait_until(lambda: len(c.received(Error)) == 1)
    await c.lm.send(after.hello.node_id, Error(code="welcome", message="back"))
    await wait_until(lambda: any(isinstance(m, Error) for m in after.messages))


async def test_dialling_a_linked_peer_again_replaces_the_link_at_both_ends(make_node: MakeNode) -> None:
    a = await make_node(1, mesh_key=KEY)
    c = await make_node(3, mesh_key=KEY)
    await a.lm.connect(c.address)
    await wait_until(lambda: len(c.ups) == 1)
    old = link_of(c, a)

    assert await a.lm.connect(c.address, c.node_id) == c.node_id

    await wait_until(lambda: len(c.ups) == 2 and len(c.downs) == 1 and len(a.downs) == 1)
    # the old link ends as replaced, or as closed by the other end if it was replaced there first
    assert a.downs[0].reason in ("replaced", "channel closed")
    assert c.downs[0].reason in ("replaced", "channel closed")
    assert link_of(c, a) is not old and old.state == "closed"
    await a.lm.send(c.node_id, Error(code="new", message="link"))
    await wait_until(lambda: len(c.received(Error)) == 1)


async def test_no_key_logs_a_warning(make_node: MakeNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="daemon.net")
    await make_node(1)
    assert any("no mesh key: anyone on this network can join this mesh" in r.getMessage()
               for r in caplog.records)


# --- send's declared errors and the small-message path ---------------------------------------


async def test_a_send_to_a_peer_whose_link_just_went_down_raises_link_error(
    make_node: MakeNode,
) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)

    b.lm.drop(a.node_id, "going away")
    await wait_until(lambda: len(a.downs) == 1)

    for channel in ("control", "activation"):
        with pytest.raises(LinkError) as caught:
            await a.lm.send(b.node_id, Error(code="x", message="still there?"), channel=channel)
        assert caught.value.peer_id == b.node_id
    with pytest.raises(ValueError, match="unknown channel"):
        await a.lm.send(b.node_id, Error(code="x", message="y"), channel="nope")
    with pytest.raises(ValueError, match="not a message type"):
        await a.lm.send(b.node_id, "not a message")  # type: ignore[arg-type]


@pytest.mark.parametrize("failure", [ConnectionError("DTLS gone"), OSError(101, "unreachable")])
async def test_an_aiortc_failure_while_sending_raises_link_error_and_ends_the_link(
    make_node: MakeNode, failure: Exception,
) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)
    dc = link_of(a, b).channels["activation"].dc

    def broken_send(data: bytes | str) -> None:
        raise failure

    dc.send = broken_send  # type: ignore[method-assign]

    with pytest.raises(LinkError, match="send failed") as caught:
        await a.lm.send(b.node_id, Error(code="x", message="y"), channel="activation")

    assert caught.value.peer_id == b.node_id
    assert a.downs == [LinkDown(b.node_id, "send failed")]
    with pytest.raises(LinkError, match="no link"):
        await a.lm.send(b.node_id, Error(code="x", message="y"))


async def test_a_transport_that_fails_under_send_raises_link_error(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)
    if not aiortc_tuned():  # known once a link has imported aiortc
        pytest.skip("stock aiortc hands pieces to SCTP in a task of its own")
    sctp: Any = link_of(a, b).channels["activation"].dc.transport

    async def broken_flush() -> None:
        raise ConnectionError("Cannot send encrypted data, not connected")

    sctp._data_channel_flush = broken_flush

    with pytest.raises(LinkError, match="send failed"):
        await a.lm.send(b.node_id, Error(code="x", message="y"), channel="activation")
    assert a.downs == [LinkDown(b.node_id, "send failed")]


async def test_a_heartbeat_goes_ahead_of_queued_activations(make_node: MakeNode) -> None:
    # Heartbeats far apart, and no backpressure: the whole message sits in aiortc's queue.
    quiet = dict(heartbeat_interval_s=30.0, lost_after_s=60.0, probe_on_link_up=False)
    a = await make_node(1, send_high_water_bytes=64 * 1024 * 1024, **quiet)
    b = await make_node(2, **quiet)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)
    if not aiortc_tuned():
        pytest.skip("stock aiortc sends every channel's pieces first in, first out")
    link = link_of(a, b)
    control, activation = link.channels["control"].dc, link.channels["activation"].dc
    sctp: Any = activation.transport

    await a.lm.send(b.node_id, big_result(1024 * 1024), channel="activation")
    queue = sctp._data_channel_queue
    assert len(queue) >= 2 and all(item[0] is activation for item in queue)

    link.heartbeat.beat(time.monotonic(), busy=True)
    link.outbox.send_now("control", Error(code="plain", message="behind"))

    # The heartbeat goes ahead of every queued activation piece; an ordinary control message
    # waits its turn (and stays behind the heartbeat: one channel keeps its order).
    owners = [item[0] for item in queue]
    assert owners[0] is control and owners[-1] is control
    assert all(owner is activation for owner in owners[1:-1])
    assert isinstance(decode(Reassembler().feed(queue[0][2], 0.0) or b""), Heartbeat)
    # (SCTP numbers them in this order; the peer may still deliver the control messages
    # before the Result, or after: streams do not wait for one another.)
    await wait_until(lambda: len(b.received(Error)) == 1 and len(b.received(Result)) == 1)
    assert len(b.received(Heartbeat)) == 1


def decode_step(seq: int, positions: int = 1) -> Forward:
    hidden = np.random.default_rng(seq).standard_normal((positions, 576), dtype=np.float32)
    return Forward(session_id=f"n-{1:016x}/{seq}", seq=seq, term=1, epoch=1, start_pos=seq,
                   hidden=encode_tensor(hidden, "f32", compress=False),
                   route=(f"n-{2:016x}", f"n-{1:016x}"))


async def test_decode_steps_ping_pong_intact_in_two_sctp_packets_each(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)
    steps = [decode_step(seq) for seq in range(50)]
    if aiortc_tuned():
        from aiortc import rtcsctptransport

        size = len(encode(steps[0])) + 8  # one piece: the message and its frame header
        assert math.ceil(size / rtcsctptransport.USERDATA_MAX_LENGTH) == 2

    for step in steps:  # one at a time, each echoed back: every SACK path gets exercised
        await a.lm.send(b.node_id, step, channel="activation")
        await wait_until(lambda: len(b.received(Forward)) == step.seq + 1)
        await b.lm.send(a.node_id, b.received(Forward)[-1], channel="activation")
        await wait_until(lambda: len(a.received(Forward)) == step.seq + 1)

    assert b.received(Forward) == steps
    assert a.received(Forward) == steps
    np.testing.assert_array_equal(decode_tensor(a.received(Forward)[7].hidden),
                                  decode_tensor(steps[7].hidden))
    assert a.downs == [] and b.downs == []


async def test_a_burst_of_small_and_large_messages_arrives_in_order(make_node: MakeNode) -> None:
    # Heartbeats far apart: only the delayed-SACK timer acknowledges a lone packet.
    a = await make_node(1, heartbeat_interval_s=30.0, lost_after_s=60.0)
    b = await make_node(2, heartbeat_interval_s=30.0, lost_after_s=60.0)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)
    sctp: Any = link_of(a, b).channels["activation"].dc.transport

    await a.lm.send(b.node_id, Error(code="lone", message="one packet"))
    await wait_until(lambda: len(b.received(Error)) == 1)
    await wait_until(lambda: not sctp._sent_queue, timeout_s=2.0)  # acknowledged all the same

    sent = [decode_step(seq, positions=1 + seq % 40) for seq in range(60)]
    await asyncio.gather(*(a.lm.send(b.node_id, msg, channel="activation") for msg in sent))
    for seq in range(5):
        link_of(a, b).outbox.send_now("control", Error(code="lone", message=str(seq)))

    await wait_until(lambda: len(b.received(Forward)) == 60 and len(b.received(Error)) == 6)
    assert b.received(Forward) == sent
    await wait_until(lambda: not sctp._sent_queue, timeout_s=2.0)


# --- measurements and the debug link delay --------------------------------------------------


async def test_a_delayed_node_shows_in_the_round_trip_both_ends_measure_and_keeps_order(
    make_node: MakeNode,
) -> None:
    delay_ms = 40.0
    quiet = dict(heartbeat_interval_s=0.05, probe_on_link_up=False, probe_interval_s=None)
    a = await make_node(1, debug_link_delay_ms=delay_ms, **quiet)
    b = await make_node(2, **quiet)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)

    # b's heartbeats are echoed late by a, a's own heartbeats leave late: both see the delay.
    def samples(node: Node, peer: Node) -> int:
        stats = node.lm.link_stats(peer.node_id)
        return stats.rtt_samples if stats is not None else 0

    await wait_until(lambda: samples(b, a) >= 5 and samples(a, b) >= 5)
    for node, peer in ((b, a), (a, b)):
        stats = node.lm.link_stats(peer.node_id)
        assert stats is not None and stats.rtt_ms is not None and stats.rtt_ms >= delay_ms
        rtt = node.lm.rtt_ms(peer.node_id)
        assert rtt is not None and rtt >= delay_ms

    # A send returns at once: the delay is the link's, not the sender's (when it returns, the
    # whole message waits in the link's delay queue; nothing else uses that channel here).
    # The message arrives no sooner than the delay, and every message keeps its place.
    sent_at = time.monotonic()
    first = Error(code="first", message="0")
    await a.lm.send(b.node_id, first, channel="activation")
    assert link_of(a, b).channels["activation"].delayed_bytes == len(split_frames(encode(first), 0)[0])
    await wait_until(lambda: len(b.received(Error)) == 1)
    assert time.monotonic() - sent_at >= delay_ms / 1000
    control = [Error(code="ctl", message=str(i)) for i in range(20)]
    activation = [decode_step(seq, positions=1 + 97 * (seq % 3)) for seq in range(12)]  # to 450 KB
    await asyncio.gather(
        *(a.lm.send(b.node_id, msg) for msg in control),
        *(a.lm.send(b.node_id, msg, channel="activation") for msg in activation),
    )
    await wait_until(lambda: len(b.received(Error)) == 21 and len(b.received(Forward)) == 12)
    assert b.received(Error) == [first, *control]
    assert b.received(Forward) == activation
    assert a.downs == [] and b.downs == []


async def test_delayed_sends_respect_the_high_water_mark(make_node: MakeNode) -> None:
    high_water_bytes = 64 * 1024
    a = await make_node(1, debug_link_delay_ms=20.0, send_high_water_bytes=high_water_bytes,
                        probe_on_link_up=False)
    b = await make_node(2)
    await a.lm.connect(b.address)
    big = big_result(1024 * 1024)
    ch = link_of(a, b).channels["activation"]

    most_queued = 0
    sending = asyncio.create_task(a.lm.send(b.node_id, big, channel="activation"))
    while not sending.done():
        most_queued = max(most_queued, ch.dc.bufferedAmount + ch.delayed_bytes)
        await asyncio.sleep(0.001)
    await sending

    assert most_queued <= high_water_bytes + MAX_FRAME_BYTES
    await wait_until(lambda: len(b.received(Result)) == 1)
    assert b.received(Result) == [big]


async def test_a_new_link_is_probed_at_both_ends(make_node: MakeNode) -> None:
    a = await make_node(1)
    b = await make_node(2)
    await a.lm.connect(b.address)

    def probed(node: Node, peer: Node) -> bool:
        stats = node.lm.link_stats(peer.node_id)
        return stats is not None and stats.samples >= 1

    await wait_until(lambda: probed(a, b) and probed(b, a))
    for node, peer in ((a, b), (b, a)):
        stats = node.lm.link_stats(peer.node_id)
        assert stats is not None and stats.small_mb_s and stats.large_mb_s
        assert stats.small_mb_s > 0 and stats.large_mb_s > 0
    # The probes never reach the mesh logic.
    assert all(isinstance(msg, Heartbeat) for _, msg in a.messages)
    assert all(isinstance(msg, Heartbeat) for _, msg in b.messages)
    assert a.lm.link_stats("n-unknown") is None
    assert await a.lm.probe("n-unknown") is None
    again = await a.lm.probe(b.node_id, large=False)
    assert again is not None and again.samples >= 2
    assert a.downs == [] and b.downs == []


async def test_a_delayed_link_is_probed_too(make_node: MakeNode) -> None:
    a = await make_node(1, debug_link_delay_ms=30.0, probe_on_link_up=False)
    b = await make_node(2, probe_on_link_up=False)
    await a.lm.connect(b.address)
    await wait_until(lambda: len(b.ups) == 1)

    for node, peer in ((a, b), (b, a)):
        stats = await node.lm.probe(peer.node_id)
        assert stats is not None and stats.samples == 1
        assert stats.small_mb_s is not None and stats.large_mb_s is not None


async def test_a_peer_without_the_probe_channel_leaves_the_rates_unmeasured(
    make_node: MakeNode, raw_peers: Callable[..., RawPeer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import daemon.net.probes as probes

    monkeypatch.setattr(probes, "PROBE_TIMEOUT_S", 0.2)
    a = await make_node(1, probe_on_link_up=False, lost_after_s=60.0)  # the old peer sends no heartbeats
    old = raw_peers(2)
    await old.link_to(a)
    await wait_until(lambda: len(a.ups) == 1)
    peer = old.hello.node_id

    stats = await a.lm.probe(peer)
    assert stats is not None and (stats.small_mb_s, stats.large_mb_s, stats.samples) == (None, None, 0)
    assert a.downs == []


async def test_a_probe_whose_link_goes_down_returns_none(make_node: MakeNode) -> None:
    a = await make_node(1, probe_on_link_up=False)
    b = await make_node(2, probe_on_link_up=False)
    await a.lm.connect(b.address)
    probing = asyncio.create_task(a.lm.probe(b.node_id))
    await wait_until(lambda: link_of(a, b).prober.probing > 0)
    a.lm.drop(b.node_id, "gone")
    assert await probing is None
    assert a.downs == [LinkDown(b.node_id, "gone")]


async def test_a_send_that_waits_for_the_link_to_drain_measures_its_rate(make_node: MakeNode) -> None:
    a = await make_node(1, send_high_water_bytes=64 * 1024, probe_on_link_up=False)
    b = await make_node(2)
    await a.lm.connect(b.address)
    before = a.lm.link_stats(b.node_id)
    assert before is not None and before.samples == 0 and before.large_mb_s is None

    await a.lm.send(b.node_id, big_result(1024 * 1024), channel="activation")

    after = a.lm.link_stats(b.node_id)
    assert after is not None and after.samples >= 1
    assert after.large_mb_s is not None and after.large_mb_s > 0


async def test_links_are_probed_again_periodically(make_node: MakeNode) -> None:
    a = await make_node(1, heartbeat_interval_s=0.05, probe_on_link_up=False, probe_interval_s=0.2)
    b = await make_node(2, probe_on_link_up=False, probe_interval_s=None)
    await a.lm.connect(b.address)

    def samples() -> int:
        stats = a.lm.link_stats(b.node_id)
        return stats.samples if stats is not None else 0

    await wait_until(lambda: samples() >= 2)
    stats = a.lm.link_stats(b.node_id)
    assert stats is not None and stats.small_mb_s is not None
    assert stats.large_mb_s is not None  # the first round includes the large probes
    assert b.lm.link_stats(a.node_id) is not None and b.lm.link_stats(a.node_id).samples == 0
