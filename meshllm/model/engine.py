"""The local engine: a chain of shards in one process, driven by the entry node's loop.

One node holding the whole model is a chain of one shard. Tests build chains of several
uneven shards in one process to prove that splitting changes no token.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from meshllm.errors import PromptTooLong
from meshllm.model.cache import PreparedModel, prepare
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.shard import ModelShape, Shard, load_config, model_shape
from meshllm.model.source import resolve
from meshllm.model.text import Detokenizer, chat_prompt_ids, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    name: str
    num_layers: int
    hidden_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    """The new text this token adds (may be empty; empty for EOS)."""
    finish_reason: str | None = None
    """Set on the last token: "stop" (EOS), "length" (max_tokens) or "cancelled"."""


def eos_ids(prepared: PreparedModel, tokenizer) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    """EOS ids from the generation config, the model config and the tokenizer, deduplicated."""
    from transformers import GenerationConfig

    found: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(prepared.folder)
        found += _as_list(gen.eos_token_id)
    except OSError:
        pass
    found += _as_list(load_config(prepared).eos_token_id)
    found += _as_list(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(found))


def _as_list(v: object) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    return [int(x) for x in v]  # type: ignore[union-attr]


_session_counter = itertools.count()


class Engine:
    """Whole model (or several uneven shards, chained) in one process. Synchronous.

    Drive it from one worker thread; `generate` enters `torch.inference_mode` itself.
    """

    def __init__(
        self,
        prepared: PreparedModel,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.prepared = prepared
        config = load_config(prepared)
        n = int(config.num_hidden_layers)
        spans = list(spans) if spans is not None else [(0, n)]
        if not spans or spans[0][0] != 0 or spans[-1][1] != n or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])
        ):
            raise ValueError(f"spans {spans} must chain [0, {n}) without gaps")
        self.shards = [Shard(prepared, s, e) for s, e in spans]
        self.tokenizer = load_tokenizer(prepared.folder)
        self.shape: ModelShape = model_shape(config)
        self.info = ModelInfo(
            model_id=prepared.model_id,
            name=prepared.name,
            num_layers=n,
            hidden_size=int(config.hidden_size),
            max_positions=self.shape.max_positions,
            eos_token_ids=eos_ids(prepared, self.tokenizer),
        )

    @classmethod
    def load(cls, model: str | None = None, *, cache_dir: str | None = None,
             spans: Sequence[tuple[int, int]] | None = None) -> "Engine":
        """Resolve, convert once if needed, and load. Raises `ModelSourceError`."""
        from pathlib import Path

        prepared = prepare(resolve(model), Path(cache_dir) if cache_dir else None)
        return cls(prepared, spans)

    # -- prompts -------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def check_prompt(self, n_prompt_tokens: int) -> None:
        """A prompt must leave room for at least one new token inside the context window."""
        if n_prompt_tokens >= self.info.max_positions:
            raise PromptTooLong(n_prompt_tokens, self.info.max_positions)

    # -- generation ----------------------------------------------------------------------

    def _run_chain(self, session_id: str, token_ids: list[int], start_pos: int) -> torch.Tensor:
        hidden = self.shards[0].embed(token_ids)  # (1, positions, hidden)
        for shard in self.shards:
            hidden = shard.forward(session_id, hidden, start_pos)
        return self.shards[-1].head(hidden)  # (vocab,)

    def generate_ids(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[int, str | None]]:
        """Yield (token id, finish_reason or None). The last one has a finish reason."""
        self.check_prompt(len(prompt_ids))
        session_id = f"local-{next(_session_counter)}"
        sampler = Sampler(params)
        eos = set(self.info.eos_token_ids)
        budget = min(params.max_tokens, self.info.max_positions - len(prompt_ids))
        try:
            with torch.inference_mode():
                feed, pos = list(prompt_ids), 0
                for i in range(budget):
                    if should_stop is not None and should_stop():
                        yield -1, "cancelled"
                        return
                    logits = self._run_chain(session_id, feed, pos)
                    pos += len(feed)
                    tok = sampler.sample(logits)
                    if tok in eos:
                        yield tok, "stop"
                        return
                    yield tok, ("length" if i == budget - 1 else None)
                    feed = [tok]
        finally:
            for shard in self.shards:
                shard.drop(session_id)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Token]:
        """Stream tokens with their text. See `Token`."""
        detok = Detokenizer(self.tokenizer, frozenset(self.info.eos_token_ids))
        eos = set(self.info.eos_token_ids)
        for tok, reason in self.generate_ids(prompt_ids, params, should_stop):
            # id -1 marks a cancellation, which produced no token
            text = "" if tok < 0 or tok in eos else detok.push(tok)
            yield Token(tok, text, reason)

    def measure_ms_per_layer(self, steps: int = 8) -> float:
        """Milliseconds per decoder layer per token, from a short decode on this machine."""
        shard = max(self.shards, key=lambda s: s.num_span_layers)
        session_id = "measure"
        with torch.inference_mode():
            hidden = shard.embed([1] * 8)
            shard.forward(session_id, hidden, 0)
            step = shard.embed([1])
            t0 = time.perf_counter()
            for i in range(steps):
                shard.forward(session_id, step, 8 + i)
            elapsed_ms = (time.perf_counter() - t0) * 1000
        shard.drop(session_id)
        return elapsed_ms / steps / max(1, shard.num_span_layers)
