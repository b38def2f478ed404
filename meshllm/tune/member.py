"""The member role: every node receives the final adapter of a finished tune job, checks it,
and takes it up only when its operator took part in the job or allowed it.

The coordinator sends `TuneDone` and the final adapter (`TuneTensors` of kind ``final``) to
every member; a member checks the job's settings (`job_problem`), the parts, the digest, and
the adapter's bound (`meshllm.tune.aggregate.final_problem`: it is the job's initial adapter,
which every member makes again from the job id, plus at most one bounded aggregate a round),
and emits `TuneFinished` once. Its ``serve`` says whether this node serves it: when its local
participant took part in the job, or with `TuneSettings.accept_adapters`. A final adapter
whose sender is lost before it arrives whole is dropped (and a participant of that job keeps
waiting for its coordinator, or for the mesh's next one, to finish the job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from meshllm import wire
from meshllm.tune.adapters import Assembly, adapter_digest, assemble, frozen
from meshllm.tune.aggregate import final_problem
from meshllm.tune.interface import MAX_JOB_STEPS, TuneContext, TuneFinished, job_problem, job_seed


@dataclass
class _Final:
    sender: str
    done: wire.TuneDone
    assembly: Assembly | None = None


class Member:
    """Takes up final adapters (see the module docstring)."""

    def __init__(self, ctx: TuneContext, job_ended: Callable[[wire.TuneDone], bool],
                 damaged: Callable[[wire.TuneDone, str], None], steps_of: Callable[[str], int | None],
                 switch: Callable[[str], None]) -> None:
        self.ctx = ctx
        self._job_ended = job_ended
        """The local participant's hook: a job ended (it leaves it; True if it took part)."""
        self._damaged = damaged
        """The local participant's hook: a job's final adapter arrived damaged."""
        self._steps_of = steps_of
        """The local participant's hook: the steps a round of a job it takes part in."""
        self._switch = switch
        """This node takes up a job's adapter (`meshllm.tune.serving.Serving.switch`)."""
        self._final: _Final | None = None
        self.last: dict[str, object] | None = None
        """The last finished job, JSON-able (for the status view)."""

    def membership(self) -> None:
        final = self._final
        if final is not None and not self.ctx.reachable(final.sender):
            self._final = None
            self.ctx.out.log("error", f"the final adapter of tune job {final.done.job_id} did not arrive: "
                                      f"{final.sender} left the mesh")

    def on_done(self, sender: str, msg: wire.TuneDone) -> None:
        if sender != self.ctx.coordinator_id:
            self.ctx.out.log("error", f"ignored a TuneDone from {sender}: not the mesh's coordinator")
            return
        if self._final is not None:
            self.ctx.out.log("error", f"the final adapter of tune job {self._final.done.job_id} did not arrive whole")
            self._final = None
        problem = job_problem(msg.rounds, msg.rank, msg.alpha)
        if problem is not None:
            self._refuse(sender, msg, f"a job of {problem}")
            return
        self._final = _Final(sender, msg)

    def on_final_part(self, sender: str, msg: wire.TuneTensors) -> None:
        final = self._final
        if final is None or final.sender != sender or msg.job_id != final.done.job_id:
            self.ctx.out.log("error", f"ignored a final adapter part from {sender} for tune job {msg.job_id}: "
                                      "not expected")
            return
        done = final.done
        final.assembly, problem, tensors = assemble(final.assembly, "final", done.rounds, msg, done.parts,
                                                    lambda: self.ctx.expected(done.rank, done.alpha))
        if tensors is not None and adapter_digest(tensors) != done.digest:
            problem = "its digest does not match"
        elif tensors is not None:
            problem = self._out_of_bounds(done, tensors)
            if problem is None:
                self._final = None
                self.finished(done, frozen(tensors))
                return
        if problem is not None:
            self._final = None
            self._refuse(sender, done, problem)

    def _out_of_bounds(self, done: wire.TuneDone, tensors: dict[str, np.ndarray]) -> str | None:
        """Why the final adapter is beyond what the job can have made, or None. A node that
        took part knows the job's steps; one that did not assumes the most a job may have."""
        steps = self._steps_of(done.job_id) or MAX_JOB_STEPS
        try:
            initial = self.ctx.initial(done.rank, done.alpha, job_seed(done.job_id))
        except Exception as error:  # noqa: BLE001 - the model's own check
            return f"cannot check it: {error}"
        return final_problem(tensors, initial, done.rounds, steps, self.ctx.settings.bounds)

    def _refuse(self, sender: str, done: wire.TuneDone, problem: str) -> None:
        self.ctx.out.log("error", f"the final adapter of tune job {done.job_id} from {sender} is refused: {problem}")
        self._damaged(done, problem)

    def finished(self, done: wire.TuneDone, tensors: dict[str, np.ndarray]) -> None:
        """Job ``done`` ended with ``tensors`` (read-only): emit `TuneFinished` once."""
        took_part = self._job_ended(done)
        serve = took_part or self.ctx.settings.accept_adapters
        if serve:
            self._switch(done.job_id)
        else:
            self.ctx.out.log("info", f"tune job {done.job_id} finished; this node took no part in it and keeps "
                                     "serving what it served (--accept-adapters serves every job's adapter)")
        self.last = {"job_id": done.job_id, "rounds": done.rounds, "rank": done.rank, "alpha": done.alpha,
                     "participants": list(done.participants), "digest": done.digest,
                     "loss": done.loss if done.loss > 0 else None, "served": serve}
        self.ctx.out.events.append(TuneFinished(done.job_id, done.rank, done.alpha, done.rounds, done.participants,
                                                {name: arr.copy() for name, arr in tensors.items()}, serve))
