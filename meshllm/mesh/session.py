"""One answer's generation state on its entry node, sans-IO.

The entry node owns each session: its token history, its sampler and its detokenizer. The
stages only hold KV caches, and those can always be rebuilt by replaying the steps recorded
here (design §8). Replaying the same steps, one by one, repeats the same arithmetic, so a
session moved to a new plan produces exactly the tokens it would have produced undisturbed.

The driver (the daemon, or the local engine) does the I/O::

    while (step := session.next_step()) is not None:
        logits = run_chain(session.session_id, step.token_ids, step.start_pos)
        token = session.accept(sample(logits))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from meshllm.mesh.speculate import MAX_DRAFT, DraftPolicy, ngram_draft


PREFILL_CHUNK_POSITIONS = 32
"""Where the numerics are batch-invariant, a prompt runs in steps of this many positions, each
batched with the decode steps of the answers already running (docs/batching.md): a long prompt
never holds their tokens back for more than one chunk. Measured on the default model (int4,
1 thread, Zen 4): a 512-token prompt takes 1.6 s in chunks of 32 or 64 and 2.0 s in one step;
a run of one chunk of 32 beside 4 decode steps takes 80-215 ms (deeper chunks attend to more
keys), against about 17 ms for the 4 steps alone. Where the numerics are not invariant (f32:
token for token `generate`), the prompt runs in one step."""


@dataclass(frozen=True)
class Step:
    """What to run through the chain next."""

    token_ids: tuple[int, ...]
    start_pos: int
    replay: bool = False
    """True while rebuilding KV caches: the logits of a replay step are not sampled."""
    sample: bool = True
    """False for a replay step and for a chunk of the prompt before its last: its output only
    fills the caches, and the session's next token is sampled after a later step."""
    drafts: tuple[int, ...] = ()
    """Drafted tokens (meshllm.mesh.speculate), the last of `token_ids`: the step's head
    checks them (`Session.accept_verified`)."""


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """The new text this token adds (may be empty; empty for EOS)."""
    finish_reason: str | None = None
    """Set on the last token: "stop" (EOS), "length" (max_tokens) or "cancelled"."""
    speculation: tuple[int, int, int] | None = None
    """On the last token of each verify step, and on the answer's last token: the answer's
    (tokens drafted, drafts accepted, verify steps) so far."""


@dataclass(frozen=True)
class StateChange:
    """Between tokens: "replanning" while the mesh moves layers, then "running" again."""

    state: str


@dataclass
class Session:
    """Token history of one answer and where its next step starts."""

    session_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    eos_token_ids: frozenset[int]
    detokenize: Callable[[int], str] = field(default=lambda _t: "")
    prefill_chunk: int = 0
    """The prompt runs in steps of this many positions (0: one step). Fixed when the session
    opens, never by load: a rebuild or replay repeats the session's own chunking."""
    drafting: DraftPolicy | None = None
    """Speculative decoding (meshllm.mesh.speculate): what drafts, and how many; None: off."""
    offered: tuple[int, ...] = ()
    """A draft model's proposal for the next step (given after each step, `offer`)."""
    _pending: Step | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _done_steps: list[tuple[int, ...]] = field(default_factory=list)
    """The positions each step kept (a verify step: its last token and the drafts that stood)."""
    _dropped: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """For a verify step (by its index in `_done_steps`): the drafts that fell. They ran in the
    step, so a replay in the original steps runs them again (then cuts them off), for the
    same shapes: where the numerics are not batch-invariant, the bits depend on them."""
    _replay: list[list[tuple[int, ...]]] = field(default_factory=list)
    """Steps still to replay, in groups: each group runs through the chain as one step."""
    _replay_dropped: list[tuple[int, ...]] = field(default_factory=list)
    """Per replay group: the fallen drafts its step runs after its kept positions."""

    @property
    def position(self) -> int:
        """Positions held in the stages' KV caches after the steps run so far."""
        return sum(len(s) for s in self._done_steps)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_step(self) -> Step | None:
        """The next step to run, or None when the answer is finished."""
        if self.finished:
            return None
        if self._replay:
            tokens = tuple(t for step in self._replay[0] for t in step) + self._replay_dropped[0]
            return Step(tokens, self.position, replay=True, sample=False)
        position = self.position
        if not self._done_steps or position < len(self.prompt_ids):
            end = len(self.prompt_ids) if self.prefill_chunk <= 0 else position + self.prefill_chunk
            chunk = self.prompt_ids[position:end]
            return Step(tuple(chunk), position, sample=position + len(chunk) >= len(self.prompt_ids))
        if self._pending is None:  # drafted once per step: `next_step` is asked again
            drafts = self._drafts()
            self._pending = Step((self.generated[-1], *drafts), position, drafts=drafts)
        return self._pending

    def _drafts(self) -> tuple[int, ...]:
        policy = self.drafting
        if policy is None:
            return ()
        k = policy.draft_length(self.max_tokens - len(self.generated) - 1)  # never past the answer's end
        if k <= 0:
            return ()
        if policy.mode == "draft":
            return self.offered[:k]
        return ngram_draft((*self.prompt_ids, *self.generated), k, min_ngram=policy.min_ngram)

    def draft_request(self) -> tuple[tuple[int, ...], int]:
        """What a draft model should propose after the step now running: the context before
        the step (its tokens come on top) and how many tokens at most; ((), 0) when the
        answer does not draft by model."""
        policy = self.drafting
        if policy is None or policy.mode != "draft" or policy.stopped:
            return (), 0
        return (*self.prompt_ids, *self.generated), min(MAX_DRAFT, policy.length + 2)

    def offer(self, drafts: Sequence[int]) -> None:
        """A draft model's tokens for the next step (used when the policy drafts by model)."""
        self.offered = tuple(drafts)

    def step_done(self) -> None:
        """A step that is not sampled ran through the chain (its logits are ignored): a replay
        step, or a chunk of the prompt before its last."""
        if self._replay:
            dropped = self._replay_dropped.pop(0)
            self._done_steps.extend(self._replay.pop(0))
            if dropped:
                self._dropped[len(self._done_steps) - 1] = dropped
            return
        step = self.next_step()
        if step is None or step.sample:
            raise RuntimeError("no step without sampling is in progress")
        self._done_steps.append(step.token_ids)

    def accept(self, token_id: int) -> Token:
        """The step returned logits and `token_id` was sampled from them."""
        return self.accept_verified((token_id,))[0]

    def accept_verified(self, token_ids: Sequence[int]) -> list[Token]:
        """The step's head sampled `token_ids`: one token a position, up to and including the
        first that differs from the step's draft (`Sampler.verify`). The positions of the
        last token and of the drafts that were right stay in the caches; the rest are cut
        off by the next step, which starts after them."""
        step = self.next_step()
        if step is None or not step.sample:
            raise RuntimeError("accept() called with no sampling step pending")
        accepted = len(token_ids) - 1
        if not 0 <= accepted <= len(step.drafts) or tuple(token_ids[:accepted]) != step.drafts[:accepted]:
            raise ValueError(f"verified tokens {tuple(token_ids)} do not follow the drafts {step.drafts}")
        self._pending = None
        kept = len(step.token_ids) - len(step.drafts) + accepted
        self._done_steps.append(step.token_ids[:kept])
        if kept < len(step.token_ids):
            self._dropped[len(self._done_steps) - 1] = step.token_ids[kept:]
        if self.drafting is not None:
            self.drafting.verified(len(step.drafts), accepted)
        out = []
        for token_id in token_ids:
            out.append(self._emit(token_id))
            if self.finished:
                break
        if self.drafting is not None and self.drafting.trips and (step.drafts or self.finished):
            last = out[-1]  # the answer's drafting so far, on the last token of a verify step
            out[-1] = Token(last.id, last.text, last.finish_reason,
                            (self.drafting.drafted, self.drafting.accepted, self.drafting.trips))
        return out

    def _emit(self, token_id: int) -> Token:
        self.generated.append(token_id)
        if token_id in self.eos_token_ids:
            self.finish_reason = "stop"
            return Token(token_id, "", "stop")
        text = self.detokenize(token_id)
        if len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
        return Token(token_id, text, self.finish_reason)

    def cancel(self) -> Token:
        self._pending = None
        self.finish_reason = "cancelled"
        return Token(-1, "", "cancelled")

    def restart(self, merge_positions: int = 0) -> None:
        """The KV caches are gone (a new plan): replay every step taken so far, in order.

        With `merge_positions` (only where the numerics are batch-invariant: a position's
        result does not depend on the step it is in), consecutive steps are replayed as one,
        up to that many positions (a longer step, the prompt, alone), and only the positions
        kept. Otherwise each step runs again as it ran, a verify step with the drafts that
        fell (the next step cuts them off). `history()` still gives the original steps."""
        done = [(step, self._dropped.get(i, ())) for i, step in enumerate(self._done_steps)]
        pending = done + [(step, dropped if j == len(group) - 1 else ())
                          for group, dropped in zip(self._replay, self._replay_dropped)
                          for j, step in enumerate(group)]
        self._pending = None
        self._done_steps, self._dropped = [], {}
        self._replay, self._replay_dropped = [], []
        for step, dropped in pending:
            last = self._replay[-1] if self._replay else None
            if last is not None and merge_positions > 0 \
                    and sum(len(s) for s in last) + len(step) <= merge_positions:
                last.append(step)
            else:
                self._replay.append([step])
                self._replay_dropped.append(() if merge_positions > 0 else dropped)

    @property
    def dropped_drafts(self) -> bool:
        """Some step ran drafts that fell: a rebuild in the original steps (prefill, then one
        position a step) would not repeat its shapes."""
        return bool(self._dropped)

    def replaying(self) -> bool:
        return bool(self._replay)

    def history(self) -> tuple[tuple[int, ...], int]:
        """The token ids of every step run so far, in order, and the first step's length:
        what a rebuild of the stages' caches repeats, in the same chunking."""
        tokens = tuple(t for step in self._done_steps for t in step)
        return tokens, len(self._done_steps[0]) if self._done_steps else 0


def run_local(session: Session, run_chain: Callable[[str, list[int], int], object],
              sample: Callable[[object], int], should_stop: Callable[[], bool] | None = None) -> Iterator[Token]:
    """Drive a session to the end with a synchronous chain (the single-process engine)."""
    while (step := session.next_step()) is not None:
        if should_stop is not None and should_stop():
            yield session.cancel()
            return
        logits = run_chain(session.session_id, list(step.token_ids), step.start_pos)
        if not step.sample:
            session.step_done()
            continue
        yield session.accept(sample(logits))
