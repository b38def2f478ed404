"""The participant role of federated fine-tuning: this node trains on its own data each round.

It joins the mesh's job (`TuneJoin`; the coordinator answers `TuneAccepted`), and each round
takes the global adapter (`TuneRound` and `TuneTensors` of kind ``global``), trains from it
(a `Train` job for the driver, at most one out at a time) and sends its delta (kind
``update``: its trained adapter minus the global, its example count and mean loss). Its data
never leaves it: only counts, a loss figure, tensor names and adapter tensors do.

Elections: it keeps its job's settings, its round and that round's global adapter (a
`Checkpoint`). When its coordinator is lost or the mesh's coordinator changes it waits (up to
``takeover_timeout_s`` from the last change) for the mesh's coordinator to resume the job: a
`TuneRound` of its job from that node (or, while it waits, from any linked peer: the
messages of an election and of the job travel on different channels) restarts the round
named there; with the same global adapter, an update it already made is sent again rather
than trained again. When this node becomes the coordinator it takes the job over itself
(`meshllm.tune.coordinator.Coordinator.take_over`). A node that joined but holds no global
adapter yet joins the new coordinator's job again. Nobody resuming the job in time ends it
here with a `TuneFailed` that says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh.events import LogKind
from meshllm.tune.adapters import Assembly, adapter_digest, assemble, frozen, tensor_messages
from meshllm.tune.interface import (
    PENDING_JOB_ID, JobRequest, Train, TuneContext, TuneError, TuneFailed, TuneProgress, job_problem, refusal,
)
from meshllm.wire import tune_messages as wm

if TYPE_CHECKING:
    from meshllm.tune.coordinator import Coordinator


@dataclass(frozen=True)
class Checkpoint:
    """What a participant holds of its job: enough for it to resume the job as coordinator."""

    job_id: str
    rounds: int
    rank: int
    alpha: float
    steps: int
    aggregate: str
    round: int
    """The round whose global adapter it holds (started again on a takeover)."""
    tensors: dict[str, np.ndarray]
    """That round's global adapter (read-only arrays)."""
    participants: tuple[str, ...]
    """That round's participants."""
    loss: float | None
    """The mean loss of the round before it."""
    contributors: tuple[str, ...]
    """The nodes named in the rounds before it (their updates may have been refused)."""
    examples: int
    """This node's example count."""


@dataclass
class _Base:
    """The global adapter of one round, as this participant received it."""

    round: int
    tensors: dict[str, np.ndarray]
    digest: str
    participants: tuple[str, ...]
    loss: float | None


@dataclass
class _Part:
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
    named: set[str] = field(default_factory=set)
    """The participants of the rounds before this one."""
    incoming: Assembly | None = None
    expect_parts: int = 0
    base: _Base | None = None
    """The latest global adapter received whole (of this round, or of the one before while the
    new one arrives)."""
    training: tuple[int, str] | None = None
    """(round, global digest) of the `Train` job out, if any."""
    queued: bool = False
    """A `Train` job for the current round waits for the one out to come back."""
    update: tuple[dict[str, np.ndarray], float] | None = None
    """This node's update (delta, loss) from ``base``, kept to send again after a takeover."""
    orphaned_since: float | None = None
    """When its coordinator was lost or changed; None while it follows a coordinator."""
    waiting_for: str | None = None
    """While orphaned: the mesh's coordinator it waits for (None: none known yet)."""
    loss: float | None = None
    mesh_loss: float | None = None
    message: str = ""

    def progress(self, loss: float | None = None) -> TuneProgress:
        return TuneProgress(self.job_id or PENDING_JOB_ID, self.state, self.round, self.rounds or self.request.rounds,
                            self.peers, loss if loss is not None else (self.loss if self.state == "sent" else None),
                            self.message)

    def status(self) -> dict[str, object]:
        """JSON-able, for the status view."""
        return {
            "job_id": self.job_id, "coordinator": self.coordinator, "state": self.state, "round": self.round,
            "rounds": self.rounds or self.request.rounds, "rank": self.rank or self.request.rank,
            "aggregate": self.aggregate or self.request.aggregate, "examples": self.request.examples,
            "peers": self.peers, "loss": self.loss, "mesh_loss": self.mesh_loss, "message": self.message,
            "waiting_for_coordinator": self.orphaned_since is not None,
        }


class Participant:
    """The local participant, if this node takes part in a job (see the module docstring)."""

    def __init__(self, ctx: TuneContext) -> None:
        self.ctx = ctx
        self.part: _Part | None = None
        self.local: Coordinator
        """The local coordinator role (wired by `meshllm.tune.rounds.TuneCore`)."""

    # -- the local node's requests -------------------------------------------------------------

    def join(self, request: JobRequest, now: float) -> str:
        if self.part is not None:
            raise TuneError(f"this node already takes part in tune job {self.part.job_id or '(joining)'}")
        try:
            msg = _join_message(request)
        except WireError as error:
            raise TuneError(f"bad tune settings: {error}") from None
        ctx = self.ctx
        coordinator = ctx.coordinator_id
        if coordinator is None:
            raise TuneError("the mesh has no coordinator yet; try again in a moment")
        if not ctx.reachable(coordinator):
            raise TuneError(f"the coordinator {coordinator} is not linked to this node yet; try again in a moment")
        part = self.part = _Part(coordinator, request, now)
        if coordinator == ctx.node_id:
            reason = self.local.admit(ctx.node_id, msg, now)
            if reason is not None:
                self.part = None
                raise TuneError(reason)
            assert part.job_id is not None
            return part.job_id
        ctx.out.send(coordinator, msg)
        part.message = f"asked the coordinator {coordinator} to join its tune job"
        self._progress(part)
        return PENDING_JOB_ID

    def quit(self) -> None:
        part = self.part
        if part is None:
            return
        self._withdraw(part, "quit")
        self._fail("this node quit the tune job", kind="info")

    def _withdraw(self, part: _Part, why: str) -> None:
        """Tell the coordinator, if it can hear, that this node leaves the job."""
        ctx = self.ctx
        if part.coordinator == ctx.node_id:
            job = self.local.job
            if job is not None and ctx.node_id in job.joined:
                self.local.leave(job, ctx.node_id, why)
        elif ctx.reachable(part.coordinator):
            ctx.out.send(part.coordinator, wire.TuneQuit(part.job_id or ""))

    # -- the mesh --------------------------------------------------------------------------------

    def membership(self, now: float) -> None:
        """The mesh changed: follow its coordinator (see the module docstring)."""
        part = self.part
        if part is None:
            return
        ctx = self.ctx
        coordinator = ctx.coordinator_id
        if part.job_id is None:  # joining: the join timeout governs; a new coordinator is asked again
            if ctx.reachable(coordinator) and coordinator != part.coordinator:
                assert coordinator is not None
                self._rejoin(part, coordinator, now)
            return
        if not ctx.reachable(coordinator):
            if part.orphaned_since is None:
                self._orphan(part, now, f"the coordinator {part.coordinator} left the mesh"
                             if coordinator == part.coordinator else "the mesh is electing a coordinator")
            return
        assert coordinator is not None
        if part.orphaned_since is None and coordinator == part.coordinator:
            return  # all well
        if part.orphaned_since is not None and part.waiting_for == coordinator:
            return  # already waiting for it
        if part.base is None:  # no global adapter to resume from: join the coordinator's job
            self._rejoin(part, coordinator, now)
            return
        why = (f"the mesh's coordinator changed from {part.coordinator} to {coordinator}"
               if coordinator != part.coordinator else f"the mesh's coordinator is {coordinator} again")
        part.coordinator, part.waiting_for, part.orphaned_since = coordinator, coordinator, now  # a fresh wait
        job = self.local.job
        if coordinator != ctx.node_id:
            self._orphan(part, now, why, waiting_for=coordinator)
        elif job is None:  # this node now coordinates: it resumes the job itself
            self.local.take_over(self.checkpoint(), now)
        elif job.job_id != part.job_id:
            self._fail(f"this node coordinates tune job {job.job_id}: tune job {part.job_id} cannot finish")

    def _orphan(self, part: _Part, now: float, why: str, waiting_for: str | None = None) -> None:
        """Follow no coordinator until the mesh's coordinator resumes the job (or time runs out)."""
        if part.orphaned_since is None:
            part.orphaned_since = now
        part.waiting_for = waiting_for
        part.incoming = None
        part.state = "waiting"
        who = f"the mesh's coordinator {waiting_for}" if waiting_for is not None else "the mesh's coordinator"
        part.message = (f"waiting for {who} to resume tune job {part.job_id} ({why}; at most "
                        f"{self.ctx.settings.takeover_timeout_s:g} s)")
        self.ctx.out.log("info", f"tune job {part.job_id} round {part.round}: {part.message}")
        self._progress(part)

    def _rejoin(self, part: _Part, coordinator: str, now: float) -> None:
        """Ask ``coordinator`` to join its job (this node holds no global adapter to resume from)."""
        ctx = self.ctx
        part.coordinator, part.job_id, part.state, part.joined_at = coordinator, None, "joining", now
        part.orphaned_since = part.waiting_for = None
        part.round, part.participants = 0, ()
        part.message = f"asked the mesh's new coordinator {coordinator} to join its tune job"
        self._progress(part)
        msg = _join_message(part.request)
        if coordinator == ctx.node_id:
            reason = self.local.admit(ctx.node_id, msg, now)
            if reason is not None:
                self._fail(f"this node cannot start a tune job as the mesh's coordinator: {reason}")
        else:
            ctx.out.send(coordinator, msg)

    def checkpoint(self) -> Checkpoint:
        part = self.part
        assert part is not None and part.job_id is not None and part.base is not None
        base = part.base
        return Checkpoint(part.job_id, part.rounds, part.rank, part.alpha, part.steps, part.aggregate, base.round,
                          base.tensors, base.participants, base.loss,
                          tuple(sorted(part.named - set(base.participants))), part.request.examples)

    def next_timer(self) -> float | None:
        part = self.part
        if part is None:
            return None
        if part.job_id is None:
            return part.joined_at + self.ctx.settings.join_timeout_s
        if part.orphaned_since is not None:
            return part.orphaned_since + self.ctx.settings.takeover_timeout_s
        return None

    def handle_timer(self, now: float) -> None:
        part = self.part
        if part is None:
            return
        ctx = self.ctx
        settings = ctx.settings
        if part.job_id is None and now >= part.joined_at + settings.join_timeout_s:
            self._withdraw(part, "join unanswered")
            self._fail(f"the coordinator {part.coordinator} did not answer the join within "
                       f"{settings.join_timeout_s:g} s")
        elif part.orphaned_since is not None and now >= part.orphaned_since + settings.takeover_timeout_s:
            wait = f"{settings.takeover_timeout_s:g} s"
            coordinator = ctx.coordinator_id
            if not ctx.reachable(coordinator):
                reason = (f"the coordinator {part.coordinator} was lost and no coordinator took tune job "
                          f"{part.job_id} over within {wait}: the job cannot finish")
            else:
                reason = (f"the mesh's coordinator {coordinator} did not resume tune job {part.job_id} within "
                          f"{wait} (only a node that took part in a round can): the job cannot finish")
            self._withdraw(part, "its coordinator was lost")
            self._fail(reason)

    # -- messages from the coordinator -----------------------------------------------------------

    def on_accepted(self, sender: str, msg: wire.TuneAccepted) -> None:
        part = self.part
        if part is None or sender != part.coordinator or part.job_id not in (None, msg.job_id):
            self.ctx.out.log("error", f"ignored a TuneAccepted from {sender} for tune job {msg.job_id}: not joining it")
            return
        problem = job_problem(msg.rounds, msg.rank, msg.alpha, msg.steps)
        if problem is not None:
            self._withdraw(part, "job out of bounds")
            self._fail(f"the coordinator {sender} runs a tune job of {problem}: this node does not take part")
            return
        part.job_id = msg.job_id
        part.rounds, part.rank, part.alpha, part.steps, part.aggregate = (
            msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate)
        if part.state == "joining":
            part.state = "waiting"
            job = self.local.job
            part.peers = len(job.joined) if job is not None and job.job_id == msg.job_id else part.peers
            part.message = (f"joined tune job {msg.job_id}: {msg.rounds} rounds of {msg.steps} steps, rank {msg.rank}, "
                            f"aggregate {msg.aggregate}; taking part from round {msg.round}")
            self._progress(part)

    def on_round(self, sender: str, msg: wire.TuneRound) -> bool:
        """A round begins (True) or the announcement is refused (False, logged)."""
        part, ctx = self.part, self.ctx
        if part is None or part.job_id != msg.job_id:
            if sender == ctx.coordinator_id and sender != ctx.node_id:
                ctx.out.send(sender, wire.TuneQuit(msg.job_id))  # not (or no longer) in that job: leave it at once
            resumed = accepted = False
        else:
            # while orphaned, the mesh's coordinator (or, in an election, whoever won it) that
            # resumed the job leads it now, from the round it says
            resumed = part.orphaned_since is not None and (sender == ctx.coordinator_id
                                                           or not ctx.reachable(ctx.coordinator_id))
            accepted = resumed or (sender == part.coordinator and msg.round > part.round)
        if part is None or not accepted:
            ctx.out.log("error", f"ignored a TuneRound from {sender} for tune job {msg.job_id} round {msg.round}: "
                                 "not expected")
            return False
        problem = job_problem(msg.rounds, msg.rank, msg.alpha, msg.steps)
        if problem is not None:
            self._withdraw(part, "job out of bounds")
            self._fail(f"{sender} announced a round of a tune job of {problem}: this node does not take part")
            return False
        if resumed:
            part.orphaned_since = part.waiting_for = None
            part.coordinator = sender
            ctx.out.log("info", f"tune job {msg.job_id} resumed by {sender} at round {msg.round} of {msg.rounds}")
        if msg.round > part.round:
            self._round_done(part, msg.loss if msg.loss > 0 else None)
            part.named.update(part.participants)
        part.round, part.rounds, part.rank, part.alpha, part.steps, part.aggregate = (
            msg.round, msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate)
        part.peers = len(msg.participants)
        part.participants = msg.participants
        part.mesh_loss = msg.loss if msg.loss > 0 else None
        part.state = "receiving"
        part.incoming = None
        part.expect_parts = msg.parts
        return True

    def round_started(self, announce: wire.TuneRound, tensors: dict[str, np.ndarray]) -> None:
        """The local coordinator's round: ``tensors`` is its global adapter (read-only)."""
        if self.part is not None and self.on_round(self.ctx.node_id, announce):
            self._global_ready(self.part, tensors)

    def on_global_part(self, sender: str, msg: wire.TuneTensors) -> None:
        part = self.part
        if (part is None or sender != part.coordinator or part.job_id != msg.job_id or part.state != "receiving"
                or msg.round != part.round):
            self.ctx.out.log("error", f"ignored a global adapter part from {sender} for tune job {msg.job_id} "
                                      f"round {msg.round}: not expected")
            return
        rank, alpha = part.rank, part.alpha
        part.incoming, problem, tensors = assemble(part.incoming, "global", part.round, msg, part.expect_parts,
                                                   lambda: self.ctx.expected(rank, alpha))
        if tensors is not None:
            part.incoming = None
            self._global_ready(part, frozen(tensors))
        elif problem is not None:
            part.incoming = None
            self._round_failed(part, f"bad global adapter from {sender}: {problem}", f"bad global adapter: {problem}")

    def _global_ready(self, part: _Part, tensors: dict[str, np.ndarray]) -> None:
        """This round's global adapter arrived whole: train from it, unless this node already
        trained (or is training) from the very same adapter for this round."""
        digest = adapter_digest(tensors)
        base = part.base
        if base is None or base.round != part.round or base.digest != digest:
            part.base = _Base(part.round, tensors, digest, part.participants, part.mesh_loss)
            part.update = None
        if part.update is not None:
            self._send_update(part)
        elif part.training == (part.round, digest):
            part.state = "training"
            part.message = f"round {part.round} of {part.rounds}: training {part.steps} steps ({part.peers} nodes)"
            self._progress(part)
        else:
            self._begin_training(part)

    def on_refused(self, sender: str, msg: wire.TuneRefused) -> None:
        part = self.part
        if part is None or sender != part.coordinator or part.job_id not in (None, msg.job_id, ""):
            self.ctx.out.log("error", f"ignored a TuneRefused from {sender} for tune job {msg.job_id}: not in it")
            return
        if msg.round == 0 or part.job_id is None:
            self._fail(f"the coordinator {sender} refused: {msg.reason}")
        else:
            self.update_refused(msg)

    def update_refused(self, msg: wire.TuneRefused) -> None:
        """The coordinator refused this node's update for round ``msg.round``."""
        part = self.part
        if part is not None and part.job_id == msg.job_id and msg.round == part.round:
            part.state = "refused"
            part.message = (f"round {msg.round} of {part.rounds}: the coordinator refused this node's update: "
                            f"{msg.reason}")
            self._progress(part)

    def job_ended(self, done: wire.TuneDone) -> bool:
        """Job ``done`` finished (its final adapter arrived): this node leaves it. True when it
        took part in it (its operator joined it)."""
        part = self.part
        if part is not None and part.job_id == done.job_id:
            self._round_done(part, done.loss if done.loss > 0 else None)
            self.part = None
            return True
        return False

    def steps_of(self, job_id: str) -> int | None:
        """The steps a round of ``job_id``, if this node takes part in it."""
        part = self.part
        return part.steps if part is not None and part.job_id == job_id and part.steps > 0 else None

    def final_damaged(self, done: wire.TuneDone, problem: str) -> None:
        part = self.part
        if part is not None and part.job_id == done.job_id:
            self._fail(f"the final adapter of tune job {done.job_id} was refused: {problem}")

    # -- training ----------------------------------------------------------------------------------

    def _begin_training(self, part: _Part) -> None:
        part.state = "training"
        part.message = f"round {part.round} of {part.rounds}: training {part.steps} steps ({part.peers} nodes)"
        if part.training is None:
            self._issue(part)
        else:  # one Train job at a time: this one goes out when the one out comes back
            part.queued = True
        self._progress(part)

    def _issue(self, part: _Part) -> None:
        base = part.base
        assert part.job_id is not None and base is not None and base.round == part.round
        part.training, part.queued = (part.round, base.digest), False
        self.ctx.out.jobs.append(Train(part.job_id, part.round, part.rounds, part.rank, part.alpha, part.steps,
                                       {name: arr.copy() for name, arr in base.tensors.items()}))

    def _result(self, job_id: str, round_no: int) -> _Part | None:
        """The participant a `Train` result is for, if it is still wanted (the job out is then
        back; a queued one goes out)."""
        part = self.part
        if part is None or part.job_id != job_id or part.training is None or part.training[0] != round_no:
            self.ctx.out.log("info", f"ignored a training result for tune job {job_id} round {round_no}: stale")
            return None
        trained_from = part.training[1]
        part.training = None
        base = part.base
        if part.queued or base is None or (base.round, base.digest) != (round_no, trained_from) \
                or part.round != round_no:
            if part.queued:
                self._issue(part)
            self.ctx.out.log("info", f"ignored a training result for tune job {job_id} round {round_no}: "
                                     f"superseded (round {part.round} runs now, from another global adapter)")
            return None
        return part

    def trained(self, job_id: str, round_no: int, tensors: Mapping[str, np.ndarray], loss: float) -> None:
        part = self._result(job_id, round_no)
        if part is None:
            return
        assert part.base is not None
        delta, problem = _delta(part.base.tensors, tensors, loss, self.ctx.settings.debug_update_scale)
        if problem is not None:
            self._round_failed(part, problem, problem)
            return
        part.update = (delta, float(loss))
        if part.state == "training" and part.round == round_no:
            self._send_update(part)
        else:
            part.message = f"{part.message}; round {round_no} trained, its update waits"

    def train_failed(self, job_id: str, round_no: int, reason: str) -> None:
        part = self._result(job_id, round_no)
        if part is not None:
            self._round_failed(part, f"training failed: {reason}", "training failed")

    def _send_update(self, part: _Part) -> None:
        assert part.job_id is not None and part.update is not None
        delta, loss = part.update
        part.loss = loss
        part.state = "sent"
        part.message = f"round {part.round} of {part.rounds}: trained, loss {loss:.4f}; update sent"
        self._progress(part)
        if part.coordinator == self.ctx.node_id:
            self.local.local_update(part.job_id, part.round, part.request.examples, delta, loss)
        else:
            for msg in tensor_messages(part.job_id, part.round, "update", delta, part.request.examples, loss):
                self.ctx.out.send(part.coordinator, msg)

    def _round_failed(self, part: _Part, local_reason: str, wire_reason: str) -> None:
        """This round has no update from here: say why locally; tell the coordinator only
        ``wire_reason`` (free of local data), when it waits for this node's update."""
        assert part.job_id is not None
        tell = part.state in ("receiving", "training") and part.orphaned_since is None
        part.state = "failed"
        part.message = f"round {part.round} of {part.rounds}: {local_reason}"
        self.ctx.out.log("error", f"tune job {part.job_id} round {part.round}: {local_reason}")
        self._progress(part)
        if not tell:
            return
        if part.coordinator == self.ctx.node_id:
            self.local.local_no_update(part.job_id, part.round, wire_reason)
        else:
            self.ctx.out.send(part.coordinator, refusal(part.job_id, part.round, wire_reason))

    def _round_done(self, part: _Part, mesh_loss: float | None) -> None:
        """The round this participant last took part in is over (a new round or the end came)."""
        if part.round == 0:
            return
        part.mesh_loss = mesh_loss
        part.state = "round_done"
        loss = f"; mean loss {mesh_loss:.4f}" if mesh_loss is not None else ""
        part.message = f"round {part.round} of {part.rounds} done{loss}"
        self._progress(part, loss=mesh_loss)

    # -- events ----------------------------------------------------------------------------------------

    def _fail(self, reason: str, kind: LogKind = "error") -> None:
        part, self.part = self.part, None
        if part is None:
            return
        self.ctx.out.log(kind, f"tune job {part.job_id or '(joining)'}: {reason}")
        self.ctx.out.events.append(TuneFailed(part.job_id or PENDING_JOB_ID, reason))

    def _progress(self, part: _Part, loss: float | None = None) -> None:
        self.ctx.out.events.append(part.progress(loss))


def _join_message(request: JobRequest) -> wire.TuneJoin:
    return wire.TuneJoin(request.rounds, request.rank, request.alpha, request.steps, request.aggregate,
                         request.examples)


def _usable_loss(loss: object) -> bool:
    try:
        value = float(loss)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and 0.0 <= value <= wm.MAX_TUNE_LOSS


def _delta(base: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray], loss: float,
           scale: float) -> tuple[dict[str, np.ndarray], str | None]:
    """(trained - base) times ``scale``, or the reason the trained adapter is not usable."""
    if set(tensors) != set(base):
        missing, extra = sorted(set(base) - set(tensors)), sorted(set(tensors) - set(base))
        return {}, (("the trained adapter lacks " + missing[0]) if missing
                    else f"the trained adapter has an unexpected tensor {extra[0]}")
    if not _usable_loss(loss):
        return {}, f"training loss {loss} is not usable"
    factor = np.float32(scale)
    delta: dict[str, np.ndarray] = {}
    for name in sorted(base):
        local = np.asarray(tensors[name], dtype=np.float32)
        if local.shape != base[name].shape:
            return {}, f"the trained {name} has shape {local.shape}, expected {base[name].shape}"
        change = local - base[name]
        if factor != 1:
            change = (change * factor).astype(np.float32)
        if not np.isfinite(change).all():
            return {}, "the trained adapter has non-finite values"
        delta[name] = change
    return delta, None
