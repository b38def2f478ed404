"""The mesh tax of a lone node: decode speed of `meshllm up` on one machine against the
in-process engine, with the same model, weights and threads, measured in turns in one run.

    python scripts/bench_lone_node.py [--rounds 6] [--tokens 64] [--threads 2] [--weights auto]
    python scripts/bench_lone_node.py --daemon-cmd "/path/to/other/checkout/.venv/bin/python -m daemon.cli"

A round times one greedy answer of `--tokens` tokens from each, alternating which goes
first. Decode rate = tokens after the first / time from the first token to the last, so the
prompt does not count. The daemon is timed through its streaming API, as a user sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.client import DaemonClient  # noqa: E402
from tui.launcher import LocalMesh  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, for a curious ten-year-old.",
    "Describe a walk through a forest in autumn, in detail.",
    "Give a long list of ideas for a rainy afternoon at home, with a sentence on each.",
]


def engine_rate(engine, prompt: str, tokens: int) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    from meshllm.model.sampling import SamplingParams

    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    stamps, out = [], []
    for token in engine.generate(ids, SamplingParams(max_tokens=tokens)):
        stamps.append(time.perf_counter())
        out.append(token.id)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


async def daemon_rate(url: str, prompt: str, tokens: int) -> tuple[float, list[int]]:
    client = DaemonClient(url)
    stamps, ids = [], []
    async for delta in client.chat([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0):
        if delta.text or delta.finish_reason:
            stamps.append(time.perf_counter())
        if delta.token_ids:
            ids = list(delta.token_ids)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--daemon-cmd", help="how to start meshllm (e.g. another checkout's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.source import resolve

    torch.set_num_threads(args.threads)
    engine = Engine(prepare(resolve(None)), weights=args.weights)
    mesh = LocalMesh(1, threads=args.threads, extra_args=["--weights", args.weights],
                     meshllm=shlex.split(args.daemon_cmd) if args.daemon_cmd else None)
    mesh.start()
    rates: dict[str, list[float]] = {"engine": [], "daemon": []}
    try:
        mesh.wait_ready(300)
        url = mesh.nodes[0].url
        with torch.inference_mode():
            engine_rate(engine, PROMPTS[0], 8)  # warm-up
        asyncio.run(daemon_rate(url, PROMPTS[0], 8))
        for r in range(args.rounds):
            prompt = PROMPTS[r % len(PROMPTS)]
            order = ["engine", "daemon"] if r % 2 == 0 else ["daemon", "engine"]
            for who in order:
                if who == "engine":
                    with torch.inference_mode():
                        rate, _ = engine_rate(engine, prompt, args.tokens)
                else:
                    rate, _ = asyncio.run(daemon_rate(url, prompt, args.tokens))
                rates[who].append(rate)
            print(f"round {r + 1}: engine {rates['engine'][-1]:.2f} tokens/s, "
                  f"daemon {rates['daemon'][-1]:.2f} tokens/s", flush=True)
    finally:
        mesh.stop()
    engine_med, daemon_med = statistics.median(rates["engine"]), statistics.median(rates["daemon"])
    per_round = [d / e for d, e in zip(rates["daemon"], rates["engine"])]
    print(f"\nmedian decode: engine {engine_med:.2f} tokens/s, lone daemon {daemon_med:.2f} tokens/s; "
          f"daemon / engine = {daemon_med / engine_med:.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in per_round)})")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "ratio_median": daemon_med / engine_med,
                                         "per_round": per_round, "threads": args.threads,
                                         "weights": args.weights, "tokens": args.tokens}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
