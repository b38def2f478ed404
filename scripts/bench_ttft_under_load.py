#!/usr/bin/env python3
"""TTFT under load (issue 21): a long prompt sent while 4 answers decode, against the same
prompt on an idle node; and what it costs the running answers.

    python scripts/bench_ttft_under_load.py [--rounds 3] [--prompt-tokens 512] [--background 4]
                                            [--background-tokens 128] [--lead-tokens 8]
                                            [--threads 1] [--cores 0] [--model PATH] [--weights W]
                                            [--api URL] [--out docs/bench/ttft-under-load.json]

Without --api, starts one real `meshllm up` daemon on loopback (`--threads`, and under
`taskset -c CORES` with --cores) for the run. The prompt is a chat of exactly --prompt-tokens
tokens (found by asking the node for its usage, as `meshllm bench` does). Rounds alternate
(idle, loaded, then loaded, idle, ...):

- idle: the prompt alone, its time to first token (max_tokens 1);
- loaded: --background greedy answers of --background-tokens tokens start at once; when each
  has streamed --lead-tokens tokens (or ended), the prompt is sent and its TTFT measured while
  they go on.

Reported (medians over rounds): TTFT idle, TTFT loaded, loaded / idle (target <= 1.5x); the
running answers' normal gap between tokens (median of their gaps before the prompt was sent)
and their longest gap that overlaps [prompt sent, prompt's first token], and longest / normal
(target <= 3x). `running` says how many background answers still decoded when the prompt went
out: a node that serves one answer at a time meets the lead only once the earlier answers have
ended, so fewer than --background run then and the prompt waits for the rest.
--out writes every raw figure as JSON (e.g. under docs/bench/).
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

from tui.bench.api import ApiBench  # noqa: E402
from tui.bench.concurrency import median, node_info, ratio  # noqa: E402
from tui.bench.report import BenchError, grid, num  # noqa: E402
from tui.bench.streams import (report_result, answers_at_once, cpu_model_name, long_prompt_alone,  # noqa: E402
                               long_prompt_under_load, ready_status, session_args, start_nodes)
from tui.client import DaemonError, DaemonUnavailable  # noqa: E402


def log(message: str) -> None:
    print(f"bench_ttft_under_load: {message}", file=sys.stderr, flush=True)


async def measure_on(url: str, args: argparse.Namespace) -> dict[str, Any]:
    clock = time.perf_counter
    async with ApiBench([url]) as bench:
        status = await ready_status(bench.entry, url)
        log(f"finding a prompt of {args.prompt_tokens} tokens")
        prompt = await bench.find_prompt(args.prompt_tokens, log)
        prompt_tokens = await bench.prompt_tokens(prompt)  # also warms the prefill
        log(f"warming up ({args.background} answers at once)")
        await answers_at_once([bench.entry], args.background, 4, clock)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            entry: dict[str, Any] = {"round": r + 1}
            for kind in ("idle", "loaded") if r % 2 == 0 else ("loaded", "idle"):
                if kind == "idle":
                    probe = await long_prompt_alone(bench.entry, prompt, clock)
                    entry["idle_ttft_ms"] = probe.ttft_ms
                    log(f"round {r + 1}/{args.rounds}: idle: TTFT {num(probe.ttft_ms, 0)} ms")
                else:
                    figures, background, probe = await long_prompt_under_load(
                        bench.entry, prompt, background=args.background, background_tokens=args.background_tokens,
                        lead_tokens=args.lead_tokens, clock=clock)
                    entry["loaded"] = figures.to_json()
                    entry["background_tokens_per_s"] = [a.tokens_per_s() for a in background]
                    entry["background_short"] = sum(1 for a in background if a.tokens < args.background_tokens)
                    log(f"round {r + 1}/{args.rounds}: loaded ({figures.running} running): TTFT "
                        f"{num(figures.ttft_ms, 0)} ms, longest gap {num(figures.longest_gap_ms, 1)} ms vs normal "
                        f"{num(figures.normal_gap_ms, 1)} ms")
            rounds.append(entry)
    idle = median(r["idle_ttft_ms"] for r in rounds)
    loaded = median(r["loaded"]["ttft_ms"] for r in rounds)
    return {
        "mode": "ttft-under-load",
        "target": url,
        "cpu_model": cpu_model_name(),
        "model": asdict(node_info(status)),
        "prompt_tokens": prompt_tokens,
        "background": args.background,
        "background_tokens": args.background_tokens,
        "lead_tokens": args.lead_tokens,
        "summary": {
            "idle_ttft_ms": idle,
            "loaded_ttft_ms": loaded,
            "ttft_ratio": ratio(loaded, idle),
            "normal_gap_ms": median(r["loaded"]["normal_gap_ms"] for r in rounds),
            "longest_gap_ms": median(r["loaded"]["longest_gap_ms"] for r in rounds),
            "gap_ratio": median(r["loaded"]["gap_ratio"] for r in rounds),
            "gap_ratio_worst": max((r["loaded"]["gap_ratio"] for r in rounds
                                    if r["loaded"]["gap_ratio"] is not None), default=None),
            "running_min": min(r["loaded"]["running"] for r in rounds),
            "running_at_first_token_min": min(r["loaded"]["running_at_first_token"] for r in rounds),
        },
        "rounds": rounds,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.api:
        return await measure_on(args.api, args)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    pinned = f", pinned to core(s) {args.cores}" if cores else ""
    log(f"starting one local node, {args.threads} thread(s){pinned}")
    node = await start_nodes(1, threads=args.threads, cores=cores[:1] if cores else None, model=args.model,
                             cache_dir=args.cache_dir, weights=args.weights,
                             extra_args=session_args([args.background + 1]), label="ttft-under-load")
    try:
        result = await measure_on(node.nodes[0].url, args)
    finally:
        await asyncio.to_thread(node.stop)
    result["target"] = f"one local node, {args.threads} thread(s){pinned}"
    return result


def format_table(result: dict[str, Any]) -> str:
    s, m = result["summary"], result["model"]
    rows = [
        ("", "median", "target"),
        (f"TTFT idle ms ({result['prompt_tokens']}-token prompt)", num(s["idle_ttft_ms"], 0), ""),
        (f"TTFT while {result['background']} answers decode ms", num(s["loaded_ttft_ms"], 0), ""),
        ("  loaded / idle", num(s["ttft_ratio"], 2, "x"), "<= 1.5x"),
        ("running answers' normal gap ms", num(s["normal_gap_ms"], 1), ""),
        ("  their longest gap meanwhile ms", num(s["longest_gap_ms"], 1), ""),
        ("  longest / normal", num(s["gap_ratio"], 2, "x"), "<= 3x"),
        ("  longest / normal, worst round", num(s["gap_ratio_worst"], 2, "x"), ""),
        ("answers running when sent (min)", f"{s['running_min']}/{result['background']}", ""),
        ("  still running at its first token (min)", f"{s['running_at_first_token_min']}/{result['background']}", ""),
    ]
    head = [f"{m['model_name']} ({m['num_layers']} layers), {m['weights']} weights, kernel {m['kernel']}; "
            f"CPU: {result['cpu_model']}; {result['target']}",
            f"{len(result['rounds'])} round(s), idle and loaded in turns; background answers of "
            f"{result['background_tokens']} tokens, the prompt sent once each streamed {result['lead_tokens']}"]
    lines = [*head, "", *grid(rows)]
    if s["running_at_first_token_min"] < result["background"]:
        lines.append("(some background answers ended before the prompt's first token: their gaps cover only part "
                     "of it; raise --background-tokens)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_ttft_under_load.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (idle and loaded each); medians reported (3)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="the long prompt's tokens (512)")
    parser.add_argument("--background", type=int, default=4, help="answers decoding meanwhile (4)")
    parser.add_argument("--background-tokens", type=int, default=128, help="max_tokens of each of them (128)")
    parser.add_argument("--lead-tokens", type=int, default=8,
                        help="tokens each of them streams before the prompt is sent (8)")
    parser.add_argument("--api", default=None, metavar="URL", help="measure this running node instead of a local one")
    parser.add_argument("--threads", type=int, default=1, help="the local node's threads (1)")
    parser.add_argument("--cores", default=None, help="pin the local node with taskset -c CORES (e.g. 0)")
    parser.add_argument("--model", default=None, help="model path (default: the built-in model)")
    parser.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    parser.add_argument("--weights", default=None, help="weight format (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON to this file")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        for name in ("rounds", "prompt_tokens", "background", "background_tokens", "lead_tokens", "threads"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
        if args.lead_tokens >= args.background_tokens:
            raise BenchError("--lead-tokens must be below --background-tokens")
        signal.signal(signal.SIGTERM, _interrupt)  # stop the daemon on the way out
        result = asyncio.run(measure(args))
    except (BenchError, ValueError, DaemonError, DaemonUnavailable) as error:
        print(f"bench_ttft_under_load: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_ttft_under_load: interrupted", file=sys.stderr)
        return 130
    report_result(result, started, format_table, as_json=args.json, out=args.out, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
