"""The port: what a role of the mesh core may use, and nothing more (sans-IO).

`MeshCore` is split by role: `transition` (load, hand-over, ready, activate), `coordinator`
(election glue, planning, balancing), `stage` (forwarded steps and rebuild parts), `entry`
(this node's answers) and `status` (the views). A role never calls back into the core: it
is given a `Port`, which the core implements (`meshllm.mesh.core.CorePort`), with

- the core's outputs: `send`, `add_job`, `emit`, `log`, `changed`, and `next_job_id`;
- read-only views of what the core keeps: this node's id, settings, model, statistics,
  members, the election's term and coordinator, the plans, the span held here, the
  placement error, and the time of the input being handled (`now`).

A message a role sends to this node itself is handled at once, without a link, by the role
it is for (the core's local dispatch table). Roles that react to the plans moving are
`PlanFollower`s of the transition; any other collaborator a role has is named in its
constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from meshllm import wire
from meshllm.mesh.events import Channel, Event, LogKind
from meshllm.mesh.jobs import Job
from meshllm.mesh.plans import PlanKey, PlanView

if TYPE_CHECKING:
    from meshllm.mesh.settings import MeshSettings, ModelLimits
    from meshllm.mesh.stats import StageStats
    from meshllm.placement.planner import ModelSpec


class PlansView(Protocol):
    """The plans as a role other than the transition sees them (`meshllm.mesh.plans.PlanBook`)."""

    @property
    def active(self) -> PlanView | None: ...

    @property
    def pending(self) -> PlanView | None: ...

    @property
    def highest_key(self) -> PlanKey: ...

    @property
    def ready(self) -> set[str]:
        """Coordinator side: the stages of the pending plan that reported ready."""
        ...


class Port(Protocol):
    """The core as a role sees it."""

    @property
    def node_id(self) -> str: ...

    @property
    def hello(self) -> wire.Hello:
        """What this node tells its peers about itself."""
        ...

    @property
    def settings(self) -> MeshSettings: ...

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def limits(self) -> ModelLimits: ...

    @property
    def stats(self) -> StageStats:
        """This node's statistics: the roles add to them."""

    @property
    def now(self) -> float:
        """The time of the input being handled."""

    @property
    def members(self) -> Mapping[str, wire.Hello]:
        """Every node linked to this one, and this node itself."""

    @property
    def term(self) -> int: ...

    @property
    def coordinator_id(self) -> str | None: ...

    @property
    def is_coordinator(self) -> bool: ...

    @property
    def plans(self) -> PlansView: ...

    @property
    def span(self) -> tuple[int, int]:
        """The layers this node holds (once loaded)."""

    @property
    def placement_error(self) -> str | None:
        """Why the mesh cannot hold the model, as its coordinator said; None when it can."""

    def name_of(self, node_id: str) -> str: ...

    def send(self, dest: str, msg: wire.Message, *, channel: Channel = "control", positions: int = 0) -> None:
        """Queue a message for a peer; one for this node itself is handled at once."""

    def add_job(self, job: Job) -> None: ...

    def emit(self, event: Event) -> None:
        """An event for the driver (an answer's output or end, above all)."""

    def log(self, kind: LogKind, message: str) -> None:
        """A line of the node's event log."""

    def changed(self) -> None:
        """Membership, election or plans changed: the status views are stale."""

    def next_job_id(self) -> int: ...


class PlanFollower:
    """A role that reacts to the plans moving (the transition tells it); by default it does not."""

    def plan_changed(self, now: float) -> None:
        """A new plan was adopted, or the coordinator refused to plan: steps on the chain are lost."""

    def plan_active(self, plan: PlanView, now: float) -> None:
        """`plan` is active: answers run on it."""

    def span_loaded(self, span: tuple[int, int]) -> None:
        """This node loaded `span` (the layers of the plan it loaded last)."""


def broadcast(port: Port, msg: wire.Message, *, include_self: bool = True) -> None:
    """`msg` to every member (this node first, when included)."""
    for peer in list(port.members):
        if include_self or peer != port.node_id:
            port.send(peer, msg)
