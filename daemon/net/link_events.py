"""Link events: what the link layer reports to its user (LinkUp, LinkDown, LinkError)."""

from __future__ import annotations

from dataclasses import dataclass

from meshllm.errors import MeshllmError
from meshllm.wire import Hello


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
    ``closed`` (this node closed), or the reason given to ``LinkManager.drop``."""


class LinkError(MeshllmError):
    """A link could not be set up, or a message could not be sent on it."""

    def __init__(self, reason: str, peer_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.peer_id = peer_id
