"""`TuneCore`: federated LoRA fine-tuning of one node, sans-IO: the front its driver talks to.

Inputs, each with ``now``: `membership` (whenever the mesh changes), `join` / `quit` (this
node's own participation), `receive` (any Tune* message), `trained` / `train_failed` (the
result of a `Train` job), `handle_timer`. Outputs, drained by the driver: `sends()`, `jobs()`,
`events()`, and `next_timer()`. It never reads a clock, sleeps or touches torch
(docs/fine-tuning.md).

It routes each input to the node's roles (one node may hold all three):

- **coordinator** (`meshllm.tune.coordinator`): the mesh's elected coordinator runs the job's
  rounds and aggregates the updates;
- **participant** (`meshllm.tune.participant`): a node that joined with its own data trains
  each round and sends its delta;
- **member** (`meshllm.tune.member`): every node receives the final adapter of a finished job,
  checks its bounds, and serves it only if it took part in the job or accepts every adapter
  (`TuneSettings.accept_adapters`);
- **serving** (`meshllm.tune.serving`): a node that took an adapter up announces its new model
  id to its peers (`served`), and a node that hears a peer announce another one closes that
  link, so that only nodes serving the same model id stay one mesh.

A tune job survives an election: the coordinator pauses it while none is known, and whoever
wins resumes it at the current round (the old coordinator, or a participant from the global
adapter it holds); nobody resuming it in time ends it on each participant with a reason.
Messages in, settings, jobs and events: `meshllm.tune.interface`; an adapter on the wire:
`meshllm.tune.adapters` (both re-exported here for the driver).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from meshllm import wire
from meshllm.mesh.events import Send
from meshllm.tune.adapters import adapter_digest, adapter_problem, split_parts, tensor_messages
from meshllm.tune.coordinator import Coordinator
from meshllm.tune.interface import (
    PENDING_JOB_ID, TUNE_CHANNEL, TUNE_MESSAGES, JobRequest, Outbox, Train, TuneContext, TuneError, TuneFailed,
    TuneFinished, TuneProgress, TuneSettings,
)
from meshllm.tune.member import Member
from meshllm.tune.participant import Participant
from meshllm.tune.serving import Serving

__all__ = [
    "PENDING_JOB_ID", "TUNE_CHANNEL", "TUNE_MESSAGES", "JobRequest", "Train", "TuneCore", "TuneError", "TuneFailed",
    "TuneFinished", "TuneProgress", "TuneSettings", "adapter_digest", "adapter_problem", "split_parts",
    "tensor_messages",
]


class TuneCore:
    """The federated fine-tuning state machine of one node (see the module docstring)."""

    def __init__(self, node_id: str, initial: Callable[[int, float, int], dict[str, np.ndarray]],
                 settings: TuneSettings = TuneSettings()) -> None:
        self._out = Outbox()
        self._ctx = ctx = TuneContext(node_id, initial, settings, self._out)
        self._coordinator = Coordinator(ctx)
        self._participant = Participant(ctx)
        self._serving = Serving(ctx)
        self._member = Member(ctx, self._participant.job_ended, self._participant.final_damaged,
                              self._participant.steps_of, self._serving.switch)
        self._coordinator.local = self._participant
        self._coordinator.member = self._member
        self._participant.local = self._coordinator

    @property
    def node_id(self) -> str:
        return self._ctx.node_id

    @property
    def settings(self) -> TuneSettings:
        return self._ctx.settings

    @property
    def coordinator_id(self) -> str | None:
        """The mesh's coordinator, as last told by `membership`."""
        return self._ctx.coordinator_id

    @property
    def members(self) -> frozenset[str]:
        """This node's linked peers, as last told by `membership`."""
        return self._ctx.members

    # -- outputs --------------------------------------------------------------------------------

    def sends(self) -> list[Send]:
        out, self._out.sends = self._out.sends, []
        return out

    def jobs(self) -> list[Train]:
        out, self._out.jobs = self._out.jobs, []
        return out

    def events(self) -> list[object]:
        out, self._out.events = self._out.events, []
        return out

    def next_timer(self) -> float | None:
        times = [t for t in (self._coordinator.next_timer(), self._participant.next_timer()) if t is not None]
        return min(times) if times else None

    def status_view(self) -> dict[str, object]:
        """JSON-able: this node's part in the current job, as coordinator and/or participant."""
        part = self._participant.part
        coordinating, participating = self._coordinator.status(), part.status() if part is not None else None
        roles = [name for name, held in (("coordinator", coordinating), ("participant", participating))
                 if held is not None]
        held = coordinating or participating
        view: dict[str, object] = {
            "role": "+".join(roles) or None, "job_id": held["job_id"] if held is not None else None,
            "state": None, "round": 0, "rounds": 0, "participants": [], "loss": None,
            "coordinator": coordinating, "participant": participating, "last_finished": self._member.last,
        }
        if coordinating is not None:
            view.update(state=coordinating["state"], round=coordinating["round"], rounds=coordinating["rounds"],
                        participants=coordinating["joined"], loss=coordinating["loss"])
        if participating is not None:
            view.update(state=participating["state"], round=participating["round"], rounds=participating["rounds"],
                        loss=participating["loss"] if participating["loss"] is not None
                        else participating["mesh_loss"])
            if coordinating is None and part is not None:
                view["participants"] = list(part.participants)
        return view

    # -- inputs ---------------------------------------------------------------------------------

    def membership(self, coordinator_id: str | None, members: frozenset[str], now: float) -> None:
        """The mesh changed: its coordinator (None: an election in progress) and this node's
        linked peers (not itself)."""
        self._ctx.coordinator_id = coordinator_id
        self._ctx.members = frozenset(members)
        self._coordinator.membership(now)
        self._participant.membership(now)
        self._member.membership()
        self._serving.membership()
        self._coordinator.check_round(now)

    def served(self, hello: wire.Hello) -> None:
        """The driver acted on a `TuneFinished` whose ``serve`` was set: this node serves
        ``hello.model_id`` now (the new one, or the old one if the adapter failed to load)."""
        self._serving.served(hello)

    def announced(self, sender: str, hello: wire.Hello, own: wire.Hello) -> None:
        """A linked peer announced the model id it serves (a ``Hello`` over its link); ``own``
        is this node's. Never raises."""
        if sender == self.node_id or sender not in self.members:
            self._out.log("error", f"ignored a Hello from {sender}: not a linked peer")
            return
        self._serving.announced(sender, hello, own)

    @property
    def switching(self) -> str | None:
        """The job whose adapter this node is taking up (until `served`), if any."""
        return self._serving.switching

    def join(self, request: JobRequest, now: float) -> str:
        """This node joins the mesh's tune job with its own data (or starts one). Returns the job
        id, or `PENDING_JOB_ID` until a remote coordinator answers (`TuneProgress` then says)."""
        return self._participant.join(request, now)

    def quit(self, now: float) -> None:
        """The local participant leaves its job (nothing happens when it is in none)."""
        self._participant.quit()
        self._coordinator.check_round(now)

    def receive(self, sender: str, msg: wire.Message, now: float) -> None:
        """Any Tune* message from a peer. A bad or unexpected one is logged and dropped (or
        refused with a TuneRefused); it never raises."""
        if sender == self.node_id or sender not in self.members:
            self._out.log("error", f"ignored a {type(msg).__name__} from {sender}: not a linked peer")
            return
        coordinator, participant, member = self._coordinator, self._participant, self._member
        if isinstance(msg, wire.TuneJoin):
            coordinator.on_join(sender, msg, now)
        elif isinstance(msg, wire.TuneQuit):
            coordinator.on_quit(sender, msg)
        elif isinstance(msg, wire.TuneAccepted):
            participant.on_accepted(sender, msg)
        elif isinstance(msg, wire.TuneRound):
            participant.on_round(sender, msg)
        elif isinstance(msg, wire.TuneTensors):
            if msg.kind == "update":
                coordinator.on_update_part(sender, msg)
            elif msg.kind == "global":
                participant.on_global_part(sender, msg)
            else:
                member.on_final_part(sender, msg)
        elif isinstance(msg, wire.TuneRefused):
            if not coordinator.on_refused(sender, msg):
                participant.on_refused(sender, msg)
        elif isinstance(msg, wire.TuneDone):
            member.on_done(sender, msg)
        elif isinstance(msg, wire.Hello):
            own = self._serving.own
            if own is None:  # the driver gives announcements to `announced`, with this node's hello
                self._out.log("error", f"ignored a Hello from {sender}: this node's own model id is not known yet")
            else:
                self._serving.announced(sender, msg, own)
        else:
            self._out.log("error", f"ignored a {type(msg).__name__} from {sender}: not a tune message")
        coordinator.check_round(now)

    def trained(self, job_id: str, round: int, tensors: Mapping[str, np.ndarray], loss: float, now: float) -> None:
        """The local training result of a `Train` job: the full local adapter and its mean loss.
        The delta (local - global, times ``debug_update_scale``) goes to the coordinator."""
        self._participant.trained(job_id, round, tensors, loss)
        self._coordinator.check_round(now)

    def train_failed(self, job_id: str, round: int, reason: str, now: float) -> None:
        """The local training of a `Train` job failed. ``reason`` stays on this node (it may
        quote local data); the coordinator only learns that training failed."""
        self._participant.train_failed(job_id, round, reason)
        self._coordinator.check_round(now)

    def handle_timer(self, now: float) -> None:
        self._coordinator.handle_timer(now)
        self._participant.handle_timer(now)
        self._coordinator.check_round(now)
