"""Plan bookkeeping of one node, sans-IO: which plan is pending, which is active, who is ready.

A plan is identified by its key ``(term, epoch)``: the election term of the coordinator that
made it, and a counter that the coordinator raises with each re-plan inside its term. Keys
only grow: a node never acts on a plan whose key is below the highest it has seen, nor on one
whose term is below the highest term it knows (design §7).

The coordinator publishes a plan; every stage loads its span and reports ready; once every
stage is ready the coordinator activates it. Until then, the previous plan (if any) is no
longer used: sessions pause and are replayed onto the new plan when it activates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.wire.messages import Stage

PlanKey = tuple[int, int]


@dataclass(frozen=True)
class PlanView:
    """A plan as this node sees it: key, chain of stages, codec, and who made it."""

    key: PlanKey
    stages: tuple[Stage, ...]
    codec: str
    coordinator_id: str

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages)

    def span_of(self, node_id: str) -> tuple[int, int]:
        """The half-open span `node_id` holds under this plan; (0, 0) when none."""
        for s in self.stages:
            if s.node_id == node_id:
                return (s.start_layer, s.end_layer)
        return (0, 0)


@dataclass
class PlanBook:
    """What one node knows about plans."""

    highest_key: PlanKey = (0, 0)
    highest_coordinator: str = ""
    """Who made the plan of `highest_key`."""
    pending: PlanView | None = None
    active: PlanView | None = None
    ready: set[str] = field(default_factory=set)
    """Coordinator side: stages of the pending plan that reported ready."""

    def offer(self, plan: PlanView, highest_term: int) -> bool:
        """A plan arrived. True when this node should adopt it (load its span, report ready).

        A plan of the same key from another coordinator replaces the one held: nodes that
        started apart each coordinated the first term alone and numbered their plans alike,
        and the mesh they form follows one coordinator from then on."""
        if plan.key[0] < highest_term or plan.key < self.highest_key:
            return False
        if plan.key == self.highest_key and plan.coordinator_id == self.highest_coordinator:
            return False
        self.highest_key = plan.key
        self.highest_coordinator = plan.coordinator_id
        self.pending = plan
        self.active = None
        self.ready = set()
        return True

    def mark_ready(self, key: PlanKey, node_id: str) -> bool:
        """Coordinator: `node_id` loaded its span of plan `key`. True when every stage is ready."""
        if self.pending is None or key != self.pending.key:
            return False
        if node_id in self.pending.node_ids:
            self.ready.add(node_id)
        return self.ready >= set(self.pending.node_ids)

    def activate(self, key: PlanKey) -> PlanView | None:
        """The coordinator says plan `key` is active. Returns it when this node knows it."""
        if self.pending is None or key != self.pending.key:
            return None
        self.active, self.pending = self.pending, None
        return self.active

    def forget_node(self, node_id: str) -> bool:
        """A node was lost. True when the active or pending plan used it (and is now void)."""
        void = False
        for plan in (self.active, self.pending):
            if plan is not None and node_id in plan.node_ids:
                void = True
        if void:
            self.active = None
            self.pending = None
            self.ready = set()
        return void
