"""The torch work the mesh asks its node to run, and what comes back.

A job is run by the node's single worker thread, in the order the core issued it. The core
never waits for one: it is told the outcome with `MeshCore.job_done` or `MeshCore.job_failed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from meshllm.mesh.rebuild import RebuildReport

Finish = Literal["send", "sample", "discard"]


@dataclass(frozen=True, eq=False)
class Compute:
    """One step of one session on this node, as a single job.

    It starts from `token_ids` (the entry node embeds them) or from `hidden`, a
    `(positions, hidden)` float32 array that came over a link; runs this node's layers if
    `run_span`; and then, by `finish`:
    - "send": returns the hidden state, for the next stage;
    - "sample": applies the final norm and lm_head and samples the session's next token;
    - "discard": returns nothing (a replayed step whose logits are not used).

    So a node that holds every layer answers a token with one job: embed, layers, head and
    sample, with no codec and no message to itself.
    """

    job_id: int
    session_id: str
    start_pos: int
    positions: int
    token_ids: tuple[int, ...] | None = None
    hidden: np.ndarray | None = None
    run_span: bool = True
    finish: Finish = "send"
    drafts: tuple[int, ...] = ()
    """With finish "sample": the step's drafted tokens (its last positions), which the head
    checks (`Sampler.verify`, meshllm.mesh.speculate)."""
    draft_context: tuple[int, ...] = ()
    draft_k: int = 0
    """With finish "sample" and a draft model: after the step's tokens, the draft model
    proposes up to `draft_k` tokens for the next step, after `draft_context` (the prompt and
    the answer before this step) and this step's tokens (`Computed.offered`)."""


@dataclass(frozen=True, eq=False)
class RebuildPart:
    """One part of a session's rebuild on a new plan (meshllm.mesh.rebuild): make this
    node's caches hold positions `[start_pos, start_pos + positions)` of the session's
    `position`, recomputing what it lacks in the original chunking (a first step of
    `prefill` positions, then one at a time), and return its output there.

    It starts from `token_ids` (the entry node embeds them; with `run_span` False it only
    embeds, for a first stage elsewhere) or from `hidden`, the upstream's output, which is
    None when the upstream has none to give."""

    job_id: int
    session_id: str
    seq: int
    position: int
    prefill: int
    start_pos: int
    positions: int
    token_ids: tuple[int, ...] | None = None
    hidden: np.ndarray | None = None
    run_span: bool = True
    whole: bool = False
    """A stage without the log it needs recomputes its whole span (meshllm.mesh.rebuild)."""


@dataclass(frozen=True)
class LoadSpan:
    """Hold layers `[start_layer, end_layer)` from now on (a plan was adopted)."""

    job_id: int
    start_layer: int
    end_layer: int


@dataclass(frozen=True, eq=False)
class ImportCache:
    """Take over the keys and values `(kv_heads, positions, head_dim)` of one layer of a
    session, handed over by the node that held the layer before."""

    job_id: int
    session_id: str
    layer: int
    keys: np.ndarray
    values: np.ndarray


@dataclass(frozen=True, eq=False)
class Loaded:
    """What a `LoadSpan` job returns: the caches of the layers this node gave up, as
    (session, layer, keys, values), for their new owners."""

    handover: tuple[tuple[str, int, np.ndarray, np.ndarray], ...] = ()


@dataclass(frozen=True)
class DropSessions:
    """Free these sessions' KV caches on this node."""

    job_id: int
    session_ids: tuple[str, ...]


Job = Compute | RebuildPart | LoadSpan | ImportCache | DropSessions


@dataclass(frozen=True, eq=False)
class Computed:
    """What a `Compute` job returned."""

    hidden: np.ndarray | None = None
    """The span's output `(positions, hidden)` when the job's finish was "send"."""
    token_id: int | None = None
    """The sampled token when the finish was "sample" (the first, for a step with drafts)."""
    token_ids: tuple[int, ...] = ()
    """For a step with drafts: the tokens its head gave, drafts that stood and one more."""
    offered: tuple[int, ...] = ()
    """The draft model's tokens for the session's next step (see `Compute.draft_k`)."""
    span_ms: float = 0.0
    """Time spent in this node's layers (plus any testing delay): what balancing measures."""
    rebuild: RebuildReport | None = None
    """For a `RebuildPart`: what this node kept and recomputed for the session."""
    rebuild_error: str | None = None
    """For a `RebuildPart`: why this node cannot rebuild the session (its inputs are gone)."""
