"""What every ``meshllm bench`` mode shares: its error, its tables, and the pure arithmetic of
measuring a mesh through its API (stats deltas, per-stage numbers, hops, token agreement).

Everything here takes plain data (``/v1/status`` snapshots, timings) and is tested on its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


class BenchError(ValueError):
    """The benchmark cannot run as asked (e.g. the prompt does not fit the model)."""


# == tables ========================================================================================


def key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)



def mb(n: int | None) -> str:
    return "-" if not n else f"{n / 1e6:.0f} MB"


def ratio_text(a: int | None, b: int | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"



def num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def grid(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]



# == a mesh through its API: pure parts ============================================================


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
    """The difference of two ``stats`` objects of one node (daemon.node.driver.StageStats.as_json)."""

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
            decode_compute_ms=per(d.decode_compute_ms, d.decode_steps) if d else None,
            prefill_compute_ms=per(p.prefill_compute_ms, prompts_prefilled) if p else None,
            decode_bytes_per_hop=per(d.decode_bytes_sent, d.decode_hops_sent) if d else None,
            prefill_bytes_per_prompt=per(p.prefill_bytes_sent, prompts_prefilled) if p else None,
        ))
    return tuple(out)


def per(total: float, count: int) -> float | None:
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
        decode_bytes_per_hop=per(hop_bytes, hop_count),
        answers=tuple(tuple(a) for a in answers),
    )




def stage_rows(label: str, m: MeshMeasure) -> list[tuple[str, ...]]:
    return [(label, s.name, f"[{s.start_layer}, {s.end_layer})", num(s.decode_compute_ms, 2),
             num(s.prefill_compute_ms, 1), num(s.decode_bytes_per_hop, 0))
            for s in m.stages]


STAGE_HEADER = ("", "NODE", "SPAN", "DECODE MS/STEP", "PREFILL MS", "BYTES/HOP")


def format_measure(m: MeshMeasure) -> str:
    """``meshllm bench --api``: one mesh."""
    head = key_value_table([
        ("model", f"{m.model_name} ({m.num_layers} layers, id {m.model_id[:12]})"),
        ("mesh", f"{m.nodes} node(s), codec {m.codec}, {m.hops_per_token} hop(s) per token ({m.api_url})"),
        ("time to first token", f"{num(m.ttft_ms)} ms ({m.prompt_tokens}-token prompt, median of "
                                f"{len(m.ttft_runs_ms)})"),
        ("decode", f"{num(m.decode_tokens_per_s, 2)} tokens/s ({m.decode_tokens} tokens), "
                   f"{num(m.ms_per_token, 2)} ms per token"),
        ("stage compute", f"{num(m.stage_compute_ms_per_token, 2)} ms per token"),
        ("other", f"{num(m.non_compute_ms_per_token, 2)} ms per token (hops, entry work); "
                  f"{num(m.per_hop_ms, 2)} ms per hop"),
        ("bytes per decode hop", num(m.decode_bytes_per_hop, 0)),
    ])
    stages = grid([STAGE_HEADER[1:], *[row[1:] for row in stage_rows("", m)]])
    return head + "\n\nper stage:\n" + "\n".join("  " + line for line in stages)

