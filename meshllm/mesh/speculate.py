"""Speculative decoding on the entry node, sans-IO: which tokens to draft, and how many.

An answer's decode step may carry, after the last sampled token, k drafted tokens: every stage
computes the k + 1 positions in one forward, and the entry node's head checks the drafts
(`meshllm.model.sampling.Sampler.verify`): each trip through the mesh then yields from 1 to
k + 1 tokens. With batch-invariant kernels a position has the same bits in a verify step as in
a one-position step, so a greedy answer is token for token the answer without speculation.

Drafts come from the answer itself (prompt lookup: the tokens that followed the latest earlier
occurrence of its last n tokens, `ngram_draft`), or from a draft model on the entry node
(`meshllm.model.draft`). Both are deterministic, so a mesh and one node with the same flags
draft, and answer, the same.

`DraftPolicy` sets the draft length from the acceptance (1 to `MAX_DRAFT`), and in `auto`
stops drafting for an answer whose drafts are seldom accepted: a verify step of k + 1
positions costs more than a step of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MODES = ("auto", "ngram", "draft", "off")
"""`--speculate`: auto (the draft model when one is loaded, else prompt lookup; off for an
answer where it does not pay), ngram (prompt lookup), draft (the draft model), off."""

MAX_DRAFT = 8
"""Drafted tokens a step carries at most."""

MAX_NGRAM = 4
"""Prompt lookup matches the answer's last 4 tokens, else 3, 2, then 1."""

LOOKUP_WINDOW = 4096
"""Prompt lookup searches the last this many tokens of the context (a bound on its cost)."""


def ngram_draft(context: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = 1) -> tuple[int, ...]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n
    tokens (n from `max_ngram` down to `min_ngram`); () when there is none."""
    if k <= 0 or len(context) < 2:
        return ()
    window = np.asarray(context[-LOOKUP_WINDOW:], dtype=np.int64)
    end = window.shape[0]
    for n in range(min(max_ngram, end - 1), max(1, min_ngram) - 1, -1):
        suffix = window[end - n:]
        starts = np.flatnonzero(window[:end - n] == suffix[0])  # earlier starts, each with a follower
        for i in starts[::-1]:
            if np.array_equal(window[i:i + n], suffix):
                return tuple(int(t) for t in window[i + n:i + n + k])
    return ()


@dataclass
class DraftPolicy:
    """The draft length of one answer, from its acceptance so far."""

    mode: str = "ngram"
    """What drafts: "ngram" or "draft" (a model); "auto" is resolved before this is made."""
    stop_when_poor: bool = False
    """`auto`: stop drafting for this answer once its drafts are seldom accepted."""
    min_ngram: int = 1
    """Prompt lookup drafts only after a match of at least this many tokens (`auto`: 2; a
    match of one token is a weak guess, and a wrong draft costs a wider step)."""
    length: int = 4
    drafted: int = 0
    accepted: int = 0
    trips: int = 0
    """Verify steps (steps that carried drafts) so far."""
    stopped: bool = False

    def draft_length(self, room: int) -> int:
        """How many tokens to draft for the next step, at most `room` (0: none)."""
        if self.stopped:
            return 0
        return max(0, min(self.length, room, MAX_DRAFT))

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify step carried `drafted` tokens, of which the first `accepted` were right."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.trips += 1
        # all right: draft further; else just past what was right (at least 1)
        self.length = min(MAX_DRAFT, self.length + 2) if accepted == drafted else max(1, accepted + 1)
        if self.stop_when_poor and self.drafted >= 12 and self.accepted < 0.25 * self.drafted:
            self.stopped = True


def policy_for(mode: str, has_draft_model: bool) -> DraftPolicy | None:
    """The draft policy of a new greedy-or-sampled answer under `--speculate mode` (None: off)."""
    if mode == "off" or (mode == "draft" and not has_draft_model):
        return None
    if mode == "auto":
        return DraftPolicy("draft" if has_draft_model else "ngram", stop_when_poor=True, min_ngram=2)
    return DraftPolicy(mode)
