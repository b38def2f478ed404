#!/usr/bin/env python3
"""The speculative decoding benchmark matrix of issue 22: a 3-node loopback mesh and one node,
--speculate off/ngram/auto, the repetitive and open prompt sets, with and without a 10 ms link
delay, and a draft model drafting for f32 weights.

    python scripts/bench_speculation.py [--groups loopback,delay,draft] [--skip-draft]
                                        [--modes off,ngram,auto] [--prompt-set repetitive,open]
                                        [--prompts N] [--rounds 3] [--answer-tokens 128]
                                        [--nodes 3] [--threads 1] [--single-threads 1]
                                        [--link-delay-ms 10] [--model PATH] [--weights W]
                                        [--draft-model builtin] [--draft-weights f32]
                                        [--out docs/bench/speculation.json] [--json]

Starts real `meshllm up` daemons on loopback (`--loopback --no-tui`, ports and state dirs in a
temporary folder, one new mesh key and mesh name per mesh), one mesh per (configuration,
mode), each started with `--speculate MODE`. Three groups run one after another; inside a group
every (configuration, mode) stays up for the whole group and answers every prompt in turns,
prompt by prompt (reversed every other prompt and round), so load drift hits all alike:

- `loopback`: the mesh (--nodes nodes, --threads each) and one node (--single-threads), each
  in every --modes mode;
- `delay`: the mesh with `--debug-link-delay-ms` --link-delay-ms on every node (a Wi-Fi-like
  hop), every --modes mode;
- `draft`: the mesh in --draft-weights (f32) with `--draft-model` (builtin: the bundled 4-bit
  SmolLM2) in mode `draft`, against the same weights in mode `off`. --skip-draft leaves it out
  (f32 nodes may refuse a draft model); a group that fails is reported as failed and the
  others still run.

Every answer is greedy, --answer-tokens long at most. Per configuration, mode and prompt set:
decode tokens/s (tokens after the first / first-to-last time, summed over the prompts, median
over rounds), its ratio to `off`, TTFT, acceptance, tokens per trip, the entry node's draft ms
per token (/v1/status) and the answers identical to `off`'s (tui/bench/speculation.py). Then
the issue's targets, each with its figure. --out writes every figure as JSON (e.g. under
docs/bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.bench.report import BenchError, grid, num  # noqa: E402
from tui.bench.speculation import (ANSWER_TOKENS, SpeculationReport, format_speculation,  # noqa: E402
                                   load_prompt_set, parse_modes, parse_prompt_sets)
from tui.bench.speculation_run import Config, run_group_async  # noqa: E402
from tui.bench.streams import cpu_model_name  # noqa: E402
from tui.client import DaemonError, DaemonUnavailable  # noqa: E402

GROUPS = ("loopback", "delay", "draft")


def log(message: str) -> None:
    print(f"bench_speculation: {message}", file=sys.stderr, flush=True)


def group_configs(args: argparse.Namespace, modes: Sequence[str]) -> dict[str, list[Config]]:
    """The configurations of each group the flags ask for."""
    mesh = f"mesh{args.nodes}"
    groups = {
        "loopback": [Config(mesh, args.nodes, args.threads, tuple(modes), args.weights),
                     Config("single", 1, args.single_threads, tuple(modes), args.weights)],
        "delay": [Config(f"{mesh}-delay{args.link_delay_ms:g}", args.nodes, args.threads, tuple(modes), args.weights,
                         link_delay_ms=args.link_delay_ms)],
        "draft": [Config(f"{mesh}-{args.draft_weights}-draft", args.nodes, args.threads, ("off", "draft"),
                         args.draft_weights, draft_model=args.draft_model)],
    }
    wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown or not wanted:
        raise BenchError(f"--groups takes a comma-separated list of {', '.join(GROUPS)}, got {args.groups!r}")
    if args.skip_draft:
        wanted = [g for g in wanted if g != "draft"]
    return {g: groups[g] for g in wanted}


# == the targets (pure) ====================================================================


def _find(groups: Mapping[str, Any], config_prefix: str, group: str) -> Mapping[str, Any] | None:
    reports = groups.get(group)
    if not isinstance(reports, list):
        return None
    return next((r for r in reports if r["config"].startswith(config_prefix)), None)


def _figure(report: Mapping[str, Any] | None, mode: str, prompt_set: str, key: str) -> float | None:
    if report is None:
        return None
    found = next((r for r in report["results"] if r["mode"] == mode and r["prompt_set"] == prompt_set), None)
    return None if found is None else found.get(key)


def targets(groups: Mapping[str, Any], nodes: int) -> list[dict[str, Any]]:
    """Each target of issue 22 with its figure from the matrix (None: not measured)."""
    mesh = _find(groups, f"mesh{nodes}", "loopback")
    single = _find(groups, "single", "loopback")
    delayed = _find(groups, f"mesh{nodes}-delay", "delay")
    draft = _find(groups, f"mesh{nodes}-", "draft")

    def row(figure: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
        return {"figure": figure, "value": value, "target": target, "met": met}

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    out = [
        row(f"{nodes}-node mesh, repetitive, ngram / off", _figure(mesh, "ngram", "repetitive", "ratio_to_off"),
            ">= 2.0x", at_least(_figure(mesh, "ngram", "repetitive", "ratio_to_off"), 2.0)),
        row(f"{nodes}-node mesh + link delay, repetitive, ngram / off",
            _figure(delayed, "ngram", "repetitive", "ratio_to_off"), ">= 2.5x",
            at_least(_figure(delayed, "ngram", "repetitive", "ratio_to_off"), 2.5)),
    ]
    for label, report in (("mesh", mesh), ("one node", single), ("mesh + link delay", delayed)):
        value = _figure(report, "auto", "open", "ratio_to_off")
        out.append(row(f"{label}, open, auto / off", value, ">= 0.95x", at_least(value, 0.95)))
    single_off = _figure(single, "off", "repetitive", "decode_tokens_per_s")
    for mode in ("ngram", "auto"):
        value = _figure(mesh, mode, "repetitive", "decode_tokens_per_s")
        share = None if value is None or not single_off else value / single_off
        out.append(row(f"{nodes}-node mesh {mode} / one node off, repetitive", share, "> 1.0x",
                       None if share is None else share > 1.0))
    for prompt_set in ("repetitive", "open"):
        out.append(row(f"draft model ({draft['config'] if draft else 'not run'}), {prompt_set}, draft / off",
                       _figure(draft, "draft", prompt_set, "ratio_to_off"), "reported", None))
        for key in ("acceptance", "tokens_per_trip"):
            out.append(row(f"  draft {key.replace('_', ' ')}, {prompt_set}", _figure(draft, "draft", prompt_set, key),
                           "reported", None))
        status = _figure(draft, "draft", prompt_set, "status") or {}
        out.append(row(f"  draft ms per token (entry), {prompt_set}", status.get("draft_ms_per_token"),
                       "reported", None))
    return out


def format_targets(rows: Sequence[Mapping[str, Any]]) -> str:
    met = {True: "yes", False: "NO", None: "-"}
    return "\n".join(grid([("target", "figure", "wanted", "met"),
                           *[(r["figure"], num(r["value"], 2), r["target"], met[r["met"]]) for r in rows]]))


# == running =======================================================================================


def report_json(config: Config, report: SpeculationReport) -> dict[str, Any]:
    return {"config": config.name, **report.to_json()}


async def run(args: argparse.Namespace, groups: Mapping[str, list[Config]],
              prompt_sets: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    tables: list[str] = []
    for name, configs in groups.items():
        log(f"group {name}: {', '.join(c.name for c in configs)}")
        try:
            reports = await run_group_async(configs, prompt_sets, rounds=args.rounds, answer_tokens=args.answer_tokens,
                                            model=args.model, cache_dir=args.cache_dir,
                                            progress=lambda m, name=name: log(f"{name}: {m}"))
        except (BenchError, DaemonError, DaemonUnavailable) as error:
            log(f"group {name} failed: {error}")
            out[name] = {"error": str(error)}
            tables.append(f"== {name}: failed: {error}")
            continue
        out[name] = [report_json(c, r) for c, r in zip(configs, reports)]
        tables += [f"== {name}: {c.name}\n{format_speculation(r)}" for c, r in zip(configs, reports)]
    return out, tables


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_speculation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="groups to run, in order (loopback,delay,draft)")
    parser.add_argument("--skip-draft", action="store_true", help="leave the draft-model group out")
    parser.add_argument("--modes", default="off,ngram,auto", help="--speculate modes of loopback and delay")
    parser.add_argument("--prompt-set", default=None, help="repetitive, open, or JSONL files (default: both sets)")
    parser.add_argument("--prompts", type=int, default=None, help="only the first N prompts of each set")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (3)")
    parser.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS, help="max_tokens of each answer (128)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the mesh (3)")
    parser.add_argument("--threads", type=int, default=1, help="--threads of each mesh node (1)")
    parser.add_argument("--single-threads", type=int, default=1, help="--threads of the single node (1)")
    parser.add_argument("--link-delay-ms", type=float, default=10.0,
                        help="--debug-link-delay-ms of the delay group (10)")
    parser.add_argument("--model", default=None, help="model path (default: the built-in model)")
    parser.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    parser.add_argument("--weights", default=None, help="weight format of loopback and delay (default: auto)")
    parser.add_argument("--draft-model", default="builtin", help="--draft-model of the draft group (builtin)")
    parser.add_argument("--draft-weights", default="f32", help="weight format of the draft group (f32)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the tables")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON to this file")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.rounds, args.answer_tokens, args.nodes, args.threads, args.single_threads) < 1:
            raise BenchError("--rounds, --answer-tokens, --nodes, --threads and --single-threads must be at least 1")
        if args.nodes < 2:
            raise BenchError("--nodes must be at least 2 (the single node is measured anyway)")
        if args.prompts is not None and args.prompts < 1:
            raise BenchError("--prompts must be at least 1")
        modes = parse_modes(args.modes)
        groups = group_configs(args, modes)
        prompt_sets = {name: load_prompt_set(name)[:args.prompts] for name in parse_prompt_sets(args.prompt_set)}
    except BenchError as error:
        print(f"bench_speculation: error: {error}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # stop the daemons on the way out
    started = time.time()
    try:
        measured, tables = asyncio.run(run(args, groups, prompt_sets))
    except KeyboardInterrupt:
        print("bench_speculation: interrupted", file=sys.stderr)
        return 130
    goals = targets(measured, args.nodes)
    result = {
        "mode": "speculation-matrix",
        "cpu_model": cpu_model_name(),
        "answer_tokens": args.answer_tokens,
        "rounds": args.rounds,
        "prompt_sets": {name: len(prompts) for name, prompts in prompt_sets.items()},
        "groups": measured,
        "targets": goals,
        "run": {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "duration_s": round(time.time() - started, 1), "load_avg_1min": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=2) if args.json else "\n\n".join([*tables, "targets (issue 22):",
                                                                       format_targets(goals)]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"written to {args.out}")
    return 1 if any(isinstance(g, dict) and "error" in g for g in measured.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
