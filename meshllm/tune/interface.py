"""The tune core's interface: what its roles are given and what they hand the driver.

In: `TuneSettings`, a `JobRequest` (the local node's own data, as counts), and the mesh as the
roles see it (`TuneContext`: this node, the coordinator, the linked members). Out, collected
by one `Outbox` and drained by the driver: messages on `TUNE_CHANNEL`, `Train` jobs, and the
events `TuneProgress`, `TuneFinished`, `TuneFailed` (and `Logged`). Nothing here reads a clock
or touches torch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from meshllm import wire
from meshllm.mesh.events import Channel, Logged, LogKind, Send
from meshllm.tune.aggregate import Bounds
from meshllm.wire import messages as wm

TUNE_CHANNEL: Channel = "activation"
"""Every tune message travels on this one channel (so they stay in order), away from the
control channel's heartbeats: an adapter part can take a second to cross a slow link."""

TUNE_MESSAGES: tuple[type[wire.Message], ...] = (
    wire.TuneJoin, wire.TuneAccepted, wire.TuneQuit, wire.TuneRound, wire.TuneTensors, wire.TuneRefused, wire.TuneDone,
    wire.Hello,
)
"""The messages `TuneCore.receive` takes (the driver routes these to it, the rest to the mesh
core). ``Hello`` over a link is a peer announcing the model id it serves now, after it took up
a tune job's adapter (`meshllm.tune.serving`)."""

MAX_JOB_ROUNDS = 1000
MAX_JOB_RANK = 256
MAX_JOB_STEPS = 100_000
MAX_JOB_ALPHA = 4096.0
"""A job's settings, at most: what ``POST /v1/tune`` accepts (`daemon.tune_request`). A
coordinator refuses to start a bigger job, a participant to train for one, and a member to
take up its adapter."""


def job_problem(rounds: int, rank: int, alpha: float, steps: int | None = None) -> str | None:
    """Why a job with these settings is out of bounds, or None."""
    if not 1 <= rounds <= MAX_JOB_ROUNDS:
        return f"{rounds} rounds; at most {MAX_JOB_ROUNDS}"
    if not 1 <= rank <= MAX_JOB_RANK:
        return f"rank {rank}; at most {MAX_JOB_RANK}"
    if not 0 < alpha <= MAX_JOB_ALPHA:
        return f"alpha {alpha:g}; above 0 and at most {MAX_JOB_ALPHA:g}"
    if steps is not None and not 1 <= steps <= MAX_JOB_STEPS:
        return f"{steps} steps a round; at most {MAX_JOB_STEPS}"
    return None


def job_seed(job_id: str) -> int:
    """The seed of a job's initial adapter: every member can make it again from the job id."""
    return zlib.crc32(job_id.encode("utf-8"))

PENDING_JOB_ID = "pending"
"""What `TuneCore.join` returns while the coordinator has not answered yet."""


class TuneError(ValueError):
    """A local request that cannot be done (already in a job, no coordinator, bad settings)."""


@dataclass(frozen=True)
class TuneSettings:
    gather_s: float = 2.0
    """Coordinator: after the first join, wait this long for others before round 1."""
    round_timeout_s: float = 600.0
    """A participant not reporting by then is dropped from the round."""
    bounds: Bounds = Bounds()
    trim: float = 0.2
    """Of the ``trimmed`` aggregate: the fraction dropped at each end."""
    debug_update_scale: float = 1.0
    """Testing aid: a participant multiplies its delta by this (a "malicious" node)."""
    accept_adapters: bool = False
    """Serve the adapter of a job this node took no part in (``--accept-adapters``). Off: only
    the final adapter of a job this node's operator joined is served; the others are refused
    and the node goes on serving what it served."""
    join_timeout_s: float = 30.0
    """A participant whose join the coordinator has not answered in this long gives up."""
    takeover_timeout_s: float = 30.0
    """A participant whose coordinator was lost or changed waits this long (from the last
    change) for the mesh's coordinator to resume the job; then the job ends for it. A
    coordinator paused by an election (no coordinator known) gives its job up after as long."""

    def __post_init__(self) -> None:
        for name in ("gather_s", "round_timeout_s", "join_timeout_s", "takeover_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if not math.isfinite(self.debug_update_scale):
            raise ValueError(f"debug_update_scale must be finite, got {self.debug_update_scale}")


@dataclass(frozen=True)
class JobRequest:
    """What the local node asks for when it joins (or starts) a job with its own data."""

    rounds: int
    rank: int
    alpha: float
    steps: int
    aggregate: str
    examples: int


# --- jobs for the driver -------------------------------------------------------------------


@dataclass(frozen=True)
class Train:
    """Train this node's adapter for one round, starting from ``tensors`` (the global adapter:
    float32 arrays, the driver's own copies). Report with `TuneCore.trained` (the full local
    adapter) or `TuneCore.train_failed`. A node has at most one `Train` job out at a time."""

    job_id: str
    round: int
    rounds: int
    rank: int
    alpha: float
    steps: int
    tensors: Mapping[str, np.ndarray]


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneProgress:
    """The local participant's progress. ``state``: ``joining`` (asked the coordinator; job_id
    is ``pending``), ``waiting`` (in the job, waiting for its next round, or for the mesh's
    coordinator to resume the job after an election), ``training``, ``sent`` (update sent;
    ``loss`` is this node's), ``refused`` (the coordinator refused this round's update:
    ``message`` says why; the node stays in the job), ``failed`` (this round's training failed
    here), ``round_done`` (``loss`` is the round's mean over the mesh, or None)."""

    job_id: str
    state: str
    round: int
    rounds: int
    peers: int
    """Participants of the current round (the joined ones before round 1)."""
    loss: float | None
    message: str


@dataclass(frozen=True)
class TuneFinished:
    """A job ended: its final global adapter (float32 arrays, the driver's own copies), checked
    against the job's bounds. Emitted once on every member (the coordinator too)."""

    job_id: str
    rank: int
    alpha: float
    rounds: int
    participants: tuple[str, ...]
    """Nodes whose updates went into the adapter, sorted (after a coordinator change: the nodes
    named in the rounds before it, whose updates may have been refused)."""
    tensors: Mapping[str, np.ndarray]
    serve: bool = True
    """This node serves the adapter from now on: it took part in the job, or it accepts every
    job's adapter (`TuneSettings.accept_adapters`). The driver reports with `TuneCore.served`."""


@dataclass(frozen=True)
class TuneFailed:
    """The local participant's job cannot finish for it: its coordinator lost with no
    successor taking the job over, join refused or unanswered, final adapter damaged, or it
    quit (`TuneCore.quit`)."""

    job_id: str
    reason: str


# --- what the roles share ----------------------------------------------------------------------


class Outbox:
    """What the roles hand the driver, in order: messages, `Train` jobs, events."""

    def __init__(self) -> None:
        self.sends: list[Send] = []
        self.jobs: list[Train] = []
        self.events: list[object] = []

    def send(self, dest: str, msg: wire.Message) -> None:
        self.sends.append(Send(dest, msg, TUNE_CHANNEL))

    def log(self, kind: LogKind, message: str) -> None:
        self.events.append(Logged(kind, message))


class TuneContext:
    """The node and the mesh as every role sees them; the adapter's expected shapes."""

    def __init__(self, node_id: str, initial: Callable[[int, float, int], dict[str, np.ndarray]],
                 settings: TuneSettings, out: Outbox) -> None:
        self.node_id = node_id
        self.initial = initial
        """(rank, alpha, seed) -> a fresh adapter: the model's own init."""
        self.settings = settings
        self.out = out
        self.coordinator_id: str | None = None
        self.members: frozenset[str] = frozenset()
        """The linked peers (not this node)."""
        self._shapes_for: tuple[tuple[int, float], dict[str, tuple[int, ...]]] | None = None

    def reachable(self, node: str | None) -> bool:
        """This node, or a linked peer."""
        return node is not None and (node == self.node_id or node in self.members)

    def expected(self, rank: int, alpha: float) -> dict[str, tuple[int, ...]]:
        """The adapter's tensor names and shapes for ``rank`` (from the model's own init)."""
        cached = self._shapes_for
        if cached is None or cached[0] != (rank, alpha):
            shapes = {name: tuple(np.shape(arr)) for name, arr in sorted(self.initial(rank, alpha, 0).items())}
            cached = self._shapes_for = ((rank, alpha), shapes)
        return cached[1]


def refusal(job_id: str, round_no: int, reason: str) -> wire.TuneRefused:
    """A TuneRefused whose reason fits the wire: printable, at most 1,024 characters."""
    text = "".join(c if c.isprintable() else " " for c in reason)
    if len(text) > wm.MAX_REASON_CHARS:
        text = text[: wm.MAX_REASON_CHARS - 3] + "..."
    return wire.TuneRefused(job_id, round_no, text)
