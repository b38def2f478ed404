"""The composition root of one daemon: API server, generation worker, model, signals.

Start-up order: listen first (a port in use fails at once, before a slow model load), then
load the model on the worker thread, measure its speed, and print the one ready line to
stdout. Logs go to stderr. A stop (SIGINT, SIGTERM, ``POST /v1/down``) ends every stream
with a clear error, stops the server and the worker, and returns from ``run``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable

from daemon.api import LOOPBACK_HOSTS, ApiServer, create_app
from daemon.completions import ChatEngine, Completions
from daemon.config import NodeConfig, client_url
from daemon.events import EventHub
from daemon.identity import load_or_create_node_id
from daemon.status import ModelSummary, SelfState, StatusBoard
from daemon.worker import GenerationWorker

log = logging.getLogger(__name__)

WORKER_JOIN_TIMEOUT_S = 5.0

EngineLoader = Callable[[NodeConfig], ChatEngine]


class StartupError(RuntimeError):
    """The node cannot start; the message is one line for the user."""


def load_engine(config: NodeConfig) -> ChatEngine:
    """Load the real engine (slow: run it on the worker thread). Raises ModelSourceError."""
    from meshllm.model.engine import Engine

    cache_dir = str(config.cache_dir) if config.cache_dir is not None else None
    return Engine.load(config.model, cache_dir=cache_dir)


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: the budget is unknown
        return 0


def ready_line(api_url: str, model_name: str, num_layers: int) -> str:
    return f"meshllm ready: {api_url} (model {model_name}, {num_layers} layers)"


class Node:
    """One daemon. ``await run()`` until stopped; ``request_stop()`` from the loop's thread."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        engine_loader: EngineLoader = load_engine,
        announce: Callable[[str], None] = lambda line: print(line, flush=True),
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self._engine_loader = engine_loader
        self._announce = announce
        self._handle_signals = handle_signals
        self._stop_requested = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: StartupError | None = None
        self.api_url: str | None = None
        """Set once the server listens (with the real port when ``api_port`` was 0)."""
        self.ready = threading.Event()
        """Set once the model is loaded and the ready line printed."""

    def request_stop(self) -> None:
        self._stop_requested.set()

    def request_stop_threadsafe(self) -> None:
        """Stop from another thread (the TUI's quit key)."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        except RuntimeError:  # the loop has closed: the node has already stopped
            pass

    async def run(self) -> None:
        """Serve until stopped. Raises StartupError when the node cannot start."""
        config = self.config
        self._loop = asyncio.get_running_loop()
        try:
            node_id = load_or_create_node_id(config.state_dir)
        except OSError as error:
            raise StartupError(f"cannot use state dir {config.state_dir}: {error.strerror or error}") from None
        hub = EventHub()
        board = StatusBoard(
            SelfState(node_id=node_id, name=config.name,
                      address=f"{config.api_host}:{config.api_port}",
                      mem_budget_bytes=physical_memory_bytes()),
            hub,
        )
        worker = GenerationWorker(config.threads)
        completions = Completions(worker)
        allowed_hosts = LOOPBACK_HOSTS if config.is_loopback_only() else None
        app = create_app(completions, board, hub, self.request_stop, allowed_hosts=allowed_hosts)
        try:
            server = await ApiServer.start(app, config.api_host, config.api_port)
        except OSError as error:
            completions.close()
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            raise StartupError(f"cannot listen on {config.api_host}:{config.api_port}: {reason}") from None
        self.api_url = client_url(config.api_host, server.port)
        board.update(address=f"{config.api_host}:{server.port}")
        worker.start()
        self._install_signal_handlers()
        self._log_placeholders(hub)
        try:
            async with asyncio.TaskGroup() as tasks:
                loading = tasks.create_task(self._load(worker, completions, board, hub))
                await self._stop_requested.wait()
                loading.cancel()
        finally:
            log.info("stopping")
            hub.close()
            worker.stop()  # running generations see their stop flag and end
            await server.stop()
            completions.close()
            self._remove_signal_handlers()
            if not await asyncio.to_thread(worker.join, WORKER_JOIN_TIMEOUT_S):
                log.warning("the worker thread is still busy; leaving it behind")
        if self._failure is not None:
            raise self._failure

    async def _load(self, worker: GenerationWorker, completions: Completions,
                    board: StatusBoard, hub: EventHub) -> None:
        from meshllm.errors import ModelSourceError

        board.update(state="loading")
        hub.log("info", f"loading model {self.config.model or '(default)'}")
        try:
            engine = await worker.call(lambda: self._engine_loader(self.config))
            ms_per_layer = await worker.call(engine.measure_ms_per_layer)
        except ModelSourceError as error:
            self._fail(str(error))
            return
        except Exception as error:  # an unexpected loader failure still ends in one line
            log.debug("model load failed", exc_info=True)
            self._fail(f"cannot load the model: {type(error).__name__}: {error}")
            return
        info = engine.info
        completions.attach(engine)
        board.update(state="ready", model=ModelSummary(info.model_id, info.name, info.num_layers),
                     ms_per_layer=round(ms_per_layer, 4))
        hub.log("info", f"model {info.name} ready: {info.num_layers} layers, "
                        f"{ms_per_layer:.2f} ms per layer per token")
        assert self.api_url is not None
        self._announce(ready_line(self.api_url, info.name, info.num_layers))
        self.ready.set()

    def _fail(self, message: str) -> None:
        self._failure = StartupError(message)
        self.request_stop()

    def _log_placeholders(self, hub: EventHub) -> None:
        config = self.config
        if config.join or config.ice_servers or config.loopback or config.mesh_key_file:
            hub.log("info", "mesh options (--join, --ice-server, --loopback, --mesh-key-file) "
                            "are accepted but this daemon runs single-node for now")

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or self._loop is None:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(signum, self.request_stop)

    def _remove_signal_handlers(self) -> None:
        if not self._handle_signals or self._loop is None:
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._loop.remove_signal_handler(signum)

