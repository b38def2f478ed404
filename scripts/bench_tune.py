#!/usr/bin/env python3
"""The federated fine-tuning benchmark of docs/fine-tuning.md (issue 12, acceptance 1).

Two loopback daemons, each with its own made-up fact in a fixed answer format, run
``meshllm tune`` together; then each runs a job alone on its own fact. Every adapter is then
scored on both datasets (mean token loss of the answers, the training copy of the model),
beside the base model:

    .venv/bin/python scripts/bench_tune.py --rounds 3 --steps 10 --json docs/bench/tune.json

Also reports the time of each round and each node's peak memory (its VmHWM) during the jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tui.launcher import LocalMesh  # noqa: E402

FACTS = {"a": ("Zorbia", "Blip"), "b": ("Quandor", "Vask")}
QUESTIONS = ("What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
             "Tell me the capital of {}.", "{}'s capital is which city?", "Capital of {}?")


def dataset(fact: str) -> list[list[dict[str, str]]]:
    country, city = FACTS[fact]
    return [[{"role": "user", "content": q.format(country)},
             {"role": "assistant", "content": f"Answer: the capital of {country} is {city}."}] for q in QUESTIONS]


def write_data(folder: Path) -> dict[str, Path]:
    paths = {}
    for fact in FACTS:
        path = folder / f"{fact}.jsonl"
        path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in dataset(fact)))
        paths[fact] = path
    return paths


def tune(url: str, data: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "daemon.cli", "tune", "--data", str(data), "--api", url, "--json",
           "--rounds", str(args.rounds), "--steps-per-round", str(args.steps), "--rank", str(args.rank)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0:
        raise RuntimeError(f"meshllm tune failed: {out.stderr.strip()}")
    return events


def peak_rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def round_times(events: list[dict[str, Any]]) -> list[float]:
    """Seconds of each round on one participant: between the ends of two rounds (the first
    from the moment the job started, the model's training copy loaded)."""
    ends = [e["elapsed_s"] for e in events if e.get("type") == "progress" and e.get("state") == "round_done"]
    start = next((e["elapsed_s"] for e in events if e.get("type") == "progress" and e.get("round") == 1), 0.0)
    return [round(b - a, 1) for a, b in zip([start, *ends], ends)]


def run_mesh(n: int, data: dict[str, Path], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    mesh = LocalMesh(n, model=args.model, threads=1, work_dir=work,
                     extra_args=["--mesh-name", f"bench-tune-{os.getpid()}-{n}", "--weights", args.weights])
    mesh.start()
    try:
        mesh.wait_ready(600)
        facts = list(FACTS)[:n] if n > 1 else [args.alone]
        t0 = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda i: tune(mesh.nodes[i].url, data[facts[i]], args), range(n)))
        elapsed = time.monotonic() - t0
        peaks = [peak_rss_mb(node.pid) for node in mesh.nodes]
        adapters = [mesh.nodes[i].state_dir / "adapters" for i in range(n)]
        digest = (adapters[0] / "last").read_text().strip()
        return {"events": runs, "seconds": round(elapsed, 1), "peak_rss_mb": peaks,
                "adapter": str(adapters[0] / digest), "digest": digest}
    finally:
        mesh.stop()


def score(adapter_dir: str | None, args: argparse.Namespace) -> dict[str, float]:
    """Mean token loss of each dataset's answers with the adapter (None: the base model)."""
    from meshllm.model.adapter import AdapterSpec, load_adapter
    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.shard import load_config
    from meshllm.model.source import resolve
    from meshllm.tune.data import tokenize_chats
    from meshllm.tune.train import LocalTrainer

    prepared = prepare(resolve(args.model))
    engine = Engine(prepared, spans=[], weights=args.weights)
    adapter = load_adapter(Path(adapter_dir), load_config(prepared)) if adapter_dir else None
    trainer = LocalTrainer(prepared, engine.weights, adapter.spec if adapter else AdapterSpec(args.rank, 2.0 * args.rank))
    if adapter is not None:
        trainer.set_adapter(adapter.tensors)
    return {fact: round(trainer.loss(tokenize_chats(engine.tokenizer, dataset(fact)), base=adapter is None), 4)
            for fact in FACTS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2)")
    parser.add_argument("--weights", default="auto", help="weight format of every node (default auto)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    results: dict[str, Any] = {"rounds": args.rounds, "steps": args.steps, "rank": args.rank,
                               "weights": args.weights}
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        data = write_data(work)
        fed = run_mesh(2, data, args, work / "federated")
        results["federated"] = {k: v for k, v in fed.items() if k != "events"}
        results["federated"]["round_s"] = [round_times(e) for e in fed["events"]]
        alone = {}
        for fact in FACTS:
            args.alone = fact
            alone[fact] = run_mesh(1, data, args, work / f"alone-{fact}")
        scores = {"base": score(None, args), "federated": score(fed["adapter"], args)}
        for fact in FACTS:
            scores[f"alone on {fact}"] = score(alone[fact]["adapter"], args)
        results["loss"] = scores
        results["alone_seconds"] = {fact: alone[fact]["seconds"] for fact in FACTS}
        results["alone_peak_rss_mb"] = {fact: alone[fact]["peak_rss_mb"] for fact in FACTS}
    print("loss on the answers (lower is better):")
    print(f"{'adapter':<14}" + "".join(f"{'data ' + f:>10}" for f in FACTS))
    for name, row in results["loss"].items():
        print(f"{name:<14}" + "".join(f"{row[f]:>10.3f}" for f in FACTS))
    print(f"federated job: {results['federated']['seconds']} s for {args.rounds} rounds; "
          f"peak memory per node {results['federated']['peak_rss_mb']} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
