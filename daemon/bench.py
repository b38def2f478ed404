"""``meshllm bench``: how fast this machine, a running mesh, or a mesh against one node is.

Three modes, one module:

- ``--local``: the engine in this process, no daemon (``run_local_bench``).
- ``--api URL [--api URL ...]``: a running mesh through its HTTP API (``measure_api``). The
  first URL is the entry node; every URL's ``/v1/status`` gives that node's stage stats.
- ``--mesh N``: one run that starts a single-node reference and then an N-node local mesh
  per codec on this machine, measures each the same way, and compares them
  (``run_mesh_comparison``, ``compare``).

What is measured through the API:
- time to first token (TTFT) for a prompt of exactly ``prompt_tokens`` tokens (chat template
  included), the median of a few streamed runs;
- decode tokens/s from the arrival times of streamed tokens after the first one;
- per stage, from the nodes' ``stats`` deltas around each window: compute ms per decode
  step, compute ms of one prompt's prefill, and whole encoded message bytes per decode hop;
- per-hop ms, estimated as (ms per token - sum of the stages' compute ms) / hops per token;
- the greedy token ids of a few answers (``meshllm.token_ids`` of non-streamed answers),
  for the token agreement of a lossy codec with the single-node reference.

Pure parts (``stats_delta``, ``stage_measures``, ``agreement``, ``ratio``, ``compare``, the
formatters) take plain data and are tested on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

    from daemon.completions import ChatEngine

_FILLER = (
    "A mesh of ordinary devices shares one language model: each holds a span of layers, "
    "and hidden states travel from one to the next for every token. "
)


class BenchError(ValueError):
    """The benchmark cannot run as asked (e.g. the prompt does not fit the model)."""


# == --local: the engine in this process ========================================================


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
    weight_rss_bytes: int | None = None
    """Resident memory the load added (RSS after loading minus before)."""
    peak_rss_bytes: int | None = None
    """Peak resident memory of the whole benchmark process."""

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
    )


def _key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def format_bench(result: LocalBenchResult) -> str:
    rate = "-" if result.decode_tokens_per_s is None else f"{result.decode_tokens_per_s:.2f}"
    memory = f"{_mb(result.weight_bytes)} held, {_mb(result.weight_rss_bytes)} resident"
    if result.file_bytes:
        memory += f" ({_ratio_text(result.weight_rss_bytes, result.file_bytes)} the file's {_mb(result.file_bytes)})"
    return _key_value_table([
        ("model", f"{result.model_name} ({result.num_layers} layers, id {result.model_id[:12]})"),
        ("weights", f"{result.weights}: {memory}; peak RSS {_mb(result.peak_rss_bytes)}"),
        ("mode", result.mode),
        ("torch threads", str(result.threads)),
        ("load", f"{result.load_s:.2f} s"),
        ("time to first token", f"{result.ttft_ms:.1f} ms ({result.prompt_tokens}-token prompt)"),
        ("decode", f"{rate} tokens/s ({result.decode_tokens} tokens)"),
        ("per layer per token", f"{result.ms_per_layer:.3f} ms"),
    ])


def _mb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.0f} MB"


def _ratio_text(a: int | None, b: int | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


# == pure parts of the mesh benchmark =============================================================


@dataclass(frozen=True)
class StatsDelta:
    """What one node did between two ``/v1/status`` snapshots (its ``stats``)."""

    decode_steps: int
    decode_compute_ms: float
    """Total over the window."""
    prefill_steps: int
    prefill_compute_ms: float
    decode_hops_sent: int
    decode_bytes_sent: int
    prefill_bytes_sent: int


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> StatsDelta:
    """The difference of two ``stats`` objects of one node (daemon.mesh.StageStats.as_json)."""

    def total(stats: Mapping[str, Any], average: str, count: str) -> float:
        return float(stats.get(average) or 0.0) * int(stats.get(count) or 0)

    def diff(key: str) -> int:
        return int(after.get(key) or 0) - int(before.get(key) or 0)

    return StatsDelta(
        decode_steps=diff("decode_steps"),
        decode_compute_ms=total(after, "decode_compute_ms_avg", "decode_steps")
        - total(before, "decode_compute_ms_avg", "decode_steps"),
        prefill_steps=diff("prefill_steps"),
        prefill_compute_ms=float(after.get("prefill_compute_ms") or 0.0)
        - float(before.get("prefill_compute_ms") or 0.0),
        decode_hops_sent=diff("decode_hops_sent"),
        decode_bytes_sent=round(total(after, "decode_bytes_per_hop", "decode_hops_sent")
                                - total(before, "decode_bytes_per_hop", "decode_hops_sent")),
        prefill_bytes_sent=diff("prefill_bytes_sent"),
    )


@dataclass(frozen=True)
class StageMeasure:
    """One stage of the plan, as its node's stats saw the benchmark."""

    node_id: str
    name: str
    start_layer: int
    end_layer: int
    measured: bool
    """False when the node's API was not given: its numbers are unknown (None)."""
    decode_compute_ms: float | None
    """Compute per decode step (one position), mean over the decode window."""
    prefill_compute_ms: float | None
    """Compute for one bench prompt's prefill, mean over the TTFT runs."""
    decode_bytes_per_hop: float | None
    """Whole encoded messages this node sent per decode hop (None: it sent none)."""
    prefill_bytes_per_prompt: float | None
    """Bytes this node sent for one bench prompt's prefill."""


def hops_per_token(entry_id: str, stage_ids: Sequence[str]) -> int:
    """Transfers between different nodes in one ring: entry -> stages... -> entry."""
    ring = [entry_id, *stage_ids, entry_id]
    return sum(1 for a, b in zip(ring, ring[1:]) if a != b)


def stage_measures(
    plan_stages: Sequence[Mapping[str, Any]],
    names: Mapping[str, str],
    decode: Mapping[str, StatsDelta],
    prefill: Mapping[str, StatsDelta],
    prompts_prefilled: int,
) -> tuple[StageMeasure, ...]:
    """Per stage numbers from the stats deltas of the nodes whose API was given.

    ``decode`` and ``prefill`` map node ids to their deltas over the decode window and over
    the TTFT window (``prompts_prefilled`` prompts).
    """
    out = []
    for stage in plan_stages:
        nid = str(stage["node_id"])
        d, p = decode.get(nid), prefill.get(nid)
        out.append(StageMeasure(
            node_id=nid,
            name=names.get(nid, nid),
            start_layer=int(stage["start_layer"]),
            end_layer=int(stage["end_layer"]),
            measured=d is not None,
            decode_compute_ms=_per(d.decode_compute_ms, d.decode_steps) if d else None,
            prefill_compute_ms=_per(p.prefill_compute_ms, prompts_prefilled) if p else None,
            decode_bytes_per_hop=_per(d.decode_bytes_sent, d.decode_hops_sent) if d else None,
            prefill_bytes_per_prompt=_per(p.prefill_bytes_sent, prompts_prefilled) if p else None,
        ))
    return tuple(out)


def _per(total: float, count: int) -> float | None:
    return round(total / count, 3) if count > 0 else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is unknown or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


@dataclass(frozen=True)
class Agreement:
    """How far greedy answers match the reference's, token for token."""

    prompts: int
    reference_tokens: int
    prefix_tokens: int
    """Tokens identical to the reference before each answer's first divergence, summed."""
    prefix_fraction: float
    """prefix_tokens / reference_tokens (1.0: every answer identical)."""
    identical_answers: int
    all_identical: bool


def agreement(reference: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> Agreement:
    """Compare answers to the same prompts, in the same order."""
    if len(reference) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(reference)} reference answers")
    prefix = 0
    identical = 0
    for ref, ans in zip(reference, answers):
        same = 0
        for a, b in zip(ref, ans):
            if a != b:
                break
            same += 1
        prefix += same
        identical += list(ref) == list(ans)
    total = sum(len(ref) for ref in reference)
    return Agreement(
        prompts=len(reference),
        reference_tokens=total,
        prefix_tokens=prefix,
        prefix_fraction=round(prefix / total, 4) if total else 1.0,
        identical_answers=identical,
        all_identical=identical == len(reference),
    )


@dataclass(frozen=True)
class MeshMeasure:
    """One running mesh (or single node), measured through its API."""

    api_url: str
    model_name: str
    model_id: str
    num_layers: int
    codec: str
    nodes: int
    """Nodes in the plan."""
    stages: tuple[StageMeasure, ...]
    hops_per_token: int
    prompt_tokens: int
    ttft_ms: float
    """Median of the TTFT runs."""
    ttft_runs_ms: tuple[float, ...]
    decode_tokens: int
    """Tokens timed for the decode rate (each request's tokens after its first)."""
    decode_tokens_per_s: float | None
    ms_per_token: float | None
    stage_compute_ms_per_token: float | None
    """Sum of the stages' decode compute ms (None when a stage was not measured)."""
    non_compute_ms_per_token: float | None
    """ms per token not spent in stage compute: hops, entry work (embed, head, sample), HTTP."""
    per_hop_ms: float | None
    """non_compute_ms_per_token / hops_per_token: an upper bound, entry work included."""
    decode_bytes_per_hop: float | None
    """Whole encoded message bytes per decode hop, over every measured node."""
    answers: tuple[tuple[int, ...], ...]
    """Greedy token ids of the agreement prompts' answers."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        data["answers"] = [list(a) for a in self.answers]
        return data


def summarize(
    *,
    api_url: str,
    entry_status: Mapping[str, Any],
    names: Mapping[str, str],
    decode: Mapping[str, StatsDelta],
    prefill: Mapping[str, StatsDelta],
    prompt_tokens: int,
    ttft_runs_ms: Sequence[float],
    decode_tokens: int,
    decode_s: float,
    answers: Sequence[Sequence[int]],
) -> MeshMeasure:
    """Turn raw timings and stats deltas into a MeshMeasure (pure)."""
    plan = entry_status["plan"]
    model = entry_status["model"]
    stage_ids = [str(s["node_id"]) for s in plan["stages"]]
    stages = stage_measures(plan["stages"], names, decode, prefill, len(ttft_runs_ms))
    hops = hops_per_token(str(entry_status["self_id"]), stage_ids)
    rate = decode_tokens / decode_s if decode_tokens > 0 and decode_s > 0 else None
    ms_per_token = 1000 / rate if rate else None
    compute = [s.decode_compute_ms for s in stages]
    compute_sum = round(sum(c for c in compute if c is not None), 3) if None not in compute else None
    non_compute = (round(ms_per_token - compute_sum, 3)
                   if ms_per_token is not None and compute_sum is not None else None)
    hop_bytes = sum(d.decode_bytes_sent for d in decode.values())
    hop_count = sum(d.decode_hops_sent for d in decode.values())
    return MeshMeasure(
        api_url=api_url,
        model_name=str(model["name"]),
        model_id=str(model["id"]),
        num_layers=int(model["num_layers"]),
        codec=str(plan.get("codec") or entry_status.get("codec") or "f32"),
        nodes=len(set(stage_ids)),
        stages=stages,
        hops_per_token=hops,
        prompt_tokens=prompt_tokens,
        ttft_ms=round(statistics.median(ttft_runs_ms), 2),
        ttft_runs_ms=tuple(round(t, 2) for t in ttft_runs_ms),
        decode_tokens=decode_tokens,
        decode_tokens_per_s=None if rate is None else round(rate, 3),
        ms_per_token=None if ms_per_token is None else round(ms_per_token, 3),
        stage_compute_ms_per_token=compute_sum,
        non_compute_ms_per_token=non_compute,
        per_hop_ms=round(non_compute / hops, 3) if non_compute is not None and hops else None,
        decode_bytes_per_hop=_per(hop_bytes, hop_count),
        answers=tuple(tuple(a) for a in answers),
    )


@dataclass(frozen=True)
class CodecRun:
    """One codec's mesh beside the single-node reference of the same run."""

    codec: str
    measure: MeshMeasure
    reference: MeshMeasure
    """The single node, measured in turns with this mesh."""
    decode_ratio: float | None
    """Decode tokens/s, mesh / single (target >= 0.95)."""
    ttft_ratio: float | None
    """TTFT of the bench prompt, mesh / single (target <= 1.3)."""
    per_hop_ms_net: float | None
    """(mesh non-compute ms - single non-compute ms) / hops: entry work cancels out."""
    agreement: Agreement

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "decode_ratio": self.decode_ratio,
            "ttft_ratio": self.ttft_ratio,
            "per_hop_ms_net": self.per_hop_ms_net,
            "agreement": asdict(self.agreement),
            "measure": self.measure.to_json(),
            "reference": {k: v for k, v in self.reference.to_json().items() if k != "answers"},
        }


@dataclass(frozen=True)
class Comparison:
    """``meshllm bench --mesh N``: a single node and an N-node mesh per codec, one run."""

    nodes: int
    cores: int
    single_threads: int
    node_threads: int
    single: MeshMeasure
    """The single node over every turn of the run (each codec's ``reference`` pooled)."""
    runs: tuple[CodecRun, ...]

    def to_json(self) -> dict[str, Any]:
        s = self.single
        return {
            "mode": "mesh",
            "model": {"name": s.model_name, "id": s.model_id, "num_layers": s.num_layers},
            "nodes": self.nodes,
            "cores": self.cores,
            "single_threads": self.single_threads,
            "node_threads": self.node_threads,
            "prompt_tokens": s.prompt_tokens,
            "single": s.to_json(),
            "codecs": [run.to_json() for run in self.runs],
        }


def compare(single: MeshMeasure, meshes: Sequence[MeshMeasure], *, nodes: int, cores: int,
            single_threads: int, node_threads: int,
            references: Sequence[MeshMeasure] | None = None) -> Comparison:
    """Ratios, net per-hop ms and token agreement of each mesh against the single node.

    ``references[i]``, when given, is the single node measured in turns with ``meshes[i]``:
    ratios and per-hop ms use it. Token agreement always uses ``single.answers``.
    """
    refs = list(references) if references is not None else [single] * len(meshes)
    if len(refs) != len(meshes):
        raise ValueError("one reference per mesh")
    runs = []
    for m, ref in zip(meshes, refs):
        net = None
        if m.non_compute_ms_per_token is not None and ref.non_compute_ms_per_token is not None and m.hops_per_token:
            net = round((m.non_compute_ms_per_token - ref.non_compute_ms_per_token) / m.hops_per_token, 3)
        runs.append(CodecRun(
            codec=m.codec,
            measure=m,
            reference=ref,
            decode_ratio=ratio(m.decode_tokens_per_s, ref.decode_tokens_per_s),
            ttft_ratio=ratio(m.ttft_ms, ref.ttft_ms),
            per_hop_ms_net=net,
            agreement=agreement(single.answers, m.answers),
        ))
    return Comparison(nodes, cores, single_threads, node_threads, single, tuple(runs))


# -- tables ------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def _grid(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


def _stage_rows(label: str, m: MeshMeasure) -> list[tuple[str, ...]]:
    return [(label, s.name, f"[{s.start_layer}, {s.end_layer})", _num(s.decode_compute_ms, 2),
             _num(s.prefill_compute_ms, 1), _num(s.decode_bytes_per_hop, 0))
            for s in m.stages]


_STAGE_HEADER = ("", "NODE", "SPAN", "DECODE MS/STEP", "PREFILL MS", "BYTES/HOP")


def format_measure(m: MeshMeasure) -> str:
    """``meshllm bench --api``: one mesh."""
    head = _key_value_table([
        ("model", f"{m.model_name} ({m.num_layers} layers, id {m.model_id[:12]})"),
        ("mesh", f"{m.nodes} node(s), codec {m.codec}, {m.hops_per_token} hop(s) per token ({m.api_url})"),
        ("time to first token", f"{_num(m.ttft_ms)} ms ({m.prompt_tokens}-token prompt, median of "
                                f"{len(m.ttft_runs_ms)})"),
        ("decode", f"{_num(m.decode_tokens_per_s, 2)} tokens/s ({m.decode_tokens} tokens), "
                   f"{_num(m.ms_per_token, 2)} ms per token"),
        ("stage compute", f"{_num(m.stage_compute_ms_per_token, 2)} ms per token"),
        ("other", f"{_num(m.non_compute_ms_per_token, 2)} ms per token (hops, entry work); "
                  f"{_num(m.per_hop_ms, 2)} ms per hop"),
        ("bytes per decode hop", _num(m.decode_bytes_per_hop, 0)),
    ])
    stages = _grid([_STAGE_HEADER[1:], *[row[1:] for row in _stage_rows("", m)]])
    return head + "\n\nper stage:\n" + "\n".join("  " + line for line in stages)


def format_comparison(c: Comparison) -> str:
    """``meshllm bench --mesh N``: the single node beside each codec's mesh, then per stage."""
    s = c.single
    cols = [s] + [r.measure for r in c.runs]
    header = ("", "single") + tuple(f"mesh {r.codec}" for r in c.runs)
    agreements = [r.agreement for r in c.runs]
    rows: list[tuple[str, ...]] = [
        header,
        ("decode tokens/s", *[_num(m.decode_tokens_per_s, 2) for m in cols]),
        ("  single, same turns", "", *[_num(r.reference.decode_tokens_per_s, 2) for r in c.runs]),
        ("  mesh / single", "1.00", *[_num(r.decode_ratio, 2) for r in c.runs]),
        (f"TTFT {s.prompt_tokens} ms", *[_num(m.ttft_ms, 0) for m in cols]),
        ("  single, same turns", "", *[_num(r.reference.ttft_ms, 0) for r in c.runs]),
        ("  mesh / single", "1.00", *[_num(r.ttft_ratio, 2) for r in c.runs]),
        ("ms per token", *[_num(m.ms_per_token, 2) for m in cols]),
        ("  stage compute", *[_num(m.stage_compute_ms_per_token, 2) for m in cols]),
        ("  other", *[_num(m.non_compute_ms_per_token, 2) for m in cols]),
        ("hops per token", *[str(m.hops_per_token) for m in cols]),
        ("per-hop ms (net)", "-", *[_num(r.per_hop_ms_net, 2) for r in c.runs]),
        ("bytes per decode hop", *[_num(m.decode_bytes_per_hop, 0) for m in cols]),
        ("token agreement", "1.00", *[_num(a.prefix_fraction, 2) for a in agreements]),
        ("identical answers", f"{len(s.answers)}/{len(s.answers)}",
         *[f"{a.identical_answers}/{a.prompts}" for a in agreements]),
    ]
    title = (f"{s.model_name} ({s.num_layers} layers): one node with {c.single_threads} thread(s) vs "
             f"a {c.nodes}-node local mesh with {c.node_threads} thread(s) per node ({c.cores} cores)")
    stage_rows = [_STAGE_HEADER, *_stage_rows("single", s)]
    for r in c.runs:
        stage_rows += _stage_rows(f"mesh {r.codec}", r.measure)
    notes = ("mesh / single: against the single node measured in turns with that mesh (same turns); "
             "per-hop ms (net): (mesh - single) non-compute ms per token / hops;\ntoken agreement: "
             "share of the single node's greedy tokens matched before each answer's first divergence")
    return "\n".join([title, "", *_grid(rows), "", "per stage:", *_grid(stage_rows), "", notes])


# == measuring a running mesh through its API ======================================================


DECODE_PROMPTS: tuple[str, ...] = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail, part by part, how a bicycle works.",
    "Describe step by step how to bake a loaf of bread at home, with every detail.",
    "Write a long letter to a friend about a trip through the mountains.",
)
"""Prompts whose answers run long; decode is timed over them until enough tokens came."""

AGREEMENT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about laptops.",
    "Explain what a KV cache is in one sentence.",
    "Give three tips for learning a new language.",
    "Tell me a fact about the moon.",
)

_PROMPT_WORDS = (
    "the quick brown fox jumps over the lazy dog and a mesh of laptops and phones runs one "
    "language model together while layers are split into spans"
).split()
_PROMPT_LEAD = "Read these words, then write a long story that uses all of them:"

REQUEST_TIMEOUT_S = 900.0


def filler_messages(words: int, last_word: str | None = None, *, lead: bool = True) -> list[dict[str, str]]:
    """A user message of ``words`` filler words (the last one replaced when given), after
    a line asking for a long story unless ``lead`` is False (for very short prompts)."""
    chosen = [_PROMPT_WORDS[i % len(_PROMPT_WORDS)] for i in range(words)]
    if last_word is not None and chosen:
        chosen[-1] = last_word
    return [{"role": "user", "content": " ".join([_PROMPT_LEAD, *chosen] if lead else chosen)}]


class ApiBench:
    """Talks to the nodes of a running mesh; ``urls[0]`` is the entry node."""

    def __init__(self, session: aiohttp.ClientSession, urls: Sequence[str],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.session = session
        self.urls = list(urls)
        self.clock = clock

    async def status(self, url: str) -> dict[str, Any]:
        from daemon.client import get_status

        return await get_status(url)

    async def statuses(self) -> list[dict[str, Any]]:
        return [await self.status(url) for url in self.urls]

    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """One greedy non-streamed answer (with ``usage`` and ``meshllm.token_ids``)."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        async with self.session.post(f"{self.urls[0]}/v1/chat/completions", json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                raise BenchError(f"the mesh refused a request: {_error_text(data, r.status)}")
            return data  # type: ignore[no-any-return]

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return int((await self.complete(messages, 1))["usage"]["prompt_tokens"])

    async def stream(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float | None, float, int]:
        """One greedy streamed answer: (sent at, first token at, last event at, tokens)."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = self.clock()
        first: float | None = None
        last = sent
        tokens = 0
        async with self.session.post(f"{self.urls[0]}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise BenchError(f"the mesh refused a request: {_error_text(await r.json(content_type=None), r.status)}")
            async for raw in r.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = self.clock()
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise BenchError(f"the mesh failed an answer: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") or choice.get("finish_reason"):
                        if first is None:
                            first = now
                        last = now
        return sent, first, last, tokens

    async def find_prompt(self, n_tokens: int, progress: Callable[[str], None]) -> list[dict[str, str]]:
        """Messages whose chat prompt is ``n_tokens`` tokens, found by asking the mesh (usage)."""
        lead, base_words = True, 0
        base = await self.prompt_tokens(filler_messages(0))
        if base > n_tokens:
            lead, base_words = False, 1
            base = await self.prompt_tokens(filler_messages(1, lead=False))
            if base > n_tokens:
                raise BenchError(f"the shortest chat prompt is {base} tokens; ask for at least that many")

        def messages(words: int, last_word: str | None = None) -> list[dict[str, str]]:
            return filler_messages(words, last_word, lead=lead)

        probe = base_words + 16
        rate = max((await self.prompt_tokens(messages(probe)) - base) / 16, 0.25)
        words = base_words + max(0, round((n_tokens - base) / rate))
        below, above = base_words, None  # most words known to fit, fewest known not to
        for _ in range(16):
            count = await self.prompt_tokens(messages(words))
            if count == n_tokens:
                return messages(words)
            if count < n_tokens:
                below = max(below, words)
            else:
                above = words if above is None else min(above, words)
            if above is not None and above - below <= 1:
                break
            step = max(1, round(abs(n_tokens - count) / rate))
            words = words + step if count < n_tokens else words - step
            words = max(below + 1, min(words, above - 1)) if above is not None else max(below + 1, words)
        for alternative in sorted(set(_PROMPT_WORDS), key=len)[:6]:  # the next word jumps over: try others
            candidate = messages(below + 1, alternative)
            if await self.prompt_tokens(candidate) == n_tokens:
                return candidate
        progress(f"no prompt of exactly {n_tokens} tokens; using the longest one below it")
        return messages(below)


def _error_text(data: object, status: int) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message"))
    return f"HTTP {status}"


def _names(statuses: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for st in statuses:
        for node in st.get("nodes", []):
            names.setdefault(str(node["id"]), str(node.get("name") or node["id"]))
    return names


def _deltas(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> dict[str, StatsDelta]:
    return {str(a["self_id"]): stats_delta(b.get("stats") or {}, a.get("stats") or {})
            for b, a in zip(before, after)}


def _add(into: dict[str, StatsDelta], more: Mapping[str, StatsDelta]) -> None:
    for nid, d in more.items():
        old = into.get(nid)
        into[nid] = d if old is None else StatsDelta(*(x + y for x, y in zip(astuple(old), astuple(d))))


class Target:
    """One mesh (or single node) being measured: timings and stats deltas of every window."""

    def __init__(self, bench: ApiBench) -> None:
        self.bench = bench
        self.entry_status: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        self.prompt_messages: list[dict[str, str]] = []
        self.prompt_tokens = 0
        self.ttfts_ms: list[float] = []
        self.prefill: dict[str, StatsDelta] = {}
        self.decode: dict[str, StatsDelta] = {}
        self.decode_tokens = 0
        self.decode_s = 0.0
        self.answers: list[list[int]] = []

    async def prepare(self, prompt_tokens: int, prompt_messages: list[dict[str, str]] | None,
                      progress: Callable[[str], None]) -> None:
        """Check the mesh is ready, warm it up, and find (or check) the bench prompt."""
        urls = self.bench.urls
        statuses = await self.bench.statuses()
        entry = statuses[0]
        plan = entry.get("plan")
        if entry.get("model") is None or plan is None or plan.get("state") != "active":
            raise BenchError(f"the mesh at {urls[0]} has no active plan yet; try again when it is ready")
        for url, st in zip(urls[1:], statuses[1:]):
            if st.get("plan") != plan:
                raise BenchError(f"{url} does not share the entry node's active plan")
        if "stats" not in entry:
            raise BenchError(f"the daemon at {urls[0]} reports no stage stats (an older version?)")
        self.entry_status, self.names = entry, _names(statuses)
        progress("warming up")
        await self.bench.complete([{"role": "user", "content": AGREEMENT_PROMPTS[0]}], 4)
        if prompt_messages is None:
            progress(f"finding a prompt of {prompt_tokens} tokens")
            prompt_messages = await self.bench.find_prompt(prompt_tokens, progress)
        self.prompt_messages = prompt_messages
        self.prompt_tokens = await self.bench.prompt_tokens(prompt_messages)  # also warms prefill

    async def warm(self) -> None:
        """One short answer and one prefill of the bench prompt: a node that sat idle is slow
        on its first request (caches, thread pools)."""
        await self.bench.complete([{"role": "user", "content": AGREEMENT_PROMPTS[0]}], 4)
        await self.bench.prompt_tokens(self.prompt_messages)

    def fork(self) -> "Target":
        """The same mesh and prompt, no timings yet."""
        other = Target(self.bench)
        other.entry_status, other.names = self.entry_status, self.names
        other.prompt_messages, other.prompt_tokens = self.prompt_messages, self.prompt_tokens
        other.answers = self.answers
        return other

    def absorb(self, other: "Target") -> None:
        """Add another fork's timings and stats to this one's."""
        self.ttfts_ms += other.ttfts_ms
        _add(self.prefill, other.prefill)
        _add(self.decode, other.decode)
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s

    async def ttft_once(self) -> None:
        before = await self.bench.statuses()
        sent, first, _last, _n = await self.bench.stream(self.prompt_messages, 1)
        if first is None:
            raise BenchError("the mesh answered with no token")
        self.ttfts_ms.append((first - sent) * 1000)
        _add(self.prefill, _deltas(before, await self.bench.statuses()))

    async def decode_once(self, text: str, new_tokens: int) -> int:
        """One greedy answer of up to ``new_tokens`` + 1 tokens; returns the tokens timed."""
        before = await self.bench.statuses()
        _sent, first, last, n = await self.bench.stream([{"role": "user", "content": text}], new_tokens + 1)
        _add(self.decode, _deltas(before, await self.bench.statuses()))
        if first is None or n < 2:
            return 0
        self.decode_tokens += n - 1
        self.decode_s += last - first
        return n - 1

    async def collect_answers(self, prompts: Sequence[str], tokens: int) -> None:
        self.answers = []
        for text in prompts:
            data = await self.bench.complete([{"role": "user", "content": text}], tokens)
            ids = (data.get("meshllm") or {}).get("token_ids")
            if ids is None:
                raise BenchError("the daemon does not report token ids (meshllm.token_ids)")
            self.answers.append([int(i) for i in ids])

    def result(self) -> MeshMeasure:
        if not self.ttfts_ms:
            raise BenchError("nothing was measured")
        return summarize(
            api_url=self.bench.urls[0], entry_status=self.entry_status, names=self.names,
            decode=self.decode, prefill=self.prefill, prompt_tokens=self.prompt_tokens,
            ttft_runs_ms=self.ttfts_ms, decode_tokens=self.decode_tokens, decode_s=self.decode_s,
            answers=self.answers,
        )


async def measure_api(
    urls: Sequence[str],
    *,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    ttft_runs: int = 3,
    agreement_tokens: int = 32,
    progress: Callable[[str], None] = lambda message: None,
    clock: Callable[[], float] = time.perf_counter,
) -> MeshMeasure:
    """Measure the mesh behind ``urls`` (entry node first).

    Raises BenchError, or DaemonUnreachable / DaemonError (daemon.client) for a URL that
    does not answer.
    """
    async with _session() as session:
        try:
            target = Target(ApiBench(session, urls, clock))
            await target.prepare(prompt_tokens, None, progress)
            progress(f"time to first token: {ttft_runs} run(s)")
            for _ in range(ttft_runs):
                await target.ttft_once()
            progress(f"decode: {decode_tokens} tokens")
            for text in DECODE_PROMPTS * 4:
                if target.decode_tokens >= decode_tokens:
                    break
                await target.decode_once(text, decode_tokens - target.decode_tokens)
            progress(f"agreement answers: {len(AGREEMENT_PROMPTS)} x {agreement_tokens} tokens")
            await target.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
        except (_client_errors(), TimeoutError) as error:
            raise BenchError(f"the mesh stopped answering: {error or type(error).__name__}") from None
    return target.result()


def _session() -> aiohttp.ClientSession:
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=10.0))


def _client_errors() -> type[Exception]:
    import aiohttp

    return aiohttp.ClientError


async def interleave(targets: Sequence[Target], *, ttft_runs: int, decode_tokens: int,
                     rounds: int = 4, progress: Callable[[str], None] = lambda message: None) -> None:
    """Measure the targets in turns (ABAB, then BABA), so that a machine whose load drifts
    slows each of them alike: TTFT runs first, then ``rounds`` decode answers each."""
    progress(f"time to first token: {ttft_runs} run(s) each, in turns")
    for r in range(ttft_runs):
        for target in targets if r % 2 == 0 else list(reversed(targets)):
            await target.ttft_once()
    progress(f"decode: {decode_tokens} tokens each, in {rounds} turns")
    per_round = -(-decode_tokens // rounds)
    for r in range(rounds):
        text = DECODE_PROMPTS[r % len(DECODE_PROMPTS)]
        for target in targets if r % 2 == 0 else list(reversed(targets)):
            await target.decode_once(text, per_round)


# == --mesh N: single node vs local meshes, one run ==============================================


CODECS = ("f32", "f16", "bf16", "int8")


def run_mesh_comparison(
    nodes: int,
    *,
    codecs: Sequence[str] = CODECS,
    cores: int | None = None,
    model: str | None = None,
    cache_dir: str | None = None,
    weights: str | None = None,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    ttft_runs: int = 3,
    agreement_tokens: int = 32,
    start_timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda message: None,
) -> Comparison:
    """A one-node reference (all cores) and, per codec, a ``nodes``-node local mesh (cores //
    nodes threads each, at least 1), all on this machine and measured through their APIs.

    The reference runs for the whole comparison; each codec's mesh runs while it is measured,
    in turns with the reference (see `interleave`), and is stopped before the next one starts.
    Only the node being asked computes at any time; the others wait idle.
    """
    if nodes < 2:
        raise BenchError("--mesh needs at least 2 nodes (the reference is the single node)")
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs:
        raise BenchError(f"codecs must be among {', '.join(CODECS)}, not {', '.join(unknown) or 'none'}")
    cores = cores or os.cpu_count() or 1
    node_threads = max(1, cores // nodes)
    setup = _LocalSetup(model, cache_dir, f"bench-{uuid.uuid4().hex[:8]}", start_timeout_s, weights)
    single, references, meshes = asyncio.run(_compare(
        setup, nodes, codecs, cores, node_threads, prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens, ttft_runs=ttft_runs, agreement_tokens=agreement_tokens,
        progress=progress,
    ))
    return compare(single, meshes, references=references, nodes=nodes, cores=cores,
                   single_threads=cores, node_threads=node_threads)


@dataclass(frozen=True)
class _LocalSetup:
    model: str | None
    cache_dir: str | None
    mesh_name: str
    start_timeout_s: float
    weights: str | None = None

    async def start(self, count: int, threads: int, codec: str | None, label: str) -> Any:
        from daemon.launcher import LocalMesh

        extra = ["--cache-dir", self.cache_dir] if self.cache_dir else []
        extra += ["--weights", self.weights] if self.weights else []
        mesh = LocalMesh(count, model=self.model, codec=codec, threads=threads,
                         extra_args=[*extra, "--mesh-name", f"{self.mesh_name}-{label}"])
        await asyncio.to_thread(mesh.start)
        try:
            await asyncio.to_thread(_wait_for_stages, mesh, count, self.start_timeout_s)
        except BaseException:
            await asyncio.to_thread(mesh.stop)
            raise
        return mesh


async def _compare(setup: _LocalSetup, nodes: int, codecs: Sequence[str], cores: int, node_threads: int, *,
                   prompt_tokens: int, decode_tokens: int, ttft_runs: int, agreement_tokens: int,
                   progress: Callable[[str], None]) -> tuple[MeshMeasure, list[MeshMeasure], list[MeshMeasure]]:
    progress(f"single: starting 1 node, {cores} thread(s)")
    reference = await setup.start(1, cores, None, "single")
    try:
        async with _session() as session:
            try:
                single = Target(ApiBench(session, [reference.nodes[0].url]))
                await single.prepare(prompt_tokens, None, lambda m: progress(f"single: {m}"))
                progress(f"single: agreement answers: {len(AGREEMENT_PROMPTS)} x {agreement_tokens} tokens")
                await single.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
                pooled = single.fork()
                references, meshes = [], []
                for codec in codecs:
                    label = f"mesh {codec}"
                    progress(f"{label}: starting {nodes} nodes, {node_threads} thread(s) each")
                    mesh = await setup.start(nodes, node_threads, codec, codec)
                    try:
                        target = Target(ApiBench(session, [n.url for n in mesh.nodes]))
                        await target.prepare(prompt_tokens, single.prompt_messages,
                                             lambda m, label=label: progress(f"{label}: {m}"))
                        paired = single.fork()
                        await paired.warm()
                        await interleave([paired, target], ttft_runs=ttft_runs, decode_tokens=decode_tokens,
                                         progress=lambda m, label=label: progress(f"{label} and single: {m}"))
                        progress(f"{label}: agreement answers")
                        await target.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
                    finally:
                        await asyncio.to_thread(mesh.stop)
                    pooled.absorb(paired)
                    references.append(paired.result())
                    meshes.append(target.result())
                    progress(f"{label}: {_num(meshes[-1].decode_tokens_per_s, 2)} tokens/s (single "
                             f"{_num(references[-1].decode_tokens_per_s, 2)}), TTFT "
                             f"{_num(meshes[-1].ttft_ms, 0)} ms (single {_num(references[-1].ttft_ms, 0)})")
            except (_client_errors(), TimeoutError) as error:
                raise BenchError(f"a mesh stopped answering: {error or type(error).__name__}") from None
    finally:
        await asyncio.to_thread(reference.stop)
    return pooled.result(), references, meshes


def _wait_for_stages(mesh: Any, count: int, timeout_s: float) -> None:
    """Until every node agrees on one active plan with ``count`` stages."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            plan = mesh.wait_ready(max(1.0, deadline - time.monotonic()))
        except (TimeoutError, RuntimeError) as error:
            raise BenchError(f"the local mesh did not form: {str(error)[:2000]}") from None
        if len(plan["stages"]) == count:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the local mesh planned {len(plan['stages'])} stage(s), not {count}")
        time.sleep(0.5)
