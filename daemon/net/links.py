"""Links: the link manager, one node's front door to its peers over WebRTC.

A :class:`LinkManager` owns every link of a node and composes the layers that make a link,
one module each:

- :mod:`daemon.net.signaling_http` sets links up (the initiator POSTs a signed SDP offer to
  the peer's ``/v1/mesh/signal``; the answer comes back in the response);
- :mod:`daemon.net.lifecycle`: one RTCPeerConnection per peer, ``connecting`` -> ``up`` ->
  ``closed``, one link per peer (duplicates settled by the same rule at both ends);
- :mod:`daemon.net.framing`: whole messages (:mod:`meshllm.wire`) over two reliable, ordered
  data channels, ``control`` and ``activation``, with reassembly, bad-frame counting and
  backpressure; :mod:`daemon.net.delay`: the debug link delay;
- :mod:`daemon.net.heartbeats`: heartbeats, their round trip, and loss detection
  (:mod:`daemon.net.failure_detector`, phi accrual);
- :mod:`daemon.net.probes`: rate probes on a third, raw channel;
- :mod:`daemon.net.aiortc_tuning`: the only place that patches aiortc/aioice internals.

It reports what happens through three callbacks: a message arrived, a link is up
(:class:`LinkUp`), a link is down (:class:`LinkDown`, exactly once per link that was up, with
a reason). Every piece from the network goes through a Reassembler and ``decode``; a
malformed one is logged and counted, and a peer that sends too many in a window loses its
link. The node and its other links carry on.

Measurements (:meth:`LinkManager.link_stats`, the model is :mod:`meshllm.placement.linkstats`):
the idle round trip of heartbeats, the rates of the probes, and a bulk-rate sample from every
``send`` that had to wait for the link to drain (backpressure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from daemon.net.aiortc_tuning import aiortc_tuned, rtc
from daemon.net.delay import MAX_DEBUG_LINK_DELAY_MS
from daemon.net.framing import (
    CHANNEL_IDS,
    DEFAULT_BAD_FRAME_LIMIT,
    DEFAULT_BAD_FRAME_WINDOW_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_SEND_HIGH_WATER_BYTES,
    BadFrameWindow,
    Channel,
    Outbox,
)
from daemon.net.heartbeats import LOADED_BYTES, LinkHeartbeat
from daemon.net.lifecycle import Link, LinkTable
from daemon.net.link_events import LinkDown, LinkError, LinkUp
from daemon.net.meshkey import NO_KEY_WARNING
from daemon.net.probes import DEFAULT_PROBE_INTERVAL_S, PROBE_CHANNEL_ID, LinkProber
from daemon.net.signaling import SIGNAL_PATH, Authenticator
from daemon.net.signaling_http import SignalingEndpoint
from daemon.tasks import TaskSet
from meshllm.errors import WireError
from meshllm.placement.linkstats import LinkMeter, LinkStats
from meshllm.wire import Bye, Heartbeat, HeartbeatAck, Hello, Message, encode

__all__ = ["CHANNEL_IDS", "DEFAULT_SEND_HIGH_WATER_BYTES", "LinkDown", "LinkError", "LinkManager",
           "LinkUp", "aiortc_tuned"]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
BYE_FLUSH_TIMEOUT_S = 0.5
"""close() waits at most this long for the Byes to leave before closing the connections."""


class LinkManager:
    """All links of one node. ``await start()``, mount :meth:`signaling_routes`, then
    :meth:`connect` to peers and :meth:`send` to them; ``await close()`` at the end.

    Callbacks run on the event loop and must not block; an exception in one is logged and
    does not harm the link.
    """

    def __init__(
        self,
        hello: Hello,
        *,
        ice_servers: Sequence[str] = (),
        loopback: bool = False,
        mesh_key: bytes | None = None,
        heartbeat_interval_s: float = 0.2,
        lost_after_s: float = 1.0,
        on_message: Callable[[str, Message], None],
        on_link_up: Callable[[LinkUp], None],
        on_link_down: Callable[[LinkDown], None],
        is_compatible: Callable[[Hello], str | None],
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        send_high_water_bytes: int = DEFAULT_SEND_HIGH_WATER_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        bad_frame_limit: int = DEFAULT_BAD_FRAME_LIMIT,
        bad_frame_window_s: float = DEFAULT_BAD_FRAME_WINDOW_S,
        debug_link_delay_ms: float = 0.0,
        probe_on_link_up: bool = True,
        probe_interval_s: float | None = DEFAULT_PROBE_INTERVAL_S,
    ) -> None:
        """``lost_after_s``: the least silence after which a peer is lost (the heartbeat
        timeout); a peer whose heartbeats arrive irregularly is given longer, up to 10 s
        (see :mod:`daemon.net.heartbeats`). ``debug_link_delay_ms``: delay every piece this
        node sends (testing aid; see :mod:`daemon.net.delay`). ``probe_on_link_up``: measure
        each new link's rates with a probe. ``probe_interval_s``: run the small probes again
        this often (None: never). ``max_message_bytes``: the largest message taken from a
        peer, and what each channel holds of messages in progress (more is refused as a bad
        frame; a node passes :func:`daemon.net.framing.link_message_bytes` of its model)."""
        if loopback and ice_servers:
            raise ValueError("loopback mode uses no ICE servers (it never leaves 127.0.0.1)")
        if heartbeat_interval_s <= 0 or lost_after_s <= heartbeat_interval_s:
            raise ValueError("need 0 < heartbeat_interval_s < lost_after_s")
        if send_high_water_bytes < 1:
            raise ValueError("send_high_water_bytes must be positive")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if not 0 <= debug_link_delay_ms <= MAX_DEBUG_LINK_DELAY_MS:
            raise ValueError(f"debug_link_delay_ms must be 0..{MAX_DEBUG_LINK_DELAY_MS:.0f}")
        if probe_interval_s is not None and not probe_interval_s > 0:
            raise ValueError("probe_interval_s must be positive (or None)")
        self._hello = hello
        self._ice_servers = list(ice_servers)
        self._auth = Authenticator(mesh_key)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lost_after_s = lost_after_s
        self._on_message = on_message
        self._on_link_up = on_link_up
        self._on_link_down = on_link_down
        self._connect_timeout_s = connect_timeout_s
        self._high_water_bytes = send_high_water_bytes
        self._low_water_bytes = send_high_water_bytes // 4
        self._max_message_bytes = max_message_bytes
        self._bad_frame_limit = bad_frame_limit
        self._bad_frame_window_s = bad_frame_window_s
        self._delay_s = debug_link_delay_ms / 1000.0
        self._probe_on_link_up = probe_on_link_up
        self._probe_interval_s = probe_interval_s
        self._tasks = TaskSet('links')
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._running = False
        self._table = LinkTable(
            on_up=self._link_up,
            on_down=lambda event: self._notify(self._on_link_down, event),
            is_running=lambda: self._running, spawn=self._tasks.spawn, clock=time.monotonic)
        self._signaling = SignalingEndpoint(
            auth=self._auth, hello=lambda: self._hello, is_compatible=is_compatible,
            loopback=loopback, connect_timeout_s=connect_timeout_s, table=self._table,
            new_link=self._new_link, is_running=lambda: self._running)

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def hello(self) -> Hello:
        """What this node tells peers about itself."""
        return self._hello

    async def start(self) -> None:
        """Start heartbeats and the HTTP client used for signaling."""
        if self._running:
            return
        if not self._auth.has_key:
            log.warning(NO_KEY_WARNING)
        self._signaling.open()
        self._heartbeat_task = self._tasks.spawn(self._heartbeat_loop(), "link heartbeats")
        self._running = True

    async def close(self, reason: str = "closed") -> None:
        """Send Bye (with ``reason``) to every peer, then close every link (each up link is
        reported as LinkDown("closed")) and stop. Signaling requests get 503 from now on."""
        if not self._running:
            return
        self._running = False
        up = [link for link in self._table.every if link.state == "up"]
        for link in up:
            link.outbox.send_now("control", Bye(node_id=self._hello.node_id, reason=reason))
        await self._wait_flushed(up, BYE_FLUSH_TIMEOUT_S + self._delay_s)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for link in list(self._table.every):
            self._table.finish(link, "closed")
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._signaling.close()

    async def _wait_flushed(self, links: list[Link], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            link.state == "up" and link.outbox.flushing() for link in links
        ):
            await asyncio.sleep(0.005)

    def update_hello(self, hello: Hello) -> None:
        """Use ``hello`` in signaling from now on (e.g. after measuring speed)."""
        if hello.node_id != self._hello.node_id:
            raise ValueError("a node's id never changes")
        self._hello = hello

    # --- queries --------------------------------------------------------------------------

    def peers(self) -> dict[str, Hello]:
        """Connected peers (links up) and their Hellos."""
        return self._table.peers()

    def rtt_ms(self, peer_id: str) -> float | None:
        """Smoothed round trip to the peer measured by heartbeats; None before the first.

        Every heartbeat counts, queueing behind bulk traffic included; ``link_stats`` has the
        figure for planning."""
        link = self._table.up(peer_id)
        return link.meter.rtt_ms if link is not None else None

    def link_stats(self, peer_id: str) -> LinkStats | None:
        """What this node measured on its link to ``peer_id`` (its sends and their echoes):
        idle round trip, small and large rates (see :mod:`meshllm.placement.linkstats`); None
        without a link that is up."""
        link = self._table.up(peer_id)
        return link.meter.stats() if link is not None else None

    async def probe(self, peer_id: str, *, large: bool = True) -> LinkStats | None:
        """Measure the link's rates now (about 0.8 MB with ``large``, 21 KB without) and
        return the new figures; None without a link that is up. Never raises for the link:
        a probe that goes unanswered leaves the figures as they were."""
        link = self._table.up(peer_id)
        if link is None:
            return None
        await link.prober.run(large=large)
        return self.link_stats(peer_id)

    def buffered_bytes(self, peer_id: str, channel: str = "control") -> int:
        """Bytes queued on a channel to the peer and not yet handed to SCTP (0 without a link)."""
        link = self._table.by_peer.get(peer_id)
        return link.channels[channel].dc.bufferedAmount if link is not None else 0

    # --- connecting -----------------------------------------------------------------------

    def signaling_routes(self) -> list[web.RouteDef]:
        """``POST /v1/mesh/signal``, to mount on the node's HTTP app."""
        return [web.post(SIGNAL_PATH, self._signaling.handle)]

    async def connect(self, address: str, peer_id: str | None = None) -> str:
        """Link to the node whose signaling server listens at ``HOST:PORT``; return its node
        id once both channels are open. ``peer_id``: the node expected there (the offer is
        signed for it, and only it can take it); None: whoever it is (one more round trip
        learns its id). Raises LinkError on refusal (wrong key, incompatible, another node
        than ``peer_id``, ...), an unauthenticated answer, an unreachable address or a
        timeout. A peer already linked keeps its link until the new one is up (then the
        rule of :mod:`daemon.net.lifecycle` decides which stays)."""
        if not self._running:
            raise LinkError("the link manager is not running")
        return await self._signaling.connect(address, peer_id)

    def drop(self, peer_id: str, reason: str) -> None:
        """Close the link to ``peer_id`` now (and one waiting to replace it); LinkDown(reason)
        is reported if it was up."""
        waiting = self._table.waiting.get(peer_id)
        if waiting is not None:
            self._table.finish(waiting, reason)
        link = self._table.by_peer.get(peer_id)
        if link is not None:
            log.warning("dropping the link to %s: %s", peer_id, reason)
            self._table.finish(link, reason)

    def _new_link(self, initiator_id: str) -> Link:
        """A link in state ``connecting``: its peer connection, channels and parts."""
        aiortc = rtc()
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(
            iceServers=[aiortc.RTCIceServer(urls=url) for url in self._ice_servers]))

        def channel(name: str, channel_id: int) -> Channel:
            dc = pc.createDataChannel(name, negotiated=True, id=channel_id, ordered=True)
            return Channel(name, dc, self._low_water_bytes, self._max_message_bytes)

        def fail(reason: str) -> None:
            self._table.finish(link, reason)

        channels = {name: channel(name, channel_id) for name, channel_id in CHANNEL_IDS.items()}
        probe = channel("probe", PROBE_CHANNEL_ID)
        now = time.monotonic()
        meter = LinkMeter()
        outbox = Outbox(channels, probe, meter=meter, high_water_bytes=self._high_water_bytes,
                        delay_s=self._delay_s, spawn=self._tasks.spawn, fail=fail)
        link = Link(
            pc, initiator_id=initiator_id, meter=meter, outbox=outbox, now_s=now,
            heartbeat=LinkHeartbeat(self._hello.node_id,
                                    lambda msg: outbox.send_now("control", msg, urgent=True), meter,
                                    interval_s=self._heartbeat_interval_s,
                                    lost_after_s=self._lost_after_s, now_s=now),
            prober=LinkProber(outbox.send_probe, meter, spawn=self._tasks.spawn,
                              is_up=lambda: link.state == "up", now_s=now),
            bad_frames=BadFrameWindow(self._bad_frame_limit, self._bad_frame_window_s))
        for ch in channels.values():
            ch.dc.add_listener("open", lambda: self._table.maybe_up(link))
            ch.dc.add_listener("close", lambda: fail("channel closed"))
            ch.dc.add_listener("message", lambda data, ch=ch: self._on_piece(link, ch, data))
            ch.dc.add_listener("bufferedamountlow", ch.drained.set)
        probe.dc.add_listener("message", lambda data: self._on_probe_piece(link, data))
        pc.add_listener("connectionstatechange", lambda: self._on_connection_state(link))
        self._table.add(link)
        return link

    def _on_connection_state(self, link: Link) -> None:
        state = link.pc.connectionState
        if state == "failed":
            self._table.finish(link, "ice failed")
        elif state == "closed":
            self._table.finish(link, "channel closed")

    def _link_up(self, link: Link, now: float) -> None:
        assert link.peer_id is not None and link.hello is not None
        link.heartbeat.restart(now)
        self._notify(self._on_link_up, LinkUp(peer_id=link.peer_id, hello=link.hello))
        link.prober.schedule(now, self._probe_interval_s)
        if self._probe_on_link_up and link.state == "up":
            link.prober.start(large=True)

    # --- sending --------------------------------------------------------------------------

    async def send(self, peer_id: str, msg: Message, *, channel: str = "control") -> int:
        """Send one message to ``peer_id``; return its encoded size in bytes.

        The message travels in data-channel pieces (:func:`meshllm.wire.split_frames`: one
        piece for any message under 256 KiB). Waits while the channel has more than the
        high-water mark queued (backpressure).

        Raises:
            LinkError: for every link-level failure, and only then: there is no link to the
                peer (or it is not up yet), the link goes down before or while the message
                is handed over, the channel is closed, or aiortc fails while sending
                (``InvalidStateError``, ``ConnectionError``, ``OSError``, ...). The link is
                closed (reported once as LinkDown) when the failure was aiortc's.
                ``LinkError.peer_id`` is ``peer_id``.
            ValueError: a programming error: ``channel`` is not one of :data:`CHANNEL_IDS`,
                or ``msg`` is not a message that can be encoded.

        A message that was handed over before the link went down may or may not arrive;
        callers that need to know wait for an answer.
        """
        if channel not in CHANNEL_IDS:
            raise ValueError(f"unknown channel {channel!r}; one of {sorted(CHANNEL_IDS)}")
        try:
            data = encode(msg)
        except WireError as exc:
            raise ValueError(f"cannot send {type(msg).__name__}: {exc}") from exc
        link = self._table.up(peer_id)
        if link is None:
            raise LinkError(f"no link to {peer_id}", peer_id)
        await link.outbox.send(peer_id, channel, data)
        return len(data)

    # --- receiving ------------------------------------------------------------------------

    def _on_piece(self, link: Link, ch: Channel, data: bytes | str) -> None:
        if link.state == "closed":
            return
        self._table.maybe_up(link)
        now = time.monotonic()
        try:
            msg = ch.feed(data, now)
        except WireError as exc:
            self._bad_frame(link, ch, str(exc), now)
            return
        link.heartbeat.heard(now)
        if msg is not None:
            self._dispatch(link, ch, msg, now)

    def _dispatch(self, link: Link, ch: Channel, msg: Message, now: float) -> None:
        peer = link.peer_id
        if peer is None:  # data before signaling finished: impossible with aiortc; ignore
            return
        if isinstance(msg, (Heartbeat, HeartbeatAck, Bye)) and msg.node_id != peer:
            self._bad_frame(link, ch, f"{type(msg).__name__} claims to come from {msg.node_id}", now)
            return
        if isinstance(msg, Heartbeat):
            link.heartbeat.on_heartbeat(msg, now)
        elif isinstance(msg, HeartbeatAck):
            link.heartbeat.on_ack(msg, now)
            return
        elif isinstance(msg, Bye):
            log.info("%s says bye: %s", peer, msg.reason)
            self._table.finish(link, "bye")
            return
        if link.state == "up":
            self._notify(self._on_message, peer, msg)

    def _bad_frame(self, link: Link, ch: Channel, problem: str, now: float) -> None:
        count = link.bad_frames.add(now)
        log.warning("bad frame from %s on %s (%d in %.0f s): %s",
                    link.peer_id, ch.name, count, self._bad_frame_window_s, problem)
        if link.bad_frames.too_many():
            self._table.finish(link, "too many bad frames")

    def _on_probe_piece(self, link: Link, data: bytes | str) -> None:
        if link.state == "closed":
            return
        self._table.maybe_up(link)
        if link.state != "up" or not isinstance(data, bytes):
            return
        now = time.monotonic()
        link.heartbeat.heard(now)
        link.prober.on_piece(data, now)

    # --- heartbeats -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        last_s = time.monotonic()
        deferred = False
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            now = time.monotonic()
            # More than an interval late: this loop stalled. Judge on the next tick (never
            # twice in a row), once the peers' pieces waiting in the sockets are in.
            stalled = not deferred and now - last_s > 2 * self._heartbeat_interval_s
            self._tick(now, stalled=stalled)
            deferred, last_s = stalled, now

    def _tick(self, now: float, *, stalled: bool = False) -> None:
        """Send heartbeats; drop links that went quiet or never came up. ``stalled``: this
        tick came more than an interval late (see :mod:`daemon.net.heartbeats`)."""
        self._table.expire_connecting(now, self._connect_timeout_s)
        for link in list(self._table.every):
            if link.state != "up":
                continue
            if link.heartbeat.lost(now, stalled=stalled):
                log.info("lost %s: %s", link.peer_id, link.heartbeat.describe(now))
                self._table.finish(link, "heartbeat timeout")
                continue
            busy = link.prober.probing > 0 or link.outbox.busy_bytes() > LOADED_BYTES
            link.heartbeat.beat(now, busy=busy)
            link.outbox.expire(now)
            if self._probe_interval_s is not None:
                link.prober.periodic(now, self._probe_interval_s)

    # --- plumbing -------------------------------------------------------------------------

    def _notify(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("link callback %s failed", getattr(callback, "__qualname__", callback))
