"""``meshllm bench --local --weights a,b,...`` and ``meshllm bench --quality``: weight formats side by side.

Each format's speed and memory are measured in a fresh process (``meshllm bench --local
--json``), so one format's memory never counts against the next; rounds alternate the
formats, and the medians are reported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tui.bench.report import BenchError


def compare_formats(formats: Sequence[str], rounds: int, passed: Sequence[str],
                    progress: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Per format, the median of `rounds` runs of ``bench --local --json`` (alternating formats)."""
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in formats}
    for r in range(rounds):
        for fmt in formats:
            progress(f"round {r + 1}/{rounds}: {fmt}")
            cmd = [sys.executable, "-m", "daemon.cli", "bench", "--local", "--json", "--weights", fmt, *passed]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise BenchError(f"{fmt}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
            runs[fmt].append(json.loads(out.stdout))
    return [_median_run(fmt, results) for fmt, results in runs.items()]


def _median_run(fmt: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(results[-1])
    out["asked"] = fmt
    out["rounds"] = len(results)
    for key in ("decode_tokens_per_s", "ttft_ms", "weight_rss_bytes", "peak_rss_bytes", "load_s"):
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_formats(runs: Sequence[dict[str, Any]]) -> str:
    first = runs[0]
    lines = [f"model: {first['model_name']} ({first['num_layers']} layers), file {first['file_bytes'] / 1e6:.1f} MB, "
             f"{first['threads']} thread(s), {first['prompt_tokens']}-token prompt, "
             f"median of {first['rounds']} round(s)", ""]
    rows = [("weights", "decode tok/s", "TTFT ms", "held MB", "RSS MB", "RSS/file", "peak RSS MB")]
    for r in runs:
        label = r["weights"] if r["asked"] == r["weights"] else f"{r['asked']} ({r['weights']})"
        rss = r.get("weight_rss_bytes")
        rows.append((label, _cell(r["decode_tokens_per_s"], ".1f"), _cell(r["ttft_ms"], ".0f"),
                     _cell(r["weight_bytes"] / 1e6, ".0f"), _cell(rss and rss / 1e6, ".0f"),
                     _cell(rss and rss / r["file_bytes"], ".2f"),
                     _cell(r.get("peak_rss_bytes") and r["peak_rss_bytes"] / 1e6, ".0f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def format_quality(results: Sequence[Any]) -> str:
    base = next((r.perplexity for r in results if r.weights == "f32"), None)
    lines = [f"perplexity on the shipped text: {results[0].text_tokens} tokens, windows of {results[0].ctx}, "
             f"{results[0].scored_tokens} tokens scored (second half of each window)", ""]
    for r in results:
        vs = "" if base is None or r.weights == "f32" else f"  ({(r.perplexity / base - 1) * 100:+.2f}% vs f32)"
        lines.append(f"{r.weights:>5}  {r.perplexity:.3f}{vs}")
    return "\n".join(lines)
