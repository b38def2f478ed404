"""The stage role of one node: the steps and rebuild parts other nodes forward to its layers,
sans-IO.

Every step from a peer passes the same checks (`Stage._admit`: it comes from the stage before
this one, or to the first stage from the session's entry node, with the rest of the chain as
its route (meshllm.mesh.checks); the plan is active and holds this node; the hidden state fits
the model and the plan's codec); a bounded number waits for compute (`max_queued_steps`,
`max_queued_rebuild_parts`; more are refused as "busy"). Once computed, a step goes on to
the next stage (`Forward`) or back to its entry node (`Result`); a rebuild part goes on down
the chain (meshllm.mesh.rebuild: the stage's store keeps the output logs a rebuild needs).
A refused step is reported to its entry node at once (`StepFailed`). The stage also imports
the caches handed over to it (`CacheHandover`) and frees the caches of sessions that ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh.checks import session_entry, step_sources
from meshllm.mesh.jobs import Compute, Computed, DropSessions, ImportCache, RebuildPart
from meshllm.mesh.plans import PlanView
from meshllm.mesh.port import PlanFollower, Port

log = logging.getLogger(__name__)


def decode_hidden(port: Port, payload: wire.TensorPayload, codec: str, positions: int | None = None) -> np.ndarray:
    """A hidden-state tensor from a peer, checked against the model and the plan."""
    return wire.decode_tensor(payload, expect_shape=(positions, port.limits.hidden_size), expect_codec=codec)


def encode_hidden(hidden: np.ndarray, codec: str) -> wire.TensorPayload:
    """zstd is tried on prompts (many positions), where it can pay; a decode step's one
    position barely compresses (docs/wire-format.md), so it goes raw."""
    return wire.encode_tensor(hidden, codec, compress="auto" if hidden.shape[0] > 1 else False)


def refuse(port: Port, msg: wire.Forward | wire.Rebuild, code: str, reason: str, entry: str | None = None) -> None:
    """Tell a step's entry node (the last node of its route) that the step was refused."""
    entry = entry or (msg.route[-1] if msg.route else None)
    log.info("step %s/%d refused: %s", msg.session_id, msg.seq, reason)
    if entry is not None:
        port.send(entry, wire.StepFailed(msg.session_id, msg.seq, code, reason[:500]))


class OwnAnswers(Protocol):
    """The answers this node is the entry node of (`meshllm.mesh.entry.EntrySessions`), as the
    stage sees them: a step whose last stage is this node, for an answer of its own, ends here."""

    def forward_is_final(self, session_id: str, route: tuple[str, ...]) -> bool: ...

    def final_forward(self, msg: wire.Forward, hidden: np.ndarray, now: float) -> int | None: ...

    def final_rebuild_part(self, msg: wire.Rebuild, hidden: np.ndarray | None, now: float) -> None: ...


class RebuildMeter:
    """Counts the rebuild parts run here (a stage's, and the entry side's own) into the stats,
    and refuses a part this node cannot rebuild ("no_log": its entry node rebuilds whole)."""

    def __init__(self, port: Port) -> None:
        self._port = port
        self._ms: dict[tuple[str, int], float] = {}
        """Compute time of the rebuilds running here, by (session, seq)."""

    def part_done(self, msg: wire.Rebuild, result: Computed) -> bool:
        """A rebuild part ran here: count it; False (and the entry node told) when this node
        cannot rebuild."""
        key = (msg.session_id, msg.seq)
        if result.rebuild_error is not None:
            self._ms.pop(key, None)
            refuse(self._port, msg, "no_log", result.rebuild_error)
            return False
        ms = self._ms.pop(key, 0.0) + result.span_ms
        report = result.rebuild
        if msg.start_pos + msg.positions < msg.position:
            self._ms[key] = ms
        elif report is not None:
            kept = report.kept[1] - report.kept[0] if report.kept else 0
            self._port.stats.rebuilt(kept, report.rebuilt_layers, ms)
            self._port.log("info", f"rebuilt session {msg.session_id} here: {report.describe()}, in {ms:.0f} ms")
        return True

    def part_failed(self, msg: wire.Rebuild) -> None:
        self._ms.pop((msg.session_id, msg.seq), None)


@dataclass(frozen=True)
class _StageStep:
    """A forwarded step (or rebuild part) computing here, and where its output goes."""

    msg: wire.Forward | wire.Rebuild
    plan: PlanView


class Stage(PlanFollower):
    """Steps and rebuild parts of other nodes' answers (and of this node's own, as a middle stage)."""

    def __init__(self, port: Port, own: OwnAnswers, meter: RebuildMeter,
                 givers: Callable[[str, tuple[int, int], int], None] = lambda sender, key, layer: None) -> None:
        """`givers(sender, plan key, layer)`: raises ValueError unless `sender` may hand over
        the caches of `layer` under that plan (`meshllm.mesh.transition.Transition.check_handover`)."""
        self._port = port
        self._own = own
        self._meter = meter
        self._givers = givers
        self._steps: dict[int, _StageStep] = {}
        self._rebuilds: dict[int, _StageStep] = {}
        self.sessions: set[str] = set()
        """Sessions of other entry nodes whose caches this node may hold."""
        self._passed_on: dict[str, tuple[str, int, str]] = {}
        """The last step (or rebuild part) of each session passed on to a next stage here:
        (that stage, the step's seq, the entry node). If the link to that stage goes down, the
        step may have gone down with it, unseen by the entry node: it is told at once."""

    # -- steps -------------------------------------------------------------------------------

    def _admit(self, sender: str, msg: wire.Forward | wire.Rebuild, payload: wire.TensorPayload | None,
               positions: int) -> tuple[PlanView, str, np.ndarray | None] | None:
        """The checks every step from a peer passes: (plan, entry node, hidden), or None
        when it was refused (the entry node is told why). A step that its sender may not
        send is refused without a word to anyone (ValueError): it comes only from the stage
        before this one under the active plan (to the first stage: from the session's entry
        node, which the session id names), with the rest of the chain as its route."""
        port = self._port
        entry = msg.route[-1] if msg.route else None
        if entry is None or session_entry(msg.session_id) != entry:
            raise ValueError(f"a step of session {msg.session_id} whose route ends at {entry}")
        plan = port.plans.active
        if plan is None or plan.key != (msg.term, msg.epoch) or port.node_id not in plan.node_ids:
            plans = [p for p in (plan, port.plans.pending) if p is not None]
            known = {n for p in plans for n in p.node_ids} if plans else set(port.members)
            if sender != entry and sender not in known:
                raise ValueError(f"a step of {msg.session_id} from {sender}, no stage of a plan known here")
            why = "this node holds no layers in the active plan" if plan is not None and plan.key == (
                msg.term, msg.epoch) else f"plan {msg.term}.{msg.epoch} is not active here"
            refuse(port, msg, "stale_plan", why, entry)
            return None
        sources = step_sources(plan, port.node_id, entry)
        if sender not in sources:
            raise ValueError(f"a step of {msg.session_id} from {sender}, not the stage before this one")
        if msg.route != sources[sender]:
            refuse(port, msg, "bad_step", "the route is not the rest of the plan's chain", entry)
            return None
        hidden = None
        if payload is not None:
            try:
                hidden = decode_hidden(port, payload, plan.codec, positions)
            except WireError as e:
                refuse(port, msg, "bad_step", str(e), entry)
                return None
        if msg.start_pos + positions > port.limits.max_positions:
            refuse(port, msg, "bad_step", "step runs past the model's context window", entry)
            return None
        return plan, entry, hidden

    def on_forward(self, sender: str, msg: wire.Forward, now: float) -> None:
        port = self._port
        rows = msg.hidden.shape[0] if msg.hidden.shape else 0
        admitted = self._admit(sender, msg, msg.hidden, rows)
        if admitted is None:
            return
        plan, entry, hidden = admitted
        assert hidden is not None
        if self._own.forward_is_final(msg.session_id, msg.route):
            self._own.final_forward(msg, hidden, now)  # this node's own answer: layers + head
            return
        if len(self._steps) >= port.settings.max_queued_steps:
            refuse(port, msg, "busy", f"over {port.settings.max_queued_steps} steps queued here", entry)
            return
        self.sessions.add(msg.session_id)
        job = Compute(port.next_job_id(), msg.session_id, msg.start_pos, hidden.shape[0], hidden=hidden)
        self._steps[job.job_id] = _StageStep(msg, plan)
        port.add_job(job)

    def on_rebuild(self, sender: str, msg: wire.Rebuild, now: float) -> None:
        """A part of a session's rebuild: run it here (meshllm.mesh.rebuild), pass it on."""
        port = self._port
        admitted = self._admit(sender, msg, msg.hidden[0] if msg.hidden else None, msg.positions)
        if admitted is None:
            return
        plan, entry, hidden = admitted
        if msg.position > port.limits.max_positions:
            refuse(port, msg, "bad_step", "rebuild runs past the model's context window", entry)
            return
        if self._own.forward_is_final(msg.session_id, msg.route):
            self._own.final_rebuild_part(msg, hidden, now)  # this node's own answer, last stage
            return
        limit = port.settings.max_queued_rebuild_parts
        if len(self._rebuilds) >= limit:
            refuse(port, msg, "busy", f"over {limit} rebuild parts queued here", entry)
            return
        self.sessions.add(msg.session_id)
        job = RebuildPart(port.next_job_id(), msg.session_id, msg.seq, msg.position, msg.prefill,
                          msg.start_pos, msg.positions, hidden=hidden, whole=msg.whole)
        self._rebuilds[job.job_id] = _StageStep(msg, plan)
        port.add_job(job)

    def job_done(self, job_id: int, result: object) -> bool:
        """True when the job was a step or rebuild part of this stage's."""
        if job_id in self._steps:
            assert isinstance(result, Computed)
            self._step_done(self._steps.pop(job_id), result)
        elif job_id in self._rebuilds:
            assert isinstance(result, Computed)
            self._rebuild_done(self._rebuilds.pop(job_id), result)
        else:
            return False
        return True

    def job_failed(self, job_id: int, reason: str) -> bool:
        if job_id in self._steps:
            step = self._steps.pop(job_id)
            log.info("step %s/%d failed here: %s", step.msg.session_id, step.msg.seq, reason)
            refuse(self._port, step.msg, "bad_step", reason)
        elif job_id in self._rebuilds:
            step = self._rebuilds.pop(job_id)
            assert isinstance(step.msg, wire.Rebuild)
            self._meter.part_failed(step.msg)
            refuse(self._port, step.msg, "no_log", reason)  # the entry node replays the session instead
        else:
            return False
        return True

    def _step_done(self, step: _StageStep, result: Computed) -> None:
        assert result.hidden is not None
        port = self._port
        msg = step.msg
        port.stats.computed(result.hidden.shape[0], result.span_ms)
        try:
            payload = encode_hidden(result.hidden, step.plan.codec)
        except WireError as e:  # what came in made this span overflow (NaN, inf): no step to pass on
            refuse(port, msg, "bad_step", f"the step's output cannot be sent: {e}")
            return
        if len(msg.route) == 1:
            reply: wire.Message = wire.Result(msg.session_id, msg.seq, payload)
        else:
            reply = wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch, msg.start_pos, payload, msg.route[1:])
            self._passed_on[msg.session_id] = (msg.route[0], msg.seq, msg.route[-1])
        port.send(msg.route[0], reply, channel="activation", positions=result.hidden.shape[0])

    def _rebuild_done(self, step: _StageStep, result: Computed) -> None:
        msg = step.msg
        assert isinstance(msg, wire.Rebuild)
        if not self._meter.part_done(msg, result):
            return
        last = msg.start_pos + msg.positions == msg.position
        if len(msg.route) == 1:  # the next hop is the entry node: it only needs to hear the end
            if last:
                self._port.send(msg.route[0], wire.Rebuilt(msg.session_id, msg.seq))
            return
        try:
            hidden = () if result.hidden is None else (encode_hidden(result.hidden, step.plan.codec),)
        except WireError as e:
            refuse(self._port, msg, "no_log", f"the rebuild's output cannot be sent: {e}")
            return
        self._passed_on[msg.session_id] = (msg.route[0], msg.seq, msg.route[-1])
        self._port.send(msg.route[0], wire.Rebuild(msg.session_id, msg.seq, msg.term, msg.epoch, msg.position,
                                                   msg.prefill, msg.start_pos, msg.positions, hidden,
                                                   msg.route[1:], msg.whole),
                        channel="activation", positions=msg.positions)

    # -- caches ------------------------------------------------------------------------------

    def on_cache_handover(self, sender: str, msg: wire.CacheHandover, now: float) -> None:
        """The caches of one layer of a session, from the node that held the layer before."""
        port = self._port
        self._givers(sender, (msg.term, msg.epoch), msg.layer)
        if (msg.term, msg.epoch) < port.plans.highest_key or msg.layer >= port.spec.num_layers:
            raise ValueError(f"cache hand-over for plan {msg.term}.{msg.epoch}, layer {msg.layer}: not wanted here")
        limits = port.limits
        shape = msg.keys.shape
        if shape[1] > limits.max_positions or (limits.kv_heads and (shape[0], shape[2]) != (
                limits.kv_heads, limits.head_dim)):
            raise ValueError(f"cache hand-over of shape {shape} does not fit this model")
        keys = wire.decode_tensor(msg.keys, expect_codec="f32")
        values = wire.decode_tensor(msg.values, expect_codec="f32")
        port.add_job(ImportCache(port.next_job_id(), msg.session_id, msg.layer, keys, values))
        if not msg.session_id.startswith(f"{port.node_id}/"):
            self.sessions.add(msg.session_id)

    def on_drop_session(self, sender: str, msg: wire.DropSession, now: float) -> None:
        """A peer's answer ended: free its caches here."""
        if session_entry(msg.session_id) == sender and msg.session_id in self.sessions:
            self.drop((msg.session_id,))

    def drop_own(self, sender: str, msg: wire.DropSession, now: float) -> None:
        """An answer of this node's own ended (its entry side tells every stage, this node too)."""
        self.drop((msg.session_id,))

    def drop(self, session_ids: tuple[str, ...]) -> None:
        self.sessions.difference_update(session_ids)
        for session_id in session_ids:
            self._passed_on.pop(session_id, None)
        self._port.add_job(DropSessions(self._port.next_job_id(), session_ids))

    def peer_lost(self, peer_id: str) -> None:
        """Sessions whose entry node left: their user is gone. Steps passed on to the lost
        peer may be lost with the link (still in this node's send queue, or on the wire): their
        entry nodes hear of it now, not after the step timeout. A step that did get through
        is not in flight at its entry node any more, which then ignores the word."""
        port = self._port
        for session_id, (hop, seq, entry) in list(self._passed_on.items()):
            if hop == peer_id:
                del self._passed_on[session_id]
                if entry != peer_id:
                    port.send(entry, wire.StepFailed(session_id, seq, "stale_plan",
                                                     f"the link from {port.node_id} to {peer_id} went down"))
        prefix = f"{peer_id}/"
        orphans = tuple(sid for sid in self.sessions if sid.startswith(prefix))
        if orphans:
            self.drop(orphans)

    def span_loaded(self, span: tuple[int, int]) -> None:
        if span == (0, 0):
            self.sessions.clear()  # a node out of the plan holds no caches
            self._passed_on.clear()
