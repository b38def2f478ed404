"""The ``meshllm`` command line: its parser, and the dispatch to one command.

Commands: up (daemon/cli_up.py); ask, tune, status, down and chat (daemon/cli_client.py);
bench (daemon/cli_bench.py); invite (daemon/cli_invite.py). Every failure a user can cause (a bad
model path, a port in use, no daemon running) ends with one line on stderr and a non-zero exit
code, never a traceback.
Options of ``up`` also come from ``MESHLLM_*`` environment variables (flags win); ``--api``
defaults to ``$MESHLLM_API``. Heavy modules (torch, the model) are imported only by the
commands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from daemon.cli_bench import cmd_bench
from daemon.cli_client import add_api_key_option, cmd_ask, cmd_chat, cmd_down, cmd_status, cmd_tune
from daemon.cli_invite import cmd_invite
from daemon.cli_common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail
from daemon.cli_up import cmd_up, up_with_tui
from daemon.node.config import DEFAULT_API_URL, LOG_LEVELS, WEIGHT_CHOICES, parse_bytes
from meshllm.placement.planner import DEFAULT_OBJECTIVE, OBJECTIVES

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "fail", "main",
           "up_with_tui"]


def _version() -> str:
    try:
        return metadata.version("meshllm")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- parser -------------------------------------------------------------------------------------


def _bytes_arg(text: str) -> int:
    """``2G``, ``500M``, ``1.5GiB`` or a plain number of bytes (as ``MESHLLM_MEM_BUDGET``)."""
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
                    "against the file); --quality gives each format's perplexity. --concurrency "
                    "1,2,4,8 sends that many answers at once (a local node started for the run, or "
                    "--api) and reports aggregate decode tokens/s per level (docs/benchmarks.md). "
                    "--speculate off,ngram,auto starts nodes (one, or --mesh N) for each mode and "
                    "compares their greedy answers over the shipped prompt sets: decode tokens/s, "
                    "acceptance, tokens per trip, and identity with off.",
    )
    where = bench.add_mutually_exclusive_group()  # one of them, or --concurrency (checked in cmd_bench)
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
    bench.add_argument("--rounds", type=int, default=3,
                       help="--local with several formats, --concurrency: rounds (3)")
    bench.add_argument("--threads", type=int, default=None,
                       help="--local, --concurrency: torch threads; --mesh: total cores to share (default: all cores); "
                            "--speculate: threads of each node (default: cores / nodes)")
    bench.add_argument("--codecs", default=",".join(("f32", "f16", "bf16", "int8")),
                       help="--mesh: codecs to compare (default f32,f16,bf16,int8)")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for time to first token (512)")
    bench.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for the decode rate (64)")
    bench.add_argument("--ttft-runs", type=int, default=3, help="--api/--mesh: TTFT runs, median kept (3)")
    bench.add_argument("--agreement-tokens", type=int, default=32,
                       help="--api/--mesh: greedy tokens per agreement prompt (32)")
    bench.add_argument("--concurrency", default=None, metavar="N[,N...]",
                       help="answers at once per level, e.g. 1,2,4,8: aggregate decode tokens/s, time between "
                            "tokens and TTFT per level, --rounds rounds in alternating order; alone (or with "
                            "--local) on one node started for the run with --threads, or with --api (answers "
                            "go to the given URLs in turn)")
    bench.add_argument("--speculate", default=None, metavar="MODE[,MODE...]",
                       help="speculative decoding: off,ngram,draft,auto (off is always measured): nodes "
                            "started per mode (one, or --mesh N each), greedy answers over the prompt sets, "
                            "the modes in turns, --rounds rounds (docs/benchmarks.md)")
    bench.add_argument("--prompt-set", dest="prompt_set", default=None, metavar="SET[,SET...]",
                       help="--speculate: repetitive, open, or a JSONL file of your own (default: both sets)")
    bench.add_argument("--prompts", type=int, default=None, metavar="N",
                       help="--speculate: only the first N prompts of each set (default: all)")
    bench.add_argument("--answer-tokens", dest="answer_tokens", type=int, default=None, metavar="N",
                       help="--speculate: max_tokens of each answer (128)")
    bench.add_argument("--draft-model", dest="draft_model", default=None, metavar="PATH|builtin|none",
                       help="--speculate: the draft model of the draft and auto nodes")
    bench.add_argument("--debug-link-delay-ms", dest="debug_link_delay_ms", type=float, default=None,
                       metavar="MS", help="--speculate: passed to every node (a Wi-Fi-like hop)")
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

    invite = commands.add_parser(
        "invite", help="print the code another device joins this mesh with",
        description="Print this device's mesh key as a one-word invite code; on another device, "
                    "`meshllm up --invite CODE` joins the mesh. The code is the last word of the "
                    "output (`meshllm invite | awk '{print $NF}'`). Anyone with it can join: share "
                    "it only with your own devices. The key comes from where `meshllm up` takes "
                    "it: --mesh-key-file, $MESHLLM_MESH_KEY, else the state dir.")
    invite.add_argument("--state-dir", default=None, metavar="DIR",
                        help="the state dir of `meshllm up` (default: $MESHLLM_STATE_DIR or "
                             "~/.local/state/meshllm)")
    invite.add_argument("--mesh-key-file", default=None, metavar="FILE",
                        help="the mesh key file `meshllm up` was given (default: $MESHLLM_MESH_KEY_FILE)")
    invite.set_defaults(run=cmd_invite)

    chat = commands.add_parser("chat", help="attach the terminal UI to the local daemon",
                               description="Open the terminal UI on a running daemon.")
    chat.add_argument("--api", default=None, help=api_help)
    chat.set_defaults(run=cmd_chat)
    for client in (ask, status, down, tune, chat):
        add_api_key_option(client)
    return parser


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    # defaults are None: "not given", so MESHLLM_* variables and then NodeConfig fill them
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--api-host", default=None, metavar="HOST",
                        help="address the API listens on (default 127.0.0.1)")
    parser.add_argument("--api-port", type=int, default=None, metavar="PORT",
                        help="API port (default 8470; 0 picks a free one)")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="file with the key (bearer token) clients must send when --api-host is beyond "
                             "loopback (default: api.key in the state dir, made and printed on first need)")
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
                        help="file with the mesh key (default: $MESHLLM_MESH_KEY, else the key in the "
                             "state dir, made by the first start)")
    parser.add_argument("--invite", default=None, metavar="CODE",
                        help="join the mesh of this code (`meshllm invite` on one of its devices): its key "
                             "is kept in the state dir")
    parser.add_argument("--open", dest="open_mesh", action="store_true", default=None,
                        help="an open mesh, with no key: anyone on this network can join (not recommended)")
    parser.add_argument("--join", action="append", default=None, metavar="HOST:PORT",
                        help="add a peer by hand (repeatable)")
    parser.add_argument("--ice-server", dest="ice_servers", action="append", default=None, metavar="URL",
                        help="STUN/TURN server for meshes across NATs (repeatable; default none)")
    parser.add_argument("--mesh-port", type=int, default=None, metavar="PORT",
                        help="port peers use for signaling (default: API port + 1)")
    parser.add_argument("--mem-budget", type=_bytes_arg, default=None, metavar="BYTES",
                        help="weights this node offers, e.g. 2G or 500M (default: half the memory)")
    parser.add_argument("--max-sessions", dest="max_sessions", type=int, default=None, metavar="N",
                        help="answers this node serves at once; more wait in a queue (4 per slot), then "
                             "get a 429 (default: as many full-context KV caches as a quarter of the "
                             "memory budget holds, 1..16)")
    parser.add_argument("--objective", default=None, choices=OBJECTIVES,
                        help=f"planner objective (default {DEFAULT_OBJECTIVE}: every node takes a share)")
    parser.add_argument("--codec", default=None, choices=("f32", "f16", "bf16", "int8"),
                        help="hidden-state codec between stages (default f32, exact)")
    parser.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, default=None,
                        metavar="S", help="the least silence that marks a peer lost (default 1.0 s; longer for a peer's jitter seen, at most 10 s)")
    parser.add_argument("--device", default=None, metavar="DEV",
                        help="where this node's layers run: cpu (default), cuda or cuda:N")
    parser.add_argument("--fallback-model", dest="fallback_model", default=None, metavar="PATH|builtin|none",
                        help="answer requests the mesh cannot serve with this model, on this node "
                             "(default builtin: the bundled SmolLM2; its memory comes out of --mem-budget)")
    parser.add_argument("--private-layers", dest="private_layers", type=int, default=None, metavar="K",
                        help="run the first and last K decoder layers of this node's own answers here, so "
                             "that neither the prompt's embeddings nor the last hidden state cross the "
                             "network (default 1; 0: the mesh may place every layer; every node of a mesh "
                             "must use the same K)")
    parser.add_argument("--speculate", default=None, choices=("auto", "ngram", "draft", "off"),
                        help="speculative decoding of this node's answers: drafted tokens checked several "
                             "per trip through the mesh, the same answer (default auto: prompt lookup, or "
                             "the draft model; off where it does not pay; docs/speculation.md)")
    parser.add_argument("--draft-model", dest="draft_model", default=None, metavar="PATH|builtin|none",
                        help="a small model on this node that drafts tokens for --speculate draft/auto "
                             "(default none; builtin: the bundled SmolLM2, 4-bit; it must share the served "
                             "model's tokenizer; its memory comes out of --mem-budget)")
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
    parser.add_argument("--accept-adapters", dest="accept_adapters", action="store_true", default=None,
                        help="serve the adapter of every tune job the mesh finishes, also of jobs this node "
                             "took no part in (default: only of jobs it joined; it leaves the others' mesh)")
    parser.add_argument("--debug-tune-scale", dest="debug_tune_scale", type=float, default=None,
                        metavar="X", help="testing aid: multiply the adapter update this node sends "
                                          "in a tune round by X (a faulty participant; default 1)")


def _weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None, choices=WEIGHT_CHOICES,
                        help="weight format in memory: auto (default: the file's own, a 4-bit GGUF "
                             "stays 4-bit), f32 (exact reference), f16, int8 or int4")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
