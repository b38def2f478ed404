"""The member role: every node takes up the final adapter of a finished tune job.

The coordinator sends `TuneDone` and the final adapter (`TuneTensors` of kind ``final``) to
every member; a member checks the parts and the digest and emits `TuneFinished` once. A
final adapter whose sender is lost before it arrives whole is dropped (and a participant of
that job keeps waiting for its coordinator, or for the mesh's next one, to finish the job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from meshllm import wire
from meshllm.tune.adapters import Assembly, adapter_digest, assemble, frozen
from meshllm.tune.interface import TuneContext, TuneFinished


@dataclass
class _Final:
    sender: str
    done: wire.TuneDone
    assembly: Assembly | None = None


class Member:
    """Takes up final adapters (see the module docstring)."""

    def __init__(self, ctx: TuneContext, job_ended: Callable[[wire.TuneDone], None],
                 damaged: Callable[[wire.TuneDone, str], None]) -> None:
        self.ctx = ctx
        self._job_ended = job_ended
        """The local participant's hook: a job ended (it leaves it, if it took part)."""
        self._damaged = damaged
        """The local participant's hook: a job's final adapter arrived damaged."""
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
            self._final = None
            self.finished(done, frozen(tensors))
            return
        if problem is not None:
            self._final = None
            self.ctx.out.log("error", f"the final adapter of tune job {done.job_id} from {sender} is refused: "
                                      f"{problem}")
            self._damaged(done, problem)

    def finished(self, done: wire.TuneDone, tensors: dict[str, np.ndarray]) -> None:
        """Job ``done`` ended with ``tensors`` (read-only): emit `TuneFinished` once."""
        self._job_ended(done)
        self.last = {"job_id": done.job_id, "rounds": done.rounds, "rank": done.rank, "alpha": done.alpha,
                     "participants": list(done.participants), "digest": done.digest,
                     "loss": done.loss if done.loss > 0 else None}
        self.ctx.out.events.append(TuneFinished(done.job_id, done.rank, done.alpha, done.rounds, done.participants,
                                                {name: arr.copy() for name, arr in tensors.items()}))
