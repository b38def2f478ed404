"""`TuneCore`: federated LoRA fine-tuning rounds of one node, sans-IO (docs/fine-tuning.md).

Inputs, each with ``now``: `membership` (whenever the mesh changes), `join` / `quit` (this
node's own participation), `receive` (any Tune* message), `trained` / `train_failed` (the
result of a `Train` job), `handle_timer`. Outputs, drained by the driver: `sends()`, `jobs()`,
`events()`, and `next_timer()`. It never reads a clock, sleeps or touches torch.

Roles (one node may hold both):

- **coordinator** (the mesh's elected coordinator): the first join starts a job; after
  ``gather_s`` round 1 begins with every node that joined. Each round it sends `TuneRound` and
  the global adapter (`TuneTensors` of kind ``global``) to the round's participants, collects
  their updates (kind ``update``: their trained adapter minus the global, with their example
  count and training loss), refuses bad ones (`meshllm.tune.aggregate.check_update`), and
  adds the aggregate of the rest to the global. A participant that leaves the mesh, quits,
  fails or does not report within ``round_timeout_s`` is left out of that round; the round
  completes with the others (with none, the global stays). After the last round it sends
  `TuneDone` and the final adapter (kind ``final``) to every member.
- **participant** (a node that joined with its own data): trains each round from the global
  adapter (a `Train` job) and sends its delta. Its data never leaves it: only counts, a loss
  figure, tensor names and adapter tensors do.
- **member** (every node): takes up the final adapter of a finished job (`TuneFinished`).

Per job, a coordinator holds one global adapter and at most one update per participant of
the round; a participant holds one global adapter. Parts out of order, too many, with unknown
names or wrong sizes are refused. Every collection is walked in sorted order: the same inputs
give the same outputs whatever the hash seed.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh.events import Channel, Logged, LogKind, Send
from meshllm.tune.aggregate import AGGREGATES, Bounds, Update, aggregate, check_update
from meshllm.wire import messages as wm

TUNE_CHANNEL: Channel = "activation"
"""Every tune message travels on this one channel (so they stay in order), away from the
control channel's heartbeats: an adapter part can take a second to cross a slow link."""

TUNE_MESSAGES: tuple[type[wire.Message], ...] = (
    wire.TuneJoin, wire.TuneAccepted, wire.TuneQuit, wire.TuneRound, wire.TuneTensors, wire.TuneRefused, wire.TuneDone,
)
"""The messages `TuneCore.receive` takes (the driver routes these to it, the rest to the mesh core)."""

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
    join_timeout_s: float = 30.0
    """A participant whose join the coordinator has not answered in this long gives up."""

    def __post_init__(self) -> None:
        for name in ("gather_s", "round_timeout_s", "join_timeout_s"):
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
    adapter) or `TuneCore.train_failed`."""

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
    is ``pending``), ``waiting`` (in the job, waiting for its next round), ``training``,
    ``sent`` (update sent; ``loss`` is this node's), ``refused`` (the coordinator refused this
    round's update: ``message`` says why; the node stays in the job), ``failed`` (this round's
    training failed here), ``round_done`` (``loss`` is the round's mean over the mesh, or None)."""

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
    """A job ended: its final global adapter (float32 arrays, the driver's own copies). Emitted
    once on every member (the coordinator too)."""

    job_id: str
    rank: int
    alpha: float
    rounds: int
    participants: tuple[str, ...]
    """Nodes whose updates went into the adapter, sorted."""
    tensors: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class TuneFailed:
    """The local participant's job cannot finish for it: coordinator lost or changed, join
    refused or unanswered, final adapter damaged, or it quit (`TuneCore.quit`)."""

    job_id: str
    reason: str


# --- adapters on the wire --------------------------------------------------------------------


def adapter_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) over the names, shapes and float32 little-endian values, by sorted name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(name.encode("utf-8") + b"\0" + repr(tuple(arr.shape)).encode("ascii") + b"\0")
        digest.update(arr.tobytes())
    return digest.hexdigest()


def split_parts(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, ...]]:
    """Tensor names (sorted) in parts of at most 64 tensors and 4 MiB of float32 values; a
    larger tensor goes alone in its part."""
    parts: list[tuple[str, ...]] = []
    current: list[str] = []
    size = 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        if current and (len(current) == wm.MAX_TUNE_TENSORS_PER_PART or size + nbytes > wm.MAX_TUNE_PART_BYTES):
            parts.append(tuple(current))
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        parts.append(tuple(current))
    return parts


def adapter_problem(tensors: Mapping[str, np.ndarray]) -> str | None:
    """Why an adapter cannot travel as TuneTensors parts, or None."""
    if not tensors:
        return "it has no tensors"
    for name in sorted(tensors):
        arr = tensors[name]
        if not isinstance(name, str) or not 1 <= len(name) <= wm.MAX_TUNE_NAME_CHARS or not name.isprintable():
            return f"tensor name {name!r} is not 1..{wm.MAX_TUNE_NAME_CHARS} printable characters"
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            return f"{name}: dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected float32"
        if not 1 <= arr.ndim <= 8 or arr.size == 0:
            return f"{name}: shape {arr.shape} cannot travel"
        if arr.size > wm.MAX_TUNE_TENSOR_ELEMENTS:
            return f"{name}: {arr.size} elements; at most {wm.MAX_TUNE_TENSOR_ELEMENTS}"
        if not np.isfinite(arr).all():
            return f"{name}: non-finite values"
    parts = len(split_parts({name: arr.shape for name, arr in tensors.items()}))
    if parts > wm.MAX_TUNE_PARTS:
        return f"it takes {parts} parts; at most {wm.MAX_TUNE_PARTS}"
    return None


def tensor_messages(job_id: str, round_no: int, kind: str, tensors: Mapping[str, np.ndarray],
                    examples: int = 0, loss: float = 0.0) -> list[wire.TuneTensors]:
    """An adapter (checked by `adapter_problem`) as its TuneTensors parts, in order."""
    groups = split_parts({name: arr.shape for name, arr in tensors.items()})
    return [
        wire.TuneTensors(job_id=job_id, round=round_no, kind=kind, part=i, parts=len(groups), examples=examples,
                         loss=loss, names=names,
                         tensors=tuple(wire.encode_tensor(np.asarray(tensors[n], dtype=np.float32), "f32")
                                       for n in names))
        for i, names in enumerate(groups)
    ]


def _frozen(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only float32 copies, by sorted name."""
    out = {}
    for name in sorted(tensors):
        arr = np.array(tensors[name], dtype=np.float32, copy=True)
        arr.setflags(write=False)
        out[name] = arr
    return out


def _refusal(job_id: str, round_no: int, reason: str) -> wire.TuneRefused:
    """A TuneRefused whose reason fits the wire: printable, at most 1,024 characters."""
    text = "".join(c if c.isprintable() else " " for c in reason)
    if len(text) > wm.MAX_REASON_CHARS:
        text = text[: wm.MAX_REASON_CHARS - 3] + "..."
    return wire.TuneRefused(job_id, round_no, text)


def _usable_loss(loss: object) -> bool:
    try:
        value = float(loss)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and 0.0 <= value <= wm.MAX_TUNE_LOSS


def _shapes_problem(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    return check_update(Update("", 1, tensors), expected, Bounds(max_norm=math.inf, max_examples=1))


class _Assembly:
    """The parts of one adapter from one sender, taken in order, each name once, each tensor
    no larger than the expected one (so memory stays within one adapter)."""

    def __init__(self, kind: str, round_no: int, first: wire.TuneTensors,
                 expected: Mapping[str, tuple[int, ...]]) -> None:
        self.kind = kind
        self.round = round_no
        self.parts = first.parts
        self.examples = first.examples
        self.loss = first.loss
        self.expected = expected
        self.next = 0
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, msg: wire.TuneTensors) -> str | None:
        """Take one part; the reason when it is refused (the assembly is then void)."""
        if msg.kind != self.kind or msg.round != self.round:
            return f"a {msg.kind} part of round {msg.round} where {self.kind} of round {self.round} was expected"
        if msg.part != self.next:
            return f"part {msg.part} out of order: part {self.next} expected"
        if msg.parts != self.parts:
            return f"part {msg.part} says {msg.parts} parts; part 0 said {self.parts}"
        if self.parts > len(self.expected):
            return f"{self.parts} parts for an adapter of {len(self.expected)} tensors"
        if msg.examples != self.examples or msg.loss != self.loss:
            return f"part {msg.part} disagrees with part 0 on examples or loss"
        for name, payload in zip(msg.names, msg.tensors):
            shape = self.expected.get(name)
            if shape is None:
                return f"unexpected tensor {name}"
            if name in self.tensors:
                return f"tensor {name} sent twice"
            try:
                self.tensors[name] = wire.decode_tensor(payload, expect_codec="f32",
                                                        max_elements=max(1, math.prod(shape)))
            except WireError as error:
                return f"{name}: {error}"
        self.next += 1
        return None

    @property
    def complete(self) -> bool:
        return self.next == self.parts


# --- the coordinator's job ---------------------------------------------------------------------


@dataclass
class _Job:
    job_id: str
    rounds: int
    rank: int
    alpha: float
    steps: int
    aggregate: str
    tensors: dict[str, np.ndarray]
    """The global adapter (read-only arrays)."""
    shapes: dict[str, tuple[int, ...]]
    gather_until: float
    joined: dict[str, int] = field(default_factory=dict)
    """Node -> the example count it joined with."""
    round: int = 0
    """The round in progress; 0 while gathering."""
    deadline: float | None = None
    participants: tuple[str, ...] = ()
    incoming: dict[str, _Assembly] = field(default_factory=dict)
    updates: dict[str, Update] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    contributors: set[str] = field(default_factory=set)
    loss: float | None = None
    """The last round's mean training loss (weighted by examples)."""

    def reported(self, node: str) -> bool:
        return node in self.updates or node in self.refused or node in self.dropped


# --- the local participant ----------------------------------------------------------------------


@dataclass
class _Participant:
    coordinator: str
    request: JobRequest
    joined_at: float
    job_id: str | None = None
    state: str = "joining"
    round: int = 0
    rounds: int = 0
    rank: int = 0
    alpha: float = 0.0
    steps: int = 0
    aggregate: str = ""
    peers: int = 0
    participants: tuple[str, ...] = ()
    incoming: _Assembly | None = None
    expect_parts: int = 0
    tensors: dict[str, np.ndarray] | None = None
    """The global adapter of the round being trained."""
    loss: float | None = None
    mesh_loss: float | None = None
    message: str = ""


@dataclass
class _Final:
    sender: str
    done: wire.TuneDone
    assembly: _Assembly | None = None


class TuneCore:
    """The federated fine-tuning state machine of one node (see the module docstring)."""

    def __init__(self, node_id: str, initial: Callable[[int, float, int], dict[str, np.ndarray]],
                 settings: TuneSettings = TuneSettings()) -> None:
        self.node_id = node_id
        self.settings = settings
        self._initial = initial
        self.coordinator_id: str | None = None
        self.members: frozenset[str] = frozenset()
        self._job: _Job | None = None
        self._part: _Participant | None = None
        self._final: _Final | None = None
        self._started = 0
        self._shapes_for: tuple[tuple[int, float], dict[str, tuple[int, ...]]] | None = None
        self._last: dict[str, object] | None = None
        self._sends: list[Send] = []
        self._jobs: list[Train] = []
        self._events: list[object] = []

    # -- outputs --------------------------------------------------------------------------------

    def sends(self) -> list[Send]:
        out, self._sends = self._sends, []
        return out

    def jobs(self) -> list[Train]:
        out, self._jobs = self._jobs, []
        return out

    def events(self) -> list[object]:
        out, self._events = self._events, []
        return out

    def next_timer(self) -> float | None:
        times = []
        job = self._job
        if job is not None:
            times.append(job.gather_until if job.round == 0 else job.deadline)
        part = self._part
        if part is not None and part.job_id is None:
            times.append(part.joined_at + self.settings.join_timeout_s)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def status_view(self) -> dict[str, object]:
        """JSON-able: this node's part in the current job, as coordinator and/or participant."""
        job, part = self._job, self._part
        roles = [name for name, held in (("coordinator", job), ("participant", part)) if held is not None]
        view: dict[str, object] = {
            "role": "+".join(roles) or None,
            "job_id": job.job_id if job is not None else (part.job_id if part is not None else None),
            "state": None, "round": 0, "rounds": 0, "participants": [], "loss": None,
            "coordinator": None, "participant": None, "last_finished": self._last,
        }
        if job is not None:
            coordinating = {
                "job_id": job.job_id, "state": "gathering" if job.round == 0 else "round",
                "round": job.round, "rounds": job.rounds, "rank": job.rank, "alpha": job.alpha, "steps": job.steps,
                "aggregate": job.aggregate, "joined": sorted(job.joined),
                "round_participants": list(job.participants),
                "reported": sorted(p for p in job.participants if job.reported(p)), "loss": job.loss,
            }
            view["coordinator"] = coordinating
            view.update(state=coordinating["state"], round=job.round, rounds=job.rounds,
                        participants=sorted(job.joined), loss=job.loss)
        if part is not None:
            participating = {
                "job_id": part.job_id, "coordinator": part.coordinator, "state": part.state, "round": part.round,
                "rounds": part.rounds or part.request.rounds, "rank": part.rank or part.request.rank,
                "aggregate": part.aggregate or part.request.aggregate, "examples": part.request.examples,
                "peers": part.peers, "loss": part.loss, "mesh_loss": part.mesh_loss, "message": part.message,
            }
            view["participant"] = participating
            view.update(state=part.state, round=part.round, rounds=participating["rounds"],
                        loss=part.loss if part.loss is not None else part.mesh_loss)
            if job is None:
                view["participants"] = list(part.participants)
        return view

    # -- inputs ---------------------------------------------------------------------------------

    def membership(self, coordinator_id: str | None, members: frozenset[str], now: float) -> None:
        """The mesh changed: its coordinator and this node's linked peers (not itself)."""
        self.coordinator_id = coordinator_id
        self.members = frozenset(members)
        job = self._job
        if job is not None:
            if coordinator_id != self.node_id:
                self._job = None
                self._log("error", f"tune job {job.job_id} abandoned after {max(job.round - 1, 0)} of {job.rounds} "
                                   f"rounds: this node no longer coordinates the mesh "
                                   f"(the coordinator is now {coordinator_id or 'unknown'})")
            else:
                for node in sorted(job.joined):
                    if node != self.node_id and node not in self.members:
                        self._leave(job, node, "left the mesh")
        part = self._part
        if part is not None:
            if coordinator_id != part.coordinator:
                self._fail(f"the mesh's coordinator changed from {part.coordinator} to {coordinator_id or 'none'}: "
                           "the tune job cannot finish")
            elif part.coordinator != self.node_id and part.coordinator not in self.members:
                self._fail(f"the coordinator {part.coordinator} left the mesh: the tune job cannot finish")
        final = self._final
        if final is not None and (final.sender != coordinator_id or final.sender not in self.members):
            self._final = None
            self._log("error", f"the final adapter of tune job {final.done.job_id} did not arrive: "
                               f"{final.sender} is no longer the coordinator")
        self._check_round(now)

    def join(self, request: JobRequest, now: float) -> str:
        """This node joins the mesh's tune job with its own data (or starts one). Returns the job
        id, or `PENDING_JOB_ID` until a remote coordinator answers (`TuneProgress` then says)."""
        if self._part is not None:
            raise TuneError(f"this node already takes part in tune job {self._part.job_id or '(joining)'}")
        try:
            msg = wire.TuneJoin(request.rounds, request.rank, request.alpha, request.steps, request.aggregate,
                                request.examples)
        except WireError as error:
            raise TuneError(f"bad tune settings: {error}") from None
        coordinator = self.coordinator_id
        if coordinator is None:
            raise TuneError("the mesh has no coordinator yet; try again in a moment")
        if coordinator != self.node_id and coordinator not in self.members:
            raise TuneError(f"the coordinator {coordinator} is not linked to this node yet; try again in a moment")
        part = self._part = _Participant(coordinator, request, now)
        if coordinator == self.node_id:
            reason = self._admit(self.node_id, msg, now)
            if reason is not None:
                self._part = None
                raise TuneError(reason)
            assert part.job_id is not None
            return part.job_id
        self._send(coordinator, msg)
        part.message = f"asked the coordinator {coordinator} to join its tune job"
        self._progress(part)
        return PENDING_JOB_ID

    def quit(self, now: float) -> None:
        """The local participant leaves its job (nothing happens when it is in none)."""
        part = self._part
        if part is None:
            return
        if part.coordinator == self.node_id:
            job = self._job
            if job is not None and self.node_id in job.joined:
                self._leave(job, self.node_id, "quit")
        else:
            self._send(part.coordinator, wire.TuneQuit(part.job_id or ""))
        self._fail("this node quit the tune job", kind="info")
        self._check_round(now)

    def receive(self, sender: str, msg: wire.Message, now: float) -> None:
        """Any Tune* message from a peer. A bad or unexpected one is logged and dropped (or
        refused with a TuneRefused); it never raises."""
        if sender == self.node_id or sender not in self.members:
            self._log("error", f"ignored a {type(msg).__name__} from {sender}: not a linked peer")
            return
        if isinstance(msg, wire.TuneJoin):
            self._on_join(sender, msg, now)
        elif isinstance(msg, wire.TuneQuit):
            job = self._job
            if job is not None and sender in job.joined and msg.job_id in ("", job.job_id):
                self._leave(job, sender, "quit")
        elif isinstance(msg, wire.TuneAccepted):
            self._on_accepted(sender, msg)
        elif isinstance(msg, wire.TuneRound):
            self._on_round(sender, msg)
        elif isinstance(msg, wire.TuneTensors):
            if msg.kind == "update":
                self._on_update_part(sender, msg, now)
            elif msg.kind == "global":
                self._on_global_part(sender, msg, now)
            else:
                self._on_final_part(sender, msg)
        elif isinstance(msg, wire.TuneRefused):
            self._on_refused(sender, msg)
        elif isinstance(msg, wire.TuneDone):
            self._on_done(sender, msg)
        else:
            self._log("error", f"ignored a {type(msg).__name__} from {sender}: not a tune message")
        self._check_round(now)

    def trained(self, job_id: str, round: int, tensors: Mapping[str, np.ndarray], loss: float, now: float) -> None:
        """The local training result of a `Train` job: the full local adapter and its mean loss.
        The delta (local - global, times ``debug_update_scale``) goes to the coordinator."""
        part = self._training(job_id, round)
        if part is None:
            return
        base = part.tensors
        assert base is not None
        problem = None
        delta: dict[str, np.ndarray] = {}
        if set(tensors) != set(base):
            missing, extra = sorted(set(base) - set(tensors)), sorted(set(tensors) - set(base))
            problem = ("the trained adapter lacks " + missing[0]) if missing else ("the trained adapter has an "
                                                                                  f"unexpected tensor {extra[0]}")
        elif not _usable_loss(loss):
            problem = f"training loss {loss} is not usable"
        else:
            scale = np.float32(self.settings.debug_update_scale)
            for name in sorted(base):
                local = np.asarray(tensors[name], dtype=np.float32)
                if local.shape != base[name].shape:
                    problem = f"the trained {name} has shape {local.shape}, expected {base[name].shape}"
                    break
                change = local - base[name]
                if scale != 1:
                    change = (change * scale).astype(np.float32)
                if not np.isfinite(change).all():
                    problem = "the trained adapter has non-finite values"
                    break
                delta[name] = change
        if problem is not None:
            self._round_failed(part, problem, problem, now)
            return
        loss = float(loss)
        part.loss = loss
        part.state = "sent"
        part.tensors = None
        part.message = f"round {part.round} of {part.rounds}: trained, loss {loss:.4f}; update sent"
        self._progress(part)
        assert part.job_id is not None
        if part.coordinator == self.node_id:
            job = self._job
            if job is not None and job.job_id == part.job_id and job.round == part.round:
                self._take_update(job, Update(self.node_id, part.request.examples, delta), loss)
        else:
            for msg in tensor_messages(part.job_id, part.round, "update", delta, part.request.examples, loss):
                self._send(part.coordinator, msg)
        self._check_round(now)

    def train_failed(self, job_id: str, round: int, reason: str, now: float) -> None:
        """The local training of a `Train` job failed. ``reason`` stays on this node (it may
        quote local data); the coordinator only learns that training failed."""
        part = self._training(job_id, round)
        if part is not None:
            self._round_failed(part, f"training failed: {reason}", "training failed", now)

    def handle_timer(self, now: float) -> None:
        job = self._job
        if job is not None:
            if job.round == 0 and now >= job.gather_until:
                self._start_round(job, now)
            elif job.round > 0 and job.deadline is not None and now >= job.deadline:
                for node in job.participants:
                    if not job.reported(node):
                        job.dropped[node] = f"no update within {self.settings.round_timeout_s:g} s"
                        job.incoming.pop(node, None)
        part = self._part
        if part is not None and part.job_id is None and now >= part.joined_at + self.settings.join_timeout_s:
            if part.coordinator != self.node_id:
                self._send(part.coordinator, wire.TuneQuit(""))
            self._fail(f"the coordinator {part.coordinator} did not answer the join within "
                       f"{self.settings.join_timeout_s:g} s")
        self._check_round(now)

    # -- coordinator ----------------------------------------------------------------------------

    def _on_join(self, sender: str, msg: wire.TuneJoin, now: float) -> None:
        if self.coordinator_id != self.node_id:
            self._send(sender, _refusal("", 0, f"{self.node_id} is not the mesh's coordinator "
                                               f"(the coordinator is {self.coordinator_id or 'unknown'})"))
            return
        reason = self._admit(sender, msg, now)
        if reason is not None:
            job = self._job
            self._log("error", f"refused the tune join of {sender}: {reason}")
            self._send(sender, _refusal(job.job_id if job is not None else "", 0, reason))

    def _admit(self, node: str, msg: wire.TuneJoin, now: float) -> str | None:
        """Take ``node`` into the job (starting one if there is none); the reason if refused."""
        if msg.examples > self.settings.bounds.max_examples:
            return f"{msg.examples} examples; a participant may bring at most {self.settings.bounds.max_examples}"
        job = self._job
        if job is None:
            self._started += 1
            job_id = f"{self.node_id[:40]}/tune-{self._started}"
            try:
                initial = self._initial(msg.rank, msg.alpha, zlib.crc32(job_id.encode("utf-8")))
            except Exception as error:  # noqa: BLE001 - the model's own check (e.g. a rank too large)
                return f"cannot make an adapter of rank {msg.rank}: {error}"
            problem = adapter_problem(initial)
            if problem is not None:
                return f"the adapter of rank {msg.rank} cannot be tuned over the mesh: {problem}"
            tensors = _frozen(initial)
            job = self._job = _Job(job_id, msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate, tensors,
                                   {name: arr.shape for name, arr in tensors.items()}, now + self.settings.gather_s)
            self._log("info", f"tune job {job_id} started by {node}: {msg.rounds} rounds of {msg.steps} steps, "
                              f"rank {msg.rank}, alpha {msg.alpha:g}, aggregate {msg.aggregate}; round 1 in "
                              f"{self.settings.gather_s:g} s")
        elif msg.rank != job.rank:
            return f"rank {msg.rank} does not match rank {job.rank} of tune job {job.job_id}"
        elif node not in job.joined and len(job.joined) >= wm.MAX_TUNE_PARTICIPANTS:
            return f"tune job {job.job_id} already has {len(job.joined)} participants"
        in_round = node in job.participants and not job.reported(node)
        first = 1 if job.round == 0 else (job.round if in_round else job.round + 1)
        if node not in job.joined:
            job.joined[node] = msg.examples
            if job.round > 0:
                self._log("info", f"{node} joined tune job {job.job_id} ({msg.examples} examples); it takes part "
                                  f"from round {first}")
        accepted = wire.TuneAccepted(job.job_id, first, job.rounds, job.rank, job.alpha, job.steps, job.aggregate)
        if node == self.node_id:
            self._on_accepted(node, accepted)
        else:
            self._send(node, accepted)
        return None

    def _leave(self, job: _Job, node: str, why: str) -> None:
        if job.joined.pop(node, None) is None:
            return
        self._log("info", f"{node} left tune job {job.job_id}: {why}")
        if job.round > 0 and node in job.participants and not job.reported(node):
            job.dropped[node] = why
            job.incoming.pop(node, None)

    def _start_round(self, job: _Job, now: float) -> None:
        participants = tuple(sorted(p for p in job.joined if p == self.node_id or p in self.members))
        if not participants:
            self._job = None
            self._log("info", f"tune job {job.job_id} ended after {job.round} of {job.rounds} rounds without a "
                              "result: no participants left")
            return
        job.round += 1
        job.participants = participants
        job.deadline = now + self.settings.round_timeout_s
        for held in (job.incoming, job.updates, job.losses, job.refused, job.dropped):
            held.clear()
        parts = tensor_messages(job.job_id, job.round, "global", job.tensors)
        announce = wire.TuneRound(job.job_id, job.round, job.rounds, job.rank, job.alpha, job.steps, job.aggregate,
                                  participants, job.loss or 0.0, len(parts))
        self._log("info", f"tune job {job.job_id} round {job.round} of {job.rounds}: participants "
                          f"{', '.join(participants)}")
        for node in participants:
            if node == self.node_id:
                part = self._part
                if part is not None and self._on_round(node, announce):
                    self._begin_training(part, job.tensors)
            else:
                self._send(node, announce)
                for msg in parts:
                    self._send(node, msg)

    def _on_update_part(self, sender: str, msg: wire.TuneTensors, now: float) -> None:
        job = self._job
        if job is None or msg.job_id != job.job_id or msg.round != job.round or sender not in job.participants:
            self._log("error", f"ignored an update part from {sender} for tune job {msg.job_id} round {msg.round}: "
                               "not expected")
            return
        if job.reported(sender):
            if sender in job.updates:
                self._refuse(job, sender, f"part {msg.part} after a complete update")
            return
        assembly = job.incoming.get(sender)
        if assembly is None:
            assembly = job.incoming[sender] = _Assembly("update", job.round, msg, job.shapes)
        problem = assembly.add(msg)
        if problem is not None:
            self._refuse(job, sender, problem)
            return
        if assembly.complete:
            del job.incoming[sender]
            self._take_update(job, Update(sender, assembly.examples, assembly.tensors), assembly.loss)

    def _take_update(self, job: _Job, update: Update, loss: float) -> None:
        reason = check_update(update, job.shapes, self.settings.bounds)
        if reason is not None:
            self._refuse(job, update.node_id, reason)
            return
        job.updates[update.node_id] = update
        job.losses[update.node_id] = loss

    def _refuse(self, job: _Job, node: str, reason: str) -> None:
        job.updates.pop(node, None)
        job.losses.pop(node, None)
        job.incoming.pop(node, None)
        job.refused[node] = reason
        self._log("error", f"tune job {job.job_id} round {job.round}: refused the update of {node}: {reason}")
        if node == self.node_id:
            part = self._part
            if part is not None and part.job_id == job.job_id:
                self._on_refused(node, _refusal(job.job_id, job.round, reason))
        else:
            self._send(node, _refusal(job.job_id, job.round, reason))

    def _check_round(self, now: float) -> None:
        job = self._job
        while job is not None and job.round > 0 and all(job.reported(p) for p in job.participants):
            self._finish_round(job, now)
            job = self._job if self._job is job else None

    def _finish_round(self, job: _Job, now: float) -> None:
        names = sorted(job.updates)
        if names:
            delta = aggregate([job.updates[n] for n in names], job.aggregate, self.settings.trim)
            job.tensors = _frozen({name: job.tensors[name] + delta[name] for name in job.tensors})
            weights = sum(job.updates[n].examples for n in names)
            job.loss = sum(job.losses[n] * job.updates[n].examples for n in names) / weights
            job.contributors.update(names)
        else:
            job.loss = None
        notes = [f"aggregated ({job.aggregate}) {', '.join(names) if names else 'no update: the adapter stays'}"]
        notes += [f"refused {n} ({job.refused[n]})" for n in sorted(job.refused)]
        notes += [f"dropped {n} ({job.dropped[n]})" for n in sorted(job.dropped)]
        if job.loss is not None:
            notes.append(f"mean loss {job.loss:.4f}")
        self._log("info", f"tune job {job.job_id} round {job.round} of {job.rounds} done: {'; '.join(notes)}")
        job.incoming.clear()
        job.updates.clear()
        if job.round >= job.rounds:
            self._finish_job(job)
        else:
            self._start_round(job, now)

    def _finish_job(self, job: _Job) -> None:
        self._job = None
        participants = tuple(sorted(job.contributors)[: wm.MAX_TUNE_PARTICIPANTS])  # the wire's bound
        digest = adapter_digest(job.tensors)
        parts = tensor_messages(job.job_id, job.rounds, "final", job.tensors)
        loss = job.loss or 0.0
        done = wire.TuneDone(job.job_id, job.rounds, job.rank, job.alpha, participants, loss, digest, len(parts))
        for node in sorted(self.members):
            self._send(node, done)
            for msg in parts:
                self._send(node, msg)
        self._log("info", f"tune job {job.job_id} finished after {job.rounds} rounds: adapter {digest[:12]} from "
                          f"{', '.join(participants) or 'no participant (the initial adapter)'}; sent to "
                          f"{len(self.members)} members")
        self._finished(done, job.tensors)

    # -- participant ----------------------------------------------------------------------------

    def _on_accepted(self, sender: str, msg: wire.TuneAccepted) -> None:
        part = self._part
        if part is None or sender != part.coordinator or part.job_id not in (None, msg.job_id):
            self._log("error", f"ignored a TuneAccepted from {sender} for tune job {msg.job_id}: not joining it")
            return
        part.job_id = msg.job_id
        part.rounds, part.rank, part.alpha, part.steps, part.aggregate = (
            msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate)
        if part.state == "joining":
            part.state = "waiting"
            job = self._job
            part.peers = len(job.joined) if job is not None and job.job_id == msg.job_id else part.peers
            part.message = (f"joined tune job {msg.job_id}: {msg.rounds} rounds of {msg.steps} steps, rank {msg.rank}, "
                            f"aggregate {msg.aggregate}; taking part from round {msg.round}")
            self._progress(part)

    def _on_round(self, sender: str, msg: wire.TuneRound) -> bool:
        part = self._part
        if sender == self.coordinator_id and sender != self.node_id and (part is None or part.job_id != msg.job_id):
            self._send(sender, wire.TuneQuit(msg.job_id))  # not (or no longer) in that job: leave it at once
        if part is None or sender != part.coordinator or part.job_id != msg.job_id or msg.round <= part.round:
            self._log("error", f"ignored a TuneRound from {sender} for tune job {msg.job_id} round {msg.round}: "
                               "not expected")
            return False
        self._round_done(part, msg.loss if msg.loss > 0 else None)
        part.round, part.rounds, part.rank, part.alpha, part.steps, part.aggregate = (
            msg.round, msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate)
        part.peers = len(msg.participants)
        part.participants = msg.participants
        part.state = "receiving"
        part.incoming = None
        part.tensors = None
        part.expect_parts = msg.parts
        return True

    def _on_global_part(self, sender: str, msg: wire.TuneTensors, now: float) -> None:
        part = self._part
        if (part is None or sender != part.coordinator or part.job_id != msg.job_id or part.state != "receiving"
                or msg.round != part.round):
            self._log("error", f"ignored a global adapter part from {sender} for tune job {msg.job_id} round "
                               f"{msg.round}: not expected")
            return
        part.incoming, problem, tensors = self._assemble(part.incoming, "global", part.round, msg,
                                                         part.expect_parts, part.rank, part.alpha)
        if tensors is not None:
            part.incoming = None
            self._begin_training(part, _frozen(tensors))
        elif problem is not None:
            part.incoming = None
            self._round_failed(part, f"bad global adapter from {sender}: {problem}",
                               f"bad global adapter: {problem}", now)

    def _assemble(self, assembly: "_Assembly | None", kind: str, round_no: int, msg: wire.TuneTensors,
                  parts: int, rank: int, alpha: float) -> tuple["_Assembly | None", str | None, dict[str, np.ndarray] | None]:
        """Start one adapter's assembly with its first part (announced as `parts` parts) or go on
        with it. Returns (assembly, the reason it is refused, its tensors once complete and whole)."""
        if assembly is None:
            if msg.parts != parts:
                return None, f"{msg.parts} parts where {parts} were announced", None
            try:
                assembly = _Assembly(kind, round_no, msg, self._expected(rank, alpha))
            except Exception as error:  # noqa: BLE001 - the model's own check
                return None, f"cannot check it: {error}", None
        problem = assembly.add(msg)
        if problem is None and assembly.complete:
            problem = _shapes_problem(assembly.tensors, assembly.expected)
            if problem is None:
                return assembly, None, assembly.tensors
        return assembly, problem, None

    def _begin_training(self, part: _Participant, tensors: dict[str, np.ndarray]) -> None:
        assert part.job_id is not None
        part.tensors = tensors
        part.state = "training"
        part.message = f"round {part.round} of {part.rounds}: training {part.steps} steps ({part.peers} nodes)"
        self._jobs.append(Train(part.job_id, part.round, part.rounds, part.rank, part.alpha, part.steps,
                                {name: arr.copy() for name, arr in tensors.items()}))
        self._progress(part)

    def _training(self, job_id: str, round_no: int) -> _Participant | None:
        part = self._part
        if part is None or part.job_id != job_id or part.round != round_no or part.state != "training":
            self._log("info", f"ignored a training result for tune job {job_id} round {round_no}: stale")
            return None
        return part

    def _round_failed(self, part: _Participant, local_reason: str, wire_reason: str, now: float) -> None:
        """This round has no update from here: say why locally; tell the coordinator only
        ``wire_reason`` (free of local data)."""
        assert part.job_id is not None
        part.state = "failed"
        part.tensors = None
        part.message = f"round {part.round} of {part.rounds}: {local_reason}"
        self._log("error", f"tune job {part.job_id} round {part.round}: {local_reason}")
        self._progress(part)
        if part.coordinator == self.node_id:
            job = self._job
            if job is not None and job.job_id == part.job_id and job.round == part.round \
                    and not job.reported(self.node_id):
                job.refused[self.node_id] = f"no update: {wire_reason}"
        else:
            self._send(part.coordinator, _refusal(part.job_id, part.round, wire_reason))
        self._check_round(now)

    def _on_refused(self, sender: str, msg: wire.TuneRefused) -> None:
        job = self._job
        if job is not None and msg.job_id == job.job_id and sender != self.node_id:
            # a participant has nothing for this round
            if msg.round == job.round and sender in job.participants and not job.reported(sender):
                job.incoming.pop(sender, None)
                job.refused[sender] = f"no update: {msg.reason}"
            return
        part = self._part
        if part is None or sender != part.coordinator or part.job_id not in (None, msg.job_id, ""):
            self._log("error", f"ignored a TuneRefused from {sender} for tune job {msg.job_id}: not in it")
            return
        if msg.round == 0 or part.job_id is None:
            self._fail(f"the coordinator {sender} refused: {msg.reason}")
            return
        if msg.round == part.round:
            part.state = "refused"
            part.message = f"round {msg.round} of {part.rounds}: the coordinator refused this node's update: {msg.reason}"
            self._progress(part)

    def _round_done(self, part: _Participant, mesh_loss: float | None) -> None:
        """The round this participant last took part in is over (a new round or the end came)."""
        if part.round == 0:
            return
        part.mesh_loss = mesh_loss
        part.state = "round_done"
        loss = f"; mean loss {mesh_loss:.4f}" if mesh_loss is not None else ""
        part.message = f"round {part.round} of {part.rounds} done{loss}"
        self._progress(part, loss=mesh_loss)

    # -- member: the final adapter ----------------------------------------------------------------

    def _on_done(self, sender: str, msg: wire.TuneDone) -> None:
        if sender != self.coordinator_id:
            self._log("error", f"ignored a TuneDone from {sender}: not the mesh's coordinator")
            return
        if self._final is not None:
            self._log("error", f"the final adapter of tune job {self._final.done.job_id} did not arrive whole")
        self._final = _Final(sender, msg)

    def _on_final_part(self, sender: str, msg: wire.TuneTensors) -> None:
        final = self._final
        if final is None or final.sender != sender or msg.job_id != final.done.job_id:
            self._log("error", f"ignored a final adapter part from {sender} for tune job {msg.job_id}: not expected")
            return
        done = final.done
        final.assembly, problem, tensors = self._assemble(final.assembly, "final", done.rounds, msg, done.parts,
                                                          done.rank, done.alpha)
        if tensors is not None and adapter_digest(tensors) != done.digest:
            problem = "its digest does not match"
        elif tensors is not None:
            self._final = None
            self._finished(done, _frozen(tensors))
            return
        if problem is not None:
            self._final = None
            self._log("error", f"the final adapter of tune job {done.job_id} from {sender} is refused: {problem}")
            part = self._part
            if part is not None and part.job_id == done.job_id:
                self._fail(f"the final adapter of tune job {done.job_id} arrived damaged: {problem}")

    def _finished(self, done: wire.TuneDone, tensors: dict[str, np.ndarray]) -> None:
        part = self._part
        if part is not None and part.job_id == done.job_id:
            self._round_done(part, done.loss if done.loss > 0 else None)
            self._part = None
        self._last = {"job_id": done.job_id, "rounds": done.rounds, "rank": done.rank, "alpha": done.alpha,
                      "participants": list(done.participants), "digest": done.digest,
                      "loss": done.loss if done.loss > 0 else None}
        self._events.append(TuneFinished(done.job_id, done.rank, done.alpha, done.rounds, done.participants,
                                         {name: arr.copy() for name, arr in tensors.items()}))

    # -- helpers ----------------------------------------------------------------------------------

    def _expected(self, rank: int, alpha: float) -> dict[str, tuple[int, ...]]:
        """The adapter's tensor names and shapes for ``rank`` (from the model's own init)."""
        cached = self._shapes_for
        if cached is None or cached[0] != (rank, alpha):
            shapes = {name: tuple(np.shape(arr)) for name, arr in sorted(self._initial(rank, alpha, 0).items())}
            cached = self._shapes_for = ((rank, alpha), shapes)
        return cached[1]

    def _fail(self, reason: str, kind: LogKind = "error") -> None:
        part, self._part = self._part, None
        if part is None:
            return
        self._log(kind, f"tune job {part.job_id or '(joining)'}: {reason}")
        self._events.append(TuneFailed(part.job_id or PENDING_JOB_ID, reason))

    def _progress(self, part: _Participant, loss: float | None = None) -> None:
        self._events.append(TuneProgress(part.job_id or PENDING_JOB_ID, part.state, part.round,
                                         part.rounds or part.request.rounds, part.peers,
                                         loss if loss is not None else (part.loss if part.state == "sent" else None),
                                         part.message))

    def _send(self, dest: str, msg: wire.Message) -> None:
        self._sends.append(Send(dest, msg, TUNE_CHANNEL))

    def _log(self, kind: LogKind, message: str) -> None:
        self._events.append(Logged(kind, message))
