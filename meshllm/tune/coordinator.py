"""The coordinator role of federated fine-tuning: one job's rounds, run by the mesh's coordinator.

The first join starts a job; after ``gather_s`` round 1 begins with every node that joined.
Each round it sends `TuneRound` and the global adapter (`TuneTensors` of kind ``global``) to
the round's participants, collects their updates (kind ``update``: their trained adapter
minus the global, with their example count and training loss), refuses bad ones
(`meshllm.tune.aggregate.check_update`), and adds the aggregate of the rest to the global. A
participant that leaves the mesh, quits, fails or does not report within ``round_timeout_s``
is left out of that round; the round completes with the others (with none, the global
stays). After the last round it sends `TuneDone` and the final adapter (kind ``final``) to
every member.

Elections: while the mesh has no coordinator (an election in progress) the job pauses; when
this node wins again it starts the current round again (same global adapter), and when
another node wins it hands the job over (drops it: the winner resumes it from its own copy,
`Coordinator.take_over`). A node that did not coordinate takes a job over from what it holds
as a participant (a `Checkpoint`: the job's settings, a round and that round's global
adapter) and starts that round again.

It holds one global adapter and at most one update per participant of the round. Every
collection is walked in sorted order: the same inputs give the same outputs whatever the
hash seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from meshllm import wire
from meshllm.tune.adapters import Assembly, adapter_digest, adapter_problem, frozen, tensor_messages
from meshllm.tune.aggregate import Update, aggregate, check_update, clip_updates
from meshllm.tune.interface import TuneContext, job_problem, job_seed, refusal
from meshllm.wire import tune_messages as wm

if TYPE_CHECKING:
    from meshllm.tune.member import Member
    from meshllm.tune.participant import Checkpoint, Participant


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
    """Node -> the example count it joined with (0: unknown, after a takeover)."""
    round: int = 0
    """The round in progress; 0 while gathering."""
    deadline: float | None = None
    paused_since: float | None = None
    """When the mesh lost its coordinator (an election in progress); None while running."""
    participants: tuple[str, ...] = ()
    incoming: dict[str, Assembly] = field(default_factory=dict)
    updates: dict[str, Update] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    contributors: set[str] = field(default_factory=set)
    loss: float | None = None
    """The last round's mean training loss (weighted by examples)."""

    def reported(self, node: str) -> bool:
        return node in self.updates or node in self.refused or node in self.dropped


class Coordinator:
    """The job this node coordinates, if any (see the module docstring)."""

    def __init__(self, ctx: TuneContext) -> None:
        self.ctx = ctx
        self.job: _Job | None = None
        self._started = 0
        self.local: Participant
        """The local participant (wired by `meshllm.tune.rounds.TuneCore`)."""
        self.member: Member
        """The local member: takes up the final adapter here."""

    # -- the mesh --------------------------------------------------------------------------------

    def membership(self, now: float) -> None:
        """The mesh changed (``ctx`` holds the new coordinator and members)."""
        job = self.job
        if job is None:
            return
        ctx, out = self.ctx, self.ctx.out
        coordinator = ctx.coordinator_id
        if coordinator is None:
            if job.paused_since is None:
                job.paused_since = now
                out.log("info", f"tune job {job.job_id} paused at round {job.round} of {job.rounds}: the mesh is "
                                "electing a coordinator")
        elif coordinator != ctx.node_id:
            self.job = None
            out.log("info", f"tune job {job.job_id} handed over at round {job.round} of {job.rounds}: {coordinator} "
                            "now coordinates the mesh (it resumes the job if it took part in a round)")
        else:
            for node in sorted(job.joined):
                if node != ctx.node_id and node not in ctx.members:
                    self.leave(job, node, "left the mesh")
            if job.paused_since is not None:
                job.paused_since = None
                if job.round > 0:
                    out.log("info", f"tune job {job.job_id} resumed: this node coordinates the mesh again; round "
                                    f"{job.round} of {job.rounds} starts again")
                    job.round -= 1
                    self._start_round(job, now)

    def take_over(self, checkpoint: Checkpoint, now: float) -> None:
        """This node now coordinates the mesh: resume the job it takes part in from what it
        holds, starting ``checkpoint.round`` again with that round's global adapter."""
        cp = checkpoint
        tensors = cp.tensors
        job = self.job = _Job(cp.job_id, cp.rounds, cp.rank, cp.alpha, cp.steps, cp.aggregate, tensors,
                              {name: arr.shape for name, arr in tensors.items()}, now)
        job.joined = {node: 0 for node in cp.participants}
        job.joined[self.ctx.node_id] = cp.examples
        job.round = cp.round - 1
        job.loss = cp.loss
        job.contributors = set(cp.contributors)
        self.ctx.out.log("info", f"tune job {cp.job_id} taken over at round {cp.round} of {cp.rounds}: this node "
                                 f"now coordinates the mesh (global adapter {adapter_digest(tensors)[:12]})")
        self._start_round(job, now)

    def next_timer(self) -> float | None:
        job = self.job
        if job is None:
            return None
        if job.paused_since is not None:
            return job.paused_since + self.ctx.settings.takeover_timeout_s
        return job.gather_until if job.round == 0 else job.deadline

    def handle_timer(self, now: float) -> None:
        job = self.job
        if job is None:
            return
        settings = self.ctx.settings
        if job.paused_since is not None:
            if now >= job.paused_since + settings.takeover_timeout_s:
                self.job = None
                self.ctx.out.log("error", f"tune job {job.job_id} abandoned after {max(job.round - 1, 0)} of "
                                          f"{job.rounds} rounds: no coordinator was elected within "
                                          f"{settings.takeover_timeout_s:g} s")
        elif job.round == 0 and now >= job.gather_until:
            self._start_round(job, now)
        elif job.round > 0 and job.deadline is not None and now >= job.deadline:
            for node in job.participants:
                if not job.reported(node):
                    job.dropped[node] = f"no update within {settings.round_timeout_s:g} s"
                    job.incoming.pop(node, None)

    # -- joins and leaves ------------------------------------------------------------------------

    def on_join(self, sender: str, msg: wire.TuneJoin, now: float) -> None:
        ctx = self.ctx
        if ctx.coordinator_id != ctx.node_id:
            ctx.out.send(sender, refusal("", 0, f"{ctx.node_id} is not the mesh's coordinator "
                                                f"(the coordinator is {ctx.coordinator_id or 'unknown'})"))
            return
        reason = self.admit(sender, msg, now)
        if reason is not None:
            job = self.job
            ctx.out.log("error", f"refused the tune join of {sender}: {reason}")
            ctx.out.send(sender, refusal(job.job_id if job is not None else "", 0, reason))

    def admit(self, node: str, msg: wire.TuneJoin, now: float) -> str | None:
        """Take ``node`` into the job (starting one if there is none); the reason if refused."""
        ctx = self.ctx
        settings = ctx.settings
        if msg.examples > settings.bounds.max_examples:
            return f"{msg.examples} examples; a participant may bring at most {settings.bounds.max_examples}"
        job = self.job
        if job is None:
            problem = job_problem(msg.rounds, msg.rank, msg.alpha, msg.steps)
            if problem is not None:
                return f"cannot start a tune job of {problem}"
            self._started += 1
            job_id = f"{ctx.node_id[:40]}/tune-{self._started}"
            try:
                initial = ctx.initial(msg.rank, msg.alpha, job_seed(job_id))
            except Exception as error:  # noqa: BLE001 - the model's own check (e.g. a rank too large)
                return f"cannot make an adapter of rank {msg.rank}: {error}"
            problem = adapter_problem(initial)
            if problem is not None:
                return f"the adapter of rank {msg.rank} cannot be tuned over the mesh: {problem}"
            tensors = frozen(initial)
            job = self.job = _Job(job_id, msg.rounds, msg.rank, msg.alpha, msg.steps, msg.aggregate, tensors,
                                  {name: arr.shape for name, arr in tensors.items()}, now + settings.gather_s)
            ctx.out.log("info", f"tune job {job_id} started by {node}: {msg.rounds} rounds of {msg.steps} steps, "
                                f"rank {msg.rank}, alpha {msg.alpha:g}, aggregate {msg.aggregate}; round 1 in "
                                f"{settings.gather_s:g} s")
        elif msg.rank != job.rank:
            return f"rank {msg.rank} does not match rank {job.rank} of tune job {job.job_id}"
        elif node not in job.joined and len(job.joined) >= wm.MAX_TUNE_PARTICIPANTS:
            return f"tune job {job.job_id} already has {len(job.joined)} participants"
        in_round = node in job.participants and not job.reported(node)
        first = 1 if job.round == 0 else (job.round if in_round else job.round + 1)
        if node not in job.joined:
            job.joined[node] = msg.examples
            if job.round > 0:
                ctx.out.log("info", f"{node} joined tune job {job.job_id} ({msg.examples} examples); it takes part "
                                    f"from round {first}")
        accepted = wire.TuneAccepted(job.job_id, first, job.rounds, job.rank, job.alpha, job.steps, job.aggregate)
        if node == ctx.node_id:
            self.local.on_accepted(node, accepted)
        else:
            ctx.out.send(node, accepted)
        return None

    def on_quit(self, sender: str, msg: wire.TuneQuit) -> None:
        job = self.job
        if job is not None and sender in job.joined and msg.job_id in ("", job.job_id):
            self.leave(job, sender, "quit")

    def leave(self, job: _Job, node: str, why: str) -> None:
        if job.joined.pop(node, None) is None:
            return
        self.ctx.out.log("info", f"{node} left tune job {job.job_id}: {why}")
        if job.round > 0 and node in job.participants and not job.reported(node):
            job.dropped[node] = why
            job.incoming.pop(node, None)

    # -- rounds ----------------------------------------------------------------------------------

    def _start_round(self, job: _Job, now: float) -> None:
        ctx, out = self.ctx, self.ctx.out
        participants = tuple(sorted(p for p in job.joined if ctx.reachable(p)))
        if not participants:
            self.job = None
            out.log("info", f"tune job {job.job_id} ended after {job.round} of {job.rounds} rounds without a "
                            "result: no participants left")
            return
        job.round += 1
        job.participants = participants
        job.deadline = now + ctx.settings.round_timeout_s
        for held in (job.incoming, job.updates, job.losses, job.refused, job.dropped):
            held.clear()
        parts = tensor_messages(job.job_id, job.round, "global", job.tensors)
        announce = wire.TuneRound(job.job_id, job.round, job.rounds, job.rank, job.alpha, job.steps, job.aggregate,
                                  participants, job.loss or 0.0, len(parts))
        out.log("info", f"tune job {job.job_id} round {job.round} of {job.rounds}: participants "
                        f"{', '.join(participants)}")
        for node in participants:
            if node == ctx.node_id:
                self.local.round_started(announce, job.tensors)
            else:
                out.send(node, announce)
                for msg in parts:
                    out.send(node, msg)

    def on_update_part(self, sender: str, msg: wire.TuneTensors) -> None:
        job = self.job
        if job is None or msg.job_id != job.job_id or msg.round != job.round or sender not in job.participants:
            self.ctx.out.log("error", f"ignored an update part from {sender} for tune job {msg.job_id} round "
                                      f"{msg.round}: not expected")
            return
        if job.reported(sender):
            if sender in job.updates:
                self._refuse(job, sender, f"part {msg.part} after a complete update")
            return
        assembly = job.incoming.get(sender)
        if assembly is None:
            assembly = job.incoming[sender] = Assembly("update", job.round, msg, job.shapes)
        problem = assembly.add(msg)
        if problem is not None:
            self._refuse(job, sender, problem)
            return
        if assembly.complete:
            del job.incoming[sender]
            self._take_update(job, Update(sender, assembly.examples, assembly.tensors), assembly.loss)

    def local_update(self, job_id: str, round_no: int, examples: int, delta: dict[str, np.ndarray],
                     loss: float) -> None:
        """The local participant's update for round ``round_no`` of job ``job_id``."""
        job = self.job
        if job is not None and job.job_id == job_id and job.round == round_no and job.paused_since is None:
            self._take_update(job, Update(self.ctx.node_id, examples, delta), loss)

    def local_no_update(self, job_id: str, round_no: int, reason: str) -> None:
        """The local participant has nothing for round ``round_no`` (``reason``: wire-safe)."""
        job = self.job
        node = self.ctx.node_id
        if job is not None and job.job_id == job_id and job.round == round_no and not job.reported(node):
            job.refused[node] = f"no update: {reason}"

    def on_refused(self, sender: str, msg: wire.TuneRefused) -> bool:
        """A participant has nothing for this round; False when ``msg`` is not about this job."""
        job = self.job
        if job is None or msg.job_id != job.job_id or sender == self.ctx.node_id:
            return False
        if msg.round == job.round and sender in job.participants and not job.reported(sender):
            job.incoming.pop(sender, None)
            job.refused[sender] = f"no update: {msg.reason}"
        return True

    def _take_update(self, job: _Job, update: Update, loss: float) -> None:
        reason = check_update(update, job.shapes, self.ctx.settings.bounds, job.steps)
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
        self.ctx.out.log("error", f"tune job {job.job_id} round {job.round}: refused the update of {node}: {reason}")
        if node == self.ctx.node_id:
            self.local.update_refused(refusal(job.job_id, job.round, reason))
        else:
            self.ctx.out.send(node, refusal(job.job_id, job.round, reason))

    def check_round(self, now: float) -> None:
        """Finish every round all of whose participants reported (none while paused)."""
        job = self.job
        while job is not None and job.round > 0 and job.paused_since is None \
                and all(job.reported(p) for p in job.participants):
            self._finish_round(job, now)
            job = self.job if self.job is job else None

    def _finish_round(self, job: _Job, now: float) -> None:
        settings = self.ctx.settings
        names = sorted(job.updates)
        clipped: tuple[str, ...] = ()
        if names:
            updates = [job.updates[n] for n in names]
            delta = aggregate(updates, job.aggregate, settings.trim, settings.bounds.clip)
            job.tensors = frozen({name: job.tensors[name] + delta[name] for name in job.tensors})
            clipping = clip_updates(updates, settings.bounds.clip)
            clipped, weights = clipping.clipped, clipping.weights
            job.loss = sum(job.losses[n] * weights[n] for n in names) / sum(weights[n] for n in names)
            job.contributors.update(names)
        else:
            job.loss = None
        notes = [f"aggregated ({job.aggregate}) {', '.join(names) if names else 'no update: the adapter stays'}"]
        if clipped:
            notes.append(f"clipped to {settings.bounds.clip:g}x the round's median {', '.join(clipped)}")
        notes += [f"refused {n} ({job.refused[n]})" for n in sorted(job.refused)]
        notes += [f"dropped {n} ({job.dropped[n]})" for n in sorted(job.dropped)]
        if job.loss is not None:
            notes.append(f"mean loss {job.loss:.4f}")
        self.ctx.out.log("info", f"tune job {job.job_id} round {job.round} of {job.rounds} done: {'; '.join(notes)}")
        job.incoming.clear()
        job.updates.clear()
        if job.round >= job.rounds:
            self._finish_job(job)
        else:
            self._start_round(job, now)

    def _finish_job(self, job: _Job) -> None:
        self.job = None
        ctx = self.ctx
        participants = tuple(sorted(job.contributors)[: wm.MAX_TUNE_PARTICIPANTS])  # the wire's bound
        digest = adapter_digest(job.tensors)
        parts = tensor_messages(job.job_id, job.rounds, "final", job.tensors)
        loss = job.loss or 0.0
        done = wire.TuneDone(job.job_id, job.rounds, job.rank, job.alpha, participants, loss, digest, len(parts))
        for node in sorted(ctx.members):
            ctx.out.send(node, done)
            for msg in parts:
                ctx.out.send(node, msg)
        ctx.out.log("info", f"tune job {job.job_id} finished after {job.rounds} rounds: adapter {digest[:12]} from "
                            f"{', '.join(participants) or 'no participant (the initial adapter)'}; sent to "
                            f"{len(ctx.members)} members")
        self.member.finished(done, job.tensors)

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, object] | None:
        job = self.job
        if job is None:
            return None
        state = "paused" if job.paused_since is not None else ("gathering" if job.round == 0 else "round")
        return {
            "job_id": job.job_id, "state": state,
            "round": job.round, "rounds": job.rounds, "rank": job.rank, "alpha": job.alpha, "steps": job.steps,
            "aggregate": job.aggregate, "joined": sorted(job.joined),
            "round_participants": list(job.participants),
            "reported": sorted(p for p in job.participants if job.reported(p)), "loss": job.loss,
        }
