"""The local engine: a chain of shards in one process, driven by the entry node's loop.

One node holding the whole model is a chain of one shard. Tests build chains of several
uneven shards in one process to prove that splitting changes no token.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from meshllm.errors import PromptTooLong
from meshllm.model.adapter import Adapter, check_adapter
from meshllm.model.cache import PreparedModel, prepare
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.formats import resolve_format
from meshllm.model.quant import kernel_description
from meshllm.model.shard import open_shard
from meshllm.model.shape import ModelShape, load_config, model_shape
from meshllm.model.source import resolve
from meshllm.model.span import ShardLike
from meshllm.model.text import Detokenizer, chat_prompt_ids, load_tokenizer
from meshllm.mesh.session import PREFILL_CHUNK_POSITIONS, Session, Token, run_local

__all__ = ["Engine", "ModelInfo", "Token"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    name: str
    num_layers: int
    hidden_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    weights: str = "f32"
    """The weight format in memory (f32, f16, int8, int4); part of `model_id`."""
    adapter: str = ""
    """The digest of the LoRA adapter served ("" for none); part of `model_id`."""
    kernel: str = ""
    """What computes the layers (meshllm's kernels and their instruction set, or torch's)."""
    batch_invariant: bool = False
    """Whether a position's bits never depend on how the step computing it was shaped."""


def served_model_id(prepared: PreparedModel, weights: str, adapter: Adapter | None, device: str = "cpu") -> str:
    """What a mesh must agree on: the weights, their format in memory, the kernels' numerics
    and the adapter."""
    # two formats of one file compute differently: to a mesh they are different models; so do
    # torch's quantized kernels and meshllm's (which give the same bits on every CPU)
    base = f"{prepared.model_id}-{weights}"
    if not kernel_description(weights, device)[1] and weights != "f32":
        base += "-torch"
    return base if adapter is None else f"{base}-a{adapter.digest}"


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


def check_device(device: str) -> str:
    """`device` if torch can use it here; else ValueError with a one-line reason."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are here")
    return device


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so timings measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Engine:
    """Whole model (or several uneven shards, chained) in one process. Synchronous.

    Drive it from one worker thread; `generate` enters `torch.inference_mode` itself.
    """

    def __init__(
        self,
        prepared: PreparedModel,
        spans: Sequence[tuple[int, int]] | None = None,
        *,
        device: str = "cpu",
        weights: str = "f32",
        tokenizer=None,  # type: ignore[no-untyped-def]
        adapter: Adapter | None = None,
    ) -> None:
        """`tokenizer`: one already loaded from `prepared` (else it is loaded here).
        `adapter`: a LoRA adapter every shard applies to its layers (AdapterError if it does
        not fit the model)."""
        self.prepared = prepared
        self.device = check_device(device)
        self.weights = resolve_format(prepared, weights)
        config = load_config(prepared)
        n = int(config.num_hidden_layers)
        spans = list(spans) if spans is not None else [(0, n)]
        if not spans:  # entry pieces only: embedding, norm and head, no decoder layers
            spans = [(0, 0)]
        elif spans[0][0] != 0 or spans[-1][1] != n or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])
        ):
            raise ValueError(f"spans {spans} must chain [0, {n}) without gaps")
        if adapter is not None:
            check_adapter(adapter, config)
        self.adapter = adapter
        self.shards: list[ShardLike] = [open_shard(prepared, s, e, weights=self.weights, device=self.device, adapter=adapter)
                       for s, e in spans]
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(prepared.folder)
        self.shape: ModelShape = model_shape(config, self.weights)
        kernel, invariant = kernel_description(self.weights, self.device)
        self.info = ModelInfo(
            model_id=served_model_id(prepared, self.weights, adapter, self.device),
            name=prepared.name,
            num_layers=n,
            hidden_size=int(config.hidden_size),
            max_positions=self.shape.max_positions,
            eos_token_ids=eos_ids(prepared, self.tokenizer),
            weights=self.weights,
            adapter=adapter.digest if adapter is not None else "",
            kernel=kernel,
            batch_invariant=invariant,
        )

    @classmethod
    def load(cls, model: str | None = None, *, cache_dir: str | None = None,
             spans: Sequence[tuple[int, int]] | None = None, device: str = "cpu",
             weights: str = "f32", adapter: Adapter | None = None) -> "Engine":
        """Resolve, convert once if needed, and load. Raises `ModelSourceError`.

        `spans=[]` loads only the entry pieces (embedding, norm, head) and the tokenizer.
        """
        from pathlib import Path

        prepared = prepare(resolve(model), Path(cache_dir) if cache_dir else None)
        return cls(prepared, spans, device=device, weights=weights, adapter=adapter)

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Serve `adapter` (None: the base model) from the next step on, in every shard; the
        model id changes with it. Sessions in flight keep KV caches computed with the previous
        adapter: switch between answers."""
        if adapter is not None:
            check_adapter(adapter, load_config(self.prepared))
        for shard in self.shards:
            shard.set_adapter(adapter)
        self.adapter = adapter
        self.info = dataclasses.replace(self.info, model_id=served_model_id(self.prepared, self.weights, adapter, self.device),
                                        adapter=adapter.digest if adapter is not None else "")

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

    def new_session(self, prompt_ids: list[int], params: SamplingParams) -> Session:
        """A session for `prompt_ids`; `max_tokens` is cut to what the context window leaves.
        With batch-invariant kernels its prompt runs in chunks (`PREFILL_CHUNK_POSITIONS`)."""
        self.check_prompt(len(prompt_ids))
        detok = Detokenizer(self.tokenizer, frozenset(self.info.eos_token_ids))
        return Session(
            session_id=f"local-{next(_session_counter)}",
            prompt_ids=tuple(prompt_ids),
            max_tokens=min(params.max_tokens, self.info.max_positions - len(prompt_ids)),
            eos_token_ids=frozenset(self.info.eos_token_ids),
            detokenize=detok.push,
            prefill_chunk=PREFILL_CHUNK_POSITIONS if self.info.batch_invariant else 0,
        )

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Token]:
        """Stream tokens with their text; the last one carries the finish reason (see `Token`)."""
        session = self.new_session(prompt_ids, params)
        sampler = Sampler(params)
        try:
            with torch.inference_mode():
                yield from run_local(session, self._run_chain, sampler.sample, should_stop)
        finally:
            for shard in self.shards:
                shard.drop(session.session_id)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held, over every shard (each holds its own embedding and head)."""
        return sum(shard.nbytes for shard in self.shards)

    @property
    def file_bytes(self) -> int:
        """Size of the model file (the GGUF), or of the folder's safetensors."""
        files = [self.prepared.gguf_path] if self.prepared.gguf_path else self.prepared.weight_files
        return sum(f.stat().st_size for f in files)

    def token_logprobs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """log p(token_ids[i + 1] | token_ids[: i + 1]) for every i, in one prefill (float32)."""
        with torch.inference_mode():
            hidden = self.shards[0].embed(list(token_ids))
            for shard in self.shards:
                hidden = shard.forward("score", hidden, 0)
                shard.drop("score")
            logits = self.shards[-1].logits_all(hidden)[:-1]
        targets = torch.tensor(list(token_ids[1:]))
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]

    def measure_ms_per_layer(self, steps: int = 8) -> float:
        """Milliseconds per decoder layer per token, from a short decode on this machine."""
        with torch.inference_mode():
            return shard_ms_per_layer(max(self.shards, key=lambda s: s.num_span_layers), steps)


def shard_ms_per_layer(shard: ShardLike, steps: int = 8) -> float:
    """Time `steps` one-position decode steps through `shard` after an 8-position prefill;
    milliseconds per layer per step. Leaves no session behind."""
    session_id = "measure"
    shard.forward(session_id, shard.embed([1] * 8), 0)
    step = shard.embed([1])
    device = str(shard.device)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        shard.forward(session_id, step, 8 + i)
    synchronize(device)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    shard.drop(session_id)
    return elapsed_ms / steps / max(1, shard.num_span_layers)
