#!/usr/bin/env python3
"""Plot recovery stalls of several `scripts/bench_stall.py --json` runs side by side.

    python scripts/plot_stall.py before.json:before after.json:after --out docs/img/stall.png

Each JSON gives one line per mode (kill -9, clean leave): the longest gap of a streamed answer
around the fault, against the token at which it happened (the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def series(path: Path) -> dict[str, list[tuple[int, float]]]:
    data = json.loads(path.read_text())
    by_mode: dict[str, dict[int, list[float]]] = {}
    for run in data["runs"]:
        if run.get("error") or run.get("at") is None:
            continue
        gap = run.get("longest_gap_s")
        if gap is not None:
            by_mode.setdefault(run["mode"], {}).setdefault(int(run["at"]), []).append(float(gap))
    return {mode: sorted((at, statistics.median(gaps)) for at, gaps in points.items())
            for mode, points in by_mode.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="JSON:LABEL", help="a bench_stall JSON and its label")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_stall: matplotlib is not installed in this Python", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"kill": "o-", "leave": "s--"}
    for spec in args.runs:
        path, _, label = spec.partition(":")
        for mode, points in sorted(series(Path(path)).items()):
            xs, ys = zip(*points)
            name = "kill -9" if mode == "kill" else "clean leave"
            ax.plot(xs, ys, styles.get(mode, "x-"), label=f"{label or path}: {name}")
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], 2.05, " 2 s target (kill)", color="grey", fontsize=8)
    ax.set_xlabel("token at which the middle stage stops")
    ax.set_ylabel("longest pause between tokens (s)")
    ax.set_title("Recovery stall, 3-node loopback mesh, SmolLM2-135M int4, 1 thread each")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot_stall: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
