#!/usr/bin/env python3
"""Start a mesh of N meshllm daemons on this machine, in loopback mode.

    python scripts/local_mesh.py --nodes 3 [--base-port 8470] [--model PATH] [--codec f32]

Prints each node's API URL, then "mesh ready" once a plan is active on every node.
Ctrl-C or SIGTERM stops every node cleanly. Each node gets its share of the cores.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.launcher import LocalMesh  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="how many daemons (default 3)")
    p.add_argument("--base-port", type=int, default=8470,
                   help="node i gets API port BASE+2i and signaling port BASE+2i+1 (default 8470)")
    p.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M)")
    p.add_argument("--codec", default=None, choices=("f32", "f16", "bf16", "int8"),
                   help="hidden-state codec between stages (default f32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per node (default: cores / nodes)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the mesh (default 300)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more options for every `meshllm up`")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    mesh = LocalMesh(args.nodes, model=args.model, base_port=args.base_port, codec=args.codec,
                     threads=args.threads, extra_args=extra)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mesh.start()
    try:
        for node in mesh.nodes:
            print(f"node{node.index + 1}: {node.url}  (logs: {node.log_path})", flush=True)
        try:
            plan = mesh.wait_ready(args.timeout)
        except (TimeoutError, RuntimeError) as e:
            print(f"local_mesh: the mesh did not form: {e}", file=sys.stderr)
            return 1
        spans = ", ".join(f"[{s['start_layer']}, {s['end_layer']})" for s in plan["stages"])
        print(f"mesh ready: {args.nodes} nodes, plan term {plan['term']}: {spans}", flush=True)
        print("try: .venv/bin/meshllm ask --api " + mesh.nodes[0].url + ' "Hello!"  (Ctrl-C stops the mesh)',
              flush=True)
        while not stop.wait(0.5):
            dead = [n for n in mesh.nodes if not n.alive]
            if dead:
                print(f"local_mesh: node{dead[0].index + 1} exited; see {dead[0].log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        print("stopping the mesh...", flush=True)
        mesh.stop()


if __name__ == "__main__":
    sys.exit(main())
