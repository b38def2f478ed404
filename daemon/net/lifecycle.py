"""Link lifecycle: each link's states, and at most one link per peer.

A :class:`Link` goes ``connecting`` -> ``up`` -> ``closed`` (or straight to closed). It is up
once its peer is known (signaling finished), it is the peer's registered link, and both
message channels are open; it is reported up (LinkUp) then, and down (LinkDown, with a
reason) exactly once when it closes after that. A link that never came up is not reported.

Two links to the same peer never live together (:meth:`LinkTable.register`): when a second
one appears (both sides dialled at once, or a peer restarted), the one initiated by the
lower node id wins; between two initiated by the same node, the newer wins. Both ends apply
the same rule. A winner never tears down a link that is up before it is up itself (both
channels open, so DTLS checked the certificate its signaling MAC covers): until then it
waits beside it, and a newcomer that never opens (a replayed or half-done offer) times out
and leaves the live link as it was. The table also bounds how many links exist, and how
many are being set up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from daemon.net.link_events import LinkDown
from daemon.net.signaling import SignalingRefused
from meshllm.placement.linkstats import LinkMeter
from meshllm.wire import Hello

if TYPE_CHECKING:
    from aiortc import RTCPeerConnection

    from daemon.net.framing import BadFrameWindow, Channel, Outbox
    from daemon.net.heartbeats import LinkHeartbeat
    from daemon.net.probes import LinkProber

log = logging.getLogger(__name__)

MAX_LINKS = 256
"""Most links (up or being set up) at once; more offers get 429."""
MAX_CONNECTING_LINKS = 16
"""Most links being set up at once (each holds sockets until it opens or times out)."""


class Link:
    """One peer connection and its parts: framing (``outbox``), heartbeats, probes."""

    def __init__(self, pc: RTCPeerConnection, *, initiator_id: str, meter: LinkMeter,
                 outbox: Outbox, heartbeat: LinkHeartbeat, prober: LinkProber,
                 bad_frames: BadFrameWindow, now_s: float) -> None:
        self.pc = pc
        self.initiator_id = initiator_id
        self.meter = meter
        self.outbox = outbox
        self.heartbeat = heartbeat
        self.prober = prober
        self.bad_frames = bad_frames
        self.peer_id: str | None = None
        self.hello: Hello | None = None
        self.state = "connecting"
        self.down_reason: str | None = None
        self.settled = asyncio.Event()
        """Set when the link goes up or closes."""
        self.created_s = now_s

    @property
    def channels(self) -> dict[str, Channel]:
        """The message channels, ``control`` and ``activation``."""
        return self.outbox.channels

    def set_peer(self, hello: Hello) -> None:
        """Signaling told who is at the other end."""
        self.peer_id = hello.node_id
        self.hello = hello
        self.outbox.set_peer(hello.node_id)
        self.prober.peer_id = hello.node_id


def wins(new: Link, old: Link) -> bool:
    """Whether ``new`` replaces ``old`` (both to the same peer): lower initiator id wins,
    and between links of the same initiator the newer one does."""
    return new.initiator_id <= old.initiator_id


class LinkTable:
    """Every link of one node. ``on_up(link, now_s)`` runs when a link goes up (after it is
    marked up), ``on_down(event)`` when a link that was up closes; ``is_running()`` is False
    once the node is closing (every link then closes as ``closed``)."""

    def __init__(self, *, on_up: Callable[[Link, float], None],
                 on_down: Callable[[LinkDown], None], is_running: Callable[[], bool],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
                 clock: Callable[[], float]) -> None:
        self._on_up = on_up
        self._on_down = on_down
        self._is_running = is_running
        self._spawn = spawn
        self._clock = clock
        self.by_peer: dict[str, Link] = {}
        """Links whose peer is known (at most one per peer), connecting or up."""
        self.waiting: dict[str, Link] = {}
        """A link (connecting) that replaces the peer's link in ``by_peer``, which is up,
        once it is up itself (at most one per peer)."""
        self.every: set[Link] = set()
        """Every link not closed yet, including those still signaling."""

    def add(self, link: Link) -> None:
        self.every.add(link)

    def up(self, peer_id: str) -> Link | None:
        """The peer's link if it is up."""
        link = self.by_peer.get(peer_id)
        return link if link is not None and link.state == "up" else None

    def peers(self) -> dict[str, Hello]:
        return {peer: link.hello for peer, link in self.by_peer.items()
                if link.state == "up" and link.hello is not None}

    def check_capacity(self) -> None:
        """SignalingRefused(429) when no more links may be set up now."""
        connecting = sum(1 for link in self.every if link.state == "connecting")
        if connecting >= MAX_CONNECTING_LINKS or len(self.every) >= MAX_LINKS:
            raise SignalingRefused(429, "too many links; try again later")

    def register(self, link: Link) -> None:
        """Make ``link`` its peer's link if it wins (see :func:`wins`) over the one there,
        else SignalingRefused(409). A loser still connecting closes as ``replaced`` now; one
        that is up stays until ``link`` is up (:meth:`maybe_up`), with ``link`` waiting."""
        peer = link.peer_id
        assert peer is not None
        existing = self.by_peer.get(peer)
        if existing is None or existing is link:
            self.by_peer[peer] = link
            return
        if not wins(link, existing):
            raise SignalingRefused(409, f"already linked with {peer}")
        if existing.state != "up":
            self.finish(existing, "replaced")
            self.by_peer[peer] = link
            return
        waiting = self.waiting.get(peer)
        if waiting is not None and waiting is not link:
            if not wins(link, waiting):
                raise SignalingRefused(409, f"already linking with {peer}")
            self.finish(waiting, "replaced")
        self.waiting[peer] = link

    def maybe_up(self, link: Link) -> None:
        """Mark the link up if everything it needs is there (called on every channel event);
        a waiting link that is up replaces its peer's link (closed as ``replaced``) now."""
        if link.state != "connecting" or link.peer_id is None or link.hello is None:
            return
        current = self.by_peer.get(link.peer_id)
        if current is not link and self.waiting.get(link.peer_id) is not link:
            return
        if any(ch.dc.readyState != "open" for ch in link.channels.values()):
            return
        if current is not link:
            del self.waiting[link.peer_id]
            if current is not None:
                self.finish(current, "replaced")
            self.by_peer[link.peer_id] = link
        link.state = "up"
        link.settled.set()
        log.info("link up: %s (%s)", link.peer_id, link.hello.name)
        self._on_up(link, self._clock())

    def expire_connecting(self, now_s: float, timeout_s: float) -> None:
        """Close the links that are still connecting ``timeout_s`` after they were made."""
        for link in list(self.every):
            if link.state == "connecting" and now_s - link.created_s > timeout_s:
                self.finish(link, "connect timeout")

    def finish(self, link: Link, reason: str) -> None:
        """Close a link (idempotent); report LinkDown if it was up."""
        if link.state == "closed":
            return
        if not self._is_running():
            reason = "closed"
        was_up = link.state == "up"
        link.state = "closed"
        link.down_reason = reason
        self.every.discard(link)
        successor = None
        if link.peer_id is not None and self.by_peer.get(link.peer_id) is link:
            del self.by_peer[link.peer_id]
            successor = self.waiting.pop(link.peer_id, None)
            if successor is not None:
                self.by_peer[link.peer_id] = successor
        elif link.peer_id is not None and self.waiting.get(link.peer_id) is link:
            del self.waiting[link.peer_id]
        link.settled.set()
        link.outbox.close(reason)
        link.prober.close()
        self._spawn(link.pc.close(), f"close link to {link.peer_id}")
        if was_up:
            assert link.peer_id is not None
            log.info("link down: %s: %s", link.peer_id, reason)
            self._on_down(LinkDown(peer_id=link.peer_id, reason=reason))
        else:
            log.debug("link attempt with %s ended: %s", link.peer_id, reason)
        if successor is not None and self._is_running():
            self.maybe_up(successor)
