"""The ``meshllm`` command: up, ask, status, down, bench and chat.

Every failure a user can cause (a bad model path, a port in use, no daemon running) ends with
one line on stderr and a non-zero exit code, never a traceback. Options of ``up`` also come
from ``MESHLLM_*`` environment variables (flags win); ``--api`` defaults to ``$MESHLLM_API``.
Heavy modules (torch, the model) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.node.config import DEFAULT_API_URL, LOG_LEVELS, WEIGHT_CHOICES, ConfigError, NodeConfig

if TYPE_CHECKING:
    from daemon.node.node import RuntimeLoader
    from tui.client import DaemonClient

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TuiRunner = Callable[[str, Callable[[], None]], None]
"""``tui.app.run_attached(api_url, on_quit)``: runs the TUI in this terminal until it quits."""


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"meshllm: {message}", file=sys.stderr, flush=True)
    return code


def _version() -> str:
    try:
        return metadata.version("meshllm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _default_api() -> str:
    return os.environ.get("MESHLLM_API", "").strip() or DEFAULT_API_URL


# -- parser -------------------------------------------------------------------------------------


def _bytes_arg(text: str) -> int:
    """``2G``, ``500M``, ``1.5GiB`` or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2G or 500M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a size must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshllm",
        description="Run one language model across the devices you already own.",
        epilog="Run `meshllm COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"meshllm {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = commands.add_parser(
        "up", help="start the daemon on this device",
        description="Start the daemon: load the model, serve the HTTP API, print one ready line. "
                    "Every option also reads MESHLLM_<OPTION> (e.g. MESHLLM_API_PORT); flags win.",
    )
    _add_node_options(up)
    up.set_defaults(run=cmd_up)

    api_help = f"daemon API URL (default: $MESHLLM_API or {DEFAULT_API_URL})"
    ask = commands.add_parser(
        "ask", help="ask the model one question and stream the answer",
        description="Send one prompt to a running daemon and stream the answer to stdout. "
                    "Greedy (temperature 0) unless --temperature says otherwise.",
    )
    ask.add_argument("prompt", help='the question; "-" reads it from stdin')
    ask.add_argument("--api", default=None, help=api_help)
    ask.add_argument("--system", default=None, help="a system message to put first")
    ask.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    ask.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    ask.add_argument("--top-p", type=float, default=None, help="nucleus sampling, 0 < p <= 1")
    ask.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens; 0 = off")
    ask.set_defaults(run=cmd_ask)

    status = commands.add_parser("status", help="show the mesh as this daemon sees it",
                                 description="Show the nodes, their layer spans and the plan.")
    status.add_argument("--api", default=None, help=api_help)
    status.add_argument("--json", action="store_true", help="print the raw status JSON")
    status.set_defaults(run=cmd_status)

    down = commands.add_parser("down", help="leave the mesh cleanly and stop the daemon",
                               description="Ask a daemon to hand its layers over and stop.")
    down.add_argument("--api", default=None, help=api_help)
    down.set_defaults(run=cmd_down)

    bench = commands.add_parser(
        "bench", help="measure decode speed, time to first token, and a mesh against one node",
        description="Measure decode tokens/s, time to first token for a long prompt, per-stage "
                    "compute ms, per-hop ms and bytes per hop. --local runs the engine in this "
                    "process; --api measures a running mesh (give every node's URL for its stage "
                    "stats, the entry node first); --mesh N starts a single-node reference and an "
                    "N-node local mesh per codec on this machine and compares them in one run. "
                    "--local with several --weights compares weight formats (speed, memory "
                    "against the file); --quality gives each format's perplexity.",
    )
    where = bench.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="benchmark this machine alone, in-process")
    where.add_argument("--api", action="append", default=None, metavar="URL",
                       help="a running mesh's node (repeatable; the first is the entry node)")
    where.add_argument("--mesh", type=int, default=None, metavar="N",
                       help="compare one node with an N-node local mesh per codec (same total cores)")
    where.add_argument("--quality", action="store_true",
                       help="perplexity of each --weights format on a fixed English text (shipped)")
    bench.add_argument("--model", default=None, help="model path for --local/--mesh (default: the built-in model)")
    bench.add_argument("--cache-dir", default=None, help="where converted weights are cached")
    bench.add_argument("--weights", default=None, metavar="FMT[,FMT...]",
                       help="weight format(s): auto (default), f32, f16, int8, int4; with several, "
                            "--local runs each in a fresh process, alternating, --rounds times")
    bench.add_argument("--rounds", type=int, default=3, help="--local with several formats: rounds (3)")
    bench.add_argument("--threads", type=int, default=None,
                       help="--local: torch threads; --mesh: total cores to share (default: all cores)")
    bench.add_argument("--codecs", default=",".join(("f32", "f16", "bf16", "int8")),
                       help="--mesh: codecs to compare (default f32,f16,bf16,int8)")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for time to first token (512)")
    bench.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for the decode rate (64)")
    bench.add_argument("--ttft-runs", type=int, default=3, help="--api/--mesh: TTFT runs, median kept (3)")
    bench.add_argument("--agreement-tokens", type=int, default=32,
                       help="--api/--mesh: greedy tokens per agreement prompt (32)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.set_defaults(run=cmd_bench)

    tune = commands.add_parser(
        "tune", help="fine-tune the model with your data, federated over the mesh (docs/fine-tuning.md)",
        description="Join (or start) a federated fine-tuning job on the local daemon. Each node trains a "
                    "LoRA adapter on its own examples; only adapter updates cross the mesh, and the "
                    "coordinator averages them each round. When the job ends every node serves the result.")
    tune.add_argument("--data", required=True, metavar="FILE.jsonl",
                      help='your examples, one chat a line: {"messages": [{"role": "user", ...}, '
                           '{"role": "assistant", ...}]}; the last message is the answer to learn')
    tune.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    tune.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    tune.add_argument("--steps-per-round", type=int, default=10,
                      help="local training steps per round, one example a step (default 10)")
    tune.add_argument("--aggregate", default="mean", choices=("mean", "median", "trimmed"),
                      help="how the coordinator combines updates: mean (weighted by examples, default), "
                           "median or trimmed (robust to a bad participant)")
    tune.add_argument("--api", default=None, help=api_help + " (must be this device's: your data stays here)")
    tune.add_argument("--json", action="store_true", help="print each progress event as a JSON line")
    tune.set_defaults(run=cmd_tune)

    chat = commands.add_parser("chat", help="attach the terminal UI to the local daemon",
                               description="Open the terminal UI on a running daemon.")
    chat.add_argument("--api", default=None, help=api_help)
    chat.set_defaults(run=cmd_chat)
    return parser


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    # defaults are None: "not given", so MESHLLM_* variables and then NodeConfig fill them
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--api-host", default=None, metavar="HOST",
                        help="address the API listens on (default 127.0.0.1)")
    parser.add_argument("--api-port", type=int, default=None, metavar="PORT",
                        help="API port (default 8470; 0 picks a free one)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: all cores; split them between nodes on one machine)")
    parser.add_argument("--name", default=None, help="this node's name (default: the hostname)")
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="node id and state (default ~/.local/state/meshllm)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="converted model weights (default ~/.cache/meshllm)")
    parser.add_argument("--loopback", action="store_true", default=None,
                        help="single-machine mesh: discovery and links on 127.0.0.1 only")
    parser.add_argument("--no-tui", action="store_true", default=None,
                        help="never start the terminal UI")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="stderr log level (default warning)")
    parser.add_argument("--mesh-name", default=None, help="join only meshes of this name (default 'default')")
    parser.add_argument("--mesh-key-file", default=None, metavar="FILE",
                        help="file with the mesh key; without one anyone on the LAN can join")
    parser.add_argument("--join", action="append", default=None, metavar="HOST:PORT",
                        help="add a peer by hand (repeatable)")
    parser.add_argument("--ice-server", dest="ice_servers", action="append", default=None, metavar="URL",
                        help="STUN/TURN server for meshes across NATs (repeatable; default none)")
    parser.add_argument("--mesh-port", type=int, default=None, metavar="PORT",
                        help="port peers use for signaling (default: API port + 1)")
    parser.add_argument("--mem-budget", type=_bytes_arg, default=None, metavar="BYTES",
                        help="weights this node offers, e.g. 2G or 500M (default: half the memory)")
    parser.add_argument("--objective", default=None, choices=("throughput", "latency"),
                        help="planner objective (default throughput: every node takes a share)")
    parser.add_argument("--codec", default=None, choices=("f32", "f16", "bf16", "int8"),
                        help="hidden-state codec between stages (default f32, exact)")
    parser.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, default=None,
                        metavar="S", help="silence that marks a peer lost (default 1.0 s)")
    parser.add_argument("--device", default=None, metavar="DEV",
                        help="where this node's layers run: cpu (default), cuda or cuda:N")
    parser.add_argument("--fallback-model", dest="fallback_model", default=None, metavar="PATH|builtin|none",
                        help="answer requests the mesh cannot serve with this model, on this node "
                             "(default builtin: the bundled SmolLM2; its memory comes out of --mem-budget)")
    parser.add_argument("--rebuild-log-mb", dest="rebuild_log_mb", type=int, default=None, metavar="MIB",
                        help="memory cap of the hidden-state logs that let a lost peer's layers be rebuilt "
                             "locally (default 256; 0: none, every loss replays the answers in progress)")
    _weights_arg(parser)
    parser.add_argument("--debug-delay-ms", dest="debug_delay_ms", type=float, default=None,
                        metavar="MS", help=argparse.SUPPRESS)
    parser.add_argument("--target-ms-per-token", dest="target_ms_per_token", type=float, default=None,
                        metavar="MS", help="latency target: the coordinator picks the smallest plan "
                                           "predicted to decode within MS per token (default: none)")
    parser.add_argument("--target-ttft-ms", dest="target_ttft_ms", type=float, default=None,
                        metavar="MS", help="latency target for the first token of an answer (default: none)")
    parser.add_argument("--debug-link-delay-ms", dest="debug_link_delay_ms", type=float, default=None,
                        metavar="MS", help="testing aid: delay every message this node sends to its "
                                           "peers by MS (like a node on slow Wi-Fi; default 0)")
    parser.add_argument("--adapter", default=None, metavar="PATH|last|none",
                        help="serve the model with this LoRA adapter (a peft folder), or `last`: the one "
                             "the last `meshllm tune` job finished on this node (default none)")
    parser.add_argument("--debug-tune-scale", dest="debug_tune_scale", type=float, default=None,
                        metavar="X", help="testing aid: multiply the adapter update this node sends "
                                          "in a tune round by X (a faulty participant; default 1)")


def _weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None, choices=WEIGHT_CHOICES,
                        help="weight format in memory: auto (default: the file's own, a 4-bit GGUF "
                             "stays 4-bit), f32 (exact reference), f16, int8 or int4")


# -- up ---------------------------------------------------------------------------------------


def _setup_logging(level: str, log_file: Path | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        logging.getLogger("daemon.access").setLevel(logging.WARNING)


def find_tui_runner() -> TuiRunner | None:
    """``tui.app.run_attached`` when the TUI is installed; None until then."""
    try:
        from tui.app import run_attached  # type: ignore[import-not-found]
    except ImportError:
        return None
    return run_attached  # type: ignore[no-any-return]


def cmd_up(args: argparse.Namespace) -> int:
    try:
        config = NodeConfig.from_sources(vars(args), os.environ)
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    from daemon.node.node import Node, StartupError
    from meshllm.errors import ModelSourceError
    from meshllm.model.source import resolve

    try:
        resolve(config.model)  # a mistyped path fails at once, before the slow imports
    except ModelSourceError as error:
        return fail(str(error))
    if config.fallback_model not in ("builtin", "none"):
        try:
            resolve(config.fallback_model)
        except ModelSourceError as error:
            return fail(f"fallback model: {error}")
    tui = None
    if not config.no_tui and sys.stdout.isatty():
        tui = find_tui_runner()
        if tui is None:
            print("meshllm: the terminal UI is not available yet; running headless "
                  "(--no-tui silences this)", file=sys.stderr, flush=True)
    if tui is not None:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(config.log_level, config.state_dir / "meshllm.log")  # stderr would draw over the TUI
        return up_with_tui(config, tui)
    _setup_logging(config.log_level)
    try:
        asyncio.run(Node(config).run())
    except StartupError as error:
        return fail(str(error))
    return EXIT_OK


def up_with_tui(config: NodeConfig, tui: TuiRunner, runtime_loader: RuntimeLoader | None = None) -> int:
    """The TUI owns the terminal (main thread); the node runs on a thread of its own.

    The TUI's quit calls ``on_quit``, which stops the node; leaving the TUI any other way
    stops it too. Start-up failures are reported as one line, as in headless mode.
    """
    from daemon.node.node import Node, StartupError, load_runtime

    log_file = config.state_dir / "meshllm.log"
    node = Node(config, runtime_loader=runtime_loader or load_runtime, handle_signals=False,
                announce=lambda line: log.info("%s", line))
    failure: list[StartupError] = []

    def serve() -> None:
        try:
            asyncio.run(node.run())
        except StartupError as error:
            failure.append(error)

    thread = threading.Thread(target=serve, name="meshllm-node")
    thread.start()
    try:
        while not node.ready.wait(0.2):
            if not thread.is_alive():
                return fail(str(failure[0]) if failure else f"the daemon stopped; see {log_file}")
        assert node.api_url is not None
        tui(node.api_url, node.request_stop_threadsafe)
    finally:  # the TUI quit, failed, or Ctrl-C came before it started: the node stops too
        node.request_stop_threadsafe()
        thread.join()
    return fail(str(failure[0])) if failure else EXIT_OK


# -- clients ----------------------------------------------------------------------------------


def _client(api: str) -> DaemonClient:
    """The HTTP client of the daemon at ``api`` (tui.client: the client side, imported lazily)."""
    from tui.client import DaemonClient

    return DaemonClient(api, connect_timeout_s=10.0, request_timeout_s=30.0)


def _client_failure(error: Exception) -> int:
    """One line for a daemon that is not there, or that answered with an error."""
    message = str(error)
    if message.startswith("cannot reach the daemon"):
        message += " (is `meshllm up` running?)"
    return fail(message)


def cmd_ask(args: argparse.Namespace) -> int:
    from tui.client import DaemonError, DaemonUnavailable

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})

    async def ask() -> str:
        last = ""
        async for delta in _client(args.api or _default_api()).chat(
                messages, max_tokens=args.max_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed):
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta.text
        return last

    try:
        last = asyncio.run(ask())
    except (DaemonUnavailable, DaemonError) as error:
        return _client_failure(error)
    if not last.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return EXIT_OK


MAX_TUNE_DATA_BYTES = 16 << 20
"""Largest --data file `meshllm tune` sends (the daemon's bound on a tune request is 32 MiB)."""


def cmd_tune(args: argparse.Namespace) -> int:
    """``meshllm tune``: send this device's examples to its own daemon and follow the job."""
    from urllib.parse import urlsplit

    from meshllm.tune.data import DataError, parse_jsonl
    from tui.client import DaemonError, DaemonUnavailable
    from tui.tune_progress import TuneProgress

    api = args.api or _default_api()
    host = urlsplit(api).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return fail(f"--api {api}: meshllm tune sends your examples to that daemon, so it must be this "
                    "device's own (127.0.0.1, localhost or ::1); run `meshllm tune` on the device that has the data")
    path = Path(args.data).expanduser()
    try:
        if path.stat().st_size > MAX_TUNE_DATA_BYTES:
            return fail(f"{path}: larger than {MAX_TUNE_DATA_BYTES // (1 << 20)} MiB")
        chats = parse_jsonl(path.read_text(encoding="utf-8"))
    except OSError as error:
        return fail(f"cannot read {path}: {error.strerror or error}")
    except UnicodeDecodeError as error:
        return fail(f"{path} is not UTF-8 text: {error}")
    except DataError as error:
        return fail(f"{path}: {error}")
    body = {"examples": chats, "rounds": args.rounds, "rank": args.rank,
            "steps_per_round": args.steps_per_round, "aggregate": args.aggregate}
    progress = TuneProgress(sys.stderr, as_json=sys.stdout if args.json else None)

    async def follow() -> dict[str, Any] | None:
        async for event in _client(api).tune(body):
            progress.show(event)
            if event.get("type") in ("done", "error"):
                return event
        return None

    try:
        last = asyncio.run(follow())
    except (DaemonUnavailable, DaemonError) as error:
        progress.close()
        return _client_failure(error)
    progress.close()
    if last is None:
        return fail("the daemon ended the tune job without a result")
    if last["type"] == "error":
        return fail(f"tune job failed: {last.get('message')}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from tui.status_table import format_status
    from tui.client import DaemonError, DaemonUnavailable

    try:
        status = asyncio.run(_client(args.api or _default_api()).status())
    except (DaemonUnavailable, DaemonError) as error:
        return _client_failure(error)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from tui.client import DaemonError, DaemonUnavailable

    api = args.api or _default_api()
    try:
        asyncio.run(_client(api).down())
    except (DaemonUnavailable, DaemonError) as error:
        return _client_failure(error)
    print(f"meshllm: the daemon at {api} is stopping", file=sys.stderr)
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    """``meshllm chat``: the TUI, opening on the chat, on a running daemon."""
    from tui.client import DaemonError, DaemonUnavailable

    api = args.api or _default_api()
    try:
        asyncio.run(_client(api).status())  # nothing answers: one line, as every client command
    except (DaemonUnavailable, DaemonError) as error:
        return _client_failure(error)
    try:
        from tui.app import run_chat
    except ImportError as error:
        return fail(f"the terminal UI cannot start ({error}); use `meshllm ask` or the HTTP API")
    run_chat(api)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    formats = [w.strip() for w in (args.weights or "").split(",") if w.strip()]
    if any(w not in WEIGHT_CHOICES for w in formats):
        return fail(f"--weights must be a comma-separated list of {', '.join(WEIGHT_CHOICES)}", EXIT_USAGE)
    if args.mesh is not None and len(formats) > 1:
        return fail("--mesh takes one --weights format", EXIT_USAGE)
    args.weights = formats[0] if len(formats) == 1 else None
    args.formats = formats
    for name in ("prompt_tokens", "decode_tokens", "ttft_runs", "agreement_tokens", "rounds"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.threads is not None and args.threads < 1:
        return fail("--threads must be at least 1", EXIT_USAGE)
    if args.quality:
        return _bench_quality(args)
    if args.local and len(args.formats) > 1:
        return _bench_formats(args)
    if args.local:
        return _bench_local(args)
    from tui.bench.api import measure_api
    from tui.bench.mesh import CODECS, format_comparison, run_mesh_comparison
    from tui.bench.report import BenchError, format_measure
    from tui.client import DaemonError, DaemonUnavailable

    def progress(message: str) -> None:
        print(f"meshllm bench: {message}", file=sys.stderr, flush=True)

    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if args.mesh is not None:
        if args.mesh < 2:
            return fail("--mesh needs at least 2 nodes (the single-node reference runs anyway)", EXIT_USAGE)
        if not codecs or any(c not in CODECS for c in codecs):
            return fail(f"--codecs must be a comma-separated list of {', '.join(CODECS)}", EXIT_USAGE)
    options = dict(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                   ttft_runs=args.ttft_runs, agreement_tokens=args.agreement_tokens, progress=progress)
    try:
        if args.api:
            measure = asyncio.run(measure_api(args.api, **options))  # type: ignore[arg-type]
            print(json.dumps({"mode": "api", **measure.to_json()}, indent=2) if args.json
                  else format_measure(measure))
            return EXIT_OK
        signal.signal(signal.SIGTERM, _interrupt)  # stop the local meshes on the way out
        comparison = run_mesh_comparison(args.mesh, codecs=codecs, cores=args.threads, model=args.model,
                                         cache_dir=args.cache_dir, weights=args.weights,
                                         **options)  # type: ignore[arg-type]
    except BenchError as error:
        return fail(str(error))
    except (DaemonUnavailable, DaemonError) as error:
        return _client_failure(error)
    print(json.dumps(comparison.to_json(), indent=2) if args.json else format_comparison(comparison))
    return EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bench_local(args: argparse.Namespace) -> int:
    """``meshllm bench --local``: the engine (every layer) in this process, no daemon."""
    try:
        config = NodeConfig.from_sources(
            {"model": args.model, "cache_dir": args.cache_dir, "threads": args.threads,
             "weights": args.weights}, os.environ
        )
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    _setup_logging("warning")
    import dataclasses

    import torch

    from meshllm.errors import ModelSourceError
    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.lean import release_free_memory
    from meshllm.model.sampling import SamplingParams
    from meshllm.model.shard import load_config, model_shape
    from meshllm.model.source import resolve
    from meshllm.model.text import load_tokenizer
    from tui.bench.local import format_bench, peak_rss_bytes, rss_bytes, run_local_bench
    from tui.bench.report import BenchError

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        prepared = prepare(resolve(config.model), config.cache_dir)
        tokenizer = load_tokenizer(prepared.folder)
        model_shape(load_config(prepared))  # the modelling code, imported before the baseline
        release_free_memory()
        baseline = rss_bytes()  # weights only from here: code and tokenizer are loaded
        engine = Engine(prepared, weights=config.weights, tokenizer=tokenizer)
    except (ModelSourceError, ValueError) as error:
        return fail(str(error))
    load_s = time.perf_counter() - started
    with torch.inference_mode():  # touch every weight (file-backed f32 pages count once read)
        for _ in engine.generate(engine.chat_prompt([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=2)):
            pass
    weight_rss = rss_bytes() - baseline
    try:
        with torch.inference_mode():
            result = run_local_bench(engine, threads=config.threads, load_s=load_s,
                                     prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
    except BenchError as error:
        return fail(str(error), EXIT_USAGE)
    result = dataclasses.replace(result, weight_rss_bytes=weight_rss, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(result.to_json(), indent=2) if args.json else format_bench(result))
    return EXIT_OK


def _bench_formats(args: argparse.Namespace) -> int:
    """``meshllm bench --local --weights a,b``: each format in a fresh process, alternating."""
    from tui.bench.formats import compare_formats, format_formats
    from tui.bench.report import BenchError

    passed = ["--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    for flag, value in (("--model", args.model), ("--cache-dir", args.cache_dir), ("--threads", args.threads)):
        if value is not None:
            passed += [flag, str(value)]
    try:
        runs = compare_formats(args.formats, args.rounds, passed,
                               progress=lambda m: print(f"meshllm bench: {m}", file=sys.stderr, flush=True))
    except BenchError as error:
        return fail(str(error))
    print(json.dumps(runs, indent=2) if args.json else format_formats(runs))
    return EXIT_OK


def _bench_quality(args: argparse.Namespace) -> int:
    """``meshllm bench --quality``: perplexity of each format on the shipped text."""
    try:
        config = NodeConfig.from_sources({"model": args.model, "cache_dir": args.cache_dir,
                                          "threads": args.threads}, os.environ)
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    _setup_logging("warning")
    import torch

    from meshllm.errors import ModelSourceError
    from meshllm.model.engine import Engine
    from meshllm.model.quality import perplexity
    from tui.bench.formats import format_quality

    torch.set_num_threads(config.threads)
    results = []
    for weights in args.formats or ["f32", "auto"]:
        print(f"meshllm bench: perplexity with {weights} weights", file=sys.stderr, flush=True)
        try:
            engine = Engine.load(config.model, cache_dir=str(config.cache_dir) if config.cache_dir else None,
                                 weights=weights)
            results.append(perplexity(engine, ctx=min(512, engine.info.max_positions)))
        except (ModelSourceError, ValueError) as error:
            return fail(str(error))
        del engine
    print(json.dumps([r.__dict__ for r in results], indent=2) if args.json else format_quality(results))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
