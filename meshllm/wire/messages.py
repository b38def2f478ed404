"""Every message meshllm nodes exchange, one frozen dataclass each, and their type tags.

A message is checked when it is built (by a caller or by the decoder): a wrong type, a value
out of range, an over-long string or tuple raises :class:`~meshllm.errors.WireError` naming
the field. So a message object that exists is valid and can always be encoded.

On the wire a message is the CBOR array ``[tag, field1, field2, ...]`` with fields in the
order they are declared here (see docs/wire-format.md). Adding, removing or reordering a
field, or changing a tag, changes the protocol: bump ``PROTOCOL_VERSION`` in codec.py.

Layer spans are half-open ``[start_layer, end_layer)``; an empty span (start == end) holds no
layers.
"""

from dataclasses import dataclass
from typing import Annotated

from meshllm.errors import WireError
from meshllm.wire.schema import Bool, Struct, Text, TupleOf, UInt, WireStruct
from meshllm.wire.tensor import CODECS, TensorPayload
from meshllm.wire.fields import (  # noqa: F401  (re-exported: callers import them from here)
    MAX_ID_CHARS, MAX_NAME_CHARS, MAX_STATE_CHARS, MAX_REASON_CHARS, MAX_STAGES, MAX_LAYERS,
    MAX_POSITIONS, MAX_LINKS, MAX_REPORT_MS, MAX_RATE_MB_S, NodeId, SessionId, Name, Term,
    Count, ByteCount, Layer, Position, Milliseconds, Seconds, Score, Reason, CodecName, Hidden,
    ReportMs, Rate, Route,
)


def _check_span(owner: str, start_layer: int, end_layer: int) -> None:
    if start_layer > end_layer:
        raise WireError(f"{owner}: span start {start_layer} > end {end_layer}")


# --- membership -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(WireStruct):
    """First message on a new link: who the sender is and what it can carry."""

    node_id: NodeId
    name: Name
    """Human-readable node name (may be empty)."""
    protocol_version: Annotated[int, UInt(max_value=255)]
    mesh_name: Annotated[str, Text(min_len=1, max_len=MAX_NAME_CHARS)]
    model_id: Annotated[str, Text(max_len=128)]
    """Content hash of the model weights the sender serves."""
    api_port: Annotated[int, UInt(min_value=1, max_value=65535)]
    mem_budget_bytes: ByteCount
    """Memory the sender offers for layer weights."""
    ms_per_layer: Milliseconds
    """Measured compute time per layer per token, in milliseconds."""
    can_coordinate: Annotated[bool, Bool()]


@dataclass(frozen=True)
class Heartbeat(WireStruct):
    """Sent on every link at a steady rate; its arrivals feed the receiver's failure detector
    (daemon/net/failure_detector.py), which decides when silence means the peer is lost."""

    node_id: NodeId
    term: Term
    """Reserved: always 0 (elections travel in their own messages); kept so that protocol 3
    frames stay the same."""
    sent_at_s: Seconds
    """Sender's clock when sent (for RTT measurement; only the sender compares it)."""


@dataclass(frozen=True)
class Bye(WireStruct):
    """The sender leaves the mesh (clean shutdown)."""

    node_id: NodeId
    reason: Reason


# --- election ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Election(WireStruct):
    """A node stands as candidate for ``term`` (bully election)."""

    term: Term
    candidate_id: NodeId
    score: Score
    """Capacity score; candidates order by (score, node id)."""


@dataclass(frozen=True)
class Answer(WireStruct):
    """A stronger node answers an Election: it takes the election over."""

    term: Term
    node_id: NodeId


@dataclass(frozen=True)
class Coordinator(WireStruct):
    """``node_id`` won the election and coordinates ``term``."""

    term: Term
    node_id: NodeId


# --- plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeReport(WireStruct):
    """A node's state, sent to the coordinator: budget, speed and the span it holds."""

    node_id: NodeId
    term: Term
    mem_budget_bytes: ByteCount
    ms_per_layer: Milliseconds
    span_start: Layer
    span_end: Layer
    """Half-open span ``[span_start, span_end)`` the node holds; empty when it holds none."""
    state: Annotated[str, Text(min_len=1, max_len=MAX_STATE_CHARS)]
    """e.g. ``starting``, ``loading``, ``ready``."""

    def _check_invariants(self) -> None:
        _check_span("NodeReport", self.span_start, self.span_end)


@dataclass(frozen=True)
class Stage(WireStruct):
    """One node's place in a plan: it runs layers ``[start_layer, end_layer)``."""

    node_id: NodeId
    start_layer: Layer
    end_layer: Layer

    def _check_invariants(self) -> None:
        _check_span("Stage", self.start_layer, self.end_layer)

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Plan(WireStruct):
    """The coordinator's assignment of layer spans for ``term``, in chain order.

    Stages are contiguous: each starts where the previous one ends.
    """

    term: Term
    epoch: Count
    """Re-plan counter within ``term``: plans order by ``(term, epoch)``."""
    stages: Annotated[tuple[Stage, ...], TupleOf(Struct(Stage), MAX_STAGES, min_len=1)]
    codec: CodecName
    """Tensor codec for hidden states under this plan (one of ``CODECS``)."""

    def _check_invariants(self) -> None:
        for before, after in zip(self.stages, self.stages[1:]):
            if after.start_layer != before.end_layer:
                raise WireError(
                    f"Plan.stages: not contiguous: {before.node_id} ends at {before.end_layer}, "
                    f"{after.node_id} starts at {after.start_layer}"
                )


@dataclass(frozen=True)
class StageReady(WireStruct):
    """``node_id`` has loaded its span of the plan ``(term, epoch)``."""

    term: Term
    epoch: Count
    node_id: NodeId


# --- inference --------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward(WireStruct):
    """Hidden states of a session, to run through the receiver's span (one hop)."""

    session_id: SessionId
    seq: Count
    """Step number within the session; a Result answers the Forward with the same seq."""
    term: Term
    """Term of the plan this step runs under."""
    epoch: Count
    """Epoch of the plan this step runs under."""
    start_pos: Position
    """Position of the first hidden state (the session's KV cache length before it)."""
    hidden: Hidden
    """(positions, hidden) or (batch, positions, hidden) float tensor."""
    route: Route
    """Node ids of the stages still to run after the receiver; the last hop returns a Result."""


@dataclass(frozen=True)
class Result(WireStruct):
    """Hidden states after the last stage, back to the session's entry node."""

    session_id: SessionId
    seq: Count
    hidden: Hidden


@dataclass(frozen=True)
class DropSession(WireStruct):
    """Forget a session: free its KV cache on the receiver."""

    session_id: SessionId


@dataclass(frozen=True)
class Error(WireStruct):
    """The sender refused or failed a request; ``code`` is a short machine-readable word."""

    code: Annotated[str, Text(min_len=1, max_len=MAX_ID_CHARS)]
    message: Reason


# --- link upkeep (added after the first release of the tags: append only) ----------------


@dataclass(frozen=True)
class HeartbeatAck(WireStruct):
    """Answers a Heartbeat at once, so its sender can measure the link's round trip."""

    node_id: NodeId
    """The node that answers."""
    echo_sent_at_s: Seconds
    """``sent_at_s`` of the Heartbeat answered, unchanged (only its sender compares it)."""


# --- plans and steps (append only) ------------------------------------------------------


@dataclass(frozen=True)
class PlanActive(WireStruct):
    """The coordinator: every stage of plan ``(term, epoch)`` is ready; use it from now on."""

    term: Term
    epoch: Count


@dataclass(frozen=True)
class StepFailed(WireStruct):
    """A stage refused or could not run a step; sent to the session's entry node."""

    session_id: SessionId
    seq: Count
    code: Annotated[str, Text(min_len=1, max_len=MAX_ID_CHARS)]
    """``stale_plan`` (the step's plan is not active there) or ``bad_step``."""
    message: Reason


@dataclass(frozen=True)
class PlanRefused(WireStruct):
    """The coordinator of ``term`` cannot place the model: ``reason`` names the shortfall."""

    term: Term
    reason: Reason


# --- recovery (append only) --------------------------------------------------------------


@dataclass(frozen=True)
class Rebuild(WireStruct):
    """One part of a session's rebuild on a new plan (docs/operations.md), one hop.

    Sent down the chain like a `Forward`. The receiver makes its KV caches hold positions
    ``[start_pos, start_pos + positions)`` of the session's ``position``, recomputing the
    layers it lacks in the original chunking (a first step of ``prefill`` positions, then one
    at a time), and passes its own output on. ``hidden`` holds the sender's output at those
    positions, or nothing when it has none."""

    session_id: SessionId
    seq: Count
    term: Term
    epoch: Count
    position: Position
    """Positions every stage holds once the rebuild is done."""
    prefill: Position
    """Positions of the session's first step."""
    start_pos: Position
    positions: Position
    hidden: Annotated[tuple[TensorPayload, ...], TupleOf(Struct(TensorPayload), 1)]
    """``(positions, hidden)`` of the sender's output, or empty."""
    route: Route
    """As in `Forward`: the stages still to run after the receiver, then the entry node."""
    whole: Annotated[bool, Bool()] = False
    """A stage without the log it needs recomputes its whole span from the sender's output."""

    def _check_invariants(self) -> None:
        if not 1 <= self.positions or self.start_pos + self.positions > self.position:
            raise WireError(f"Rebuild: part [{self.start_pos}, {self.start_pos + self.positions}) "
                            f"is outside [0, {self.position})")
        if not 1 <= self.prefill <= self.position:
            raise WireError(f"Rebuild.prefill: {self.prefill} is outside [1, {self.position}]")


@dataclass(frozen=True)
class Rebuilt(WireStruct):
    """The last stage to the entry node: the rebuild ``seq`` of the session is complete."""

    session_id: SessionId
    seq: Count


@dataclass(frozen=True)
class CacheHandover(WireStruct):
    """The keys and values of one layer of one session, from the node that gives the layer up
    under plan ``(term, epoch)`` to the node that takes it (docs/operations.md)."""

    session_id: SessionId
    term: Term
    epoch: Count
    layer: Layer
    keys: Hidden
    """``(kv_heads, positions, head_dim)``, codec f32."""
    values: Hidden

    def _check_invariants(self) -> None:
        if len(self.keys.shape) != 3 or self.keys.shape != self.values.shape:
            raise WireError(f"CacheHandover: keys {self.keys.shape} and values {self.values.shape} "
                            "must be one (kv_heads, positions, head_dim) shape")


@dataclass(frozen=True)
class HandoverDone(WireStruct):
    """Every `CacheHandover` of ``node_id`` for plan ``(term, epoch)`` to the receiver is sent."""

    term: Term
    epoch: Count
    node_id: NodeId


# --- measurements (append only) -----------------------------------------------------------


@dataclass(frozen=True)
class LinkFigures(WireStruct):
    """What the sender measured on its link to ``peer_id`` (its sends and their echoes;
    meshllm.placement.linkstats): the idle round trip and two rates. A rate of 0 is not measured yet."""

    peer_id: NodeId
    rtt_ms: ReportMs
    small_mb_s: Rate
    """Rate of a message's first 4,096 bytes (activation sized), MB/s."""
    large_mb_s: Rate
    """Rate of bulk bytes beyond them (prefill sized), MB/s."""


@dataclass(frozen=True)
class LinkReport(WireStruct):
    """A node's measurements, sent to every member about once a second: its links, its own
    work per token as an entry node, and what its answers measured (docs/placement.md).
    A figure of 0 is not measured (or, for a target, none)."""

    node_id: NodeId
    term: Term
    epoch: Count
    """The plan ``(term, epoch)`` under which ``ms_per_token`` and ``ms_per_layer`` were measured."""
    head_ms: ReportMs
    """Embedding, final norm, lm_head and sampling of one token on this node."""
    prefill_ms_per_layer: ReportMs
    """One decoder layer over a typical prompt (meshllm.placement.planner.PREFILL_POSITIONS positions)."""
    ms_per_layer: ReportMs
    """This node's span under that plan: recent decode compute per layer."""
    ms_per_token: ReportMs
    """Answers entered here under that plan: the median time between two tokens (of the last 32)."""
    tokens: Count
    """Times between two tokens measured here under that plan so far (a receiver judges only
    new ones)."""
    entry: Annotated[bool, Bool()]
    """Answers were entered here lately: the planner counts this node as an entry node."""
    target_ms_per_token: ReportMs
    target_ttft_ms: ReportMs
    links: Annotated[tuple[LinkFigures, ...], TupleOf(Struct(LinkFigures), MAX_LINKS)]

    def _check_invariants(self) -> None:
        peers = [link.peer_id for link in self.links]
        if len(set(peers)) != len(peers):
            raise WireError("LinkReport.links: a peer is listed twice")
        if self.node_id in peers:
            raise WireError("LinkReport.links: a node cannot report a link to itself")


# --- federated fine-tuning (append only): meshllm/wire/tune_messages.py ----------------

from meshllm.wire.tune_messages import (  # noqa: E402
    TuneAccepted, TuneDone, TuneJoin, TuneQuit, TuneRefused, TuneRound, TuneTensors,
)


Message = (
    Hello
    | Heartbeat
    | Bye
    | Election
    | Answer
    | Coordinator
    | NodeReport
    | Plan
    | StageReady
    | Forward
    | Result
    | DropSession
    | Error
    | HeartbeatAck
    | PlanActive
    | StepFailed
    | PlanRefused
    | Rebuild
    | Rebuilt
    | CacheHandover
    | HandoverDone
    | LinkReport
    | TuneJoin
    | TuneAccepted
    | TuneQuit
    | TuneRound
    | TuneTensors
    | TuneRefused
    | TuneDone
)
"""Any top-level message."""

MESSAGE_TAGS: dict[type[WireStruct], int] = {
    Hello: 1,
    Heartbeat: 2,
    Bye: 3,
    Election: 4,
    Answer: 5,
    Coordinator: 6,
    NodeReport: 7,
    Plan: 8,
    StageReady: 9,
    Forward: 10,
    Result: 11,
    DropSession: 12,
    Error: 13,
    HeartbeatAck: 14,
    PlanActive: 15,
    StepFailed: 16,
    PlanRefused: 17,
    Rebuild: 18,
    Rebuilt: 19,
    CacheHandover: 20,
    HandoverDone: 21,
    LinkReport: 22,
    TuneJoin: 23,
    TuneAccepted: 24,
    TuneQuit: 25,
    TuneRound: 26,
    TuneTensors: 27,
    TuneRefused: 28,
    TuneDone: 29,
}
"""Type tag of each message class: the first item of its CBOR array. Never reuse a tag."""

MESSAGE_TYPES: dict[int, type[WireStruct]] = {tag: cls for cls, tag in MESSAGE_TAGS.items()}
"""Message class of each type tag."""
