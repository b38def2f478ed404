#!/usr/bin/env python3
"""Benchmark a local mesh against one node and plot it for docs/benchmarks.md.

    python scripts/bench_mesh.py [--nodes 3] [--runs 1] [--fresh] [-- more `meshllm bench` options]
    python scripts/bench_mesh.py --plot-only

Each run is `meshllm bench --mesh N --json` on the default model (single-node reference and one
N-node loopback mesh per codec, same total cores). Runs are appended to docs/benchmarks.json
(`--fresh` starts it anew); the plots under docs/img/ show every run in the file:
`bench_tokens_per_s.png` (decode tokens/s, single vs mesh per codec), `bench_bytes_per_hop.png`
(bytes per decode hop per codec, with the 1.25 KB target) and `bench_ratios.png` (mesh/single
decode and TTFT ratios, with their targets). `--markdown` prints the results table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "docs" / "benchmarks.json"
IMG = REPO / "docs" / "img"
DECODE_RATIO_TARGET = 0.95
TTFT_RATIO_TARGET = 1.3
BYTES_PER_HOP_TARGET = 1250


def run_bench(nodes: int, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "daemon.cli", "bench", "--mesh", str(nodes), "--json", *extra]
    print("running:", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    started = time.time()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)  # progress: stderr
    previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # it stops its meshes
    try:
        out, _ = child.communicate()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if child.returncode != 0:
        raise SystemExit(f"bench_mesh: meshllm bench failed (exit {child.returncode})")
    result = json.loads(out)
    result["run"] = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                     "duration_s": round(time.time() - started, 1),
                     "load_avg_1min": round(os.getloadavg()[0], 2)}
    return result


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["runs"])


def save_runs(path: Path, runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


# -- plots ------------------------------------------------------------------------------------


def _legend_below(ax: Any) -> None:
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)


def _run_label(i: int, run: dict[str, Any]) -> str:
    return f"run {i + 1}: single {run['single_threads']} thr, mesh {run['nodes']}x{run['node_threads']} thr"


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    codecs = [c["codec"] for c in runs[0]["codecs"]]
    first = runs[0]
    subtitle = (f"{first['model']['name']}, {first['nodes']}-node loopback mesh vs one node, "
                f"{first['cores']} cores in all")
    width = 0.8 / len(runs)
    paths = []

    # decode tokens/s: single, then the mesh for each codec
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = ["single"] + [f"mesh {c}" for c in codecs]
    for i, run in enumerate(runs):
        values = [run["single"]["decode_tokens_per_s"] or 0.0] + [
            c["measure"]["decode_tokens_per_s"] or 0.0 for c in run["codecs"]]
        xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=_run_label(i, run))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("decode tokens/s (greedy, batch 1)")
    ax.set_title(f"Decode speed\n{subtitle}", fontsize=10)
    _legend_below(ax)
    fig.tight_layout()
    paths.append(out_dir / "bench_tokens_per_s.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # bytes per decode hop per codec
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        values = [c["measure"]["decode_bytes_per_hop"] or 0.0 for c in run["codecs"]]
        xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(codecs))]
        bars = ax.bar(xs, values, width, label=_run_label(i, run))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(BYTES_PER_HOP_TARGET, color="crimson", linestyle="--", linewidth=1,
               label=f"target {BYTES_PER_HOP_TARGET} B")
    ax.set_xticks(range(len(codecs)), codecs)
    ax.set_ylabel("bytes per decode hop (whole message)")
    ax.set_title(f"Bytes per decode hop by codec\n{subtitle}", fontsize=10)
    _legend_below(ax)
    fig.tight_layout()
    paths.append(out_dir / "bench_bytes_per_hop.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # ratios against the targets
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, key, target, title in (
        (left, "decode_ratio", DECODE_RATIO_TARGET, "decode tokens/s, mesh / single (higher is better)"),
        (right, "ttft_ratio", TTFT_RATIO_TARGET, "TTFT(512), mesh / single (lower is better)"),
    ):
        for i, run in enumerate(runs):
            values = [c[key] or 0.0 for c in run["codecs"]]
            xs = [x + (i - (len(runs) - 1) / 2) * width for x in range(len(codecs))]
            bars = ax.bar(xs, values, width, label=_run_label(i, run))
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(target, color="crimson", linestyle="--", linewidth=1, label=f"target {target}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(codecs)), codecs)
        ax.set_title(title, fontsize=10)
        _legend_below(ax)
    fig.suptitle(subtitle, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "bench_ratios.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# -- markdown -----------------------------------------------------------------------------------


def _n(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(run: dict[str, Any]) -> str:
    """One run as a markdown table: the single node beside each codec's mesh."""
    s = run["single"]
    codecs = run["codecs"]
    head = ["", f"single ({run['single_threads']} thr)"] + [
        f"mesh {c['codec']} ({run['nodes']}x{run['node_threads']} thr)" for c in codecs]
    rows = [
        ["decode tokens/s", _n(s["decode_tokens_per_s"], 2)] + [_n(c["measure"]["decode_tokens_per_s"], 2) for c in codecs],
        ["decode mesh / single", "1.00"] + [_n(c["decode_ratio"], 2) for c in codecs],
        [f"TTFT({s['prompt_tokens']}) ms", _n(s["ttft_ms"], 0)] + [_n(c["measure"]["ttft_ms"], 0) for c in codecs],
        ["TTFT mesh / single", "1.00"] + [_n(c["ttft_ratio"], 2) for c in codecs],
        ["ms per token", _n(s["ms_per_token"], 1)] + [_n(c["measure"]["ms_per_token"], 1) for c in codecs],
        ["stage compute ms per token", _n(s["stage_compute_ms_per_token"], 1)]
        + [_n(c["measure"]["stage_compute_ms_per_token"], 1) for c in codecs],
        ["other ms per token", _n(s["non_compute_ms_per_token"], 1)]
        + [_n(c["measure"]["non_compute_ms_per_token"], 1) for c in codecs],
        ["per-hop ms (net)", "-"] + [_n(c["per_hop_ms_net"], 2) for c in codecs],
        ["bytes per decode hop", "-"] + [_n(c["measure"]["decode_bytes_per_hop"], 0) for c in codecs],
        ["token agreement", "1.00"] + [_n(c["agreement"]["prefix_fraction"], 2) for c in codecs],
        ["identical answers", f"{len(s['answers'])}/{len(s['answers'])}"]
        + [f"{c['agreement']['identical_answers']}/{c['agreement']['prompts']}" for c in codecs],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    stages = ["", "| config | node | span | decode ms/step | prefill ms (one prompt) | bytes/hop |",
              "|---|---|---|---|---|---|"]
    for label, m in [("single", s)] + [(f"mesh {c['codec']}", c["measure"]) for c in codecs]:
        for st in m["stages"]:
            stages.append(f"| {label} | {st['name']} | [{st['start_layer']}, {st['end_layer']}) | "
                          f"{_n(st['decode_compute_ms'], 2)} | {_n(st['prefill_compute_ms'], 0)} | "
                          f"{_n(st['decode_bytes_per_hop'], 0)} |")
    return "\n".join(lines + stages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="mesh size (default 3)")
    p.add_argument("--runs", type=int, default=1, help="how many runs to make now (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_JSON, help="results file (default docs/benchmarks.json)")
    p.add_argument("--fresh", action="store_true", help="forget the runs already in the results file")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plots from the results file")
    p.add_argument("--markdown", action="store_true", help="print each run in the file as a markdown table")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for `meshllm bench`")
    args = p.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    runs = [] if args.fresh else load_runs(args.out)
    if not args.plot_only:
        for _ in range(args.runs):
            runs.append(run_bench(args.nodes, extra))
            save_runs(args.out, runs)  # after every run: a later failure keeps the earlier ones
    if not runs:
        print(f"bench_mesh: no runs in {args.out}", file=sys.stderr)
        return 1
    for path in plot(runs, IMG):
        print(f"wrote {path.relative_to(REPO)}")
    if args.markdown:
        for i, run in enumerate(runs, 1):
            print(f"\n### Run {i} ({run.get('run', {}).get('started', '?')})\n\n{markdown(run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
