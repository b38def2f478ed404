"""What configures one node's mesh core: its settings, the model's limits on what a peer
sends, and who may join and coordinate (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm import wire
from meshllm.placement.balance import BalanceSettings
from meshllm.placement.planner import DEFAULT_OBJECTIVE


@dataclass(frozen=True)
class MeshSettings:
    objective: str = DEFAULT_OBJECTIVE
    codec: str = "f32"
    election_timeout_s: float = 0.5
    plan_wait_s: float = 30.0
    """How long an answer waits for an active plan before it fails."""
    replan_debounce_s: float = 0.1
    debug_delay_s: float = 0.0
    """Testing aid (the driver applies it): a delay before every step this node's layers run,
    as a slow device would take."""
    step_timeout_s: float = 120.0
    """A step whose result has not come back after this long is lost (no hangs)."""
    report_interval_s: float = 1.0
    """How often a stage reports its measured decode speed to the coordinator."""
    max_queued_steps: int = 64
    """Forwarded steps waiting for this node's compute; more are refused ("busy")."""
    max_queued_rebuild_parts: int = 1024
    """Rebuild parts waiting for this node's compute; more are refused ("busy")."""
    stage_ready_s: float = 15.0
    """Coordinator: a plan whose stages are not all ready this long after it was published is
    made again without the ones that are not (a member that claims room it does not load
    stalls no one), when the others can hold the model; such a node is planned with again
    once it reports a stage ready, links again, or after ten times this."""
    handover_wait_s: float = 5.0
    """How long a node that takes over layers from a live node waits for their caches
    before it reports ready without them (they are then rebuilt, or replayed)."""
    balance: BalanceSettings = field(default_factory=BalanceSettings)
    target_ms_per_token: float | None = None
    """Latency target (coordinator): the plan with the fewest stages predicted to decode
    within this many ms per token (docs/placement.md)."""
    target_ttft_ms: float | None = None
    """Latency target for the first token of a typical prompt."""
    head_ms: float = 0.0
    """This node's own work per token as an entry node (embed, head, sample), measured."""
    prefill_ms_per_layer: float | None = None
    """One layer over a typical prompt on this node, measured (None: not measured)."""
    batch_invariant: bool = False
    """This node's numerics are batch-invariant (its runtime's `batch_invariant`: the weight
    format's kernels give a position the same bits alone, in a chunk or in a batch). Every
    node of a mesh runs the same model id, weight format included, so as an entry node it
    plans its answers' rebuilds by its own numerics: parts of up to
    `rebuild.INVARIANT_PART_POSITIONS`, each run by a stage in one pass, and a full replay in
    steps as large; False keeps the original chunking (meshllm.mesh.rebuild)."""

    def __post_init__(self) -> None:
        for name in ("target_ms_per_token", "target_ttft_ms"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= wire.messages.MAX_REPORT_MS):
                raise ValueError(f"{name} must be in (0, {wire.messages.MAX_REPORT_MS:g}], got {value}")


@dataclass(frozen=True)
class ModelLimits:
    """What a forwarded hidden state (and a handed-over cache) must fit."""

    hidden_size: int
    max_positions: int
    kv_heads: int = 0
    """Keys and values are (kv_heads, positions, head_dim); 0: not checked."""
    head_dim: int = 0


def incompatibility(ours: wire.Hello, theirs: wire.Hello) -> str | None:
    """Why a peer cannot join our mesh, or None when it can."""
    if theirs.protocol_version != ours.protocol_version:
        return f"protocol version {theirs.protocol_version} != {ours.protocol_version}"
    if theirs.mesh_name != ours.mesh_name:
        return f"mesh name {theirs.mesh_name!r} != {ours.mesh_name!r}"
    if theirs.model_id != ours.model_id:
        return f"model {theirs.model_id} != {ours.model_id}"
    return None


SCORE_MAX_BUDGET_BYTES = 2**42
"""The most memory (4 TiB) a hello's budget counts for in its election score."""
SCORE_MIN_MS_PER_LAYER = 0.01
"""The least compute time per layer a hello's speed counts for in its election score."""
MAX_ELECTION_SCORE = SCORE_MAX_BUDGET_BYTES / 1e9 / SCORE_MIN_MS_PER_LAYER
"""The highest score any node can have (about 439,805): what an absurd claim comes to."""


def election_score(hello: wire.Hello) -> float:
    """Who should coordinate: memory per unit of compute time, from the hello's budget and
    speed, each taken within sane ranges (at most `SCORE_MAX_BUDGET_BYTES`, at least
    `SCORE_MIN_MS_PER_LAYER`): so at most `MAX_ELECTION_SCORE`; -1 for a node that cannot."""
    if not hello.can_coordinate:
        return -1.0
    budget = min(max(hello.mem_budget_bytes, 0), SCORE_MAX_BUDGET_BYTES)
    return budget / 1e9 / max(hello.ms_per_layer, SCORE_MIN_MS_PER_LAYER)
