#!/usr/bin/env python3
"""Start a mesh of N meshllm daemons on this machine, in loopback mode.

    python scripts/local_mesh.py --nodes 3 [--base-port 8470] [--model PATH] [--codec f32]
                                 [--restart SECONDS]

Prints each node's API URL and process id, then "mesh ready" once a plan is active on every
node. When a node exits (a crash, a kill -9, a clean `meshllm down`), the others keep
running and the script says which node exited, how (exit code or signal) and where its log
is; with --restart SECONDS it starts that node again after the delay (same ports, same
options, same state dir) and says when it is back. Ctrl-C or SIGTERM stops every node
cleanly. Each node gets its share of the cores, and all share one new mesh key (given as
MESHLLM_MESH_KEY; one already set in the environment is used instead).

Try failover by hand: `kill -9 PID` of a node from its start line, then ask another node.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.client import DaemonError, DaemonUnavailable  # noqa: E402
from tui.launcher import LocalMesh  # noqa: E402

POLL_S = 0.2


def spans_text(plan: dict[str, Any], names: dict[str, str]) -> str:
    return ", ".join(f"{names.get(s['node_id'], s['node_id'][:8])} [{s['start_layer']}, {s['end_layer']})"
                     for s in plan["stages"])


def say(message: str) -> None:
    print(message, flush=True)


class Watch:
    """Reports node exits and restarts them after ``restart_s`` (None: never)."""

    def __init__(self, mesh: LocalMesh, restart_s: float | None, names: dict[str, str]) -> None:
        self.mesh = mesh
        self.restart_s = restart_s
        self.names = names
        """Node id -> "nodeN", for the plans it prints."""
        self.down: dict[int, float | None] = {}
        """Exited nodes -> when to restart them (None: not restarted)."""
        self.coming_back: set[int] = set()
        """Restarted nodes not ready yet."""
        self.whole = True
        """The last plan printed had every node up."""

    def tick(self) -> bool:
        """One look at the nodes; False once no node runs and none will come back."""
        now = time.monotonic()
        for node in self.mesh.nodes:
            i = node.index
            if i not in self.down and not node.alive:
                due = None if self.restart_s is None else now + self.restart_s
                self.down[i] = due
                self.coming_back.discard(i)
                self.whole = False
                again = f"; restarting it in {self.restart_s:g} s" if due is not None else ""
                say(f"node{i + 1} exited ({node.exit_description()}, pid {node.pid}); "
                    f"log: {node.log_path}{again}")
            elif i in self.down and self.down[i] is not None and self.down[i] <= now:  # type: ignore[operator]
                del self.down[i]
                self.mesh.start_node(i)
                self.coming_back.add(i)
                say(f"node{i + 1} restarted: {node.url}  pid {node.pid}  (log: {node.log_path})")
            elif i in self.coming_back and node.ready.is_set():
                self.coming_back.discard(i)
                say(f"node{i + 1} is back: {node.url}  pid {node.pid}")
        if not self.whole and not self.down and not self.coming_back:
            plan = self._agreed_plan()
            if plan is not None:
                self.whole = True
                say(f"mesh whole again: {len(self.mesh.nodes)} nodes, plan term {plan['term']}: "
                    f"{spans_text(plan, self.names)}")
        return any(n.alive for n in self.mesh.nodes) or any(d is not None for d in self.down.values())

    def _agreed_plan(self) -> dict[str, Any] | None:
        try:
            return self.mesh.agreed_plan()
        except (DaemonUnavailable, DaemonError, OSError, KeyError, ValueError):
            return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="how many daemons (default 3)")
    p.add_argument("--base-port", type=int, default=8470,
                   help="node i gets API port BASE+2i and signaling port BASE+2i+1 (default 8470; "
                        "0: free ports)")
    p.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M)")
    p.add_argument("--codec", default=None, choices=("f32", "f16", "bf16", "int8"),
                   help="hidden-state codec between stages (default f32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per node (default: cores / nodes)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the mesh (default 300)")
    p.add_argument("--restart", type=float, default=None, metavar="SECONDS",
                   help="start a node that exited again after SECONDS (default: leave it down)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for every `meshllm up`")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    if args.restart is not None and args.restart < 0:
        p.error("--restart must be >= 0")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    mesh = LocalMesh(args.nodes, model=args.model, base_port=args.base_port or None, codec=args.codec,
                     threads=args.threads, extra_args=extra)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mesh.start()
    try:
        for node in mesh.nodes:
            say(f"node{node.index + 1}: {node.url}  pid {node.pid}  (logs: {node.log_path})")
        try:
            plan = mesh.wait_ready(args.timeout)
        except (TimeoutError, RuntimeError) as e:
            print(f"local_mesh: the mesh did not form: {e}", file=sys.stderr)
            return 1
        names = {}
        for node in mesh.nodes:
            try:
                names[mesh.status(node.index)["self_id"]] = f"node{node.index + 1}"
            except (DaemonUnavailable, DaemonError, KeyError):
                pass
        say(f"mesh ready: {args.nodes} nodes, plan term {plan['term']}: {spans_text(plan, names)}")
        say("try: .venv/bin/meshllm ask --api " + mesh.nodes[0].url + ' "Hello!"  (Ctrl-C stops the mesh)')
        watch = Watch(mesh, args.restart, names)
        while not stop.wait(POLL_S):
            if not watch.tick():
                print("local_mesh: every node exited", file=sys.stderr)
                return 1
        return 0
    finally:
        say("stopping the mesh...")
        mesh.stop()


if __name__ == "__main__":
    sys.exit(main())
