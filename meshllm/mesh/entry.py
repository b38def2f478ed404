"""The entry side: the answers this node is the entry node of, and their policy when the mesh
moves under them (pause, replay, retry, give up), sans-IO.

Each answer runs one step at a time (a prompt chunk, or its last token and any drafts). A step
starts with this node's own job (embed, plus its layers when it holds the first stage),
crosses the other stages as `Forward` messages, and ends with the head and sampler here. A
lost step (a stage left, a new plan came, a stage refused it, no result in time) is followed
by a rebuild on the plan in force: the stages keep their caches across re-plans and recompute
only the layers they lack, from logs (meshllm.mesh.rebuild). When they cannot, the session is
replayed (`Session.restart()`). Either way the answer does not change (docs/operations.md).

Each answer is in one explicit state (`AnswerState`: a `Phase` and what it needs): running,
replanning, due a rebuild or a replay, or cancelled. It talks to the core only through its port.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace

import numpy as np

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh.events import SessionEnded, SessionOutput
from meshllm.mesh.jobs import Compute, Computed, RebuildPart
from meshllm.mesh.plans import PlanKey, PlanView
from meshllm.mesh.port import PlanFollower, Port
from meshllm.mesh.rebuild import INVARIANT_PART_POSITIONS
from meshllm.mesh.rebuild import parts as rebuild_parts
from meshllm.mesh.session import Session, StateChange, Step
from meshllm.mesh.stage import RebuildMeter, decode_hidden, encode_hidden

log = logging.getLogger(__name__)

MAX_STEP_RETRIES = 4
"""Consecutive failed steps of one session under one plan before the answer fails."""

STALE_RETRY_S = 0.5
"""After a stage refused a step as "stale_plan" (it already moved to a newer plan that this
node has not heard of yet), how long to wait for that plan before retrying on the old one."""


class Phase(enum.Enum):
    """Where an answer stands with the mesh moving under it."""

    RUNNING = "running"
    """Its steps run as they come: the stages' caches match the session."""
    REPLANNING = "replanning"
    """"replanning" was said (no plan was active, or a step was lost); the stages' caches
    match the session again (or it has none yet): the next token says "running"."""
    REBUILD = "rebuild"
    """Replanning, and a step was lost: the stages rebuild the session's caches from what
    they kept and the logs before its next step (meshllm.mesh.rebuild)."""
    WHOLE_REBUILD = "whole_rebuild"
    """Replanning, and a stage could not rebuild for want of a log: the next rebuild is a
    whole one (every stage without its log recomputes its whole span)."""
    FULL_REPLAY = "full_replay"
    """Replanning, and even a whole rebuild failed (or this node could not run its part):
    every step is replayed from the start."""
    CANCELLED = "cancelled"
    """The user cancelled: the answer ends at the next step boundary."""
    CANCELLED_REPLANNING = "cancelled_replanning"
    """Cancelled while replanning: a last token, if one comes, says "running" first."""

    @property
    def replanning(self) -> bool:
        """"replanning" was said, and "running" not since."""
        return self not in (Phase.RUNNING, Phase.CANCELLED)

    @property
    def cancelled(self) -> bool:
        return self in (Phase.CANCELLED, Phase.CANCELLED_REPLANNING)

    @property
    def recovering(self) -> bool:
        """The stages' caches must be rebuilt (or the session replayed) before its next step."""
        return self in _RECOVERY_LEVEL


_RECOVERY_LEVEL = {Phase.REBUILD: 1, Phase.WHOLE_REBUILD: 2, Phase.FULL_REPLAY: 3}


@dataclass(frozen=True)
class AnswerState:
    """An answer's phase, and what the phase needs to know of stale-plan refusals."""

    phase: Phase = Phase.RUNNING
    since: float | None = None
    """Since when stages keep refusing this answer's steps as "stale_plan" (the mesh is
    moving: elections, joins), with no token in between; such refusals count as failures
    only once this has lasted `plan_wait_s`."""
    retry_at: float | None = None
    """After a "stale_plan" refusal: no retry on the same plan before then."""


@dataclass
class _RebuildRun:
    """A rebuild of the stages' caches for a session's `position` positions."""

    position: int
    prefill: int
    history: tuple[int, ...]
    whole: bool
    """Every stage without the log it needs recomputes its whole span."""
    jobs: dict[int, tuple[str, wire.Rebuild]]
    """This node's own jobs for parts of the rebuild, each with its role ("first": the first
    stage's layers, "embed": the embedding for a first stage elsewhere, "last": the last
    stage's layers) and the part it runs."""


@dataclass
class _InFlight:
    """The step of a session that is running: in a job here, or out on the chain."""

    seq: int
    step: Step
    plan: PlanView
    rebuild: _RebuildRun | None = None
    """Set when the step is a rebuild of the caches (then `step` is the next real step)."""
    job_id: int | None = None
    """Set while this node's own job for the step runs."""
    deadline: float | None = None
    """Set while the step is out on the chain: lost if no result by then."""
    lost: str | None = None
    """Set when the step was lost while its job ran: the job's outcome is ignored."""
    ran_span: bool = False
    """The job ran this node's layers (first or last stage): its time goes to the stats."""


@dataclass
class _Answer:
    """One answer entered here: its session, the step in flight, and its state (the state's
    transitions are here; their outputs are the entry side's)."""

    session: Session
    seq: int = 0
    plan_key: PlanKey | None = None
    failures: int = 0
    plan_deadline: float | None = None
    """While no plan is active: when the answer gives up waiting for one."""
    step: _InFlight | None = None
    state: AnswerState = field(default_factory=AnswerState)

    def _set(self, phase: Phase) -> None:
        self.state = replace(self.state, phase=phase)

    def cancel(self) -> None:
        self._set(Phase.CANCELLED_REPLANNING if self.state.phase.replanning else Phase.CANCELLED)

    def pause(self) -> bool:
        """Replanning from now on; True when that is news (then "replanning" is said)."""
        phase = self.state.phase
        if phase.replanning:
            return False
        self._set(Phase.CANCELLED_REPLANNING if phase.cancelled else Phase.REPLANNING)
        return True

    def token(self) -> bool:
        """A new token: running again; True when that is news (then "running" is said)."""
        self.failures = 0  # progress (replayed steps do not count)
        self.state = replace(self.state, since=None)
        phase = self.state.phase
        if not phase.replanning:
            return False
        self._set(Phase.CANCELLED if phase.cancelled else Phase.RUNNING)
        return True

    def refused_as_stale(self, now: float, plan_wait_s: float) -> None:
        """A stage refused the step in flight as "stale_plan": the mesh is moving. No retry on
        the same plan for a moment, and not a failure of the step while it has not moved
        for `plan_wait_s` (the caller's `lose` counts it back)."""
        since = self.state.since if self.state.since is not None else now
        self.state = replace(self.state, since=since, retry_at=now + STALE_RETRY_S)
        if now - since < plan_wait_s:
            self.failures -= 1

    def lost(self, step: _InFlight, recovery: Phase) -> None:
        """`step` was lost (and "replanning" said): the next step rebuilds the stages' caches
        first, at least as `recovery` says, and whole again after a whole rebuild."""
        if self.state.phase.cancelled:
            return  # the answer ends at the next step boundary anyway
        if step.rebuild is not None and step.rebuild.whole:
            recovery = max(recovery, Phase.WHOLE_REBUILD, key=_RECOVERY_LEVEL.__getitem__)
        self._set(recovery)

    def recovery(self, plan: PlanView) -> Phase | None:
        """About to step on `plan`: the recovery due first (REBUILD, WHOLE_REBUILD or
        FULL_REPLAY; a rebuild too when the plan moved, as the caches live on the old plan's
        stages), or None; the answer is no longer recovering once it is taken."""
        phase = self.state.phase
        moved = self.plan_key is not None and plan.key != self.plan_key
        if moved:
            self.failures = 0  # failures count up only while the plan stays the same
        self.plan_key = plan.key
        if not (phase.recovering or moved):
            return None
        self._set(Phase.REPLANNING if phase.replanning else Phase.RUNNING)
        return phase if phase.recovering else Phase.REBUILD


class EntrySessions(PlanFollower):
    """Every answer whose entry node this is. `meter` counts the rebuild parts this node runs
    for its own answers (shared with the stage role, `meshllm.mesh.stage.RebuildMeter`)."""

    def __init__(self, port: Port, meter: RebuildMeter) -> None:
        self._port = port
        self._meter = meter
        self._answers: dict[str, _Answer] = {}
        self._by_job: dict[int, str] = {}
        self._counter = 0

    def state(self, session_id: str) -> AnswerState | None:
        answer = self._answers.get(session_id)
        return answer.state if answer is not None else None

    # -- from the driver -------------------------------------------------------------------

    def open(self, session: Session, now: float) -> str:
        session.session_id = f"{self._port.node_id}/{self._counter}"
        self._counter += 1
        self._answers[session.session_id] = _Answer(session)
        self._advance(self._answers[session.session_id], now)
        return session.session_id

    def cancel(self, session_id: str, now: float) -> None:
        """Stop at the next step boundary; the answer ends with a "cancelled" token."""
        answer = self._answers.get(session_id)
        if answer is not None:
            answer.cancel()
            self._advance(answer, now)

    def close(self, session_id: str) -> None:
        """Nobody listens any more: forget the answer now, with no further output."""
        answer = self._answers.pop(session_id, None)
        if answer is not None:
            self._drop_everywhere(session_id)

    # -- from the transition and the core -----------------------------------------------------

    def plan_changed(self, now: float) -> None:
        """A new plan was offered, or the plan in force went void: steps on the chain are lost."""
        for answer in list(self._answers.values()):
            if answer.step is not None and answer.step.deadline is not None:
                self._lose(answer, "a new plan arrived", now)
            else:
                self._advance(answer, now)

    def plan_active(self, plan: PlanView, now: float) -> None:
        for answer in list(self._answers.values()):
            self._advance(answer, now)

    def node_linked(self, now: float) -> None:
        """A link came up: answers waiting for a link to a stage of the plan may go on."""
        for answer in list(self._answers.values()):
            if answer.step is None:
                self._advance(answer, now)

    def node_lost(self, node_id: str, now: float) -> None:
        for answer in list(self._answers.values()):
            step = answer.step
            if step is not None and step.deadline is not None and node_id in step.plan.node_ids:
                self._lose(answer, f"{node_id} lost", now)

    def step_failed(self, sender: str, msg: wire.StepFailed, now: float) -> None:
        answer = self._answers.get(msg.session_id)
        if answer is None or answer.step is None or answer.step.seq != msg.seq:
            return
        if sender != self._port.node_id and sender not in answer.step.plan.node_ids:
            raise ValueError(f"a step of {msg.session_id} refused by {sender}, no stage of its route")
        recovery = Phase.REBUILD
        if msg.code == "stale_plan":  # the mesh is moving: wait a moment for its new plan
            answer.refused_as_stale(now, self._port.settings.plan_wait_s)
        rebuild = answer.step.rebuild
        if msg.code == "no_log" and rebuild is not None:
            # even a whole rebuild failed: replay the session; else rebuild whole
            recovery = Phase.FULL_REPLAY if rebuild.whole else Phase.WHOLE_REBUILD
        self._lose(answer, f"{sender}: {msg.code}: {msg.message}", now, recovery)

    def result(self, sender: str, msg: wire.Result, now: float) -> None:
        """The last stage's output for a step. Raises ValueError for a result that cannot be
        ours (the caller logs and drops it)."""
        answer = self._answers.get(msg.session_id)
        if answer is None or answer.step is None or answer.step.seq != msg.seq or answer.step.deadline is None \
                or answer.step.rebuild is not None:
            return  # late: the step was already lost or the answer is over
        step = answer.step
        if sender != step.plan.node_ids[-1]:
            raise ValueError(f"result for {msg.session_id} from {sender}, not from the last stage")
        try:
            hidden = decode_hidden(self._port, msg.hidden, step.plan.codec, len(step.step.token_ids))
        except WireError as e:
            self._lose(answer, f"bad result from {sender}: {e}", now)
            return
        step.deadline = None
        if step.step.replay:  # only the plan's caches are being refilled (the private ones hold it)
            self._finish_step(answer, (), now)
        else:  # a prompt chunk before its last still fills this node's private layers' caches
            self._run_job(answer, hidden=hidden, run_span=False, finish="sample" if step.step.sample else "discard")

    def forward_is_final(self, session_id: str, route: tuple[str, ...]) -> bool:
        """A `Forward` whose last stage is this node, for an answer of its own: the layers
        are fused with the head and sampler."""
        return route == (self._port.node_id,) and session_id in self._answers

    def final_forward(self, msg: wire.Forward, hidden: np.ndarray, now: float) -> int | None:
        """Run this node's layers (the last stage) and the head for an answer of its own; the
        job id, or None when the step is not the one in flight any more."""
        answer = self._answers.get(msg.session_id)
        if answer is None or answer.step is None or answer.step.seq != msg.seq or answer.step.deadline is None \
                or answer.step.rebuild is not None:
            return None
        answer.step.deadline = None
        return self._run_job(answer, hidden=hidden, run_span=True,
                             finish="sample" if answer.step.step.sample else "discard")

    def job_done(self, job_id: int, result: Computed, now: float) -> bool:
        """True when the job was one of the entry side's."""
        session_id = self._by_job.pop(job_id, None)
        if session_id is None:
            return False
        answer = self._answers.get(session_id)
        if answer is not None and answer.step is not None and answer.step.rebuild is not None:
            role_part = answer.step.rebuild.jobs.pop(job_id, None)
            if role_part is not None:
                self._rebuild_part_done(answer, *role_part, result, now)
            return True
        if answer is None or answer.step is None or answer.step.job_id != job_id:
            return True
        step = answer.step
        step.job_id = None
        if step.ran_span:
            self._port.stats.computed(len(step.step.token_ids), result.span_ms)
        active = self._port.plans.active
        if step.lost is not None:
            self._lose(answer, step.lost, now)
        elif result.hidden is not None and (active is None or active.key != step.plan.key):
            self._lose(answer, "a new plan arrived", now)  # the stages would refuse it
        elif result.hidden is not None:
            self._send_down_chain(answer, result.hidden, now)
        else:
            self._finish_step(answer, result.token_ids or ((result.token_id,) if result.token_id is not None else ()),
                              now, result.offered)
        return True

    def job_failed(self, job_id: int, reason: str, now: float) -> bool:
        session_id = self._by_job.pop(job_id, None)
        if session_id is None:
            return False
        answer = self._answers.get(session_id)
        if answer is None or answer.step is None:
            return True
        if answer.step.rebuild is not None and answer.step.rebuild.jobs.pop(job_id, None) is not None:
            self._lose(answer, reason, now, Phase.FULL_REPLAY)  # this node could not run its part
        elif answer.step.job_id == job_id:
            answer.step.job_id = None
            self._lose(answer, reason, now)
        return True

    def handle_timer(self, now: float) -> None:
        for answer in list(self._answers.values()):
            step = answer.step
            if step is not None and step.deadline is not None and step.deadline <= now:
                self._lose(answer, f"no result after {self._port.settings.step_timeout_s:.0f} s", now)
            elif any(d is not None and d <= now for d in (answer.plan_deadline, answer.state.retry_at)):
                self._advance(answer, now)

    def next_timer(self) -> float | None:
        deadlines = [d for a in self._answers.values()
                     for d in (a.plan_deadline, a.state.retry_at, a.step.deadline if a.step else None)
                     if d is not None]
        return min(deadlines, default=None)

    def stop(self, reason: str) -> None:
        """The node is stopping: every answer ends with an error."""
        for session_id in list(self._answers):
            self._end(session_id, reason)

    # -- the policy ----------------------------------------------------------------------------

    def _advance(self, answer: _Answer, now: float) -> None:
        """Start the answer's next step if nothing is in flight and a plan allows it."""
        port = self._port
        session = answer.session
        while answer.step is None:
            step = session.next_step()
            if step is None:
                self._end(session.session_id, None)
                return
            if answer.state.phase.cancelled:
                self._output(answer, session.cancel())
                self._end(session.session_id, None)
                return
            plan = port.plans.active
            if plan is None:
                if port.placement_error is not None:
                    self._end(session.session_id, f"the mesh cannot hold the model: {port.placement_error}")
                    return
                if answer.plan_deadline is None:
                    answer.plan_deadline = now + port.settings.plan_wait_s
                elif answer.plan_deadline <= now:
                    self._end(session.session_id, "no active plan: the mesh is still forming or re-planning")
                    return
                if answer.pause():
                    self._output(answer, StateChange("replanning"))
                return
            unlinked = [n for n in plan.node_ids if n != port.node_id and n not in port.members]
            if unlinked:
                # the coordinator planned with a node this one has no link to (yet: it links
                # with every member within a second or so of a join): its results and
                # refusals could not come back here. Wait for the link, as for a plan.
                if answer.plan_deadline is None:
                    answer.plan_deadline = now + port.settings.plan_wait_s
                elif answer.plan_deadline <= now:
                    self._end(session.session_id, f"no link to {port.name_of(unlinked[0])}, "
                                                  "a stage of the plan in force")
                    return
                if answer.pause():
                    self._output(answer, StateChange("replanning"))
                return
            answer.plan_deadline = None
            if answer.state.retry_at is not None:
                if plan.key == answer.plan_key and now < answer.state.retry_at:
                    return  # a stage refused this plan as stale: wait for the newer one
                answer.state = replace(answer.state, retry_at=None)
            recovery = answer.recovery(plan)
            if recovery is not None and session.dropped_drafts and not port.settings.batch_invariant:
                recovery = Phase.FULL_REPLAY  # a rebuild would not repeat its verify steps' shapes
            if recovery is Phase.FULL_REPLAY:
                port.stats.full_replays += 1
                _log_lost(session.session_id, answer.seq, "rebuild impossible: replaying every step")
                session.restart(INVARIANT_PART_POSITIONS if port.settings.batch_invariant else 0)
                continue
            if recovery is not None and session.position > 0:
                self._start_rebuild(answer, step, plan, recovery is Phase.WHOLE_REBUILD, now)
                return
            answer.step = _InFlight(answer.seq, step, plan)
            answer.seq += 1
            first_is_here = plan.node_ids[0] == port.node_id
            alone = first_is_here and len(plan.stages) == 1
            finish = ("sample" if step.sample else "discard") if alone else "send"
            self._run_job(answer, token_ids=step.token_ids, run_span=first_is_here, finish=finish)

    # -- rebuilds ------------------------------------------------------------------------------

    def _start_rebuild(self, answer: _Answer, step: Step, plan: PlanView, whole: bool, now: float) -> None:
        """Have every stage of `plan` hold the session's caches again: one rebuild, streamed
        down the chain in parts (meshllm.mesh.rebuild), instead of a replay step by step."""
        port = self._port
        session = answer.session
        history, prefill = session.history()
        if whole:
            port.stats.whole_rebuilds += 1
            _log_lost(session.session_id, answer.seq, "a log is gone: stages without it recompute their spans")
        run = _RebuildRun(len(history), prefill, history, whole, {})
        answer.step = _InFlight(answer.seq, step, plan, rebuild=run)
        answer.seq += 1
        answer.step.deadline = now + port.settings.step_timeout_s
        ids = plan.node_ids
        first_is_here = ids[0] == port.node_id
        route = ids[1:] if first_is_here else ids
        for start, end in rebuild_parts(run.position, prefill, port.settings.batch_invariant):
            part = wire.Rebuild(session.session_id, answer.step.seq, plan.key[0], plan.key[1], run.position,
                                prefill, start, end - start, (), route[1:] + (port.node_id,), whole)
            job = RebuildPart(port.next_job_id(), session.session_id, answer.step.seq, run.position, prefill,
                              start, end - start, token_ids=history[start:end], run_span=first_is_here,
                              whole=whole)
            run.jobs[job.job_id] = ("first" if first_is_here else "embed", part)
            self._by_job[job.job_id] = session.session_id
            port.add_job(job)

    def final_rebuild_part(self, msg: wire.Rebuild, hidden: np.ndarray | None, now: float) -> None:
        """A part of a rebuild of an answer of this node's own, which holds its last stage."""
        answer = self._answers.get(msg.session_id)
        if answer is None or answer.step is None or answer.step.seq != msg.seq or answer.step.rebuild is None:
            return
        port = self._port
        job = RebuildPart(port.next_job_id(), msg.session_id, msg.seq, msg.position, msg.prefill,
                          msg.start_pos, msg.positions, hidden=hidden, whole=msg.whole)
        answer.step.rebuild.jobs[job.job_id] = ("last", msg)
        self._by_job[job.job_id] = msg.session_id
        port.add_job(job)

    def rebuilt(self, sender: str, msg: wire.Rebuilt, now: float) -> None:
        answer = self._answers.get(msg.session_id)
        if answer is None or answer.step is None or answer.step.seq != msg.seq or answer.step.rebuild is None:
            return
        if sender != answer.step.plan.node_ids[-1]:
            raise ValueError(f"rebuild of {msg.session_id} reported done by {sender}, not by the last stage")
        answer.step = None
        self._advance(answer, now)

    def _rebuild_part_done(self, answer: _Answer, role: str, part: wire.Rebuild, result: Computed,
                           now: float) -> None:
        """One of this node's own jobs of a rebuild (see `_RebuildRun.jobs`)."""
        step = answer.step
        assert step is not None and step.rebuild is not None
        if role != "embed" and not self._meter.part_done(part, result):
            return  # refused here: the entry side heard it as a "no_log" failure
        ids = step.plan.node_ids
        if role == "last" or (role == "first" and len(ids) == 1):  # this node held the whole chain
            if part.start_pos + part.positions == part.position:  # the rebuild is done
                answer.step = None
                self._advance(answer, now)
            return
        hidden = () if result.hidden is None else (encode_hidden(result.hidden, step.plan.codec),)
        self._port.send(ids[1 if role == "first" else 0], wire.Rebuild(
            part.session_id, part.seq, part.term, part.epoch, part.position, part.prefill, part.start_pos,
            part.positions, hidden, part.route, part.whole), channel="activation", positions=part.positions)

    def _run_job(self, answer: _Answer, *, token_ids: tuple[int, ...] | None = None,
                 hidden: np.ndarray | None = None, run_span: bool, finish: str) -> int:
        step = answer.step
        assert step is not None
        job_id = self._port.next_job_id()
        step.job_id = job_id
        step.ran_span = run_span
        self._by_job[job_id] = answer.session.session_id
        session = answer.session
        sample = finish == "sample"
        self._port.add_job(Compute(job_id, session.session_id, step.step.start_pos, len(step.step.token_ids),
                                   token_ids, hidden, run_span, finish,  # type: ignore[arg-type]
                                   step.step.drafts if sample else (), *(session.draft_request() if sample else ((), 0))))
        return job_id

    def _send_down_chain(self, answer: _Answer, hidden: np.ndarray, now: float) -> None:
        """This node's part of the step is done: hand the hidden state to the next stage."""
        port = self._port
        step = answer.step
        assert step is not None
        plan = step.plan
        ids = plan.node_ids
        first = 1 if ids[0] == port.node_id else 0  # this node ran the first stage already
        if first == len(ids):  # a single stage here, with finish "send": cannot happen
            raise AssertionError("a plan of one stage on the entry node runs as one job")
        route = ids[first + 1:] + (port.node_id,)
        msg = wire.Forward(answer.session.session_id, step.seq, plan.key[0], plan.key[1],
                           step.step.start_pos, encode_hidden(hidden, plan.codec), route)
        step.deadline = now + port.settings.step_timeout_s
        port.send(ids[first], msg, channel="activation", positions=hidden.shape[0])

    def _finish_step(self, answer: _Answer, token_ids: tuple[int, ...], now: float,
                     offered: tuple[int, ...] = ()) -> None:
        session = answer.session
        step = answer.step
        assert step is not None
        answer.step = None
        if not step.step.sample:
            session.step_done()
        else:
            if not token_ids:
                raise AssertionError("a sampling step ended without a token")
            if answer.token():
                self._output(answer, StateChange("running"))
            for token in session.accept_verified(token_ids):
                self._output(answer, token)
            session.offer(offered)
        self._advance(answer, now)

    def _lose(self, answer: _Answer, reason: str, now: float, recovery: Phase = Phase.REBUILD) -> None:
        """The step in flight is lost: rebuild the stages' caches (at least at `recovery`,
        and whole again after a whole rebuild) and carry on, or give up after too many."""
        step = answer.step
        if step is None:
            return
        if step.job_id is not None:
            step.lost = reason  # wait for the job: its outcome is ignored
            return
        answer.step = None
        answer.failures += 1
        _log_lost(answer.session.session_id, step.seq, reason)
        if answer.failures > MAX_STEP_RETRIES:
            self._end(answer.session.session_id, f"steps keep failing: {reason}")
            return
        if answer.pause():
            self._output(answer, StateChange("replanning"))
        answer.lost(step, recovery)
        self._advance(answer, now)

    def _output(self, answer: _Answer, item: object) -> None:
        self._port.emit(SessionOutput(answer.session.session_id, item))  # type: ignore[arg-type]

    def _end(self, session_id: str, error: str | None) -> None:
        if self._answers.pop(session_id, None) is None:
            return
        self._port.emit(SessionEnded(session_id, error))
        self._drop_everywhere(session_id)

    def _drop_everywhere(self, session_id: str) -> None:
        """Every stage of the plan in force frees the session's caches, and this node its own
        (its private layers' too, also when it holds no stage)."""
        plan = self._port.plans.active
        stages = plan.node_ids if plan is not None else ()
        for node_id in (*stages, *(() if self._port.node_id in stages else (self._port.node_id,))):
            self._port.send(node_id, wire.DropSession(session_id))


def _log_lost(session_id: str, seq: int, reason: str) -> None:
    log.info("session %s step %d lost: %s", session_id, seq, reason)
