"""Concurrent streamed answers through a daemon's HTTP API, and the local nodes they are measured on.

- ``stream_answer`` / ``answers_at_once``: N greedy streamed answers sent at once, each one's
  token arrival times kept (``tui.bench.concurrency.AnswerTiming``);
- ``measure_concurrency``: ``meshllm bench --concurrency 1,2,4,8`` against running nodes, the
  levels in alternating order over the rounds;
- ``long_prompt_under_load``: a long prompt sent while other answers decode (TTFT under load);
- ``start_nodes``: N loopback daemons (``tui.launcher.LocalMesh``), each optionally pinned to
  one core with ``taskset`` (two simulated devices on one machine);
- ``run_local_concurrency``: ``--concurrency`` without ``--api``: one such node, measured, stopped.

Every answer reaches a daemon only through ``tui.client``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from tui.bench.api import AGREEMENT_PROMPTS, DECODE_PROMPTS, _bench_error
from tui.bench.concurrency import (AnswerTiming, ConcurrencyReport, UnderLoad, level_result, node_info, round_order,
                                   under_load, with_ratios)
from tui.bench.report import BenchError
from tui.client import DaemonClient, DaemonError, DaemonUnavailable

if TYPE_CHECKING:
    from pathlib import Path
    from tui.launcher import LocalMesh

Clock = Callable[[], float]
Progress = Callable[[str], None]
REQUEST_TIMEOUT_S = 900.0


# == answers =======================================================================================


def decode_messages(index: int) -> list[dict[str, str]]:
    """The chat of answer ``index`` of a level: the decode bench's long-answer prompts, in turn."""
    return [{"role": "user", "content": DECODE_PROMPTS[index % len(DECODE_PROMPTS)]}]


def _refused(error: DaemonError | DaemonUnavailable) -> BenchError:
    if isinstance(error, DaemonError) and error.status == 429:
        return BenchError(f"the node turned an answer away ({error}): it admits fewer answers at once than "
                          "asked; start it with a larger --max-sessions, or ask for lower levels")
    return _bench_error(error)


async def stream_answer(client: DaemonClient, messages: list[dict[str, str]], max_tokens: int, clock: Clock,
                        on_token: Callable[[int], None] | None = None) -> AnswerTiming:
    """One greedy streamed answer and the arrival time of each of its tokens.

    A chunk with text is a token's arrival; the finish chunk is one only when it ends the answer
    on an end-of-sequence token (``finish_reason`` "stop") or the answer had no text at all (after
    "length" it follows the last text at once). ``on_token(count)`` after each arrival.
    """
    sent = clock()
    times: list[float] = []
    tokens = 0
    finish: str | None = None
    try:
        async for delta in client.chat(messages, max_tokens=max_tokens, temperature=0):
            now = clock()
            if delta.completion_tokens is not None:
                tokens = delta.completion_tokens
            arrived = bool(delta.text)
            if delta.finish_reason:
                finish = delta.finish_reason
                arrived = arrived or finish != "length" or not times
            if arrived:
                times.append(now)
                if on_token is not None:
                    on_token(len(times))
    except (DaemonError, DaemonUnavailable) as error:
        raise _refused(error) from None
    return AnswerTiming(sent, tuple(times), tokens or len(times), finish)


async def answers_at_once(clients: Sequence[DaemonClient], count: int, max_tokens: int,
                          clock: Clock) -> list[AnswerTiming]:
    """``count`` answers sent at the same moment, answer i to ``clients[i % len(clients)]``."""
    return list(await asyncio.gather(*(
        stream_answer(clients[i % len(clients)], decode_messages(i), max_tokens, clock) for i in range(count))))


# == the levels ====================================================================================


async def ready_status(client: DaemonClient, url: str) -> dict[str, Any]:
    """The node's status once it serves (BenchError when it has no active plan)."""
    status = await client.status()
    plan = status.get("plan")
    if status.get("model") is None or plan is None or plan.get("state") != "active":
        raise BenchError(f"the mesh at {url} has no active plan yet; try again when it is ready")
    return status


async def alternate_levels(
    targets: Mapping[str, Sequence[DaemonClient]],
    levels: Sequence[int],
    *,
    rounds: int,
    decode_tokens: int,
    progress: Progress = lambda message: None,
    clock: Clock = time.perf_counter,
) -> dict[str, dict[int, list[list[AnswerTiming]]]]:
    """Every level on every target, ``rounds`` times: in round r, the levels in ``round_order``
    and, per level, the targets in turn (reversed every other round), so a machine whose load
    drifts slows each alike. Each target warms up first (a short answer, then the largest level
    with 4 tokens). Returns target -> level -> the answers of each round."""
    def tag(name: str) -> str:
        return f"{name}: " if len(targets) > 1 else ""

    for name, clients in targets.items():
        progress(f"{tag(name)}warming up ({max(levels)} answers at once)")
        await stream_answer(clients[0], [{"role": "user", "content": AGREEMENT_PROMPTS[0]}], 4, clock)
        await answers_at_once(clients, max(levels), 4, clock)
    measured: dict[str, dict[int, list[list[AnswerTiming]]]] = {name: {n: [] for n in levels} for name in targets}
    names = list(targets)
    for r in range(rounds):
        for n in round_order(levels, r):
            for name in names if r % 2 == 0 else list(reversed(names)):
                answers = await answers_at_once(targets[name], n, decode_tokens + 1, clock)
                measured[name][n].append(answers)
                rate = level_result(n, [answers], decode_tokens + 1).aggregate_tokens_per_s
                progress(f"round {r + 1}/{rounds}: {tag(name)}{n} answer(s) at once: aggregate "
                         f"{rate or 0:.2f} decode tokens/s")
    return measured


async def open_clients(urls: Sequence[str]) -> list[DaemonClient]:
    """One client per URL, each with its own connection pool (close with ``close_clients``)."""
    clients = [DaemonClient(url, connect_timeout_s=10.0, request_timeout_s=REQUEST_TIMEOUT_S) for url in urls]
    for c in clients:
        await c.__aenter__()
    return clients


async def close_clients(clients: Sequence[DaemonClient]) -> None:
    for c in clients:
        await c.__aexit__(None, None, None)


async def measure_concurrency(
    urls: Sequence[str],
    levels: Sequence[int],
    *,
    rounds: int = 3,
    decode_tokens: int = 64,
    target: str | None = None,
    progress: Progress = lambda message: None,
    clock: Clock = time.perf_counter,
) -> ConcurrencyReport:
    """Each level of ``levels``: that many greedy answers of ``decode_tokens`` + 1 tokens sent at
    once, ``rounds`` times, the levels in alternating order round by round. Answers go to the
    ``urls`` in turn (one URL: every answer enters at that node)."""
    if not levels:
        raise BenchError("no concurrency level to measure")
    clients = await open_clients(urls)
    try:
        status = await ready_status(clients[0], urls[0])
        for client, url in zip(clients[1:], urls[1:]):
            await ready_status(client, url)
        label = target or ", ".join(urls)
        measured = await alternate_levels({label: clients}, levels, rounds=rounds, decode_tokens=decode_tokens,
                                          progress=progress, clock=clock)
    finally:
        await close_clients(clients)
    results = with_ratios([level_result(n, measured[label][n], decode_tokens + 1) for n in levels])
    return ConcurrencyReport(target=label, node=node_info(status), cpu_model=cpu_model_name(),
                             decode_tokens=decode_tokens, rounds=rounds, levels=results)


# == TTFT under load ===============================================================================


async def long_prompt_alone(client: DaemonClient, prompt: list[dict[str, str]], clock: Clock) -> AnswerTiming:
    """The long prompt on an idle node: its first token only."""
    return await stream_answer(client, prompt, 1, clock)


async def long_prompt_under_load(client: DaemonClient, prompt: list[dict[str, str]], *, background: int,
                                 background_tokens: int, lead_tokens: int,
                                 clock: Clock) -> tuple[UnderLoad, list[AnswerTiming], AnswerTiming]:
    """``background`` answers of ``background_tokens`` tokens start at once; once each of them has
    streamed ``lead_tokens`` tokens (or ended), the long prompt is sent (its first token only).

    A node that serves one answer at a time meets the condition only when the earlier answers
    have ended: ``UnderLoad.running`` says how many still decoded when the prompt went out.
    """
    seen = [0] * background
    ended = [False] * background
    all_led = asyncio.Event()

    def check() -> None:
        if all(s >= lead_tokens or e for s, e in zip(seen, ended)):
            all_led.set()

    def counter(i: int) -> Callable[[int], None]:
        def on_token(count: int) -> None:
            seen[i] = count
            check()
        return on_token

    async def one(i: int) -> AnswerTiming:
        try:
            return await stream_answer(client, decode_messages(i), background_tokens, clock, counter(i))
        finally:
            ended[i] = True
            check()

    tasks = [asyncio.ensure_future(one(i)) for i in range(background)]
    waiter = asyncio.ensure_future(all_led.wait())
    try:
        while not waiter.done():
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:  # a failed background answer ends the round
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        probe = await stream_answer(client, prompt, 1, clock)
        answers = list(await asyncio.gather(*tasks))
    finally:
        for t in [waiter, *tasks]:
            t.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
    return under_load(answers, probe), answers, probe


# == local nodes ===================================================================================


def cpu_model_name() -> str:
    """This machine's CPU: ``lscpu``'s "Model name" (/proc/cpuinfo when lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found = re.search(r"^Model name:\s*(.+)$", out, re.M)
    if not found:
        try:
            with open("/proc/cpuinfo") as f:
                found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        except OSError:
            found = None
    return found.group(1).strip() if found else "unknown"


@lru_cache(maxsize=1)
def up_accepts(flag: str) -> bool:
    """Whether ``meshllm up`` of this checkout has the option ``flag`` (its --help lists it)."""
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "up", "--help"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return re.search(rf"(^|[\s,]){re.escape(flag)}\b", done.stdout) is not None


def session_args(levels: Sequence[int]) -> list[str]:
    """``--max-sessions N`` for the largest level, where ``meshllm up`` has admission control:
    every answer of a level runs at once instead of waiting in its queue."""
    return ["--max-sessions", str(max(levels))] if levels and up_accepts("--max-sessions") else []


async def start_nodes(count: int, *, threads: int, cores: Sequence[int] | None = None, model: str | None = None,
                      cache_dir: str | None = None, weights: str | None = None, extra_args: Sequence[str] = (),
                      label: str = "concurrency", start_timeout_s: float = 300.0) -> LocalMesh:
    """``count`` loopback daemons (one mesh key, a mesh name of their own), ``threads`` each; with
    ``cores``, node i runs under ``taskset -c cores[i]``. Returns once their plan has ``count`` stages."""
    from tui.bench.mesh import wait_for_stages
    from tui.launcher import LocalMesh

    if cores is not None:
        if len(cores) != count:
            raise BenchError(f"{count} node(s) need {count} core(s) to pin, got {len(cores)}")
        if shutil.which("taskset") is None:
            raise BenchError("pinning nodes to cores needs `taskset` (util-linux)")
        allowed = os.sched_getaffinity(0)
        if any(c not in allowed for c in cores):
            raise BenchError(f"cores {sorted(set(cores) - allowed)} are not available here (have {sorted(allowed)})")
    extra = ["--mesh-name", f"{label}-{uuid.uuid4().hex[:8]}", *extra_args]
    extra += ["--cache-dir", cache_dir] if cache_dir else []
    extra += ["--weights", weights] if weights else []
    mesh = LocalMesh(count, model=model, threads=threads, extra_args=extra)
    try:
        for node in mesh.nodes:
            daemon = [sys.executable, "-m", "daemon.cli"]
            pin = ["taskset", "-c", str(cores[node.index])] if cores is not None else []
            node.launch([*pin, *daemon], env=mesh.env, cwd=mesh.cwd)
        await asyncio.to_thread(wait_for_stages, mesh, count, start_timeout_s)
    except BaseException:
        await asyncio.to_thread(mesh.stop)
        raise
    return mesh


def run_local_concurrency(
    levels: Sequence[int],
    *,
    threads: int,
    model: str | None = None,
    cache_dir: str | None = None,
    weights: str | None = None,
    rounds: int = 3,
    decode_tokens: int = 64,
    progress: Progress = lambda message: None,
) -> ConcurrencyReport:
    """``meshllm bench --concurrency`` without ``--api``: one loopback node with ``threads``
    threads, started for the run, measured, stopped."""

    async def main() -> ConcurrencyReport:
        progress(f"starting one local node, {threads} thread(s)")
        mesh = await start_nodes(1, threads=threads, model=model, cache_dir=cache_dir, weights=weights,
                                 extra_args=session_args(levels))
        try:
            return await measure_concurrency([mesh.nodes[0].url], levels, rounds=rounds, decode_tokens=decode_tokens,
                                             target=f"one local node, {threads} thread(s)", progress=progress)
        finally:
            await asyncio.to_thread(mesh.stop)

    return asyncio.run(main())


def report_result(result: dict[str, Any], started: float, table: Callable[[dict[str, Any]], str], *,
                  as_json: bool, out: "Path | None", log: Callable[[str], None]) -> None:
    """A script's end: when and how loaded it ran, the table (or JSON) printed, the JSON kept."""
    import json

    result["run"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                     "duration_s": round(time.time() - started, 1), "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2) if as_json else table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"written to {out}")
