"""``meshllm up``: start the daemon on this device, headless or under the terminal UI.

Heavy modules (torch, the model, the node) are imported only once the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from daemon.cli_common import EXIT_OK, EXIT_USAGE, fail, setup_logging
from daemon.node.config import ConfigError, NodeConfig
from daemon.node.identity import make_state_dir

if TYPE_CHECKING:
    from daemon.node.node import RuntimeLoader

log = logging.getLogger(__name__)

class TuiRunner(Protocol):
    """``tui.app.run_attached(api_url, on_quit, api_key=...)``: runs the TUI in this terminal
    until it quits; ``api_key``: what the API needs (None on loopback)."""

    def __call__(self, api_url: str, on_quit: Callable[[], None], *, api_key: str | None = None) -> None: ...


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
        try:
            make_state_dir(config.state_dir)
        except OSError as error:
            return fail(f"cannot use state dir {config.state_dir}: {error.strerror or error}")
        setup_logging(config.log_level, config.state_dir / "meshllm.log")  # stderr would draw over the TUI
        return up_with_tui(config, tui)
    setup_logging(config.log_level)
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
    def announce(line: str) -> None:
        log.info("%s", line)
        print(line, file=sys.stderr, flush=True)  # before the TUI draws: a new API key is shown once

    node = Node(config, runtime_loader=runtime_loader or load_runtime, handle_signals=False, announce=announce)
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
        tui(node.api_url, node.request_stop_threadsafe, api_key=node.api_key)
    finally:  # the TUI quit, failed, or Ctrl-C came before it started: the node stops too
        node.request_stop_threadsafe()
        thread.join()
    return fail(str(failure[0])) if failure else EXIT_OK
