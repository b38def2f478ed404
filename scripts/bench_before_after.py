#!/usr/bin/env python3
"""Compare two checkouts of meshllm side by side: `meshllm bench --local`, alternating.

    git worktree add /tmp/before <commit>
    python scripts/bench_before_after.py --before /tmp/before [--after .] [--threads 1]
                                         [--rounds 3] [--avx2] [--json OUT]

Each round runs the default model's benchmark (auto weights, a 512-token prompt, then 64
decoded tokens) once per checkout, in a fresh process, the order alternating from round to
round, with this venv's Python and each checkout's own code (PYTHONPATH). It prints each run
and the medians: decode tokens/s, time to first token, peak RSS, and after/before ratios.

--avx2 simulates an AVX2-only laptop on an AVX-512 machine: ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 and MESHLLM_KERNEL_ISA=avx2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "MESHLLM_KERNEL_ISA": "avx2"}
METRICS = ("decode_tokens_per_s", "ttft_ms", "peak_rss_bytes")


def run_once(repo: Path, threads: int, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "bench", "--local", "--weights", "auto", "--threads", str(threads),
         "--prompt-tokens", "512", "--decode-tokens", "64", "--json"],
        cwd=repo, env=dict(env, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"bench failed in {repo}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout (a git worktree)")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--avx2", action="store_true", help="simulate an AVX2-only CPU")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    env = dict(os.environ, **(AVX2_ENV if args.avx2 else {}))
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            result = run_once(sides[side], args.threads, env)
            runs[side].append(result)
            print(f"round {r + 1} {side:6s}: decode {result['decode_tokens_per_s']:.1f} tok/s, "
                  f"TTFT {result['ttft_ms']:.0f} ms, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    print(f"medians of {args.rounds}, {args.threads} thread(s){', AVX2 simulated' if args.avx2 else ''}:")
    for metric in METRICS:
        before = statistics.median(x[metric] for x in runs["before"])
        after = statistics.median(x[metric] for x in runs["after"])
        print(f"  {metric:22s} before {before:12.1f}  after {after:12.1f}  after/before {after / before:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "avx2": args.avx2, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
