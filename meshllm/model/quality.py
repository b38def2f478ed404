"""How much a weight format costs in quality: perplexity on a fixed English text.

The text (``data/quality_text.txt``, original prose, CC0) is cut into windows of ``ctx``
tokens; each window runs as one prefill and only its second half is scored, so every scored
token sees at least ``ctx / 2`` tokens of context. llama.cpp's ``llama-perplexity`` scores
its windows the same way, so the two figures compare on one text and one context size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from meshllm.model.engine import Engine

QUALITY_TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"


@dataclass(frozen=True)
class Perplexity:
    weights: str
    perplexity: float
    scored_tokens: int
    text_tokens: int
    ctx: int


def quality_text() -> str:
    return QUALITY_TEXT.read_text(encoding="utf-8")


def perplexity(engine: Engine, text: str | None = None, ctx: int = 512) -> Perplexity:
    """exp(mean negative log-likelihood) of the second half of every full window of `ctx` tokens."""
    if ctx < 4 or ctx > engine.info.max_positions:
        raise ValueError(f"ctx must be 4..{engine.info.max_positions}, not {ctx}")
    ids = list(engine.tokenizer(text if text is not None else quality_text())["input_ids"])
    windows = len(ids) // ctx
    if windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    nll, scored = 0.0, 0
    for w in range(windows):
        logprobs = engine.token_logprobs(ids[w * ctx:(w + 1) * ctx])  # predicts tokens 1..ctx-1
        tail = logprobs[ctx // 2 - 1:]  # predictions of tokens ctx/2 .. ctx-1
        nll -= float(tail.double().sum())
        scored += tail.numel()
    return Perplexity(engine.weights, math.exp(nll / scored), scored, len(ids), ctx)
