#!/usr/bin/env python3
"""Chaos run: answers on a local mesh while nodes die and come back.

    python scripts/chaos.py [--nodes 4] [--answers 20] [--kills 20] [--model PATH]
                            [--max-tokens 48] [--seed 1] [--extra "--heartbeat-timeout 1.0"]
                            [--json [PATH]]

Starts a local mesh (tui.launcher.LocalMesh), answers each prompt once with no fault (the
reference: greedy, temperature 0), then streams M answers from node 1 (the entry node, never
killed) while it kills -9 random other nodes at random tokens of the answer, restarts them
after a random delay (so that at most --max-down are down at once), and now and then kills
the coordinator. Prints a summary: answers completed, answers identical to their reference,
the stall of each answer (its longest wait for a text chunk) as p50 / p95 / max over the
answers, "replanning" states seen, kills, and every error; --json prints it as JSON instead,
--json PATH writes the JSON there as well as printing the text. Exits 1 if any answer failed
or differed, 130 when interrupted.
Node logs are kept (and their folder named) when something went wrong, or with --keep-logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.client import DaemonClient, DaemonError, DaemonUnavailable, iterate_sync  # noqa: E402
from tui.launcher import LocalMesh  # noqa: E402

ENTRY = 0
"""Index of the entry node: answers are asked there, and it is never killed."""

PROMPTS = [
    "Tell me about the sea.",
    "What is a mesh network?",
    "Count from one to ten.",
    "Write a short poem about layers.",
    "Why is the sky blue?",
    "Name three fruits.",
]

POLL_S = 0.01


# -- one streamed answer -----------------------------------------------------------------


@dataclass
class Progress:
    """What the streaming thread has seen so far; read by the chaos loop."""

    chunks: int = 0
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class Answer:
    index: int
    prompt: str
    text: str = ""
    token_ids: list[int] | None = None
    """The generated ids, from the last chunk's ``meshllm.token_ids`` when the daemon sends them."""
    chunks: int = 0
    """Streamed chunks that carried text."""
    replanning: int = 0
    """Chunks that carried ``"meshllm": {"state": "replanning"}``."""
    longest_gap_s: float = 0.0
    """The longest wait for a text chunk (the first one counts from the request)."""
    finish_reason: str | None = None
    error: str | None = None
    killed: list[str] = field(default_factory=list)
    """The nodes killed while this answer streamed, e.g. "node3 (coordinator) at chunk 12"."""
    identical: bool | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason is not None

    def same_as(self, reference: Answer) -> bool:
        """Token for token when both carry ids, else character for character."""
        if self.token_ids is not None and reference.token_ids is not None:
            return self.token_ids == reference.token_ids and self.text == reference.text
        return self.text == reference.text


def stream_answer(url: str, answer: Answer, max_tokens: int, timeout_s: float, progress: Progress) -> None:
    """Stream one greedy answer into ``answer``; errors end up in ``answer.error``.

    ``timeout_s`` bounds the silence between two chunks: a longer stall is an error.
    """
    client = DaemonClient(url, connect_timeout_s=timeout_s, chat_idle_timeout_s=timeout_s)
    last = time.monotonic()
    try:
        for delta in iterate_sync(client.chat([{"role": "user", "content": answer.prompt}],
                                              max_tokens=max_tokens, temperature=0)):
            if delta.state == "replanning":
                answer.replanning += 1
            if delta.token_ids is not None:
                answer.token_ids = list(delta.token_ids)
            answer.finish_reason = delta.finish_reason or answer.finish_reason
            if delta.text:
                now = time.monotonic()
                answer.longest_gap_s = max(answer.longest_gap_s, now - last)
                last = now
                answer.text += delta.text
                answer.chunks += 1
                with progress.lock:
                    progress.chunks = answer.chunks
        if answer.finish_reason is None:
            answer.error = "the stream ended without a finish_reason"
    except DaemonError as e:
        answer.error = f"HTTP {e.status}: {e}" if e.status is not None else f"stream error: {e}"
    except DaemonUnavailable as e:  # refused, reset, timed out (a stall), cut short
        answer.error = f"{type(e).__name__}: {e}"
    finally:
        answer.longest_gap_s = max(answer.longest_gap_s, time.monotonic() - last if answer.error else 0.0)
        with progress.lock:
            progress.done = True


# -- the chaos -----------------------------------------------------------------------------


@dataclass
class Tally:
    kills: int = 0
    coordinator_kills: int = 0
    restarts: int = 0
    errors: list[str] = field(default_factory=list)
    """Things that went wrong outside the answers (a node that died on its own...)."""


class Chaos:
    """Kills and restarts nodes of ``mesh``; never the entry node, never too many at once."""

    def __init__(self, mesh: LocalMesh, node_ids: list[str], rng: random.Random, *, max_down: int,
                 coordinator_share: float, restart_s: tuple[float, float]) -> None:
        self.mesh = mesh
        self.node_ids = node_ids
        self.rng = rng
        self.max_down = max_down
        self.coordinator_share = coordinator_share
        self.restart_s = restart_s
        self.tally = Tally()
        self._restarts: dict[int, float] = {}
        """Killed nodes and when they come back."""
        self._reported_dead: set[int] = set()

    def victims(self) -> list[int]:
        """Nodes that may be killed now: up, ready, not the entry node."""
        if len(self._restarts) >= self.max_down:
            return []
        return [n.index for n in self.mesh.nodes
                if n.index != ENTRY and n.alive and n.ready.is_set()]

    def kill_one(self) -> str | None:
        """Kill -9 one node (now and then the coordinator); its name, or None when none may be."""
        victims = self.victims()
        if not victims:
            return None
        coordinator = self._coordinator()
        if coordinator in victims and self.rng.random() < self.coordinator_share:
            victim = coordinator
        else:
            others = [i for i in victims if i != coordinator]
            victim = self.rng.choice(others or victims)
        self.mesh.kill_node(victim)
        self.tally.kills += 1
        self.tally.coordinator_kills += victim == coordinator
        self._restarts[victim] = time.monotonic() + self.rng.uniform(*self.restart_s)
        return f"node{victim + 1}" + (" (coordinator)" if victim == coordinator else "")

    def _coordinator(self) -> int | None:
        try:
            coordinator_id = self.mesh.status(ENTRY).get("coordinator_id")
        except (OSError, ValueError):
            return None
        return self.node_ids.index(coordinator_id) if coordinator_id in self.node_ids else None

    def wait_for_victim(self, timeout_s: float) -> None:
        """Until a node may be killed (killed ones restart and get ready), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.victims() and time.monotonic() < deadline:
            self.tick()
            time.sleep(0.05)

    def tick(self) -> None:
        """Restart the nodes whose time has come; note nodes that died on their own."""
        now = time.monotonic()
        for index, due in list(self._restarts.items()):
            if due <= now:
                del self._restarts[index]
                self.mesh.start_node(index)
                self.tally.restarts += 1
        for node in self.mesh.nodes:
            if not node.alive and node.index not in self._restarts and node.index not in self._reported_dead:
                self._reported_dead.add(node.index)
                code = node.process.returncode if node.process is not None else None
                self.tally.errors.append(f"node{node.index + 1} exited on its own (exit code {code})")


def run_answer(mesh: LocalMesh, chaos: Chaos | None, answer: Answer, kill_steps: list[int],
               args: argparse.Namespace) -> list[int]:
    """Stream ``answer``, killing a node whenever it reaches the next of ``kill_steps``.
    Returns the kill steps it did not reach."""
    progress = Progress()
    thread = threading.Thread(
        target=stream_answer, name=f"answer{answer.index}", daemon=True,
        args=(mesh.nodes[ENTRY].url, answer, args.max_tokens, args.answer_timeout, progress))
    thread.start()
    steps = sorted(kill_steps)
    while True:
        with progress.lock:
            chunks, done = progress.chunks, progress.done
        if done:
            break
        if chaos is not None:
            while steps and chunks >= steps[0] and (victim := chaos.kill_one()) is not None:
                steps.pop(0)
                answer.killed.append(f"{victim} at chunk {chunks}")
            chaos.tick()
        time.sleep(POLL_S)
    thread.join()
    return steps


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4, help="daemons in the mesh (default 4; at least 2)")
    p.add_argument("--answers", type=int, default=20, help="answers streamed under chaos (default 20)")
    p.add_argument("--kills", type=int, default=20, help="kill -9s to aim for over the run (default 20)")
    p.add_argument("--model", default=None, help="model path (default: the built-in model)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (default 48)")
    p.add_argument("--seed", type=int, default=1, help="seed of the chaos (default 1)")
    p.add_argument("--extra", action="append", default=[], metavar="ARGS",
                   help='more options for every `meshllm up`, e.g. "--heartbeat-timeout 1.0" (repeatable)')
    p.add_argument("--max-down", type=int, default=None,
                   help="most nodes down at once (default: nodes - 2, at least 1)")
    p.add_argument("--coordinator-share", type=float, default=0.25,
                   help="chance that a kill takes the coordinator when it is not the entry (default 0.25)")
    p.add_argument("--restart-delay", type=float, nargs=2, default=(0.5, 5.0), metavar=("MIN_S", "MAX_S"),
                   help="a killed node restarts after a random delay in this range (default 0.5 5.0)")
    p.add_argument("--answer-timeout", type=float, default=120.0,
                   help="an answer fails after this long without a byte (default 120 s)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the mesh (300)")
    p.add_argument("--keep-logs", action="store_true", help="keep node logs even when all went well")
    p.add_argument("--repo", type=Path, default=None,
                   help="checkout whose daemons to run (default: this one), e.g. a git worktree of another commit")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="print the summary as JSON; with PATH, write the JSON there and print the text")
    args = p.parse_args(argv)
    if args.nodes < 2:
        p.error("--nodes must be at least 2 (node 1 is the entry and is never killed)")
    if args.answers < 1 or args.kills < 0 or args.max_tokens < 1:
        p.error("--answers and --max-tokens must be >= 1, --kills >= 0")
    if not 0 <= args.restart_delay[0] <= args.restart_delay[1]:
        p.error("--restart-delay needs 0 <= MIN_S <= MAX_S")
    args.max_down = args.max_down or max(1, args.nodes - 2)
    args.extra_args = [word for extra in args.extra for word in shlex.split(extra)]
    if "--mesh-name" not in args.extra_args:  # never join (or disturb) another mesh on this machine
        args.extra_args += ["--mesh-name", f"chaos-{os.getpid()}"]
    return args


def kills_per_answer(total: int, answers: int, rng: random.Random) -> list[int]:
    """Spread ``total`` kills over the answers, as evenly as whole numbers allow."""
    counts = [total // answers] * answers
    for i in rng.sample(range(answers), total % answers):
        counts[i] += 1
    return counts


def chaos_run(args: argparse.Namespace, mesh: LocalMesh) -> dict[str, Any]:
    rng = random.Random(args.seed)
    started = time.monotonic()
    mesh.start()
    try:
        plan = mesh.wait_ready(args.ready_timeout)
    except TimeoutError as e:
        first_line = str(e).splitlines()[0]
        raise RuntimeError(f"the mesh did not form: {first_line}\n{describe(mesh)}") from None
    node_ids = [mesh.status(i)["self_id"] for i in range(len(mesh.nodes))]
    log(args, f"mesh ready: {len(mesh.nodes)} nodes, {len(plan['stages'])} stages; references...")

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.answers)]
    references: dict[str, Answer] = {}
    for prompt in dict.fromkeys(prompts):
        ref = Answer(-1, prompt)
        run_answer(mesh, None, ref, [], args)
        if not ref.completed:
            raise RuntimeError(f"the reference answer to {prompt!r} failed: {ref.error}")
        references[prompt] = ref

    chaos = Chaos(mesh, node_ids, rng, max_down=args.max_down, coordinator_share=args.coordinator_share,
                  restart_s=tuple(args.restart_delay))
    answers: list[Answer] = []
    carried: list[int] = []
    for index, (prompt, kills) in enumerate(zip(prompts, kills_per_answer(args.kills, args.answers, rng))):
        chunks = max(1, references[prompt].chunks)
        steps = [rng.randrange(chunks) for _ in range(kills + len(carried))]
        if steps:
            chaos.wait_for_victim(args.ready_timeout)
        answer = Answer(index, prompt)
        carried = run_answer(mesh, chaos, answer, steps, args)
        answer.identical = answer.completed and answer.same_as(references[prompt])
        answers.append(answer)
        log(args, f"answer {index + 1}/{args.answers}: " + (
            "identical" if answer.identical else "DIFFERS" if answer.completed else f"FAILED: {answer.error}")
            + f" (killed {', '.join(answer.killed) or 'none'}; longest stall {answer.longest_gap_s:.2f} s, "
              f"{answer.replanning} replanning)")
    return summarize(args, answers, references, chaos.tally, time.monotonic() - started)


def describe(mesh: LocalMesh) -> str:
    """One line per node: what its status says about the plan and its peers."""
    ids: dict[str, str] = {}
    statuses: list[dict[str, Any] | str] = []
    for node in mesh.nodes:
        try:
            status = mesh.status(node.index)
        except (OSError, ValueError) as e:
            statuses.append("down" if not node.alive else f"no status ({e})")
            continue
        ids[status["self_id"]] = f"node{node.index + 1}"
        statuses.append(status)
    lines = []
    for node, status in zip(mesh.nodes, statuses):
        if isinstance(status, str):
            lines.append(f"  node{node.index + 1}: {status}")
            continue
        plan = status.get("plan")
        plan_text = "no plan" if plan is None else (
            f"plan {plan['term']}.{plan.get('epoch', '?')} {plan['state']}: "
            + ", ".join(f"{ids.get(s['node_id'], s['node_id'])} [{s['start_layer']}, {s['end_layer']})"
                        for s in plan["stages"]))
        coordinator = ids.get(status.get("coordinator_id") or "", status.get("coordinator_id"))
        lines.append(f"  node{node.index + 1}: term {status.get('term')}, coordinator {coordinator}, "
                     f"sees {len(status.get('nodes', []))} nodes, {plan_text}")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (``q`` in [0, 1]): the smallest value that at least a share
    ``q`` of the values do not exceed. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stall_stats(gaps: list[float]) -> dict[str, Any]:
    """p50 / p95 / max of the answers' stalls (each answer's longest gap), in seconds."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {"answers": len(gaps), "p50_s": r(percentile(gaps, 0.50)), "p95_s": r(percentile(gaps, 0.95)),
            "max_s": r(max(gaps) if gaps else None),
            "method": "nearest rank over each answer's longest wait for a text chunk (the first from the request)"}


def summarize(args: argparse.Namespace, answers: list[Answer], references: dict[str, Answer],
              tally: Tally, elapsed_s: float) -> dict[str, Any]:
    stalled = max(answers, key=lambda a: a.longest_gap_s)
    return {
        "nodes": args.nodes,
        "answers": len(answers),
        "completed": sum(a.completed for a in answers),
        "identical": sum(bool(a.identical) for a in answers),
        "kills": tally.kills,
        "kills_target": args.kills,
        "coordinator_kills": tally.coordinator_kills,
        "restarts": tally.restarts,
        "replanning_states": sum(a.replanning for a in answers),
        "longest_stall_s": round(stalled.longest_gap_s, 3),
        "longest_stall_answer": stalled.index + 1,
        "stall": stall_stats([a.longest_gap_s for a in answers]),
        "stall_completed": stall_stats([a.longest_gap_s for a in answers if a.completed]),
        "reference_stall": stall_stats([r.longest_gap_s for r in references.values()]),
        "reference_stall_s": round(max(r.longest_gap_s for r in references.values()), 3),
        "max_tokens": args.max_tokens,
        "model": args.model or "built-in",
        "seed": args.seed,
        "coordinator_share": args.coordinator_share,
        "elapsed_s": round(elapsed_s, 1),
        "errors": tally.errors,
        "failures": [
            {"answer": a.index + 1, "prompt": a.prompt, "error": a.error or "differs from the reference",
             "text": a.text, "reference": references[a.prompt].text}
            for a in answers if not a.identical
        ],
        "per_answer": [
            {**asdict(a), "longest_gap_s": round(a.longest_gap_s, 3)} for a in answers
        ],
    }


def print_summary(summary: dict[str, Any]) -> None:
    s = summary
    print(f"answers completed: {s['completed']}/{s['answers']}, identical to the reference: "
          f"{s['identical']}/{s['answers']}")
    print(f"kills: {s['kills']} (aimed at {s['kills_target']}), "
          f"of the coordinator: {s['coordinator_kills']}, restarts: {s['restarts']}")
    st, ref = s["stall"], s["reference_stall"]
    print(f"stall (longest wait for a chunk) over {st['answers']} answers: p50 {st['p50_s']:.2f} s, "
          f"p95 {st['p95_s']:.2f} s, max {st['max_s']:.2f} s (answer {s['longest_stall_answer']}); "
          f"without faults: p50 {ref['p50_s']:.2f} s, max {ref['max_s']:.2f} s")
    print(f"replanning states seen: {s['replanning_states']}")
    print(f"time: {s['elapsed_s']:.0f} s")
    for failure in s["failures"]:
        print(f"answer {failure['answer']} ({failure['prompt']!r}): {failure['error']}")
        if failure["text"]:
            print(f"   got:  {failure['text']!r}\n   want: {failure['reference']!r}")
    for error in s["errors"]:
        print(f"error: {error}")


def log(args: argparse.Namespace, message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr if args.json == "-" else sys.stdout, flush=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="meshllm-chaos-"))
    mesh = LocalMesh(args.nodes, model=args.model, extra_args=args.extra_args, work_dir=work_dir, cwd=args.repo)
    ok = False
    try:
        summary = chaos_run(args, mesh)
        ok = not summary["failures"] and not summary["errors"]
        summary["logs"] = None if ok and not args.keep_logs else str(work_dir)
        if args.json not in (None, "-"):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if args.json == "-":
            print(json.dumps(summary, indent=2))
        else:
            print_summary(summary)
            if summary["logs"]:
                print(f"node logs: {work_dir}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print(f"chaos: interrupted; node logs: {work_dir}", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"chaos: {e}\nnode logs: {work_dir}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mesh.stop()
        if ok and not args.keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
