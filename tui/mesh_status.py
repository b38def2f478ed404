"""The mesh as one status snapshot describes it (``GET /v1/status``), as typed, frozen values.

``MeshStatus.from_json`` reads the daemon's JSON (docs/api.md) and rejects what it cannot use
with ``StatusFormatError``, so a malformed snapshot becomes one error line in the UI instead of
a crash. Spans are half-open ``[start_layer, end_layer)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class StatusFormatError(ValueError):
    """A status snapshot that does not have the shape docs/api.md gives it."""


PRIVATE = "(private)"
"""`MeshStatus.layer_owners` of a private layer: each entry node runs it for its own answers."""


@dataclass(frozen=True)
class NodeInfo:
    """One row of the mesh table."""

    node_id: str
    name: str
    is_self: bool
    """This is the node whose API the UI is attached to."""
    is_coordinator: bool
    state: str
    """starting, loading, ready or lost."""
    mem_budget_bytes: int | None
    ms_per_layer: float | None
    """Measured compute per decoder layer per token."""
    span: tuple[int, int] | None
    """Half-open layer range ``[start_layer, end_layer)`` this node holds, if any."""
    weight_bytes: int | None
    """Memory of the weights it holds (its span plus embedding and head), in the mesh's format."""
    rtt_ms: float | None
    """Link round trip from this node; None for this node itself or when not measured yet."""
    address: str
    link: LinkInfo | None = None
    """What this node measured on its link to that one (None: itself, or not measured yet)."""
    predicted_ms_per_token: float | None = None
    """Predicted ms per token of the plan in force, with that node as the entry node."""
    measured_ms_per_token: float | None = None
    """What that node measured for its answers under the plan in force."""


@dataclass(frozen=True)
class LinkInfo:
    rtt_ms: float
    """Idle round trip (the planner's figure)."""
    small_mb_s: float | None
    """Rate of an activation-sized message, MB/s."""
    large_mb_s: float | None
    """Rate of bulk bytes (prefill sized), MB/s."""


@dataclass(frozen=True)
class LatencyInfo:
    """The plan in force: predicted and measured times against the targets (docs/api.md)."""

    predicted_ms_per_token: float | None
    measured_ms_per_token: float | None
    predicted_ttft_ms: float | None
    target_ms_per_token: float | None
    target_ttft_ms: float | None
    miss_ms_per_token: float | None
    measured_miss_ms_per_token: float | None
    miss_ttft_ms: float | None
    entry_mean: bool = False
    """The prediction averages over every node (nobody asked yet)."""

    @property
    def missed(self) -> bool:
        """A prediction or the measurement misses a target."""
        return any(m for m in (self.miss_ms_per_token, self.measured_miss_ms_per_token, self.miss_ttft_ms))


@dataclass(frozen=True)
class Stage:
    node_id: str
    start_layer: int
    end_layer: int


@dataclass(frozen=True)
class PlanInfo:
    term: int
    state: str
    """pending (layers still loading) or active."""
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class IncompatibleNode:
    """A node that was seen on the network but will not be joined, and why."""

    name: str
    address: str
    reason: str


@dataclass(frozen=True)
class FallbackInfo:
    """The local fallback model of the node the UI is attached to (docs/api.md)."""

    model: str | None
    state: str
    """off, standby (loads on first need), loading, loaded or failed."""
    serving: bool
    """New requests are answered by it: the mesh cannot serve right now."""
    weight_bytes: int
    reserved_bytes: int
    mesh_trouble: str | None
    """Why the mesh cannot serve, if it cannot."""


@dataclass(frozen=True)
class SessionsInfo:
    """The answers of the node the UI is attached to (docs/api.md, ``sessions``)."""

    running: int = 0
    queued: int = 0
    """Waiting for a slot."""
    max_sessions: int | None = None
    """Answers it serves at once (``--max-sessions``); None: not known yet."""
    queue_max: int | None = None
    """Requests that may wait; one more gets a 429."""


@dataclass(frozen=True)
class SpeculationInfo:
    """Speculative decoding of the node's own answers (docs/api.md, ``speculation``)."""

    mode: str = "off"
    acceptance: float | None = None
    """Share of the drafted tokens that stood, over the last answers that drafted."""
    tokens_per_trip: float | None = None
    """Tokens each verify step through the mesh gave."""


@dataclass(frozen=True)
class MeshStatus:
    self_id: str
    model_name: str | None
    model_id: str | None
    num_layers: int | None
    codec: str
    term: int
    coordinator_id: str | None
    plan: PlanInfo | None
    nodes: tuple[NodeInfo, ...]
    incompatible: tuple[IncompatibleNode, ...]
    sessions: SessionsInfo
    """Chat requests in progress on this node: running and waiting."""
    weights: str | None = None
    """The mesh's weight format in memory (f32, f16, int8, int4)."""
    fallback: FallbackInfo | None = None
    """The local fallback model; None when the daemon has none to say."""
    latency: LatencyInfo | None = None
    """Predicted and measured ms per token of the plan in force; None without an active plan."""
    mesh_key_id: str | None = None
    """The mesh key's public id; ``open`` for an open mesh; None: not known yet."""
    invite: str | None = None
    """The code another device joins this mesh with (``meshllm up --invite CODE``)."""
    private_layers: int = 0
    """K: every entry node runs the first and last K layers of its own answers (`PRIVATE`)."""
    speculation: SpeculationInfo = SpeculationInfo()
    """How this node's answers draft, and how well (the last answers)."""

    def node(self, node_id: str) -> NodeInfo | None:
        return next((node for node in self.nodes if node.node_id == node_id), None)

    def node_name(self, node_id: str | None) -> str:
        node = self.node(node_id) if node_id is not None else None
        return node.name if node is not None else (node_id or "nobody")

    def layer_owners(self) -> tuple[str | None, ...]:
        """For each decoder layer, the id of the node holding it (None: nobody; `PRIVATE`:
        each entry node, for its own answers).

        From the plan's stages when there is a plan, else from the nodes' own spans.
        """
        if not self.num_layers:
            return ()
        owners: list[str | None] = [None] * self.num_layers
        k = min(self.private_layers, self.num_layers // 2)
        for layer in (*range(k), *range(self.num_layers - k, self.num_layers)):
            owners[layer] = PRIVATE
        if self.plan is not None:
            spans = [(stage.node_id, stage.start_layer, stage.end_layer) for stage in self.plan.stages]
        else:
            spans = [(node.node_id, *node.span) for node in self.nodes if node.span is not None]
        for node_id, start, end in spans:
            for layer in range(max(0, start), min(end, self.num_layers)):
                owners[layer] = node_id
        return tuple(owners)

    @classmethod
    def from_json(cls, data: object) -> MeshStatus:
        """Read a snapshot; raises StatusFormatError naming the first field that is wrong."""
        body = _mapping(data, "status")
        model = body.get("model")
        model_map = _mapping(model, "model") if model is not None else {}
        plan_data = body.get("plan")
        coordinator_id = _optional(body, "coordinator_id", str)
        nodes = tuple(_node(item, coordinator_id) for item in _list(body, "nodes"))
        return cls(
            self_id=_required(body, "self_id", str),
            model_name=_optional(model_map, "name", str),
            model_id=_optional(model_map, "id", str),
            num_layers=_optional(model_map, "num_layers", int),
            private_layers=_optional(model_map, "private_layers", int) or 0,
            weights=_optional(model_map, "weights", str),
            codec=_optional(body, "codec", str) or "?",
            term=_optional(body, "term", int) or 0,
            coordinator_id=coordinator_id,
            plan=_plan(plan_data) if plan_data is not None else None,
            nodes=nodes,
            incompatible=tuple(
                IncompatibleNode(
                    name=_optional(item_map, "name", str) or "?",
                    address=_optional(item_map, "address", str) or "?",
                    reason=_optional(item_map, "reason", str) or "",
                )
                for item_map in (_mapping(item, "incompatible[]") for item in _list(body, "incompatible"))
            ),
            sessions=_sessions(body.get("sessions")),
            speculation=_speculation(body.get("speculation")),
            fallback=_fallback(body.get("fallback")),
            latency=_latency(body.get("latency")),
            mesh_key_id=_optional(body, "mesh_key_id", str),
            invite=_optional(body, "invite", str),
        )


def _node(data: object, coordinator_id: str | None) -> NodeInfo:
    body = _mapping(data, "nodes[]")
    node_id = _required(body, "id", str)
    span = body.get("span")
    return NodeInfo(
        node_id=node_id,
        name=_optional(body, "name", str) or node_id,
        is_self=bool(body.get("is_self", False)),
        is_coordinator=body.get("role") == "coordinator" or node_id == coordinator_id,
        state=_optional(body, "state", str) or "?",
        mem_budget_bytes=_optional(body, "mem_budget_bytes", int),
        ms_per_layer=_optional(body, "ms_per_layer", float),
        span=_span(span) if span is not None else None,
        weight_bytes=_optional(body, "weight_bytes", int),
        rtt_ms=_optional(body, "rtt_ms", float),
        address=_optional(body, "address", str) or "",
        link=_link(body.get("link")),
        predicted_ms_per_token=_optional(body, "predicted_ms_per_token", float),
        measured_ms_per_token=_optional(body, "measured_ms_per_token", float),
    )


def _sessions(data: object) -> SessionsInfo:
    if data is None:
        return SessionsInfo()
    body = _mapping(data, "sessions")
    return SessionsInfo(running=_optional(body, "running", int) or 0, queued=_optional(body, "queued", int) or 0,
                        max_sessions=_optional(body, "max", int), queue_max=_optional(body, "queue_max", int))


def _speculation(data: object) -> SpeculationInfo:
    if data is None:
        return SpeculationInfo()
    body = _mapping(data, "speculation")
    return SpeculationInfo(mode=_optional(body, "mode", str) or "off", acceptance=_optional(body, "acceptance", float),
                           tokens_per_trip=_optional(body, "tokens_per_trip", float))


def _link(data: object) -> LinkInfo | None:
    if data is None:
        return None
    body = _mapping(data, "nodes[].link")
    return LinkInfo(rtt_ms=_required(body, "rtt_ms", float), small_mb_s=_optional(body, "small_mb_s", float),
                    large_mb_s=_optional(body, "large_mb_s", float))


def _latency(data: object) -> LatencyInfo | None:
    if data is None:
        return None
    body = _mapping(data, "latency")
    return LatencyInfo(
        predicted_ms_per_token=_optional(body, "predicted_ms_per_token", float),
        measured_ms_per_token=_optional(body, "measured_ms_per_token", float),
        predicted_ttft_ms=_optional(body, "predicted_ttft_ms", float),
        target_ms_per_token=_optional(body, "target_ms_per_token", float),
        target_ttft_ms=_optional(body, "target_ttft_ms", float),
        miss_ms_per_token=_optional(body, "miss_ms_per_token", float),
        measured_miss_ms_per_token=_optional(body, "measured_miss_ms_per_token", float),
        miss_ttft_ms=_optional(body, "miss_ttft_ms", float),
        entry_mean=bool(body.get("entry_mean", False)),
    )


def _fallback(data: object) -> FallbackInfo | None:
    if data is None:
        return None
    body = _mapping(data, "fallback")
    return FallbackInfo(
        model=_optional(body, "model", str),
        state=_optional(body, "state", str) or "?",
        serving=bool(body.get("serving", False)),
        weight_bytes=_optional(body, "weight_bytes", int) or 0,
        reserved_bytes=_optional(body, "reserved_bytes", int) or 0,
        mesh_trouble=_optional(body, "mesh_trouble", str),
    )


def _plan(data: object) -> PlanInfo:
    body = _mapping(data, "plan")
    stages = []
    for item in _list(body, "stages"):
        stage = _mapping(item, "plan.stages[]")
        stages.append(Stage(
            node_id=_required(stage, "node_id", str),
            start_layer=_required(stage, "start_layer", int),
            end_layer=_required(stage, "end_layer", int),
        ))
    return PlanInfo(
        term=_optional(body, "term", int) or 0,
        state=_optional(body, "state", str) or "?",
        stages=tuple(stages),
    )


def _span(data: object) -> tuple[int, int]:
    if (not isinstance(data, list) or len(data) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in data)):
        raise StatusFormatError(f"span must be [start_layer, end_layer], not {data!r}")
    return (data[0], data[1])


def _mapping(data: object, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise StatusFormatError(f"{where} must be an object, not {type(data).__name__}")
    return data


def _list(body: Mapping[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise StatusFormatError(f"{key} must be a list, not {type(value).__name__}")
    return value


def _required(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = _optional(body, key, kind)
    if value is None:
        raise StatusFormatError(f"{key} is missing")
    return value


def _optional(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StatusFormatError(f"{key} must be {kind.__name__}, not {value!r:.40}")
    return value
