"""Where a node's memory goes: RSS import by import, of a serving node, and of a first start.

    python scripts/bench_memory.py imports             # RSS after each step of the daemon's imports
    python scripts/bench_memory.py node [--weights auto] [--model PATH]
                                                       # `meshllm up --no-tui --threads 1`, one answer
    python scripts/bench_memory.py convert PATH.gguf   # peak RSS of converting a GGUF (fresh cache)

Each measure runs in a fresh process. RSS is VmRSS of /proc/PID/status, the peak VmHWM;
"anon" and "file" split the RSS into private memory and pages of mapped files (libraries,
the weight cache's safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMPORT_STEPS = [
    "numpy",
    "torch",
    "transformers",
    "safetensors",
    "meshllm.model.shard",
    "meshllm.model.lean",
    "meshllm.model.runtime",
    "aiohttp",
    "daemon.net.discovery",
    "daemon.net.links",
    "daemon.node.node",
]
WATCHED = ["torch._dynamo", "sympy", "transformers.activations", "transformers.masking_utils", "transformers.modeling_utils",
           "transformers.models.llama.modeling_llama", "tokenizers", "accelerate", "peft", "aiortc",
           "av", "zeroconf", "textual", "gguf", "PIL", "jinja2"]

_STEPS_PROBE = textwrap.dedent(
    """
    import importlib, json, sys
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
        return out
    rows = [("python", status())]
    for name in sys.argv[2:]:
        importlib.import_module(name)
        rows.append((name, status()))
    loaded = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
    print(json.dumps({"rows": rows, "loaded": loaded}))
    """
)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def cmd_imports(args: argparse.Namespace) -> int:
    res = subprocess.run([sys.executable, "-c", _STEPS_PROBE, json.dumps(WATCHED), *IMPORT_STEPS],
                         cwd=REPO, capture_output=True, text=True, check=True)
    data = json.loads(res.stdout)
    print("| after importing | RSS MB | + MB | anon MB | file MB |")
    print("|---|---|---|---|---|")
    prev = 0
    for name, s in data["rows"]:
        print(f"| `{name}` | {mb(s['VmRSS'])} | {mb(s['VmRSS'] - prev)} | {mb(s['RssAnon'])} | {mb(s['RssFile'])} |")
        prev = s["VmRSS"]
    print("\nloaded:", ", ".join(data["loaded"]))
    print("not loaded:", ", ".join(m for m in WATCHED if m not in data["loaded"]))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="meshllm-mem-") as tmp:
        cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
        cmd = [sys.executable, "-m", "daemon.cli", "up", "--no-tui", "--threads", str(args.threads),
               "--api-port", "0", "--loopback", "--state-dir", str(Path(tmp) / "state"),
               "--cache-dir", str(cache), "--weights", args.weights, "--mesh-name", f"mem-{os.getpid()}"]
        if args.model:
            cmd += ["--model", args.model]
        results = []
        for run in range(args.starts):
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if not line.startswith("meshllm ready: "):
                    print("node failed to start:", line, file=sys.stderr)
                    return 1
                url = line.split()[2]
                ready = proc_status(proc.pid)
                body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                   "max_tokens": args.tokens, "temperature": 0}).encode()
                req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    answer = json.loads(r.read())
                time.sleep(1.0)
                after = proc_status(proc.pid)
                with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as r:
                    status = json.loads(r.read())
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            results.append({"start": "first (converts)" if run == 0 and not args.cache_dir else "warm cache",
                            "seconds_to_answer": round(time.perf_counter() - t0, 1),
                            "ready": ready, "after_answer": after,
                            "answer": answer["choices"][0]["message"]["content"][:60],
                            "weights": status.get("model", status).get("weights") if isinstance(status, dict) else None})
        for r in results:
            a, rd = r["after_answer"], r["ready"]
            print(f"{r['start']}: after one answer RSS {mb(a['VmRSS'])} MB (anon {mb(a['RssAnon'])}, "
                  f"file {mb(a['RssFile'])}), peak {mb(a['VmHWM'])} MB; at ready RSS {mb(rd['VmRSS'])} MB; "
                  f"answer {r['answer']!r}")
    return 0


_CONVERT_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from meshllm.model.cache import prepare
    from meshllm.model.formats import format_file, resolve_format
    from meshllm.model.source import resolve
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out
    import torch, transformers, safetensors  # noqa: F401 - the baseline includes the libraries
    base = status()
    prepared = prepare(resolve(sys.argv[1]), Path(sys.argv[2]))
    converted = status()
    fmt = resolve_format(prepared, sys.argv[3])
    if fmt != "f32":
        format_file(prepared, fmt)
    print(json.dumps({"base": base, "converted": converted, "end": status(), "format": fmt}))
    """
)


def cmd_convert(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="meshllm-mem-") as tmp:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _CONVERT_PROBE, args.gguf, tmp, args.weights],
                             cwd=REPO, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        d = json.loads(res.stdout)
        size = Path(args.gguf).stat().st_size
        print(f"{Path(args.gguf).name} ({size / 1e6:.0f} MB): after imports {mb(d['base']['VmRSS'])} MB; "
              f"float32 cache: peak {mb(d['converted']['VmHWM'])} MB; then the {d['format']} file: "
              f"peak {mb(d['end']['VmHWM'])} MB; {time.perf_counter() - t0:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("imports")
    p = sub.add_parser("node")
    p.add_argument("--model")
    p.add_argument("--weights", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--starts", type=int, default=2, help="the first converts into a fresh cache")
    p.add_argument("--cache-dir", help="use this cache (default: a fresh one)")
    p = sub.add_parser("convert")
    p.add_argument("gguf")
    p.add_argument("--weights", default="auto")
    args = parser.parse_args()
    return {"imports": cmd_imports, "node": cmd_node, "convert": cmd_convert}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
