"""What one decode hop costs: a decode-sized Forward ping-ponged between LinkManagers.

A *hop* is one transfer of a decode step's hidden state (1 x 576 float32 = 2,304 bytes of
tensor data, ~2.35 KB as a framed ``Forward``) from one node to the next over
``daemon.net.links.LinkManager`` (aiortc, DTLS-encrypted SCTP data channels), in loopback mode.
Each hop here includes what a stage does around the link: ``decode_tensor`` of what arrived
and ``encode_tensor`` of what it passes on (f32, no zstd, as the mesh does for one position).

Modes (``--mode``):

- ``inproc``: two nodes on one event loop; per hop = round trip / 2;
- ``xproc``: the second node in its own process (one daemon per process, as in a real mesh);
- ``ring3``: three nodes, two in their own processes: A -> B -> C -> A; per hop = round / 3.

``--torch-thread`` runs, in every process of the mesh, a thread doing small torch matmuls in a
loop (``torch.set_num_threads(1)``), as a stage's worker thread does while the hop runs: the
GIL it holds delays the event loop.

``--worker-call`` makes each relay pass the hidden state through ``GenerationWorker.call``
(daemon/node/worker.py) with no compute, as a stage does around its layers: what the thread
hand-over adds to a hop.

``--breakdown`` prints what each component costs per hop: micro-benchmarks of the wire steps
(cbor, tensor, framing) and a cProfile of the in-process ping-pong grouped by layer (aiortc
SCTP, DTLS, aioice, asyncio, pyee, links, wire), scaled to the measured unprofiled time.

``--compare DIR`` measures the same mode in alternating rounds against another checkout of
this repository (e.g. ``git worktree add /tmp/hop-base HEAD~3``): each round runs this script
in a fresh process with ``DIR`` or this tree first on ``sys.path``, so both are measured on
the same machine at the same time. The ratio (this tree / DIR) is the number to trust; the
absolute values move with the load of the machine.

Examples::

    .venv/bin/python scripts/bench_hop.py --mode inproc --hops 2000
    .venv/bin/python scripts/bench_hop.py --mode xproc --torch-thread
    .venv/bin/python scripts/bench_hop.py --breakdown
    .venv/bin/python scripts/bench_hop.py --compare /tmp/hop-base --mode xproc --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("BENCH_HOP_TREE"):
    sys.path.insert(0, os.environ["BENCH_HOP_TREE"])
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402

from daemon.net.links import LinkManager  # noqa: E402
from meshllm import wire  # noqa: E402

HIDDEN = 576
SESSION = "n-0000000000000000/s-1"


def make_hello(index: int) -> wire.Hello:
    return wire.Hello(
        node_id=f"n-{index:016x}", name=f"bench{index}", protocol_version=wire.PROTOCOL_VERSION,
        mesh_name="bench", model_id="bench-model", api_port=8470, mem_budget_bytes=1 << 30,
        ms_per_layer=1.0, can_coordinate=True,
    )


def node_id(index: int) -> str:
    return f"n-{index:016x}"


# --- a node ---------------------------------------------------------------------------------


class BenchNode:
    """A LinkManager behind a signaling server. A Forward that arrives goes, like a stage's,
    through a queue to one consumer task, which decodes its tensor, encodes it again and passes
    it on to ``route[0]`` (as a Result when that is the last hop). ``on_result`` gets Results."""

    def __init__(self, index: int, worker_call: bool = False) -> None:
        self.index = index
        self.worker: Any = None
        if worker_call:
            from daemon.node.worker import GenerationWorker

            self.worker = GenerationWorker(1)
        self.queue: asyncio.Queue[tuple[str, wire.Message]] = asyncio.Queue()
        self.on_result: Callable[[wire.Result], None] = lambda msg: None
        self.lm = LinkManager(
            make_hello(index), loopback=True, mesh_key=b"bench key: 32 bytes long, ok!!!!",
            on_message=self._on_message, on_link_up=lambda event: None,
            on_link_down=lambda event: None, is_compatible=lambda hello: None,
            heartbeat_interval_s=0.2, lost_after_s=5.0,
        )
        self.runner: web.AppRunner | None = None
        self.address = ""
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.lm.start()
        app = web.Application()
        app.add_routes(self.lm.signaling_routes())
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"
        self.task = asyncio.get_running_loop().create_task(self._relay())
        if self.worker is not None:
            self.worker.start()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.worker is not None:
            self.worker.stop()
        await self.lm.close()
        if self.runner is not None:
            await self.runner.cleanup()

    def _on_message(self, sender: str, msg: wire.Message) -> None:
        if isinstance(msg, wire.Result):
            self.on_result(msg)
        elif isinstance(msg, wire.Forward):
            self.queue.put_nowait((sender, msg))

    async def _relay(self) -> None:
        while True:
            _, msg = await self.queue.get()
            assert isinstance(msg, wire.Forward)
            hidden = wire.decode_tensor(msg.hidden, expect_shape=(None, HIDDEN))
            if self.worker is not None:
                hidden = await self.worker.call(lambda hidden=hidden: hidden)
            payload = wire.encode_tensor(hidden, "f32", compress=False)
            if len(msg.route) == 1:
                reply: wire.Message = wire.Result(msg.session_id, msg.seq, payload)
            else:
                reply = wire.Forward(msg.session_id, msg.seq, msg.term, msg.epoch,
                                     msg.start_pos, payload, msg.route[1:])
            await self.lm.send(msg.route[0], reply, channel="activation")


# --- a busy torch thread --------------------------------------------------------------------


def start_torch_thread() -> Callable[[], None]:
    """A daemon thread running small matmuls until the returned function is called (which
    waits for the thread to end: torch aborts the process when it exits under a busy thread)."""
    import torch

    torch.set_num_threads(1)
    stop = threading.Event()

    def spin() -> None:
        a = torch.randn(64, 576)
        b = torch.randn(576, 576)
        with torch.inference_mode():
            while not stop.is_set():
                for _ in range(10):
                    a = torch.tanh(a @ b * 0.01)

    thread = threading.Thread(target=spin, name="bench-torch", daemon=True)
    thread.start()

    def stop_and_join() -> None:
        stop.set()
        thread.join(timeout=10)

    return stop_and_join


# --- the origin: sends a step around the ring and times it ----------------------------------


async def ping(origin: BenchNode, route: list[str], hops: int, warmup: int) -> list[float]:
    """Send ``warmup + hops`` steps around ``route`` (ending at the origin); return the round
    times in seconds of the last ``hops``."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[wire.Result] | None = None

    def on_result(msg: wire.Result) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    origin.on_result = on_result
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, HIDDEN), dtype=np.float32)
    times: list[float] = []
    for seq in range(warmup + hops):
        waiter = loop.create_future()
        t0 = time.perf_counter()
        payload = wire.encode_tensor(hidden, "f32", compress=False)
        msg = wire.Forward(SESSION, seq, 1, 1, 100 + seq % 1000, payload, tuple(route[1:]))
        await origin.lm.send(route[0], msg, channel="activation")
        result = await waiter
        wire.decode_tensor(result.hidden, expect_shape=(None, HIDDEN))
        if seq >= warmup:
            times.append(time.perf_counter() - t0)
    return times


# --- child process (xproc / ring3) ----------------------------------------------------------


async def serve_child(index: int, torch_thread: bool, worker_call: bool) -> None:
    """A relay node in its own process. stdout: its address; stdin: ``connect ADDR`` lines,
    ``quit`` (or EOF) to stop."""
    node = BenchNode(index, worker_call)
    await node.start()
    stop = start_torch_thread() if torch_thread else None
    print(node.address, flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "quit":
            break
        if line.startswith("connect "):
            try:
                peer = await node.lm.connect(line.split()[1])
                print(f"ok {peer}", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                print(f"error {exc!r}", flush=True)
    if stop is not None:
        stop()
    await node.close()


class Child:
    def __init__(self, index: int, torch_thread: bool, worker_call: bool) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(index)]
        if torch_thread:
            cmd.append("--torch-thread")
        if worker_call:
            cmd.append("--worker-call")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=os.environ.copy())
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("bench child did not start")

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- one measurement ------------------------------------------------------------------------


async def measure(mode: str, hops: int, warmup: int, torch_thread: bool,
                  profile_to: str | None = None, worker_call: bool = False) -> dict[str, float]:
    """Per-hop times (ms) of one run of ``mode``."""
    origin = BenchNode(0)
    await origin.start()
    locals_: list[BenchNode] = []
    children: list[Child] = []
    stop = start_torch_thread() if torch_thread else None
    try:
        if mode == "inproc":
            other = BenchNode(1, worker_call)
            await other.start()
            locals_.append(other)
            await origin.lm.connect(other.address)
            route = [node_id(1), node_id(0)]
        elif mode == "xproc":
            children.append(Child(1, torch_thread, worker_call))
            await origin.lm.connect(children[0].address)
            route = [node_id(1), node_id(0)]
        elif mode == "ring3":
            children += [Child(1, torch_thread, worker_call), Child(2, torch_thread, worker_call)]
            await origin.lm.connect(children[0].address)
            await origin.lm.connect(children[1].address)
            reply = await asyncio.to_thread(children[0].command, f"connect {children[1].address}")
            if not reply.startswith("ok"):
                raise RuntimeError(f"child link failed: {reply}")
            route = [node_id(1), node_id(2), node_id(0)]
        else:
            raise ValueError(mode)
        await asyncio.sleep(0.3)  # let the links settle (first heartbeats)
        profiler = None
        if profile_to:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        times = await ping(origin, route, hops, warmup)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_to)
    finally:
        if stop is not None:
            stop()
        for child in children:
            child.close()
        for node in locals_:
            await node.close()
        await origin.close()
    per_hop = sorted(t * 1000 / len(route) for t in times)
    return {
        "median_ms": statistics.median(per_hop),
        "p90_ms": per_hop[int(0.9 * (len(per_hop) - 1))],
        "mean_ms": statistics.fmean(per_hop),
        "hops_per_round": len(route),
    }


# --- breakdown ------------------------------------------------------------------------------


def _per_call_us(fn: Callable[[], object], n: int = 20000) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            fn()
        best = min(best, (time.perf_counter() - t0) / (n // 5))
    return best * 1e6


def wire_breakdown() -> dict[str, float]:
    """Microseconds per call of the wire steps of one hop (min of 5 batches)."""
    hidden = np.random.default_rng(0).standard_normal((1, HIDDEN), dtype=np.float32)
    payload = wire.encode_tensor(hidden, "f32", compress=False)
    msg = wire.Forward(SESSION, 7, 1, 1, 100, payload, (node_id(0),))
    data = wire.encode(msg)
    pieces = wire.split_frames(data, 5)
    reassembler = wire.Reassembler()
    out = {
        "encode_tensor (f32, 1x576)": _per_call_us(lambda: wire.encode_tensor(hidden, "f32", compress=False)),
        "decode_tensor": _per_call_us(lambda: wire.decode_tensor(payload, expect_shape=(None, HIDDEN))),
        "build Forward (field checks)": _per_call_us(
            lambda: wire.Forward(SESSION, 7, 1, 1, 100, payload, (node_id(0),))),
        "encode (cbor)": _per_call_us(lambda: wire.encode(msg)),
        "decode (cbor check + cbor2 + field checks)": _per_call_us(lambda: wire.decode(data)),
        "split_frames": _per_call_us(lambda: wire.split_frames(data, 5)),
        "Reassembler.feed": _per_call_us(lambda: reassembler.feed(pieces[0], 0.0)),
    }
    out["message bytes"] = float(len(data))
    out["pieces"] = float(len(pieces))
    return out


_GROUPS = [
    ("aiortc SCTP (rtcsctptransport)", ("aiortc/rtcsctptransport",)),
    ("aiortc data channel + pyee emit", ("aiortc/rtcdatachannel", "pyee/")),
    ("DTLS: aiortc dtls, pyOpenSSL, OpenSSL calls", ("aiortc/rtcdtlstransport", "OpenSSL/", "cryptography/",
                                                     "_openssl")),
    ("socket syscalls (sendto, recvfrom, epoll)", ("_socket.socket", "select.epoll")),
    ("aioice (UDP protocol, STUN check, queue)", ("aioice/",)),
    ("asyncio event loop (run_once, tasks, queues)", ("asyncio/", "selectors.py", "selector_events",
                                                      "_contextvars")),
    ("LinkManager (daemon/net/links.py)", ("daemon/net/links.py",)),
    ("wire: cbor + fields + framing (meshllm/wire, cbor2)", ("meshllm/wire/codec", "meshllm/wire/cborcheck",
                                                           "meshllm/wire/schema", "meshllm/wire/messages",
                                                           "meshllm/wire/framing", "cbor2")),
    ("wire: tensor codec (meshllm/wire/tensor, numpy)", ("meshllm/wire/tensor", "numpy")),
    ("bench harness (ping, relay)", ("bench_hop.py",)),
    ("logging", ("logging/",)),
]


def profile_breakdown(path: str, rounds: int) -> list[tuple[str, float, int]]:
    """(group, share of profiled own time, calls per round) from a cProfile dump."""
    import pstats

    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    grand = 0.0
    for (filename, _, funcname), (_, ncalls, tottime, _, _) in stats.items():
        name = "other (builtins, C calls)"
        where = filename if filename != "~" else funcname
        for group, needles in _GROUPS:
            if any(needle in where for needle in needles):
                name = group
                break
        totals[name] = totals.get(name, 0.0) + tottime
        calls[name] = calls.get(name, 0) + ncalls
        grand += tottime
    return sorted(((name, totals[name] / grand, calls[name] // rounds) for name in totals),
                  key=lambda row: -row[1])


def top_functions(path: str, rounds: int, n: int = 25) -> list[str]:
    import pstats

    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:n]
    out = []
    for (filename, line, funcname), (_, ncalls, tottime, cumtime, _) in rows:
        short = "/".join(filename.split("/")[-2:])
        out.append(f"{tottime / rounds * 1e6:8.1f} us {ncalls / rounds:6.1f} calls  "
                   f"{short}:{line} {funcname}")
    return out


# --- entry points ---------------------------------------------------------------------------


def run_one(args: argparse.Namespace) -> dict[str, float]:
    return asyncio.run(measure(args.mode, args.hops, args.warmup, args.torch_thread,
                               worker_call=args.worker_call))


def compare(args: argparse.Namespace) -> None:
    base = str(Path(args.compare).resolve())
    trees = [("base", base), ("this", str(ROOT))]
    results: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for label, tree in order:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", args.mode,
                   "--hops", str(args.hops), "--warmup", str(args.warmup), "--json"]
            if args.torch_thread:
                cmd.append("--torch-thread")
            if args.worker_call:
                cmd.append("--worker-call")
            env = dict(os.environ, BENCH_HOP_TREE=tree)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results[label].append(row)
            print(f"round {r + 1} {label:4s}: median {row['median_ms']:.3f} ms/hop, "
                  f"p90 {row['p90_ms']:.3f}, mean {row['mean_ms']:.3f}", flush=True)
    med = {label: statistics.median(row["median_ms"] for row in rows) for label, rows in results.items()}
    p90 = {label: statistics.median(row["p90_ms"] for row in rows) for label, rows in results.items()}
    mean = {label: statistics.median(row["mean_ms"] for row in rows) for label, rows in results.items()}
    ratios = [t["median_ms"] / b["median_ms"] for t, b in zip(results["this"], results["base"])]
    print(f"\n{args.mode}{' + torch thread' if args.torch_thread else ''}: per hop, median of "
          f"{args.rounds} rounds x {args.hops} hops")
    for label, tree in trees:
        print(f"  {label} ({tree}): median {med[label]:.3f} ms, p90 {p90[label]:.3f} ms, "
              f"mean {mean[label]:.3f} ms")
    print(f"  this / base, round by round: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")
    mean_ratios = [t["mean_ms"] / b["mean_ms"] for t, b in zip(results["this"], results["base"])]
    print(f"  this / base of the means: {', '.join(f'{r:.2f}' for r in mean_ratios)} "
          f"(median {statistics.median(mean_ratios):.2f})")


def breakdown(args: argparse.Namespace) -> None:
    print("wire steps, us per call (min of 5 batches):")
    for name, value in wire_breakdown().items():
        print(f"  {name:45s} {value:8.1f}")
    plain = run_one(args)
    rounds = args.hops + args.warmup
    path = "/tmp/bench_hop.prof"
    profiled = asyncio.run(measure(args.mode, args.hops, args.warmup, args.torch_thread,
                                   profile_to=path, worker_call=args.worker_call))
    hops = plain["hops_per_round"]
    print(f"\n{args.mode}: per hop median {plain['median_ms']:.3f} ms, p90 {plain['p90_ms']:.3f} ms, "
          f"mean {plain['mean_ms']:.3f} ms (unprofiled); {profiled['mean_ms']:.3f} ms under cProfile")
    print(f"profile of {rounds} rounds ({hops} hops each), own time by layer, scaled to the "
          f"unprofiled mean per hop (cProfile inflates Python calls, so treat these as shares):")
    for name, share, calls in profile_breakdown(path, rounds * hops):
        print(f"  {name:52s} {share * 100:5.1f}%  ~{share * plain['mean_ms'] * 1000:6.0f} us  "
              f"{calls:4d} calls/hop")
    print("\ntop functions by own time per hop (profiled):")
    for line in top_functions(path, rounds * hops):
        print("  " + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("inproc", "xproc", "ring3"), default="inproc")
    parser.add_argument("--hops", type=int, default=2000, help="timed round trips (default 2000)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--torch-thread", action="store_true",
                        help="a busy torch thread in every process of the mesh")
    parser.add_argument("--worker-call", action="store_true",
                        help="relays hand the hidden state through daemon.node.worker's thread")
    parser.add_argument("--breakdown", action="store_true", help="per-component costs")
    parser.add_argument("--compare", metavar="DIR", help="alternate rounds against another checkout")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of --compare (default 4)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve_child(args.serve, args.torch_thread, args.worker_call))
    elif args.compare:
        compare(args)
    elif args.breakdown:
        breakdown(args)
    else:
        result = run_one(args)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.mode}{' + torch thread' if args.torch_thread else ''}"
                  f"{' + worker call' if args.worker_call else ''}: per hop median "
                  f"{result['median_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, mean "
                  f"{result['mean_ms']:.3f} ms ({args.hops} rounds of {result['hops_per_round']} hops)")


if __name__ == "__main__":
    main()
