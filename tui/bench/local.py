"""``meshllm bench --local``: the engine (every layer) in this process, no daemon."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tui.bench.report import BenchError, key_value_table, mb, ratio_text

if TYPE_CHECKING:
    from meshllm.model.engine import Engine

_FILLER = (
    "A mesh of ordinary devices shares one language model: each holds a span of layers, "
    "and hidden states travel from one to the next for every token. "
)

_PAGE = os.sysconf("SC_PAGE_SIZE")


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
    weights: str = "f32"
    """Weight format in memory."""
    weight_bytes: int = 0
    """Bytes of the weights the engine holds (its own count)."""
    file_bytes: int = 0
    """Size of the model file (the GGUF) on disk."""
    kernel: str = ""
    """What computed the layers (meshllm's kernels and their instruction set, or torch's)."""
    weight_rss_bytes: int | None = None
    """Resident memory the load added (RSS after loading minus before)."""
    peak_rss_bytes: int | None = None
    """Peak resident memory of the whole benchmark process."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bench_prompt_ids(engine: Engine, prompt_tokens: int) -> list[int]:
    """The first ``prompt_tokens`` tokens of a long chat prompt."""
    repeats = 1
    while True:
        ids = engine.chat_prompt([{"role": "user", "content": _FILLER * repeats}])
        if len(ids) >= prompt_tokens:
            return ids[:prompt_tokens]
        repeats *= 2


def run_local_bench(
    engine: Engine,
    *,
    threads: int,
    load_s: float,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    clock: Callable[[], float] = time.perf_counter,
) -> LocalBenchResult:
    """Warm up, then time one greedy generation of ``decode_tokens`` + 1 tokens."""
    from meshllm.model.sampling import SamplingParams  # torch: only the local benchmark needs it

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
        weights=str(getattr(info, "weights", "f32")),
        weight_bytes=int(getattr(engine, "weight_bytes", 0)),
        file_bytes=int(getattr(engine, "file_bytes", 0)),
        kernel=str(getattr(info, "kernel", "")),
    )



def format_bench(result: LocalBenchResult) -> str:
    rate = "-" if result.decode_tokens_per_s is None else f"{result.decode_tokens_per_s:.2f}"
    memory = f"{mb(result.weight_bytes)} held, {mb(result.weight_rss_bytes)} resident"
    if result.file_bytes:
        memory += f" ({ratio_text(result.weight_rss_bytes, result.file_bytes)} the file's {mb(result.file_bytes)})"
    return key_value_table([
        ("model", f"{result.model_name} ({result.num_layers} layers, id {result.model_id[:12]})"),
        ("weights", f"{result.weights}: {memory}; peak RSS {mb(result.peak_rss_bytes)}"),
        *([("kernel", result.kernel)] if result.kernel else []),
        ("mode", result.mode),
        ("torch threads", str(result.threads)),
        ("load", f"{result.load_s:.2f} s"),
        ("time to first token", f"{result.ttft_ms:.1f} ms ({result.prompt_tokens}-token prompt)"),
        ("decode", f"{rate} tokens/s ({result.decode_tokens} tokens)"),
        ("per layer per token", f"{result.ms_per_layer:.3f} ms"),
    ])


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
