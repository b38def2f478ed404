#!/usr/bin/env python3
"""Two simulated devices: a 2-node loopback mesh, each daemon pinned to its own core, against
one node pinned to one core, with 4 answers at once and with 1 (issue 21).

    python scripts/bench_two_devices.py [--levels 4,1] [--rounds 3] [--decode-tokens 64]
                                        [--cores 0,1] [--model PATH] [--weights W] [--spread]
                                        [--out docs/bench/two-devices.json]

Starts three real `meshllm up` daemons on loopback (`--loopback --no-tui`, ports and state dirs
in a temporary folder, `--threads 1` each): the mesh's node1 under `taskset -c C0` and node2
under `taskset -c C1` (one mesh key between them, their plan has 2 stages), and the single
node under `taskset -c C0` (a mesh of its own). Both stay up for the whole run; at each level
N, N greedy streamed answers of --decode-tokens + 1 tokens go to the mesh's node1 (with
--spread: to node1 and node2 in turn) or to the single node, the two measured in turns (mesh,
single, then single, mesh in the next round, ...), the levels alternating too. While one is
measured the other sits idle (its core is free but for heartbeats).

Reported per level, for each side: aggregate decode tokens/s (every answer's tokens after its
first / (latest last token - earliest first token), median over rounds; see
tui/bench/concurrency.py), p50/p95 time between tokens, TTFT p50; and mesh / single. The
mesh has twice the compute of the single node: with 4 answers, aggregate tokens/s can reach
2x (target 1.7x); with 1 answer only one device works at a time, so it cannot gain.
Where `meshllm up` has --max-sessions, each daemon gets the largest level, so every answer runs
at once. --out writes every raw figure as JSON (e.g. under docs/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.bench.concurrency import level_result, node_info, parse_levels, ratio, with_ratios  # noqa: E402
from tui.bench.report import BenchError, grid, num  # noqa: E402
from tui.bench.streams import (report_result, alternate_levels, close_clients, cpu_model_name, open_clients,  # noqa: E402
                               ready_status, session_args, start_nodes)
from tui.client import DaemonError, DaemonUnavailable  # noqa: E402


def log(message: str) -> None:
    print(f"bench_two_devices: {message}", file=sys.stderr, flush=True)


async def measure(args: argparse.Namespace, levels: list[int], cores: list[int]) -> dict[str, Any]:
    common = dict(threads=1, model=args.model, cache_dir=args.cache_dir, weights=args.weights,
                  extra_args=session_args(levels))
    log(f"starting the mesh: node1 on core {cores[0]}, node2 on core {cores[1]}, 1 thread each")
    mesh = await start_nodes(2, cores=cores, label="two-devices-mesh", **common)  # type: ignore[arg-type]
    try:
        log(f"starting the single node on core {cores[0]}, 1 thread")
        single = await start_nodes(1, cores=cores[:1], label="two-devices-single", **common)  # type: ignore[arg-type]
        try:
            mesh_urls = [n.url for n in mesh.nodes] if args.spread else [mesh.nodes[0].url]
            targets = {"mesh": await open_clients(mesh_urls), "single": await open_clients([single.nodes[0].url])}
            try:
                statuses = {name: await ready_status(clients[0], clients[0].api_url)
                            for name, clients in targets.items()}
                measured = await alternate_levels(targets, levels, rounds=args.rounds,
                                                  decode_tokens=args.decode_tokens, progress=log)
            finally:
                for clients in targets.values():
                    await close_clients(clients)
        finally:
            await asyncio.to_thread(single.stop)
    finally:
        await asyncio.to_thread(mesh.stop)
    asked = args.decode_tokens + 1
    sides = {name: with_ratios([level_result(n, measured[name][n], asked) for n in levels]) for name in measured}
    rows = []
    for i, n in enumerate(levels):
        m, s = sides["mesh"][i], sides["single"][i]
        rows.append({"level": n, "mesh_over_single": ratio(m.aggregate_tokens_per_s, s.aggregate_tokens_per_s),
                     "mesh": m.to_json(), "single": s.to_json()})
    return {
        "mode": "two-devices",
        "cpu_model": cpu_model_name(),
        "cores": cores,
        "threads_per_node": 1,
        "spread": args.spread,
        "model": {name: asdict(node_info(st)) for name, st in statuses.items()},
        "stages": {name: len((st.get("plan") or {}).get("stages") or []) for name, st in statuses.items()},
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        "levels": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("answers at once", "mesh tok/s", "single tok/s", "mesh / single",
                                    "mesh gap p50/p95 ms", "single gap p50/p95 ms", "mesh TTFT p50", "single TTFT p50")]
    for row in result["levels"]:
        m, s = row["mesh"], row["single"]
        rows.append((str(row["level"]), num(m["aggregate_tokens_per_s"], 2), num(s["aggregate_tokens_per_s"], 2),
                     num(row["mesh_over_single"], 2, "x"),
                     f"{num(m['gap_p50_ms'], 1)}/{num(m['gap_p95_ms'], 1)}",
                     f"{num(s['gap_p50_ms'], 1)}/{num(s['gap_p95_ms'], 1)}",
                     num(m["ttft_p50_ms"], 0), num(s["ttft_p50_ms"], 0)))
    model = result["model"]["single"]
    head = [f"{model['model_name']} ({model['num_layers']} layers), {model['weights']} weights, kernel "
            f"{model['kernel']}; CPU: {result['cpu_model']}",
            f"mesh: 2 nodes ({result['stages']['mesh']} stages) on cores {result['cores'][0]} and "
            f"{result['cores'][1]}, 1 thread each, answers to "
            f"{'both nodes in turn' if result['spread'] else 'node1'}; single: 1 node on core "
            f"{result['cores'][0]}, 1 thread; {result['decode_tokens']} decode tokens per answer, "
            f"{result['rounds']} round(s), in turns"]
    note = ("aggregate tok/s: every answer's tokens after its first / (latest last token - earliest first token), "
            "median over rounds")
    return "\n".join([*head, "", *grid(rows), "", note])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_two_devices.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="4,1", help="answers at once, comma-separated (4,1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (3)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per answer after its first (64)")
    parser.add_argument("--cores", default="0,1", help="the two cores: node1 (and the single node), node2 (0,1)")
    parser.add_argument("--model", default=None, help="model path (default: the built-in model)")
    parser.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    parser.add_argument("--weights", default=None, help="weight format of every daemon (default: auto)")
    parser.add_argument("--spread", action="store_true", help="send the mesh's answers to both nodes in turn")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON to this file")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        levels = parse_levels(args.levels)
        cores = [int(c) for c in args.cores.split(",") if c.strip()]
        if len(cores) != 2 or cores[0] == cores[1]:
            raise BenchError(f"--cores takes two different cores, got {args.cores!r}")
        if args.rounds < 1 or args.decode_tokens < 1:
            raise BenchError("--rounds and --decode-tokens must be at least 1")
        signal.signal(signal.SIGTERM, _interrupt)  # stop the daemons on the way out
        started = time.time()
        result = asyncio.run(measure(args, levels, cores))
    except (BenchError, ValueError, DaemonError, DaemonUnavailable) as error:
        print(f"bench_two_devices: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_two_devices: interrupted", file=sys.stderr)
        return 130
    report_result(result, started, format_table, as_json=args.json, out=args.out, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
