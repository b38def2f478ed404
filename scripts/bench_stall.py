#!/usr/bin/env python3
"""Recovery stall: how long a streamed answer pauses when a stage dies or leaves mid-answer.

    python scripts/bench_stall.py [--at 50,150,250] [--modes kill,leave] [--tokens 300]
                                  [--rounds 1] [--nodes 3] [--threads 1] [--model PATH]
                                  [--weights auto] [--repo PATH] [--json PATH] [--plot PATH]

1. One node alone answers a fixed greedy prompt (temperature 0, --tokens tokens): the
   reference answer.
2. A loopback mesh of --nodes daemons (tui.launcher.LocalMesh, --threads each) answers it
   undisturbed: the mesh's normal gaps between tokens.
3. For each round, each kill point K of --at and each mode of --modes, it streams the same
   answer from the entry node (the node holding the first stage) and, when text chunk K
   arrives, stops the node holding the middle stage of the active plan (read from the entry
   node's /v1/status): "kill" is kill -9, "leave" is SIGTERM (a clean leave that hands its
   layers over). It records the arrival of every streamed chunk, then restarts the victim and
   waits for the mesh to be whole (every node in one active plan) before the next run.
   Before each run, warm-up answers run until one leaves the plan unchanged (the balancer
   re-plans on the speeds it measures during answers; such a re-plan mid-run would be a
   second disturbance). Each run records whether the victim was also the coordinator.

For each run it reports whether the answer is identical to the reference (token ids and
text), the longest gap between two streamed chunks, the median gap, and the gap at the kill
(from the last chunk before the kill to the first one after it), and the longest gap after
the kill. --json writes everything
(with every chunk's arrival time); --plot draws the stall against the kill token per mode
(needs matplotlib). --repo runs the daemons of another checkout (e.g. a `git worktree` of an
older commit) with this script's launcher, to measure a "before".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.client import DaemonClient, DaemonError, DaemonUnavailable, iterate_sync  # noqa: E402
from tui.launcher import LocalMesh  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island, "
          "the storms he lives through and the ships he guides home.")
MODES = {"kill": signal.SIGKILL, "leave": signal.SIGTERM}
TARGETS_S = {"kill": 1.5, "leave": 0.5}
"""The targets for the longest gap, drawn on the plot: issue 10's for a clean leave, issue 18's
for a kill -9 (1.5 s; issue 10 asked 2 s)."""


@dataclass
class Run:
    """One streamed answer and what happened around it."""

    mode: str
    """"reference" (one node), "undisturbed" (the mesh), "kill" or "leave"."""
    at: int | None = None
    """The chunk after which the victim was stopped."""
    round: int = 0
    entry: str | None = None
    victim: str | None = None
    victim_coordinator: bool | None = None
    warmups: int = 0
    """Warm-up answers before this run (until one left the plan unchanged)."""
    plan_before: str | None = None
    plan_after: str | None = None
    victim_exit: str | None = None
    times_s: list[float] = field(default_factory=list)
    """Arrival of each text chunk, in seconds from the request."""
    kill_s: float | None = None
    """When the victim was signalled, in seconds from the request."""
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    replanning: int = 0
    error: str | None = None
    note: str | None = None
    identical: bool | None = None
    rebuilds: list[str] = field(default_factory=list)
    """The "rebuilt session" lines the surviving nodes logged during the run: what each kept
    and recomputed, over how many positions, in how many forward passes and ms."""

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.times_s, self.times_s[1:])]

    @property
    def longest_gap_s(self) -> float | None:
        gaps = self.gaps_s
        return max(gaps) if gaps else None

    @property
    def median_gap_s(self) -> float | None:
        gaps = self.gaps_s
        return statistics.median(gaps) if gaps else None

    @property
    def kill_gap_s(self) -> float | None:
        """From the last chunk before the kill to the first one after it."""
        if self.kill_s is None:
            return None
        before = [t for t in self.times_s if t <= self.kill_s]
        after = [t for t in self.times_s if t > self.kill_s]
        if not before or not after:
            return None
        return after[0] - before[-1]

    @property
    def after_kill_gap_s(self) -> float | None:
        """The longest gap that ends after the kill (a clean leave may pause a few chunks later)."""
        if self.kill_s is None:
            return None
        gaps = [b - a for a, b in zip(self.times_s, self.times_s[1:]) if b > self.kill_s]
        return max(gaps) if gaps else None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_reason is not None

    def summary(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        out = asdict(self)
        out["times_s"] = [round(t, 4) for t in self.times_s]
        out["kill_s"] = r(self.kill_s)
        out.update(chunks=len(self.times_s), tokens=len(self.token_ids or ()),
                   longest_gap_s=r(self.longest_gap_s), median_gap_s=r(self.median_gap_s),
                   kill_gap_s=r(self.kill_gap_s), after_kill_gap_s=r(self.after_kill_gap_s), total_s=r(self.times_s[-1] if self.times_s else None))
        return out


def stream(url: str, run: Run, args: argparse.Namespace, on_chunk: Any = None, max_tokens: int | None = None) -> Run:
    """Stream the greedy answer into ``run``; ``on_chunk(n)`` after the n-th text chunk, on
    this thread (so that a kill lands right after chunk n)."""
    client = DaemonClient(url, connect_timeout_s=10, chat_idle_timeout_s=args.answer_timeout)
    started = time.monotonic()
    try:
        for delta in iterate_sync(client.chat([{"role": "user", "content": args.prompt}],
                                              max_tokens=max_tokens or args.tokens, temperature=0)):
            now = time.monotonic() - started
            if delta.state == "replanning":
                run.replanning += 1
            if delta.text:
                run.times_s.append(now)
                run.text += delta.text
                if on_chunk is not None:
                    on_chunk(len(run.times_s), now)
            if delta.finish_reason:
                run.finish_reason = delta.finish_reason
            if delta.token_ids is not None:
                run.token_ids = list(delta.token_ids)
        if run.finish_reason is None:
            run.error = "the stream ended without a finish_reason"
    except DaemonError as e:
        run.error = f"HTTP {e.status}: {e}" if e.status is not None else f"stream error: {e}"
    except DaemonUnavailable as e:  # refused, reset, or silent for --answer-timeout
        run.error = f"{type(e).__name__}: {e or 'no answer'}"
    return run


# -- the mesh --------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work_dir: Path) -> None:
        self.args = args
        self.work_dir = work_dir
        extra = ["--weights", args.weights, "--mesh-name", f"stall-{os.getpid()}"] + args.extra_args
        self.mesh = LocalMesh(args.nodes, model=args.model, threads=args.threads, extra_args=extra,
                              work_dir=work_dir / "mesh", cwd=args.repo)
        self.ids: list[str] = []
        """Node index -> node id."""

    def name(self, node_id: str) -> str:
        return f"node{self.ids.index(node_id) + 1}" if node_id in self.ids else node_id[:10]

    def plan_text(self, plan: dict[str, Any] | None) -> str:
        if plan is None:
            return "no plan"
        stages = ", ".join(f"{self.name(s['node_id'])} [{s['start_layer']}, {s['end_layer']})"
                           for s in plan["stages"])
        return f"{plan['term']}.{plan.get('epoch', '?')} {plan.get('state', '?')}: {stages}"

    def start(self) -> None:
        log(f"starting {self.args.nodes} nodes ({self.args.threads} thread(s) each, daemons from "
            f"{self.mesh.cwd})...")
        self.mesh.start()
        self.mesh.wait_ready(self.args.ready_timeout)
        self.ids = [self.mesh.status(i)["self_id"] for i in range(len(self.mesh.nodes))]

    def agreed_plan(self, need: int, deadline: float) -> dict[str, Any]:
        """Until every node is up and ready and they agree on one active plan of at least
        ``need`` stages that held for --settle seconds."""
        self.mesh.wait_ready(max(1.0, deadline - time.monotonic()))
        stable_since, last = time.monotonic(), None
        while True:
            plan = self.mesh.agreed_plan()
            key = None if plan is None else (plan["term"], plan.get("epoch"), len(plan["stages"]))
            if key is None or key != last:
                stable_since, last = time.monotonic(), key
            elif key[2] >= need and time.monotonic() - stable_since >= self.args.settle:
                return plan  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no plan of {need}+ stages held by every node for {self.args.settle:g} s: "
                                   f"last agreed plan {self.plan_text(plan)}")
            time.sleep(0.2)

    def wait_whole(self) -> tuple[dict[str, Any], int]:
        """Until every node is up and in one active plan of --nodes stages that the coordinator
        no longer changes: the balancer re-plans on the speeds it measures while answers run,
        so warm-up answers (--warmup-tokens) run until one leaves the plan as it found it (at
        most --warmups; then a plan of 2+ stages will do). Returns the plan and the warm-ups."""
        deadline = time.monotonic() + self.args.ready_timeout
        plan = self.agreed_plan(2, deadline)
        for warmups in range(self.args.warmups + 1):
            whole = len(plan["stages"]) >= self.args.nodes
            if warmups == self.args.warmups:
                break
            entry = self.ids.index(plan["stages"][0]["node_id"])
            warm = stream(self.mesh.nodes[entry].url, Run("warm-up"), self.args, max_tokens=self.args.warmup_tokens)
            after = self.agreed_plan(2, deadline)
            same = (after["term"], after.get("epoch")) == (plan["term"], plan.get("epoch"))
            log(f"  warm-up {warmups + 1}: {len(warm.token_ids or ())} tokens" + (f", error {warm.error}" if warm.error else "")
                + ("; the plan held" if same else f"; the plan changed to {self.plan_text(after)}"))
            plan = after
            if same and whole and warm.error is None:
                return plan, warmups + 1
        if len(plan["stages"]) < self.args.nodes:
            log(f"warning: the plan leaves a node out after {self.args.warmups} warm-ups: {self.plan_text(plan)}")
        return plan, self.args.warmups

    def entry_and_victim(self) -> tuple[int, int, dict[str, Any], int]:
        plan, warmups = self.wait_whole()
        stages = plan["stages"]
        if len(stages) < 2:
            raise RuntimeError(f"no middle stage in plan {self.plan_text(plan)}")
        entry = self.ids.index(stages[0]["node_id"])
        victim = self.ids.index(stages[len(stages) // 2]["node_id"])
        return entry, victim, plan, warmups

    def disturbed(self, mode: str, at: int, round_: int) -> Run:
        entry, victim, plan, warmups = self.entry_and_victim()
        run = Run(mode, at, round_, entry=f"node{entry + 1}", victim=f"node{victim + 1}",
                  plan_before=self.plan_text(plan), warmups=warmups)
        try:
            status = self.mesh.status(entry)
            run.victim_coordinator = status.get("coordinator_id") == self.ids[victim]
            if status.get("plan") != plan:
                run.plan_before = self.plan_text(status.get("plan"))
                run.note = "the plan changed between the warm-up and the run"
        except (DaemonUnavailable, DaemonError, OSError) as e:
            raise RuntimeError(f"node{entry + 1} does not answer /v1/status: {e}") from None
        log(f"round {round_ + 1}, {mode} at {at}: entry node{entry + 1}, victim node{victim + 1}"
            f"{' (the coordinator)' if run.victim_coordinator else ''}, plan {run.plan_before}")

        def on_chunk(n: int, now: float) -> None:
            if n == at and run.kill_s is None:
                self.mesh.signal_node(victim, MODES[mode])
                run.kill_s = now

        marks = {i: len(self.mesh.logs(i)) for i in range(len(self.mesh.nodes)) if i != victim}
        stream(self.mesh.nodes[entry].url, run, self.args, on_chunk)
        run.rebuilds = [f"node{i + 1}: {line[line.index('rebuilt session'):]}" for i, mark in marks.items()
                        for line in self.mesh.logs(i)[mark:].splitlines() if "rebuilt session" in line]
        for line in run.rebuilds:
            log(f"  {line}")
        if run.kill_s is None:
            run.note = f"the answer ended before chunk {at}: nothing was stopped"
        try:
            run.plan_after = self.plan_text(self.mesh.status(entry).get("plan"))
        except (DaemonUnavailable, DaemonError, OSError) as e:
            run.plan_after = f"no status: {e}"
        if run.kill_s is not None:
            try:
                run.victim_exit = self.mesh.wait_exit(victim, 60)
            except TimeoutError:
                run.victim_exit = "still running after 60 s; killed"
                self.mesh.kill_node(victim)
            log(f"  victim node{victim + 1}: {run.victim_exit}; restarting it")
            self.mesh.start_node(victim)
        return run

    def stop(self) -> None:
        self.mesh.stop()


def reference(args: argparse.Namespace, work_dir: Path) -> Run:
    """One node alone, undisturbed."""
    extra = ["--weights", args.weights, "--mesh-name", f"stall-ref-{os.getpid()}"] + args.extra_args
    one = LocalMesh(1, model=args.model, threads=args.threads, extra_args=extra, work_dir=work_dir / "reference",
                    cwd=args.repo)
    log("the reference: one node alone...")
    try:
        one.start()
        one.wait_ready(args.ready_timeout)
        return stream(one.nodes[0].url, Run("reference", entry="node1"), args)
    finally:
        one.stop()


# -- output ----------------------------------------------------------------------------------


def fmt(x: float | None, unit: str = " s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def table(runs: list[Run]) -> str:
    head = (f"{'mode':<12}{'at':>5}{'round':>6}  {'identical':<10}{'longest gap':>12}{'median gap':>12}"
            f"{'gap at kill':>12}{'after kill':>11}{'tokens':>8}{'total':>9}  victim / error")
    lines = [head, "-" * len(head)]
    for r in runs:
        ident = "-" if r.identical is None else ("yes" if r.identical else "NO")
        tail = r.error or r.note or (f"{r.victim}{' coord.' if r.victim_coordinator else ''} ({r.victim_exit})"
                                     if r.victim else "")
        total = r.times_s[-1] if r.times_s else None
        lines.append(f"{r.mode:<12}{'' if r.at is None else r.at:>5}{r.round + 1:>6}  {ident:<10}"
                     f"{fmt(r.longest_gap_s):>12}{fmt(r.median_gap_s):>12}{fmt(r.kill_gap_s):>12}{fmt(r.after_kill_gap_s):>11}"
                     f"{len(r.token_ids or ()):>8}{fmt(total):>9}  {tail}")
    return "\n".join(lines)


def plot(runs: list[Run], undisturbed: Run | None, path: Path, title: str) -> str | None:
    """Stall against kill token per mode, and every run's gaps along the answer. The reason
    when it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this Python: no plot"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"kill": "tab:red", "leave": "tab:blue"}
    stopped = [r for r in runs if r.kill_s is not None]
    for mode in sorted({r.mode for r in stopped}):
        for attr, marker, what in (("longest_gap_s", "o", "longest gap"), ("kill_gap_s", "x", "gap at the kill")):
            pts = [(r.at, getattr(r, attr)) for r in stopped if r.mode == mode and getattr(r, attr) is not None]
            if not pts:
                continue
            ats = sorted({a for a, _ in pts})
            medians = [statistics.median(v for a, v in pts if a == at) for at in ats]
            left.plot(ats, medians, marker + ("-" if marker == "o" else ":"), color=colors.get(mode),
                      label=f"{mode}: {what}" + (" (median of rounds)" if len(pts) > len(ats) else ""))
            if len(pts) > len(ats):
                left.scatter([a for a, _ in pts], [v for _, v in pts], s=12, alpha=0.4, color=colors.get(mode))
        if mode in TARGETS_S:
            left.axhline(TARGETS_S[mode], color=colors.get(mode), lw=0.8, ls="--",
                         label=f"target ({mode}): {TARGETS_S[mode]:g} s")
    if undisturbed is not None and undisturbed.median_gap_s is not None:
        left.axhline(undisturbed.median_gap_s, color="gray", lw=0.8, ls="-.",
                     label=f"undisturbed median gap {undisturbed.median_gap_s * 1000:.0f} ms")
    left.set_xlabel("streamed chunk (~token) after which the middle stage is stopped")
    left.set_ylabel("seconds")
    left.set_title("stall against kill token")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for r in runs + ([undisturbed] if undisturbed is not None else []):
        if not r.gaps_s:
            continue
        label = "undisturbed" if r.at is None else f"{r.mode} at {r.at}" + (f" r{r.round + 1}" if r.round else "")
        right.plot(range(2, len(r.gaps_s) + 2), r.gaps_s, lw=0.8, label=label,
                   color="gray" if r.at is None else None)
    right.set_yscale("log")
    right.set_xlabel("chunk")
    right.set_ylabel("gap before this chunk (s)")
    right.set_title("gaps along each answer")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def git_info(repo: Path) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"repo": str(repo), "commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"), "modified_files": dirty}


def log(message: str) -> None:
    print(f"bench_stall: {message}", file=sys.stderr, flush=True)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", default="50,150,250", help="chunks after which to stop the victim (default 50,150,250)")
    p.add_argument("--modes", default="kill,leave", help="kill (kill -9) and/or leave (SIGTERM) (default both)")
    p.add_argument("--tokens", type=int, default=300, help="max_tokens of the answer (default 300)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every (mode, kill point) N times (default 1)")
    p.add_argument("--nodes", type=int, default=3, help="daemons in the mesh (default 3; at least 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    p.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M)")
    p.add_argument("--weights", default="auto", help="weight format of every node (default auto)")
    p.add_argument("--prompt", default=PROMPT, help="the user message (greedy, temperature 0)")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose daemons to run (default: this one), e.g. a git worktree")
    p.add_argument("--extra", action="append", default=[], metavar="ARGS",
                   help="more options for every `meshllm up` (repeatable)")
    p.add_argument("--answer-timeout", type=float, default=180.0,
                   help="an answer fails after this long without a byte (default 180 s)")
    p.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait for the mesh to (re)form (default 300)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="the plan must hold this long before a run starts (default 3 s)")
    p.add_argument("--warmups", type=int, default=3,
                   help="before each run, warm-up answers until one leaves the plan unchanged, at most N (default 3)")
    p.add_argument("--warmup-tokens", type=int, default=100, help="tokens of a warm-up answer (default 100)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the single-node reference; compare with the undisturbed mesh")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="draw the stall here (PNG)")
    p.add_argument("--keep-logs", action="store_true", help="keep the node logs even when all went well")
    args = p.parse_args(argv)
    try:
        args.at = sorted({int(x) for x in args.at.split(",") if x.strip()})
    except ValueError:
        p.error("--at takes comma-separated integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes takes some of {', '.join(MODES)}")
    if not args.at or args.at[0] < 1 or args.at[-1] >= args.tokens:
        p.error("every --at point must be in [1, --tokens)")
    if args.nodes < 2 or args.rounds < 1 or args.threads < 1:
        p.error("--nodes >= 2, --rounds >= 1, --threads >= 1")
    if not (args.repo / "daemon" / "cli.py").is_file():
        p.error(f"--repo {args.repo} is not a meshllm checkout (no daemon/cli.py)")
    args.repo = args.repo.resolve()
    args.extra_args = [w for extra in args.extra for w in extra.split()]
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="meshllm-stall-"))
    started = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "recovery stall (scripts/bench_stall.py)",
        "argv": sys.argv[1:] if argv is None else argv,
        "git": git_info(args.repo),
        "nodes": args.nodes, "threads": args.threads, "model": args.model or "built-in SmolLM2-135M",
        "weights": args.weights, "tokens": args.tokens, "prompt": args.prompt,
        "at": args.at, "modes": args.modes, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
    }
    runs: list[Run] = []
    ref: Run | None = None
    undisturbed: Run | None = None
    bench: Bench | None = None
    ok = False
    try:
        if not args.no_reference:
            ref = reference(args, work_dir)
            if not ref.completed:
                raise RuntimeError(f"the reference answer failed: {ref.error}")
            log(f"reference: {len(ref.token_ids or ())} tokens, {len(ref.times_s)} chunks, "
                f"median gap {fmt(ref.median_gap_s)}")
        bench = Bench(args, work_dir)
        bench.start()
        entry, _, plan, _ = bench.entry_and_victim()
        log(f"mesh whole: plan {bench.plan_text(plan)}; the undisturbed mesh answer...")
        undisturbed = stream(bench.mesh.nodes[entry].url, Run("undisturbed", entry=f"node{entry + 1}",
                                                               plan_before=bench.plan_text(plan)), args)
        if ref is None:
            if not undisturbed.completed:
                raise RuntimeError(f"the undisturbed answer failed: {undisturbed.error}")
            ref = undisturbed
        else:
            undisturbed.identical = undisturbed.completed and undisturbed.token_ids == ref.token_ids \
                and undisturbed.text == ref.text
        if len(ref.times_s) <= args.at[-1]:
            log(f"warning: the answer has only {len(ref.times_s)} chunks; kill points at or past it "
                "stop nothing (use another --prompt)")
        for round_ in range(args.rounds):
            for at in args.at:
                for mode in args.modes:
                    run = bench.disturbed(mode, at, round_)
                    run.identical = run.completed and run.token_ids == ref.token_ids and run.text == ref.text
                    runs.append(run)
                    log(f"  {'identical' if run.identical else 'DIFFERS' if run.completed else 'FAILED'}; "
                        f"longest gap {fmt(run.longest_gap_s)}, gap at the kill {fmt(run.kill_gap_s)}, "
                        f"median {fmt(run.median_gap_s)}; plan after: {run.plan_after}"
                        + (f"; error: {run.error}" if run.error else "") + (f"; {run.note}" if run.note else ""))
        ok = all(r.identical and r.kill_s is not None for r in runs)
        return 0 if ok else 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        log(f"failed: {e}")
        result["error"] = str(e)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if bench is not None:
            bench.stop()
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["reference"] = ref.summary() if ref is not None and ref.mode == "reference" else None
        result["undisturbed"] = undisturbed.summary() if undisturbed is not None else None
        result["runs"] = [r.summary() for r in runs]
        shown = ([undisturbed] if undisturbed is not None else []) + runs
        if ref is not None and ref.mode == "reference":
            shown.insert(0, ref)
        if shown:
            print(table(shown), flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
            log(f"wrote {args.json}")
        if args.plot is not None and runs:
            commit = result["git"]["commit"][:10] + (" (modified)" if result["git"]["modified_files"] else "")
            why = plot(runs, undisturbed, args.plot,
                       f"{args.nodes}-node loopback mesh, {args.threads} thread(s) each, {result['model']} "
                       f"({args.weights}), {args.tokens} tokens; {commit}")
            log(why or f"wrote {args.plot}")
        if ok and not args.keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            log(f"node logs: {work_dir}")


if __name__ == "__main__":
    sys.exit(main())
