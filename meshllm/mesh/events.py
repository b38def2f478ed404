"""What the mesh core hands its driver, besides compute jobs: sends and events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshllm import wire
from meshllm.mesh.session import StateChange, Token

Channel = Literal["control", "activation"]
LogKind = Literal["join", "leave", "election", "replan", "error", "info"]


@dataclass(frozen=True)
class Send:
    """A message for a peer. Sends to one peer must go out in the order they were drained."""

    dest: str
    message: wire.Message
    channel: Channel = "control"
    positions: int = 0
    """For hidden states: how many positions they carry (for the byte statistics)."""


@dataclass(frozen=True)
class Logged:
    """Something for the node's event log (and the TUI's)."""

    kind: LogKind
    message: str


@dataclass(frozen=True)
class StatusChanged:
    """Membership, election or plans changed: status views are stale."""


@dataclass(frozen=True)
class SessionOutput:
    """The next item of an answer this node is the entry of."""

    session_id: str
    item: Token | StateChange


@dataclass(frozen=True)
class SessionEnded:
    """The answer is over: finished or cancelled (`error` None), or failed with `error`."""

    session_id: str
    error: str | None = None


Event = Logged | StatusChanged | SessionOutput | SessionEnded
