"""Links: one RTCPeerConnection per peer, two data channels, heartbeats and backpressure.

A :class:`LinkManager` owns every link of a node. It sets links up through HTTP signaling
(:mod:`daemon.net.signaling`: the initiator POSTs its SDP offer to the peer's
``/v1/mesh/signal``, the answer comes back in the response), then carries whole messages
(:mod:`meshllm.wire`) over two reliable, ordered data channels per peer: ``control`` and
``activation``. It reports what happens through three callbacks: a message arrived, a link
is up (:class:`LinkUp`), a link is down (:class:`LinkDown`, exactly once per link that was
up, with a reason).

Every piece from the network goes through a Reassembler and ``decode``; a malformed one is
logged and counted, and a peer that sends too many in a window loses its link. The node and
its other links carry on.

Two links to the same peer never live together: when a second one appears (both sides
dialled at once, or a peer restarted), the one initiated by the lower node id wins; between
two initiated by the same node, the newer wins. Both ends apply the same rule.

Measurements (:meth:`LinkManager.link_stats`, the model is :mod:`meshllm.placement.linkstats`):

- round trip: every heartbeat is echoed at once; the sample of a heartbeat sent while the
  link was busy (a probe in flight, or more than ``LOADED_BYTES`` queued or in flight) is
  queueing, not latency, and is left out of the planner's figure (``rtt_ms()`` keeps it);
- rates: a probe when a link comes up, on a third data channel (``probe``, negotiated id 2,
  raw bytes that never reach the mesh logic): messages of TINY, SMALL and LARGE bytes, each
  echoed by 5 bytes as soon as it has arrived whole, a few times each; the least round trip
  of each size counts, and the differences between sizes give the rates (latency and the
  echo cancel out). A peer without the probe channel drops the probes (aiortc ignores data
  for a stream it has no channel for), so the rates stay unmeasured. The whole probe runs
  again PROBE_SETTLE_S after the link came up (the first often meets a node still busy
  starting), then the small probes every ``probe_interval_s`` and the large ones every
  LARGE_PROBE_EVERY rounds; each probe replaces the rates it measures.
  :meth:`LinkManager.probe` runs the whole probe on demand;
- passively, from real traffic: a ``send`` that waits for the link to drain (backpressure)
  saw the bytes that left the channel's buffer while it waited, at the rate SCTP's
  acknowledgements allow: one bulk-rate sample. aiortc tells a sender nothing else about
  when its bytes arrived (a message's SCTP acknowledgement can be delayed by up to 20 ms),
  so a message that never waits (anything under the high-water mark) yields no sample.

``debug_link_delay_ms`` (testing aid, ``--debug-link-delay-ms``): every piece this node sends
(messages, heartbeats and their echoes, probes and their echoes, Byes) waits that long in one
queue per link before it is handed to aiortc, so per-peer order holds, sends do not wait for
one another (the queue counts toward backpressure), and peers see the delay in the round trip
they measure, as from a node on slow Wi-Fi.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from daemon.net.loopback import is_loopback_host, loopback_ice, usable_candidates
from daemon.net.meshkey import NO_KEY_WARNING
from daemon.hostport import parse_host_port
from daemon.tasks import TaskSet
from daemon.net.signaling import (
    MAX_BODY_BYTES,
    SIGNAL_PATH,
    Authenticator,
    SignalingRefused,
    answer_from_json,
    answer_to_json,
    error_reason,
    error_to_json,
    offer_from_json,
    offer_to_json,
)
from meshllm.errors import MeshllmError, WireError
from meshllm.placement.linkstats import (
    LARGE_PROBE_BYTES,
    SMALL_BYTES,
    TINY_PROBE_BYTES,
    LinkMeter,
    LinkStats,
)
from meshllm.wire import (
    Bye,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Message,
    Reassembler,
    decode,
    encode,
    split_frames,
)

if TYPE_CHECKING:
    from aiortc import RTCDataChannel, RTCPeerConnection

log = logging.getLogger(__name__)

CHANNEL_IDS: dict[str, int] = {"control": 0, "activation": 1}
"""The data channels of every link (negotiated out of band, so both ends create them)."""
DEFAULT_SEND_HIGH_WATER_BYTES = 512 * 1024
"""send() waits while a channel has more than this queued (backpressure). Both channels
share one SCTP association, so this also bounds how long a control message can wait behind
activations: about high-water / throughput (0.1 s at 5 MB/s)."""
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_BAD_FRAME_LIMIT = 5
DEFAULT_BAD_FRAME_WINDOW_S = 10.0
BYE_FLUSH_TIMEOUT_S = 0.5
"""close() waits at most this long for the Byes to leave before closing the connections."""
MAX_LINKS = 256
"""Most links (up or being set up) at once; more offers get 429."""
MAX_CONNECTING_LINKS = 16
"""Most links being set up at once (each holds sockets until it opens or times out)."""
PROBE_CHANNEL_ID = 2
"""The probe channel: raw bytes between link managers, never messages (see the module doc)."""
PROBE_REPEATS = 5
"""Round trips per small probe size (interleaved); the least counts: on a busy machine the
difference between 64 bytes and 4 KB (~0.5 ms) is within a few tries' jitter."""
LARGE_PROBE_REPEATS = 3
"""Round trips of the large probe; the least counts."""
PROBE_TIMEOUT_S = 2.0
"""A probe that gets no echo within this is given up (a peer without the probe channel)."""
DEFAULT_PROBE_INTERVAL_S = 30.0
"""The small probes run again this often on every link (about 21 KB each time)."""
PROBE_SETTLE_S = 5.0
"""The whole probe runs once more this long after a link comes up: the first one often meets
a node still busy starting (loading its model, its layers), which slows everything."""
LARGE_PROBE_EVERY = 4
"""The periodic probes include the large ones every this many rounds (the first included)."""
LOADED_BYTES = 16 * 1024
"""A heartbeat sent while more than this is queued or in flight measures queueing."""
MIN_BULK_SAMPLE_BYTES = 64 * 1024
"""A backpressure wait that drained less than this yields no rate sample."""
MAX_DEBUG_LINK_DELAY_MS = 10_000.0
_PROBE_HEADER = struct.Struct(">cI")
_PROBE_REQUEST = b"P"
_PROBE_ECHO = b"A"
_MESSAGE_ID_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class LinkUp:
    """A link to a peer is open: both channels carry messages from now on."""

    peer_id: str
    """The peer's node id."""
    hello: Hello
    """What the peer said about itself during signaling."""


@dataclass(frozen=True)
class LinkDown:
    """A link that was up is gone; reported exactly once per link."""

    peer_id: str
    reason: str
    """``heartbeat timeout``, ``channel closed``, ``ice failed``, ``bye``,
    ``too many bad frames``, ``replaced`` (a newer link to the same peer took over),
    ``closed`` (this node closed), or the reason given to :meth:`LinkManager.drop`."""


class LinkError(MeshllmError):
    """A link could not be set up, or a message could not be sent on it."""

    def __init__(self, reason: str, peer_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.peer_id = peer_id


class _Channel:
    """One data channel of a link, with its reassembly and send state."""

    def __init__(self, name: str, dc: RTCDataChannel, low_water_bytes: int) -> None:
        self.name = name
        self.dc = dc
        self.reassembler = Reassembler()
        self.send_lock = asyncio.Lock()
        self.drained = asyncio.Event()
        """Set when the queued bytes fall to the low-water mark (or the link ends)."""
        self._next_message_id = 0
        self.delayed_bytes = 0
        """Bytes waiting in the link's delay queue for this channel (debug link delay)."""
        self.pushed_bytes = 0
        """Bytes the delay queue has handed to ``dc`` so far."""
        dc.bufferedAmountLowThreshold = low_water_bytes

    def take_message_id(self) -> int:
        message_id = self._next_message_id
        self._next_message_id = (message_id + 1) & _MESSAGE_ID_MASK
        return message_id


class _Link:
    """One peer connection: ``connecting`` -> ``up`` -> ``closed`` (or straight to closed)."""

    def __init__(self, pc: RTCPeerConnection, channels: dict[str, _Channel], probe: _Channel,
                 initiator_id: str, now_s: float) -> None:
        self.pc = pc
        self.channels = channels
        self.probe = probe
        """The probe channel (raw bytes; not in ``channels``, which carry messages)."""
        self.initiator_id = initiator_id
        self.peer_id: str | None = None
        self.hello: Hello | None = None
        self.state = "connecting"
        self.down_reason: str | None = None
        self.settled = asyncio.Event()
        """Set when the link goes up or closes."""
        self.created_s = now_s
        self.last_rx_s = now_s
        self.bad_frames_s: deque[float] = deque()
        self.meter = LinkMeter()
        self.loaded_heartbeats: deque[float] = deque(maxlen=64)
        """``sent_at_s`` of recent heartbeats sent while the link was busy."""
        self.probe_waiters: dict[int, asyncio.Future[float]] = {}
        self.next_probe_seq = 0
        self.probing = 0
        """Probes in flight (a heartbeat sent meanwhile measures queueing)."""
        self.probe_task: asyncio.Task[None] | None = None
        self.probe_lock = asyncio.Lock()
        self.next_probe_s = now_s
        self.probe_rounds = 0
        self.delayed: deque[tuple[float, _Channel, bytes]] = deque()
        """Pieces waiting out the debug link delay: (due, channel, piece), in sending order."""
        self.pump_task: asyncio.Task[None] | None = None


def _wins(new: _Link, old: _Link) -> bool:
    """Whether ``new`` replaces ``old`` (both to the same peer): lower initiator id wins,
    and between links of the same initiator the newer one does."""
    return new.initiator_id <= old.initiator_id


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
        bad_frame_limit: int = DEFAULT_BAD_FRAME_LIMIT,
        bad_frame_window_s: float = DEFAULT_BAD_FRAME_WINDOW_S,
        debug_link_delay_ms: float = 0.0,
        probe_on_link_up: bool = True,
        probe_interval_s: float | None = DEFAULT_PROBE_INTERVAL_S,
    ) -> None:
        """``debug_link_delay_ms``: delay every piece this node sends (testing aid; see the
        module doc). ``probe_on_link_up``: measure each new link's rates with a probe.
        ``probe_interval_s``: run the small probes again this often (None: never)."""
        if loopback and ice_servers:
            raise ValueError("loopback mode uses no ICE servers (it never leaves 127.0.0.1)")
        if heartbeat_interval_s <= 0 or lost_after_s <= heartbeat_interval_s:
            raise ValueError("need 0 < heartbeat_interval_s < lost_after_s")
        if send_high_water_bytes < 1:
            raise ValueError("send_high_water_bytes must be positive")
        if not 0 <= debug_link_delay_ms <= MAX_DEBUG_LINK_DELAY_MS:
            raise ValueError(f"debug_link_delay_ms must be 0..{MAX_DEBUG_LINK_DELAY_MS:.0f}")
        if probe_interval_s is not None and not probe_interval_s > 0:
            raise ValueError("probe_interval_s must be positive (or None)")
        self._hello = hello
        self._ice_servers = list(ice_servers)
        self._loopback = loopback
        self._auth = Authenticator(mesh_key)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lost_after_s = lost_after_s
        self._on_message = on_message
        self._on_link_up = on_link_up
        self._on_link_down = on_link_down
        self._is_compatible = is_compatible
        self._connect_timeout_s = connect_timeout_s
        self._high_water_bytes = send_high_water_bytes
        self._low_water_bytes = send_high_water_bytes // 4
        self._bad_frame_limit = bad_frame_limit
        self._bad_frame_window_s = bad_frame_window_s
        self._delay_s = debug_link_delay_ms / 1000.0
        self._probe_on_link_up = probe_on_link_up
        self._probe_interval_s = probe_interval_s
        self._term = 0
        self._links: dict[str, _Link] = {}
        """Links whose peer is known (at most one per peer), connecting or up."""
        self._every_link: set[_Link] = set()
        """Every link not closed yet, including those still signaling."""
        self._tasks = TaskSet('links')
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running = False

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
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._connect_timeout_s))
        self._heartbeat_task = self._tasks.spawn(self._heartbeat_loop(), "link heartbeats")
        self._running = True

    async def close(self, reason: str = "closed") -> None:
        """Send Bye (with ``reason``) to every peer, then close every link (each up link is
        reported as LinkDown("closed")) and stop. Signaling requests get 503 from now on."""
        if not self._running:
            return
        self._running = False
        up = [link for link in self._every_link if link.state == "up"]
        for link in up:
            self._send_now(link, "control", Bye(node_id=self._hello.node_id, reason=reason))
        await self._wait_flushed(up, BYE_FLUSH_TIMEOUT_S + self._delay_s)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for link in list(self._every_link):
            self._finish(link, "closed")
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._session is not None:
            await self._session.close()

    def update_hello(self, hello: Hello) -> None:
        """Use ``hello`` in signaling from now on (e.g. after measuring speed)."""
        if hello.node_id != self._hello.node_id:
            raise ValueError("a node's id never changes")
        self._hello = hello

    def set_term(self, term: int) -> None:
        """The highest term this node has seen; heartbeats carry it from now on."""
        self._term = max(self._term, term)

    # --- queries --------------------------------------------------------------------------

    def peers(self) -> dict[str, Hello]:
        """Connected peers (links up) and their Hellos."""
        return {peer: link.hello for peer, link in self._links.items()
                if link.state == "up" and link.hello is not None}

    def rtt_ms(self, peer_id: str) -> float | None:
        """Smoothed round trip to the peer measured by heartbeats; None before the first.

        Every heartbeat counts, queueing behind bulk traffic included; ``link_stats`` has the
        figure for planning."""
        link = self._links.get(peer_id)
        return link.meter.rtt_ms if link is not None and link.state == "up" else None

    def link_stats(self, peer_id: str) -> LinkStats | None:
        """What this node measured on its link to ``peer_id`` (its sends and their echoes):
        idle round trip, small and large rates (see :mod:`meshllm.placement.linkstats`); None without
        a link that is up."""
        link = self._links.get(peer_id)
        return link.meter.stats() if link is not None and link.state == "up" else None

    async def probe(self, peer_id: str, *, large: bool = True) -> LinkStats | None:
        """Measure the link's rates now (about 0.8 MB with ``large``, 21 KB without) and
        return the new figures; None without a link that is up. Never raises for the link:
        a probe that goes unanswered leaves the figures as they were."""
        link = self._links.get(peer_id)
        if link is None or link.state != "up":
            return None
        await self._probe(link, large=large)
        return self.link_stats(peer_id)

    def buffered_bytes(self, peer_id: str, channel: str = "control") -> int:
        """Bytes queued on a channel to the peer and not yet handed to SCTP (0 without a link)."""
        link = self._links.get(peer_id)
        return link.channels[channel].dc.bufferedAmount if link is not None else 0

    # --- connecting -----------------------------------------------------------------------

    def signaling_routes(self) -> list[web.RouteDef]:
        """``POST /v1/mesh/signal``, to mount on the node's HTTP app."""
        return [web.post(SIGNAL_PATH, self._handle_signal)]

    async def connect(self, address: str) -> str:
        """Link to the node whose API listens at ``HOST:PORT``; return its node id once both
        channels are open. Raises LinkError on refusal (wrong key, incompatible, ...), an
        unauthenticated answer, an unreachable address or a timeout."""
        if not self._running:
            raise LinkError("the link manager is not running")
        try:
            host, port = parse_host_port(address)
        except ValueError as exc:
            raise LinkError(f"cannot connect to {address!r}: not HOST:PORT") from exc
        if self._loopback and not is_loopback_host(host):
            raise LinkError(f"loopback mode: will not connect to {address} (not 127.0.0.1)")
        try:
            self._check_capacity()
        except SignalingRefused as exc:
            raise LinkError(exc.reason) from exc
        link = self._new_link(initiator_id=self._hello.node_id)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._initiate(link, address, host, port)
        except TimeoutError:
            self._finish(link, "connect timeout")
            raise LinkError(f"timed out connecting to {address}", link.peer_id) from None
        except BaseException:
            self._finish(link, "connect failed")
            raise

    async def _initiate(self, link: _Link, address: str, host: str, port: int) -> str:
        with loopback_ice(self._loopback):
            await link.pc.setLocalDescription(await link.pc.createOffer())
        offer = self._auth.sign_offer(self._hello, link.pc.localDescription.sdp, time.time())
        status, body = await self._post(address, host, port, offer_to_json(offer))
        if status != 200:
            reason = error_reason(body) or f"HTTP {status}"
            log.warning("%s refused a link: %s", address, reason)
            raise LinkError(f"{address} refused the link: {reason}")
        try:
            answer = answer_from_json(body)
            self._auth.verify_answer(answer, offer)
            self._check_peer(answer.hello)
        except SignalingRefused as exc:
            log.warning("refusing the answer of %s: %s", address, exc.reason)
            raise LinkError(f"refused the answer of {address}: {exc.reason}") from exc
        sdp, candidates = usable_candidates(answer.sdp, loopback=self._loopback)
        if candidates == 0:
            raise LinkError(f"the answer of {address} has no usable ICE candidate")
        link.peer_id = answer.hello.node_id
        link.hello = answer.hello
        try:
            self._register(link)
        except SignalingRefused as exc:
            raise LinkError(exc.reason, link.peer_id) from exc
        try:
            answer_sdp = _rtc().RTCSessionDescription(sdp=sdp, type="answer")
            await link.pc.setRemoteDescription(answer_sdp)
        except Exception as exc:  # aiortc's SDP parser fails in many ways on bad input
            raise LinkError(f"bad SDP answer from {address}: {exc!r}", link.peer_id) from exc
        await link.settled.wait()
        if link.state != "up":
            raise LinkError(f"link to {link.peer_id} failed: {link.down_reason}", link.peer_id)
        return link.peer_id

    async def _post(self, address: str, host: str, port: int,
                    body: dict[str, Any]) -> tuple[int, object]:
        assert self._session is not None
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{port}{SIGNAL_PATH}"
        try:
            async with self._session.post(url, json=body) as response:
                raw = await response.content.read(MAX_BODY_BYTES + 1)
                status = response.status
        except aiohttp.ClientError as exc:
            raise LinkError(f"cannot reach {address}: {exc}") from exc
        if len(raw) > MAX_BODY_BYTES:
            raise LinkError(f"the answer of {address} is over {MAX_BODY_BYTES} bytes")
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    async def _handle_signal(self, request: web.Request) -> web.Response:
        """Answer an offer, or refuse it with 400/403/409/429/503 and the reason."""
        link: _Link | None = None
        try:
            if not self._running:
                raise SignalingRefused(503, "this node is shutting down")
            offer = offer_from_json(await _read_json(request))
            peer = offer.hello.node_id
            try:
                self._auth.verify_offer(offer, time.time())
            except SignalingRefused as exc:
                log.warning("refused a link from %s (%s): %s", peer, request.remote, exc.reason)
                raise
            self._check_peer(offer.hello)
            sdp, candidates = usable_candidates(offer.sdp, loopback=self._loopback)
            if candidates == 0:
                raise SignalingRefused(400, "the offer has no usable ICE candidate")
            self._check_capacity()
            link = self._new_link(initiator_id=peer)
            link.peer_id = peer
            link.hello = offer.hello
            with loopback_ice(self._loopback):
                try:
                    offer_sdp = _rtc().RTCSessionDescription(sdp=sdp, type="offer")
                    await link.pc.setRemoteDescription(offer_sdp)
                    await link.pc.setLocalDescription(await link.pc.createAnswer())
                except Exception as exc:  # aiortc's SDP parser fails in many ways on bad input
                    raise SignalingRefused(400, f"bad SDP offer: {exc!r}") from exc
            if not self._running:
                raise SignalingRefused(503, "this node is shutting down")
            self._register(link)
            answer = self._auth.sign_answer(offer, self._hello, link.pc.localDescription.sdp)
            log.info("answered a link offer from %s (%s)", peer, request.remote)
            return web.json_response(answer_to_json(answer))
        except SignalingRefused as exc:
            if exc.status != 403:
                log.info("refused a signaling request from %s: %s", request.remote, exc.reason)
            if link is not None:
                self._finish(link, "refused")
            return web.json_response(error_to_json(exc, self._hello.node_id), status=exc.status)
        except BaseException:
            if link is not None:
                self._finish(link, "signaling failed")
            raise

    def _check_capacity(self) -> None:
        connecting = sum(1 for link in self._every_link if link.state == "connecting")
        if connecting >= MAX_CONNECTING_LINKS or len(self._every_link) >= MAX_LINKS:
            raise SignalingRefused(429, "too many links; try again later")

    def _check_peer(self, hello: Hello) -> None:
        if hello.node_id == self._hello.node_id:
            raise SignalingRefused(409, "that is this node")
        reason = self._is_compatible(hello)
        if reason is not None:
            raise SignalingRefused(409, f"incompatible: {reason}")

    def _register(self, link: _Link) -> None:
        assert link.peer_id is not None
        existing = self._links.get(link.peer_id)
        if existing is not None and existing is not link:
            if not _wins(link, existing):
                raise SignalingRefused(409, f"already linked with {link.peer_id}")
            self._finish(existing, "replaced")
        self._links[link.peer_id] = link

    def _new_link(self, initiator_id: str) -> _Link:
        rtc = _rtc()
        pc = rtc.RTCPeerConnection(rtc.RTCConfiguration(iceServers=[rtc.RTCIceServer(urls=url)
                                                                   for url in self._ice_servers]))
        channels = {
            name: _Channel(
                name,
                pc.createDataChannel(name, negotiated=True, id=channel_id, ordered=True),
                self._low_water_bytes,
            )
            for name, channel_id in CHANNEL_IDS.items()
        }
        probe = _Channel("probe", pc.createDataChannel("probe", negotiated=True, id=PROBE_CHANNEL_ID,
                                                       ordered=True), self._low_water_bytes)
        link = _Link(pc, channels, probe, initiator_id, time.monotonic())
        for channel in channels.values():
            self._watch_channel(link, channel)
        probe.dc.add_listener("message", lambda data: self._on_probe_piece(link, data))
        pc.add_listener("connectionstatechange", lambda: self._on_connection_state(link))
        self._every_link.add(link)
        return link

    def _watch_channel(self, link: _Link, channel: _Channel) -> None:
        channel.dc.add_listener("open", lambda: self._maybe_up(link))
        channel.dc.add_listener("close", lambda: self._finish(link, "channel closed"))
        channel.dc.add_listener("message", lambda data: self._on_piece(link, channel, data))
        channel.dc.add_listener("bufferedamountlow", channel.drained.set)

    def _on_connection_state(self, link: _Link) -> None:
        state = link.pc.connectionState
        if state == "failed":
            self._finish(link, "ice failed")
        elif state == "closed":
            self._finish(link, "channel closed")

    def _maybe_up(self, link: _Link) -> None:
        if link.state != "connecting" or link.peer_id is None or link.hello is None:
            return
        if self._links.get(link.peer_id) is not link:
            return
        if any(ch.dc.readyState != "open" for ch in link.channels.values()):
            return
        link.state = "up"
        link.last_rx_s = time.monotonic()
        link.settled.set()
        log.info("link up: %s (%s)", link.peer_id, link.hello.name)
        self._notify(self._on_link_up, LinkUp(peer_id=link.peer_id, hello=link.hello))
        if self._probe_interval_s is not None:
            link.next_probe_s = link.last_rx_s + min(PROBE_SETTLE_S, self._probe_interval_s)
        if self._probe_on_link_up and link.state == "up":
            self._start_probe(link, large=True)

    def _finish(self, link: _Link, reason: str) -> None:
        """Close a link (idempotent); report LinkDown if it was up."""
        if link.state == "closed":
            return
        if not self._running:
            reason = "closed"
        was_up = link.state == "up"
        link.state = "closed"
        link.down_reason = reason
        self._every_link.discard(link)
        if link.peer_id is not None and self._links.get(link.peer_id) is link:
            del self._links[link.peer_id]
        link.settled.set()
        for channel in link.channels.values():
            channel.drained.set()
        for task in (link.probe_task, link.pump_task):
            if task is not None:
                task.cancel()
        link.delayed.clear()
        for waiter in link.probe_waiters.values():
            waiter.cancel()
        link.probe_waiters.clear()
        self._tasks.spawn(link.pc.close(), f"close link to {link.peer_id}")
        if was_up:
            assert link.peer_id is not None
            log.info("link down: %s: %s", link.peer_id, reason)
            self._notify(self._on_link_down, LinkDown(peer_id=link.peer_id, reason=reason))
        else:
            log.debug("link attempt with %s ended: %s", link.peer_id, reason)

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
        link = self._links.get(peer_id)
        if link is None or link.state != "up":
            raise LinkError(f"no link to {peer_id}", peer_id)
        ch = link.channels[channel]
        async with ch.send_lock:
            for piece in split_frames(data, ch.take_message_id()):
                if link.state == "up" and self._queued(ch) > self._high_water_bytes:
                    await self._wait_drained(link, ch)
                if link.state != "up":
                    raise LinkError(f"link to {peer_id} lost: {link.down_reason}", peer_id)
                if self._delay_s:
                    self._delay(link, ch, piece)
                    continue
                try:
                    await _send_piece(ch.dc, piece)
                except _rtc().InvalidStateError:
                    self._finish(link, "channel closed")
                    raise LinkError(f"link to {peer_id} lost: channel closed", peer_id) from None
                except Exception as exc:  # aiortc/aioice/OpenSSL: ConnectionError, OSError, ...
                    self._finish(link, "send failed")
                    raise LinkError(f"link to {peer_id} lost: send failed: {exc!r}",
                                    peer_id) from exc
        return len(data)

    @staticmethod
    def _queued(ch: _Channel) -> int:
        return ch.dc.bufferedAmount + ch.delayed_bytes

    async def _wait_drained(self, link: _Link, ch: _Channel) -> None:
        """Wait until the channel's queue is below the high-water mark again. Without a debug
        delay, the bytes that left the buffer meanwhile went at the rate SCTP's
        acknowledgements allowed: a bulk-rate sample."""
        start_s = time.monotonic()
        buffered, pushed = ch.dc.bufferedAmount, ch.pushed_bytes
        while link.state == "up" and self._queued(ch) > self._high_water_bytes:
            ch.drained.clear()
            await ch.drained.wait()
        left = buffered + (ch.pushed_bytes - pushed) - ch.dc.bufferedAmount
        if link.state == "up" and not self._delay_s and left >= MIN_BULK_SAMPLE_BYTES:
            link.meter.add_bulk(left, (time.monotonic() - start_s) * 1000.0)

    def _send_now(self, link: _Link, channel: str, msg: Message) -> None:
        """Queue a small message at once, ignoring backpressure (heartbeats, acks, byes)."""
        ch = link.channels[channel]
        try:
            for piece in split_frames(encode(msg), ch.take_message_id()):
                if self._delay_s:
                    self._delay(link, ch, piece)
                else:
                    ch.dc.send(piece)
        except _rtc().InvalidStateError:
            self._finish(link, "channel closed")

    # --- the debug link delay -----------------------------------------------------------------

    def _delay(self, link: _Link, ch: _Channel, piece: bytes) -> None:
        """Queue ``piece`` to leave ``debug_link_delay_ms`` from now, after those before it."""
        link.delayed.append((time.monotonic() + self._delay_s, ch, piece))
        ch.delayed_bytes += len(piece)
        if link.pump_task is None:
            link.pump_task = self._tasks.spawn(self._pump(link), f"delayed sends to {link.peer_id}")

    async def _pump(self, link: _Link) -> None:
        """Hand the delayed pieces of one link to aiortc when due, in order."""
        try:
            while link.delayed and link.state != "closed":
                due, ch, piece = link.delayed[0]
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                link.delayed.popleft()
                ch.delayed_bytes -= len(piece)
                ch.pushed_bytes += len(piece)
                try:
                    await _send_piece(ch.dc, piece)
                except _rtc().InvalidStateError:
                    self._finish(link, "channel closed")
                    return
                except Exception as exc:  # aiortc/aioice/OpenSSL, as in send()
                    log.warning("delayed send to %s failed: %r", link.peer_id, exc)
                    self._finish(link, "send failed")
                    return
                ch.drained.set()  # a sender may be waiting on the delayed bytes
        finally:
            link.pump_task = None

    # --- probes -------------------------------------------------------------------------------

    def _send_probe(self, link: _Link, data: bytes) -> None:
        if self._delay_s:
            self._delay(link, link.probe, data)
            return
        try:
            link.probe.dc.send(data)
        except _rtc().InvalidStateError:
            self._finish(link, "channel closed")

    def _on_probe_piece(self, link: _Link, data: bytes | str) -> None:
        if link.state == "closed":
            return
        self._maybe_up(link)
        if link.state != "up" or not isinstance(data, bytes) or len(data) < _PROBE_HEADER.size:
            return
        now = time.monotonic()
        link.last_rx_s = now
        kind, seq = _PROBE_HEADER.unpack_from(data)
        if kind == _PROBE_REQUEST:
            self._send_probe(link, _PROBE_HEADER.pack(_PROBE_ECHO, seq))
        elif kind == _PROBE_ECHO:
            waiter = link.probe_waiters.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)

    def _start_probe(self, link: _Link, *, large: bool) -> None:
        if link.probe_task is None or link.probe_task.done():
            link.probe_task = self._tasks.spawn(self._probe(link, large=large),
                                                f"probe link to {link.peer_id}")

    async def _probe(self, link: _Link, *, large: bool) -> None:
        """Round trips of TINY and SMALL probes (PROBE_REPEATS each, interleaved), then of
        LARGE ones; the least of each size goes to the link's meter."""
        async with link.probe_lock:
            tiny: list[float] = []
            small: list[float] = []
            for _ in range(PROBE_REPEATS):
                for size, times in ((TINY_PROBE_BYTES, tiny), (SMALL_BYTES, small)):
                    ms = await self._probe_once(link, size)
                    if ms is None:
                        return
                    times.append(ms)
            big: list[float] = []
            for _ in range(LARGE_PROBE_REPEATS if large else 0):
                ms = await self._probe_once(link, LARGE_PROBE_BYTES)
                if ms is None:
                    break
                big.append(ms)
            link.meter.add_probe(min(tiny), min(small), min(big) if big else None)
            log.debug("probed %s: %.2f / %.2f / %s ms -> %s", link.peer_id, min(tiny), min(small),
                      f"{min(big):.2f}" if big else "-", link.meter.stats())

    async def _probe_once(self, link: _Link, size: int) -> float | None:
        """One probe of ``size`` bytes: ms until its echo arrived; None if none came."""
        if link.state != "up":
            return None
        seq = link.next_probe_seq
        link.next_probe_seq = (seq + 1) & _MESSAGE_ID_MASK
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        link.probe_waiters[seq] = waiter
        link.probing += 1
        start_s = time.monotonic()
        try:
            self._send_probe(link, _PROBE_HEADER.pack(_PROBE_REQUEST, seq)
                             + bytes(size - _PROBE_HEADER.size))
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                arrived_s = await waiter
        except TimeoutError:
            log.debug("probe of %d bytes to %s: no echo", size, link.peer_id)
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not waiter.cancelled() or (task is not None and task.cancelling()):
                raise
            return None  # the link went down (_finish cancels the waiters)
        finally:
            link.probing -= 1
            link.probe_waiters.pop(seq, None)
        return (arrived_s - start_s) * 1000.0

    async def _wait_flushed(self, links: list[_Link], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            link.state == "up" and (link.delayed or link.channels["control"].dc.bufferedAmount > 0)
            for link in links
        ):
            await asyncio.sleep(0.005)

    def drop(self, peer_id: str, reason: str) -> None:
        """Close the link to ``peer_id`` now; LinkDown(reason) is reported if it was up."""
        link = self._links.get(peer_id)
        if link is not None:
            log.warning("dropping the link to %s: %s", peer_id, reason)
            self._finish(link, reason)

    # --- receiving ------------------------------------------------------------------------

    def _on_piece(self, link: _Link, ch: _Channel, data: bytes | str) -> None:
        if link.state == "closed":
            return
        self._maybe_up(link)
        now = time.monotonic()
        if not isinstance(data, bytes):
            self._bad_frame(link, ch, "a text message (only binary pieces are allowed)", now)
            return
        try:
            whole = ch.reassembler.feed(data, now)
            if whole is None:
                link.last_rx_s = now
                return
            msg = decode(whole)
        except WireError as exc:
            self._bad_frame(link, ch, str(exc), now)
            return
        link.last_rx_s = now
        self._dispatch(link, ch, msg, now)

    def _dispatch(self, link: _Link, ch: _Channel, msg: Message, now: float) -> None:
        peer = link.peer_id
        if peer is None:  # data before signaling finished: impossible with aiortc; ignore
            return
        if isinstance(msg, (Heartbeat, HeartbeatAck, Bye)) and msg.node_id != peer:
            self._bad_frame(link, ch, f"{type(msg).__name__} claims to come from {msg.node_id}", now)
            return
        if isinstance(msg, Heartbeat):
            self._send_now(link, "control", HeartbeatAck(node_id=self._hello.node_id,
                                                         echo_sent_at_s=msg.sent_at_s))
        elif isinstance(msg, HeartbeatAck):
            sample_ms = (now - msg.echo_sent_at_s) * 1000.0
            if 0.0 <= sample_ms <= self._lost_after_s * 1000.0:
                link.meter.add_rtt(sample_ms, idle=msg.echo_sent_at_s not in link.loaded_heartbeats)
            return
        elif isinstance(msg, Bye):
            log.info("%s says bye: %s", peer, msg.reason)
            self._finish(link, "bye")
            return
        if link.state == "up":
            self._notify(self._on_message, peer, msg)

    def _bad_frame(self, link: _Link, ch: _Channel, problem: str, now: float) -> None:
        window = link.bad_frames_s
        window.append(now)
        while window and now - window[0] > self._bad_frame_window_s:
            window.popleft()
        log.warning("bad frame from %s on %s (%d in %.0f s): %s",
                    link.peer_id, ch.name, len(window), self._bad_frame_window_s, problem)
        if len(window) >= self._bad_frame_limit:
            self._finish(link, "too many bad frames")

    # --- heartbeats -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        """Send heartbeats; drop links that went quiet or never came up."""
        for link in list(self._every_link):
            if link.state == "connecting":
                if now - link.created_s > self._connect_timeout_s:
                    self._finish(link, "connect timeout")
                continue
            if now - link.last_rx_s > self._lost_after_s:
                self._finish(link, "heartbeat timeout")
                continue
            if link.probing or _busy_bytes(link) > LOADED_BYTES:
                link.loaded_heartbeats.append(now)
            self._send_now(link, "control", Heartbeat(node_id=self._hello.node_id,
                                                      term=self._term, sent_at_s=now))
            for ch in link.channels.values():
                ch.reassembler.expire(now)
            if self._probe_interval_s is not None and now >= link.next_probe_s:
                link.next_probe_s = now + self._probe_interval_s
                self._start_probe(link, large=link.probe_rounds % LARGE_PROBE_EVERY == 0)
                link.probe_rounds += 1

    # --- plumbing -------------------------------------------------------------------------

    def _notify(self, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("link callback %s failed", getattr(callback, "__qualname__", callback))


def _busy_bytes(link: _Link) -> int:
    """Bytes queued on the link or sent and not acknowledged yet (SCTP's own figures where
    aiortc has them)."""
    queued = sum(LinkManager._queued(ch) for ch in (*link.channels.values(), link.probe))
    sctp: Any = link.probe.dc.transport
    in_flight = getattr(sctp, "_flight_size", 0)
    outbound = sum(len(chunk.user_data) for chunk in getattr(sctp, "_outbound_queue", ()))
    return queued + in_flight + outbound


async def _read_json(request: web.Request) -> object:
    """The request's JSON body, at most MAX_BODY_BYTES; SignalingRefused(400/413) otherwise."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise SignalingRefused(413, f"body over {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise SignalingRefused(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SignalingRefused(400, f"body is not JSON: {exc}") from exc


# --- aiortc tuning for small messages ------------------------------------------------------
#
# A decode hop is one small message (~2.4 KB) each way. aiortc 1.16 spends most of a hop's
# time per datagram (DTLS, SCTP, aioice and a loop turn each), and with its defaults a hop
# takes 6 datagrams: 3 DATA packets (a packet carries at most 1,160 bytes of user data, sized
# for the 1,280-byte minimum IPv6 MTU) and 3 SACKs (it acknowledges every packet at once).
# Three patches, measured with scripts/bench_hop.py (docs/benchmarks.md, "One hop, broken
# down"), make it 3 datagrams:
#
# 1. SCTP packets carry up to SCTP_USERDATA_BYTES (1,232) bytes of user data, so an f32 decode
#    hop (2,304 bytes of tensor, ~2,400 as a Forward) is 2 DATA packets. A datagram is then at
#    most 1,260 + 37 (DTLS) bytes: 1,325 bytes with IPv4 and UDP headers, 1,345 with IPv6,
#    within any Ethernet, Wi-Fi or WireGuard MTU (the paths a LAN mesh uses); a path below
#    that (some IPv6 tunnels) would drop them. A peer with stock aiortc takes them as they are
#    (its DTLS reads records of up to 1,500 bytes, its SCTP any chunk size).
# 2. Delayed SACK (RFC 4960 section 6.2): acknowledge every second packet that carries DATA
#    in a task of its own, which runs after the tasks the packet woke (so a stage's reply
#    leaves before the SACK, 18% off a hop in a ring of 3 processes), a lone packet after
#    SACK_DELAY_S, and at once whenever a TSN is missing or duplicated. aiortc's
#    retransmission timer is at least 1 s, far above the delay.
# 3. LinkManager.send hands a piece to SCTP in its own task (``_send_piece``) instead of
#    aiortc creating a task per send that does it on a later loop turn; other sends (the
#    heartbeats of ``_send_now``) share one such task per loop turn. This also makes a failing
#    transport (ConnectionError) raise in ``send`` (as LinkError), not in an orphan task.
#
# Two more were measured and left out (each under 1.5% of a hop, not worth patching pyOpenSSL
# and aioice internals): skipping the failing ``bio_read`` after every decrypted datagram
# (1.7 us each) and aioice's attempt to parse every DTLS datagram as STUN (0.8 us each).
#
# Nothing here touches encryption: every datagram is still DTLS. The patches are installed
# once per process at the first link, when aiortc is first imported (``_rtc``), and only on
# the aiortc version they were written against (TUNED_AIORTC_VERSION); on another the stock
# code runs and a log line says so.

TUNED_AIORTC_VERSION = "1.16.0"
SCTP_USERDATA_BYTES = 1232
"""Most user data in one SCTP DATA chunk (aiortc's default: 1,160)."""
SACK_DELAY_S = 0.02
"""Longest a received packet waits for its SACK (RFC 4960 allows 200 ms)."""
_tuned: bool | None = None


def _rtc() -> ModuleType:
    """aiortc, imported at the first link (an offer made or answered), with the patches above
    installed. A node that never links never loads it, nor PyAV beneath it (~40 MB)."""
    import aiortc

    _install_aiortc_tuning()
    return aiortc


def aiortc_tuned() -> bool:
    """Whether the patches above are installed in this process."""
    return bool(_tuned)


def _install_aiortc_tuning() -> bool:
    """Install the patches once; return whether they are in force."""
    global _tuned
    if _tuned is not None:
        return _tuned
    import importlib.metadata

    found = importlib.metadata.version("aiortc")
    if found != TUNED_AIORTC_VERSION:
        log.info("links: aiortc %s runs as it is (the small-message tuning is for %s)",
                 found, TUNED_AIORTC_VERSION)
        _tuned = False
        return False
    _patch_sctp()
    _tuned = True
    return True


async def _send_piece(dc: RTCDataChannel, piece: bytes) -> None:
    """``dc.send(piece)``; when tuned, also hands the piece to SCTP now (see 3. above)."""
    if not _tuned:
        dc.send(piece)
        return
    sctp: Any = dc.transport
    sctp._meshllm_inline = True
    try:
        dc.send(piece)
    finally:
        sctp._meshllm_inline = False
    await sctp._data_channel_flush()


def _patch_sctp() -> None:
    from aiortc import rtcsctptransport as sctp_module
    from aiortc.rtcsctptransport import RTCSctpTransport

    sctp_module.USERDATA_MAX_LENGTH = SCTP_USERDATA_BYTES
    established = RTCSctpTransport.State.ESTABLISHED
    original_send_sack = RTCSctpTransport._send_sack
    original_data_channel_flush = RTCSctpTransport._data_channel_flush

    cls: Any = RTCSctpTransport
    cls._meshllm_unsacked = 0
    cls._meshllm_sack_timer = None
    cls._meshllm_sack_soon = False
    cls._meshllm_inline = False
    cls._meshllm_flush_pending = False

    async def _send_sack(self: Any) -> None:
        self._meshllm_unsacked = 0
        if self._meshllm_sack_timer is not None:
            self._meshllm_sack_timer.cancel()
            self._meshllm_sack_timer = None
        await original_send_sack(self)

    async def _delayed_sack(self: Any) -> None:
        self._meshllm_sack_soon = False
        if not self._sack_needed or self._association_state != established:
            return
        try:
            await self._send_sack()
        except ConnectionError:  # DTLS closed meanwhile: nothing to acknowledge any more
            pass

    def _sack_timer_fired(self: Any) -> None:
        self._meshllm_sack_timer = None
        if self._sack_needed and self._association_state == established:
            asyncio.ensure_future(_delayed_sack(self))

    async def _handle_data(self: Any, data: bytes) -> None:
        # aiortc 1.16's _handle_data, with a delayed SACK at the end.
        try:
            _, _, verification_tag, chunks = sctp_module.parse_packet(data)
        except ValueError:
            return
        if any(isinstance(chunk, sctp_module.InitChunk) for chunk in chunks):
            assert len(chunks) == 1
            expected_tag = 0
        else:
            expected_tag = self._local_verification_tag
        if verification_tag != expected_tag:
            return
        for chunk in chunks:
            await self._receive_chunk(chunk)
        if not self._sack_needed:
            return
        self._meshllm_unsacked += 1
        if (self._sack_misordered or self._sack_duplicates
                or self._association_state != established):
            await self._send_sack()
        elif self._meshllm_unsacked >= 2:
            # After the tasks this packet woke (the message's consumer): its reply goes first.
            if not self._meshllm_sack_soon:
                self._meshllm_sack_soon = True
                asyncio.ensure_future(_delayed_sack(self))
        elif self._meshllm_sack_timer is None:
            self._meshllm_sack_timer = self._loop.call_later(SACK_DELAY_S, _sack_timer_fired, self)

    async def _flush_task(self: Any) -> None:
        self._meshllm_flush_pending = False
        await original_data_channel_flush(self)

    def _data_channel_send(self: Any, channel: RTCDataChannel, data: bytes | str) -> None:
        # aiortc 1.16's _data_channel_send; the flush runs in the caller (see _send_piece), or
        # in one task for all the sends of a loop turn instead of one task per send.
        if data == "":
            pp_id, user_data = sctp_module.WEBRTC_STRING_EMPTY, b"\x00"
        elif isinstance(data, str):
            pp_id, user_data = sctp_module.WEBRTC_STRING, data.encode("utf8")
        elif data == b"":
            pp_id, user_data = sctp_module.WEBRTC_BINARY_EMPTY, b"\x00"
        else:
            pp_id, user_data = sctp_module.WEBRTC_BINARY, data
        if self._remote_max_message_size and len(user_data) > self._remote_max_message_size:
            raise ValueError(
                f"Cannot send message of {len(user_data)} bytes, the remote party "
                f"only supports messages up to {self._remote_max_message_size} bytes"
            )
        channel._addBufferedAmount(len(user_data))
        self._data_channel_queue.append((channel, pp_id, user_data))
        if not self._meshllm_inline and not self._meshllm_flush_pending:
            self._meshllm_flush_pending = True
            asyncio.ensure_future(_flush_task(self))

    cls._send_sack = _send_sack
    cls._handle_data = _handle_data
    cls._data_channel_send = _data_channel_send
