"""Sampling on the entry node: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1.0 keeps all."""
    seed: int | None = None
    """Seed of this session's random generator; the same seed gives the same answer."""
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token from logits. Its random state lives here, with the session."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is not None:
            self._generator.manual_seed(params.seed)
        else:
            self._generator.seed()

    def get_state(self) -> torch.Tensor:
        return self._generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def sample(self, logits: torch.Tensor) -> int:
        """logits (vocab,) -> token id."""
        if self.params.greedy:
            return int(torch.argmax(logits).item())
        return int(torch.multinomial(self._probs(logits), 1, generator=self._generator).item())

    def verify(self, logits: torch.Tensor, drafts: Sequence[int]) -> list[int]:
        """The tokens of a step that carried `drafts` (speculative decoding), from its logits
        `(len(drafts) + 1, vocab)`: each draft while it stands, then one more token.

        Greedy: a draft stands while it is the argmax, and the token after the last one that
        stands is the argmax: exactly the tokens of decoding one at a time. Sampling: the
        standard rejection rule for a draft that is one token for sure: it stands with the
        probability p(draft); where it falls, the token is drawn from p without it,
        renormalized; so every token has the distribution of decoding one at a time."""
        out: list[int] = []
        for row, draft in zip(logits, (*drafts, None)):
            if draft is None:
                out.append(self.sample(row))
                break
            if self.params.greedy:
                out.append(self.sample(row))
                if out[-1] != draft:
                    break
                continue
            probs = self._probs(row)
            if float(torch.rand(1, generator=self._generator).item()) < float(probs[draft]):
                out.append(int(draft))
                continue
            probs[draft] = 0.0
            out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=self._generator).item()))
            break
        return out

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution of one position: temperature, top-k, top-p."""
        p = self.params
        scores = logits.float() / p.temperature
        if p.top_k and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p; always keep the first
            drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
            drop_sorted[0] = False
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        return torch.softmax(scores, dim=-1)
