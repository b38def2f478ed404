"""``meshllm bench --local``: single-node speed of the engine on this machine.

Measures time to first token for a long prompt (prefill), decode tokens per second after it,
and the engine's own ms per layer per token. Runs in-process, without a daemon. The mesh
benchmark (``--api URL``) will report the same fields for a running mesh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from meshllm.model.sampling import SamplingParams

from daemon.completions import ChatEngine

_FILLER = (
    "A mesh of ordinary devices shares one language model: each holds a span of layers, "
    "and hidden states travel from one to the next for every token. "
)


class BenchError(ValueError):
    """The benchmark cannot run as asked (e.g. the prompt does not fit the model)."""


@dataclass(frozen=True)
class LocalBenchResult:
    mode: str
    model_name: str
    model_id: str
    num_layers: int
    threads: int
    load_s: float
    """Time to load the model (includes a one-time GGUF conversion on first use)."""
    prompt_tokens: int
    ttft_ms: float
    """From the call to the first token: prefill of the prompt plus one sample."""
    decode_tokens: int
    """Tokens timed for the decode rate (after the first one)."""
    decode_tokens_per_s: float | None
    ms_per_layer: float
    """Engine's measure: one decode step, per decoder layer."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bench_prompt_ids(engine: ChatEngine, prompt_tokens: int) -> list[int]:
    """The first ``prompt_tokens`` tokens of a long chat prompt."""
    repeats = 1
    while True:
        ids = engine.chat_prompt([{"role": "user", "content": _FILLER * repeats}])
        if len(ids) >= prompt_tokens:
            return ids[:prompt_tokens]
        repeats *= 2


def run_local_bench(
    engine: ChatEngine,
    *,
    threads: int,
    load_s: float,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    clock: Callable[[], float] = time.perf_counter,
) -> LocalBenchResult:
    """Warm up, then time one greedy generation of ``decode_tokens`` + 1 tokens."""
    info = engine.info
    if prompt_tokens < 1 or decode_tokens < 1:
        raise BenchError("prompt and decode token counts must be at least 1")
    if prompt_tokens + decode_tokens + 1 > info.max_positions:
        raise BenchError(
            f"{prompt_tokens} prompt + {decode_tokens + 1} new tokens do not fit the model's "
            f"{info.max_positions} positions"
        )
    prompt = bench_prompt_ids(engine, prompt_tokens)
    for _ in engine.generate(prompt[:8], SamplingParams(max_tokens=2)):  # warm-up
        pass

    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1)
    start = clock()
    first_at: float | None = None
    last_at = start
    produced = 0
    for token in engine.generate(prompt, params):
        now = clock()
        if token.id < 0:
            break
        produced += 1
        if first_at is None:
            first_at = now
        last_at = now
    if first_at is None:
        raise BenchError("the engine produced no token")
    timed = produced - 1
    rate = timed / (last_at - first_at) if timed > 0 and last_at > first_at else None
    return LocalBenchResult(
        mode="local",
        model_name=info.name,
        model_id=info.model_id,
        num_layers=info.num_layers,
        threads=threads,
        load_s=round(load_s, 3),
        prompt_tokens=len(prompt),
        ttft_ms=round((first_at - start) * 1000, 2),
        decode_tokens=timed,
        decode_tokens_per_s=None if rate is None else round(rate, 2),
        ms_per_layer=round(engine.measure_ms_per_layer(), 4),
    )


def format_bench(result: LocalBenchResult) -> str:
    rate = "-" if result.decode_tokens_per_s is None else f"{result.decode_tokens_per_s:.2f}"
    rows = [
        ("model", f"{result.model_name} ({result.num_layers} layers, id {result.model_id[:12]})"),
        ("mode", result.mode),
        ("torch threads", str(result.threads)),
        ("load", f"{result.load_s:.2f} s"),
        ("time to first token", f"{result.ttft_ms:.1f} ms ({result.prompt_tokens}-token prompt)"),
        ("decode", f"{rate} tokens/s ({result.decode_tokens} tokens)"),
        ("per layer per token", f"{result.ms_per_layer:.3f} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
