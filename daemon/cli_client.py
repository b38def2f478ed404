"""The client commands of ``meshllm``: ask, tune, status, down and chat, each talking to a
running daemon over its HTTP API (``tui.client``, imported once the command runs).

Each sends the daemon's API key when it has one (docs/api.md, "Access"): ``--api-key-file``,
else ``$MESHLLM_API_KEY_FILE``, else, for a daemon on this device, ``api.key`` in its state
dir (``tui.api_key``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli_common import EXIT_OK, default_api, fail

if TYPE_CHECKING:
    from tui.client import DaemonClient


API_KEY_FILE_HELP = ("file with the daemon's API key, needed when its API is beyond loopback (default: "
                     "$MESHLLM_API_KEY_FILE, else api.key in this device's state dir for a daemon on this device)")


def add_api_key_option(parser: argparse.ArgumentParser) -> None:
    """``--api-key-file`` of a client command."""
    parser.add_argument("--api-key-file", default=None, metavar="FILE", help=API_KEY_FILE_HELP)


def _api_key(api: str, args: argparse.Namespace) -> str | None:
    """The key to send to the daemon at ``api``: ``--api-key-file``'s, else the one
    ``tui.api_key.find_api_key`` finds. Raises DaemonError when a key file cannot be read."""
    from tui.api_key import ApiKeyFileError, find_api_key
    from tui.client import DaemonError

    key_file = getattr(args, "api_key_file", None)
    try:
        return find_api_key(api, key_file=Path(key_file).expanduser() if key_file else None)
    except ApiKeyFileError as error:
        raise DaemonError(str(error)) from None


def _client(api: str, args: argparse.Namespace) -> DaemonClient:
    """The HTTP client of the daemon at ``api`` (tui.client: the client side, imported lazily),
    with its key (``_api_key``)."""
    from tui.client import DaemonClient

    return DaemonClient(api, connect_timeout_s=10.0, request_timeout_s=30.0, api_key=_api_key(api, args))


def client_failure(error: Exception) -> int:
    """One line for a daemon that is not there, or that answered with an error."""
    message = str(error)
    if message.startswith("cannot reach the daemon"):
        message += " (is `meshllm up` running?)"
    if getattr(error, "status", None) == 401:
        message += " (give the key with --api-key-file FILE or $MESHLLM_API_KEY_FILE)"
    return fail(message)


def cmd_ask(args: argparse.Namespace) -> int:
    from tui.client import DaemonError, DaemonUnavailable

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})

    async def ask() -> str:
        last = ""
        async for delta in _client(args.api or default_api(), args).chat(
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
        return client_failure(error)
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

    api = args.api or default_api()
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
        async for event in _client(api, args).tune(body):
            progress.show(event)
            if event.get("type") in ("done", "error"):
                return event
        return None

    try:
        last = asyncio.run(follow())
    except (DaemonUnavailable, DaemonError) as error:
        progress.close()
        return client_failure(error)
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
        status = asyncio.run(_client(args.api or default_api(), args).status())
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    from tui.client import DaemonError, DaemonUnavailable

    api = args.api or default_api()
    try:
        asyncio.run(_client(api, args).down())
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    print(f"meshllm: the daemon at {api} is stopping", file=sys.stderr)
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    """``meshllm chat``: the TUI, opening on the chat, on a running daemon."""
    from tui.client import DaemonError, DaemonUnavailable

    api = args.api or default_api()
    try:
        key = _api_key(api, args)
        asyncio.run(_client(api, args).status())  # nothing answers: one line, as every client command
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    try:
        from tui.app import run_chat
    except ImportError as error:
        return fail(f"the terminal UI cannot start ({error}); use `meshllm ask` or the HTTP API")
    run_chat(api, api_key=key)
    return EXIT_OK
