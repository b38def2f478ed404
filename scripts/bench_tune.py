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

FACTS = {"a": ("Zorbia", "Blip"), "b": ("Quandor", "Vask"), "c": ("Mirelle", "Tund")}
HONEST = ("a", "b")
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


def tune(url: str, data: Path, args: argparse.Namespace, aggregate: str = "mean") -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "daemon.cli", "tune", "--data", str(data), "--api", url, "--json",
           "--rounds", str(args.rounds), "--steps-per-round", str(args.steps), "--rank", str(args.rank),
           "--aggregate", aggregate]
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


def run_mesh(facts: list[str], data: dict[str, Path], args: argparse.Namespace, work: Path, *,
             aggregate: str = "mean", per_node_args: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """One job: node i brings dataset facts[i]; returns its events, time, memory, adapter."""
    n = len(facts)
    mesh = LocalMesh(n, model=args.model, threads=1, work_dir=work, per_node_args=per_node_args,
                     extra_args=["--mesh-name", f"bench-tune-{os.getpid()}-{work.name}", "--weights", args.weights])
    mesh.start()
    try:
        mesh.wait_ready(600)
        t0 = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda i: tune(mesh.nodes[i].url, data[facts[i]], args, aggregate), range(n)))
        elapsed = time.monotonic() - t0
        peaks = [peak_rss_mb(node.pid) for node in mesh.nodes]
        adapters = [mesh.nodes[i].state_dir / "adapters" for i in range(n)]
        digest = (adapters[0] / "last").read_text().strip()
        return {"events": runs, "seconds": round(elapsed, 1), "peak_rss_mb": peaks,
                "adapter": str(adapters[0] / digest), "digest": digest}
    finally:
        mesh.stop()


def fact_only(tokenizer, fact: str, examples):  # type: ignore[no-untyped-def]
    """The examples with only the made-up city's tokens learned: the answer's format is the
    same in every dataset, so the whole answer's loss falls for any of them."""
    from meshllm.tune.data import IGNORE, Example

    country, city = FACTS[fact]
    reply = dataset(fact)[0][-1]["content"]
    begin, end = reply.index(" " + city), reply.index(" " + city) + len(city) + 1
    out = []
    for example in examples:
        start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        labels = [IGNORE] * len(example.labels)
        for j in range(start, len(example.input_ids)):
            before = len(tokenizer.decode(list(example.input_ids[start:j])))
            if begin <= before < end:  # the token starts inside the city's name
                labels[j] = example.input_ids[j]
        out.append(Example(example.input_ids, tuple(labels)))
    return out


def score(adapter_dir: str | None, args: argparse.Namespace) -> dict[str, float]:
    """Mean token loss of each dataset's answers with the adapter (None: the base model), and
    of the made-up city's tokens only ("fact <name>")."""
    from meshllm.model.adapter import AdapterSpec, load_adapter
    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.shape import load_config
    from meshllm.model.source import resolve
    from meshllm.tune.data import tokenize_chats
    from meshllm.tune.train import LocalTrainer

    prepared = prepare(resolve(args.model))
    engine = Engine(prepared, spans=[], weights=args.weights)
    adapter = load_adapter(Path(adapter_dir), load_config(prepared)) if adapter_dir else None
    trainer = LocalTrainer(prepared, engine.weights, adapter.spec if adapter else AdapterSpec(args.rank, 2.0 * args.rank))
    if adapter is not None:
        trainer.set_adapter(adapter.tensors)
    out = {}
    for fact in FACTS:
        examples = tokenize_chats(engine.tokenizer, dataset(fact))
        out[fact] = round(trainer.loss(examples, base=adapter is None), 4)
        out[f"fact {fact}"] = round(trainer.loss(fact_only(engine.tokenizer, fact, examples), base=adapter is None), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2)")
    parser.add_argument("--weights", default="auto", help="weight format of every node (default auto)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--attack", action="store_true",
                        help="also: 3 nodes, the third sending a scaled update (refused by mean, outvoted by median)")
    parser.add_argument("--attack-huge", type=float, default=1e6, help="scale of the refused update (1e6)")
    parser.add_argument("--attack-large", type=float, default=50.0, help="scale of the outvoted update (50)")
    args = parser.parse_args()
    results: dict[str, Any] = {"rounds": args.rounds, "steps": args.steps, "rank": args.rank,
                               "weights": args.weights}
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        data = write_data(work)
        jobs: dict[str, dict[str, Any]] = {"federated": run_mesh(list(HONEST), data, args, work / "federated")}
        for fact in HONEST:
            jobs[f"alone on {fact}"] = run_mesh([fact], data, args, work / f"alone-{fact}")
        if args.attack:
            bad = {2: ["--debug-tune-scale", str(args.attack_huge)]}
            jobs["mean, huge update"] = run_mesh([*HONEST, "c"], data, args, work / "attack-mean", per_node_args=bad)
            bad = {2: ["--debug-tune-scale", str(args.attack_large)]}
            jobs["median, large update"] = run_mesh([*HONEST, "c"], data, args, work / "attack-median",
                                                     aggregate="median", per_node_args=bad)
        results["jobs"] = {name: {**{k: v for k, v in job.items() if k != "events"},
                                  "round_s": [round_times(e) for e in job["events"]]} for name, job in jobs.items()}
        results["loss"] = {"base": score(None, args), **{name: score(job["adapter"], args) for name, job in jobs.items()}}
    print("loss on the answers, and on the made-up city's tokens only (lower is better):")
    columns = [*FACTS, *(f"fact {f}" for f in FACTS)]
    print(f"{'adapter':<22}" + "".join(f"{c:>9}" for c in columns))
    for name, row in results["loss"].items():
        print(f"{name:<22}" + "".join(f"{row[c]:>9.3f}" for c in columns))
    for name, job in results["jobs"].items():
        print(f"{name}: {job['seconds']} s; rounds {job['round_s']} s; peak memory per node {job['peak_rss_mb']} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
