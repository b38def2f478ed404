"""The node's status as clients see it (``GET /v1/status``), published on every change.

Single-node for now: the node is its own coordinator and holds every layer once loaded.
The mesh work will feed peers, terms and plans into the same snapshot shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any, Literal

from daemon.api.events import EventHub, StatusEvent

NodeState = Literal["starting", "loading", "ready", "lost"]
NO_SESSIONS = {"running": 0, "queued": 0, "max": None, "queue_max": None}
"""The ``sessions`` object before the node's admission is attached."""


@dataclass(frozen=True)
class ModelSummary:
    model_id: str
    """Content hash of the weights."""
    name: str
    num_layers: int
    weights: str = "f32"
    """Weight format in memory (f32, f16, int8, int4)."""
    kernel: str = ""
    """What computes the layers: meshllm's kernels (and their instruction set) or torch's."""
    batch_invariant: bool = False
    private_layers: int = 0
    """K: every entry node runs layers [0, K) and [num_layers - K, num_layers) of its own answers."""


@dataclass(frozen=True)
class SelfState:
    """What this node knows about itself."""

    node_id: str
    name: str
    address: str
    """HOST:PORT of its API."""
    mem_budget_bytes: int
    state: NodeState = "starting"
    model: ModelSummary | None = None
    ms_per_layer: float | None = None
    codec: str = "f32"
    mesh_key_id: str | None = None
    """The mesh key's public id (``open``: an open mesh); None until the key is loaded."""
    invite: str | None = None
    """The invite code another device joins with (``meshllm up --invite``); None: open mesh or
    not loaded yet. It carries the key: the status is for the owner's clients only."""


class StatusBoard:
    """Holds the node's state; every change publishes a status event to the hub."""

    def __init__(self, initial: SelfState, hub: EventHub) -> None:
        self._state = initial
        self._hub = hub
        self._mesh_view: Callable[[], dict[str, Any]] | None = None
        self._fallback_view: Callable[[], dict[str, Any]] | None = None
        self._sessions_view: Callable[[], dict[str, Any]] | None = None
        self._last: dict[str, Any] | None = None

    def attach_mesh(self, mesh_view: Callable[[], dict[str, Any]]) -> None:
        """From now on the mesh supplies term, coordinator, plan, nodes and incompatible peers."""
        self._mesh_view = mesh_view
        self.refresh()

    def attach_fallback(self, fallback_view: Callable[[], dict[str, Any]]) -> None:
        """From now on the local fallback model supplies the ``fallback`` object."""
        self._fallback_view = fallback_view
        self.refresh()

    def attach_sessions(self, sessions_view: Callable[[], dict[str, Any]]) -> None:
        """From now on the node's admission supplies the ``sessions`` object (running, queued
        and their limits)."""
        self._sessions_view = sessions_view
        self.refresh()

    def refresh(self) -> None:
        """Publish a status event if the snapshot changed (the mesh calls this on every change)."""
        snap = self.snapshot()
        if snap != self._last:
            self._last = snap
            self._hub.publish(StatusEvent(snap))

    @property
    def state(self) -> SelfState:
        return self._state

    def update(self, **changes: Any) -> None:
        new = replace(self._state, **changes)
        if new != self._state:
            self._state = new
            self.refresh()

    def model_id_changed(self, model_id: str) -> None:
        """The node serves another model id now (a finished tune job's adapter)."""
        if self._state.model is not None:
            self.update(model=replace(self._state.model, model_id=model_id))

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /v1/status`` (docs/api.md)."""
        s = self._state
        ready = s.state == "ready" and s.model is not None
        span = [0, s.model.num_layers] if ready and s.model is not None else None
        plan = None
        if ready and s.model is not None:
            plan = {
                "term": 0,
                "state": "active",
                "stages": [{"node_id": s.node_id, "start_layer": 0, "end_layer": s.model.num_layers}],
            }
        model = None
        if s.model is not None:
            model = {"id": s.model.model_id, "name": s.model.name, "num_layers": s.model.num_layers,
                     "weights": s.model.weights, "kernel": s.model.kernel,
                     "batch_invariant": s.model.batch_invariant, "private_layers": s.model.private_layers}
        snap = {
            "self_id": s.node_id,
            "model": model,
            "codec": s.codec,
            "term": 0,
            "coordinator_id": s.node_id,
            "plan": plan,
            "nodes": [
                {
                    "id": s.node_id,
                    "name": s.name,
                    "is_self": True,
                    "role": "coordinator",
                    "state": s.state,
                    "mem_budget_bytes": s.mem_budget_bytes,
                    "ms_per_layer": s.ms_per_layer,
                    "span": span,
                    "weight_bytes": None,
                    "rtt_ms": None,
                    "address": s.address,
                }
            ],
            "latency": None,
            "incompatible": [],
            "sessions": self._sessions_view() if self._sessions_view is not None else dict(NO_SESSIONS),
            "mesh_key_id": s.mesh_key_id,
            "invite": s.invite,
            "fallback": self._fallback_view() if self._fallback_view is not None else None,
        }
        if self._mesh_view is not None:
            snap.update(self._mesh_view())
            for node in snap["nodes"]:
                if node.get("is_self"):
                    node["address"] = s.address  # where this node's API answers
        return snap
