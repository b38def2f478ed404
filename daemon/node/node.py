"""The composition root of one daemon: API server, generation worker, model, mesh, signals.

This is the one module that wires the layers together: the HTTP API (daemon/api), the node's
own parts (daemon/node) and the network (daemon/net) import none of each other's internals;
each gets what it needs here, as objects or callbacks (tests/unit/test_layers.py).

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from meshllm import wire
from meshllm.model.runtime import Runtime
from meshllm.tune.rounds import TuneSettings
from meshllm.wire import PROTOCOL_VERSION, Hello

from daemon.api.access import ApiKey, ApiKeyError, is_loopback_host, load_api_key
from daemon.api.admission import Admission, kv_bytes_per_session, session_limits
from daemon.api.app import LOOPBACK_HOSTS, ApiServer, create_app
from daemon.api.completions import Completions
from daemon.api.events import EventHub
from daemon.api.status import ModelSummary, SelfState, StatusBoard
from daemon.api.tune import TuneEndpoint
from daemon.net.discovery import BadRecord, Discovery, DiscoveryEvent, PeerGone, hello_from_txt
from daemon.net.framing import link_message_bytes
from daemon.net.links import LinkDown, LinkError, LinkManager, LinkUp
from daemon.invite import invite_code, key_id
from daemon.net.meshkey import NO_KEY_WARNING, MeshKeyError, resolve_mesh_key
from daemon.net.signaling import SIGNAL_PATH
from daemon.node.config import NodeConfig, client_url
from daemon.node.driver import MeshDriver, MeshSettings, incompatibility
from daemon.node.fallback import Fallback, FallbackError, choose_fallback, engine_loader
from daemon.node.identity import load_or_create_node_id
from daemon.node.measure import EntryCosts, measure_entry_costs
from daemon.node.tune import adapters_dir, last_adapter
from daemon.node.worker import GenerationWorker

if TYPE_CHECKING:
    from meshllm.model.adapter import Adapter
    from meshllm.model.cache import PreparedModel

log = logging.getLogger(__name__)

WORKER_JOIN_TIMEOUT_S = 5.0

RuntimeLoader = Callable[[NodeConfig], "Runtime"]


class StartupError(RuntimeError):
    """The node cannot start; the message is one line for the user."""


def load_runtime(config: NodeConfig) -> Runtime:
    """Resolve and prepare the model, then load its entry pieces (slow: on the worker thread).

    Raises ModelSourceError. The node's layers come later, from the plan.
    """
    from meshllm.model.cache import prepare
    from meshllm.model.source import resolve

    folder = served_adapter_folder(config)  # before the slow part: a missing adapter fails at once
    prepared = prepare(resolve(config.model), config.cache_dir)
    runtime = Runtime.load(prepared, device=config.device, weights=config.weights,
                           log_cap_bytes=config.rebuild_log_mb * 1024 * 1024, private_layers=config.private_layers,
                           adapter=None if folder is None else load_served_adapter(config, folder, prepared))
    if config.draft_model != "none":
        from meshllm.errors import ModelSourceError
        from meshllm.model.draft import DraftModel

        try:
            runtime.draft = DraftModel.load(config.draft_model, served_tokenizer=runtime.engine.tokenizer,
                                            device=config.device, cache_dir=config.cache_dir,
                                            served_name=runtime.engine.info.name)
        except ValueError as error:  # another tokenizer: one line
            raise ModelSourceError(f"--draft-model: {error}") from None
    return runtime


def served_adapter_folder(config: NodeConfig) -> Path | None:
    """The folder of the adapter `--adapter` names (None: none). Raises ModelSourceError."""
    from meshllm.errors import ModelSourceError

    if config.adapter == "none":
        return None
    if config.adapter == "last":
        folder = last_adapter(config.state_dir)
        if folder is None:
            raise ModelSourceError(f"--adapter last: no tune job has finished on this node yet "
                                   f"(nothing in {adapters_dir(config.state_dir)})")
        return folder
    return Path(config.adapter).expanduser()


def load_served_adapter(config: NodeConfig, folder: Path, prepared: "PreparedModel") -> "Adapter":
    """The adapter in `folder` (docs/fine-tuning.md), checked against the model. Raises
    ModelSourceError with one line for the user."""
    from meshllm.errors import ModelSourceError
    from meshllm.model.adapter import AdapterError, load_adapter
    from meshllm.model.shape import load_config

    try:
        return load_adapter(folder, load_config(prepared))
    except AdapterError as error:
        raise ModelSourceError(f"--adapter {config.adapter}: {error}") from None




def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: the budget is unknown
        return 0


def ready_line(api_url: str, model_name: str, num_layers: int, weights: str, kernel: str = "") -> str:
    on = f" on {kernel}" if kernel else ""
    return f"meshllm ready: {api_url} (model {model_name}, {num_layers} layers, {weights} weights{on})"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PendingRoute:
    """An HTTP route whose handler comes later: the signaling server listens before the link
    layer exists (its port is in the hello the link layer is made with), so it answers 503
    until `serve_with` gives it the link layer's handler."""

    def __init__(self) -> None:
        self._handler: Handler | None = None

    def serve_with(self, handler: Handler) -> None:
        self._handler = handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._handler is None:
            return web.json_response({"error": "starting up"}, status=503)
        return await self._handler(request)


class MeshInbox:
    """What the link layer and discovery report, for the mesh driver. Both are made before the
    driver (it sends through the links; its adapter changes re-advertise on discovery), so the
    driver comes later: `deliver_to`. Nothing is reported before the links start, which is
    after that."""

    def __init__(self, hello: Hello) -> None:
        self._hello = hello
        self._mesh: MeshDriver | None = None

    def deliver_to(self, mesh: MeshDriver) -> None:
        self._mesh = mesh

    def _driver(self) -> MeshDriver:
        if self._mesh is None:
            raise RuntimeError("a link event before the mesh driver exists")
        return self._mesh

    def message(self, peer_id: str, msg: wire.Message) -> None:
        self._driver().on_message(peer_id, msg)

    def link_up(self, event: LinkUp) -> None:
        self._driver().on_link_up(event.peer_id, event.hello)

    def link_down(self, event: LinkDown) -> None:
        self._driver().on_link_down(event.peer_id, event.reason)

    def incompatibility(self, other: Hello) -> str | None:
        """Why `other` cannot join this node's mesh (None: it can), by this node's hello now."""
        return incompatibility(self._hello if self._mesh is None else self._mesh.hello, other)

    def discovered(self, event: DiscoveryEvent) -> None:
        mesh = self._driver()
        if isinstance(event, PeerGone):
            mesh.peer_gone(event.name, event.node_id)
            return
        if event.node_id == mesh.node_id:
            return
        try:
            theirs = hello_from_txt(event.txt, event.name)
        except BadRecord as e:
            log.info("ignoring discovered peer %s: %s", event.name, e)
            return
        mesh.peer_seen(event.name, event.address, theirs, refused=event.key_mismatch)


class Node:
    """One daemon. ``await run()`` until stopped; ``request_stop()`` from the loop's thread."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        runtime_loader: RuntimeLoader = load_runtime,
        announce: Callable[[str], None] = lambda line: print(line, flush=True),
        handle_signals: bool = True,
    ) -> None:
        self.config = config
        self._runtime_loader = runtime_loader
        self._cleanup: list[Callable[[], Awaitable[object]]] = []
        self._background: list[asyncio.Task[None]] = []
        """Tasks that run until the node stops (the mesh loop, --join keepers)."""
        self._announce = announce
        self._handle_signals = handle_signals
        self._stop_requested = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: StartupError | None = None
        self.api_url: str | None = None
        """Set once the server listens (with the real port when ``api_port`` was 0)."""
        self.api_key: str | None = None
        """The key clients send when the API listens beyond loopback (None: on loopback)."""
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
        self._tune = TuneEndpoint()
        # until the model is loaded (no answer starts before): the flag's limit, or one slot
        self._admission = Admission(config.max_sessions or 1)
        allowed_hosts = LOOPBACK_HOSTS if config.is_loopback_only() else None
        api_key: ApiKey | None = None
        if not is_loopback_host(config.api_host):  # beyond loopback: a bearer token (docs/api.md)
            try:
                api_key = load_api_key(config.api_key_file, config.state_dir)
            except ApiKeyError as error:
                completions.close()
                raise StartupError(str(error)) from None
            self.api_key = api_key.value
        app = create_app(completions, board, hub, self.request_stop, allowed_hosts=allowed_hosts, tune=self._tune,
                         api_key=self.api_key, admission=self._admission)
        try:
            server = await ApiServer.start(app, config.api_host, config.api_port)
        except OSError as error:
            completions.close()
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            raise StartupError(f"cannot listen on {config.api_host}:{config.api_port}: {reason}") from None
        self.api_url = client_url(config.api_host, server.port)
        board.update(address=f"{config.api_host}:{server.port}")
        if api_key is not None:
            self._announce(api_key.notice(f"http://{config.api_host}:{server.port}"))
        worker.start()
        self._install_signal_handlers()
        try:
            async with asyncio.TaskGroup() as tasks:
                loading = tasks.create_task(self._load(node_id, worker, completions, board, hub, tasks))
                await self._stop_requested.wait()
                for cleanup in self._cleanup:  # say goodbye while the loop still runs
                    try:
                        await cleanup()
                    except Exception as error:  # noqa: BLE001 - stopping goes on regardless
                        log.debug("cleanup step failed: %s", error)
                self._cleanup.clear()
                loading.cancel()
                for task in self._background:
                    task.cancel()
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

    async def _load(self, node_id: str, worker: GenerationWorker, completions: Completions,
                    board: StatusBoard, hub: EventHub, tasks: asyncio.TaskGroup) -> None:
        from meshllm.errors import ModelSourceError

        config = self.config
        board.update(state="loading")
        hub.log("info", f"loading model {config.model or '(default)'}")
        try:
            key = resolve_mesh_key(config.mesh_key_file, os.environ, config.state_dir,
                                   open_mesh=config.open_mesh, invite=config.invite)
            board.update(mesh_key_id=key_id(key), invite=None if key is None else invite_code(key))
            if key is None:
                hub.log("info", f"warning: {NO_KEY_WARNING}")
            runtime = await worker.call(lambda: self._runtime_loader(config))
            ms_per_layer = await worker.call(runtime.measure_ms_per_layer)
        except (ModelSourceError, MeshKeyError) as error:
            self._fail(str(error))
            return
        except Exception as error:  # an unexpected loader failure still ends in one line
            log.debug("model load failed", exc_info=True)
            self._fail(f"cannot load the model: {type(error).__name__}: {error}")
            return
        try:
            costs = await worker.call(lambda: measure_entry_costs(runtime))
        except Exception as error:  # noqa: BLE001 - predictions only: the node serves without them
            log.warning("cannot measure the entry costs: %s: %s", type(error).__name__, error)
            costs = EntryCosts(head_ms=0.0, prefill_ms_per_layer=0.0)
        info = runtime.engine.info
        budget = config.mem_budget or physical_memory_bytes() // 2
        limits = session_limits(config.max_sessions, mem_budget_bytes=budget, kv_bytes=kv_bytes_per_session(
            info.num_layers, *runtime.kv_shape, info.max_positions))
        self._admission.set_limits(limits.max_sessions, limits.queue_max)
        log.info("admission: %s", limits.describe())
        hub.log("info", limits.describe())
        board.update(model=ModelSummary(runtime.mesh_model_id, info.name, info.num_layers, info.weights, info.kernel,
                                        info.batch_invariant, runtime.private_layers),
                     ms_per_layer=round(ms_per_layer, 4), mem_budget_bytes=budget)
        hub.log("info", f"model {info.name} loaded: {info.num_layers} layers, {info.weights} weights on "
                        f"{info.kernel}{' (batch-invariant)' if info.batch_invariant else ''}, "
                        f"{ms_per_layer:.2f} ms per layer per token, {costs.head_ms:.2f} ms of embedding and "
                        f"head per token, {costs.prefill_ms_per_layer:.1f} ms per layer for a 256-token prompt")
        try:
            fallback = self._make_fallback(runtime, worker, board, hub, budget)
        except (FallbackError, ModelSourceError) as error:
            self._fail(str(error))
            return
        try:
            # the fallback's and the draft model's bytes come out of the budget this node offers the mesh
            drafting = runtime.draft.nbytes if runtime.draft is not None else 0
            mesh = await self._start_mesh(node_id, runtime, worker, board, hub, tasks, key,
                                          budget - fallback.reserved_bytes - drafting, ms_per_layer,
                                          on_change=fallback.mesh_changed, costs=costs)
        except OSError as error:
            reason = os.strerror(error.errno).lower() if error.errno else str(error)
            self._fail(f"cannot listen for peers on {config.signal_host}:{config.signal_port}: {reason}")
            return
        fallback.watch(mesh.health)
        self._cleanup.insert(0, fallback.close)  # answers not started yet go nowhere once stopping
        completions.attach(runtime.engine, mesh, fallback)
        self._tune.attach(mesh.tune)
        await mesh.wait_active_plan()  # ready to answer once a plan is active
        board.update(state="ready")
        assert self.api_url is not None
        self._announce(ready_line(self.api_url, info.name, info.num_layers, info.weights, info.kernel))
        self.ready.set()

    def _make_fallback(self, runtime: Runtime, worker: GenerationWorker, board: StatusBoard,
                       hub: EventHub, budget: int) -> Fallback:
        """The local fallback model (--fallback-model), loaded on first need. Raises
        FallbackError (or ModelSourceError) when the one asked for cannot be used."""
        from meshllm.model.source import resolve

        config = self.config
        shape = runtime.engine.shape
        choice = choose_fallback(config.fallback_model, resolve(config.model).path,
                                 shape.num_layers * shape.layer_bytes + shape.embed_head_bytes, budget)
        fallback = Fallback(choice, worker,
                            load=engine_loader(choice, device=config.device, cache_dir=config.cache_dir,
                                               served=runtime),
                            log_event=hub.log, on_change=board.refresh)
        board.attach_fallback(fallback.status_view)
        if choice.enabled:
            hub.log("info", f"fallback model {choice.name}: answers the mesh cannot serve, on this node "
                            f"(loads on first need; {choice.reserved_bytes / 1e6:.1f} MB of the memory budget)")
        else:
            hub.log("info", f"no fallback model ({choice.off_reason})")
        return fallback

    async def _start_mesh(self, node_id: str, runtime: Runtime, worker: GenerationWorker, board: StatusBoard,
                          hub: EventHub, tasks: asyncio.TaskGroup, key: bytes | None,
                          budget: int, ms_per_layer: float,
                          on_change: Callable[[], None] | None = None,
                          costs: EntryCosts | None = None) -> MeshDriver:
        """Links, signaling server, discovery and the mesh logic, all owned by `tasks`.
        `on_change` is called after the status board on every change of the mesh."""
        config = self.config
        info = runtime.engine.info
        signal_app = web.Application(client_max_size=64 * 1024)
        signaling = PendingRoute()
        signal_app.router.add_post(SIGNAL_PATH, signaling.handle)
        signal_server = await ApiServer.start(signal_app, config.signal_host, config.signal_port)
        hello = Hello(node_id, config.name[:64], PROTOCOL_VERSION, config.mesh_name,
                      runtime.mesh_model_id, signal_server.port, budget, ms_per_layer, True)
        inbox = MeshInbox(hello)
        links = LinkManager(
            hello,
            ice_servers=config.ice_servers,
            loopback=config.loopback,
            mesh_key=key,
            lost_after_s=config.heartbeat_timeout_s,
            heartbeat_interval_s=min(0.2, config.heartbeat_timeout_s / 4),
            on_message=inbox.message,
            on_link_up=inbox.link_up,
            on_link_down=inbox.link_down,
            is_compatible=inbox.incompatibility,
            debug_link_delay_ms=config.debug_link_delay_ms,
            max_message_bytes=link_message_bytes(runtime.hidden_size, info.max_positions, *runtime.kv_shape),
        )
        discovery = Discovery(hello, host=config.signal_host, port=signal_server.port,
                              loopback=config.loopback, on_event=inbox.discovered, key_id=key_id(key))
        settings = MeshSettings(objective=config.objective,
                                codec=config.codec, debug_delay_s=config.debug_delay_ms / 1000,
                                target_ms_per_token=config.target_ms_per_token, target_ttft_ms=config.target_ttft_ms,
                                # an entry node also runs its private layers for each of its tokens
                                head_ms=(costs.head_ms if costs is not None else 0.0)
                                + 2 * runtime.private_layers * ms_per_layer,
                                prefill_ms_per_layer=costs.prefill_ms_per_layer if costs else None,
                                batch_invariant=runtime.batch_invariant)
        if config.debug_link_delay_ms:
            hub.log("info", f"testing aid: every message to a peer waits {config.debug_link_delay_ms:g} ms "
                            "(--debug-link-delay-ms)")

        def model_id_changed(new: Hello) -> None:
            """A finished tune job's adapter is served now: peers and discovery see the new id."""
            links.update_hello(new)
            tasks.create_task(discovery.update(new))
            board.model_id_changed(new.model_id)

        mesh = MeshDriver(hello, runtime, worker, links, settings=settings,
                          on_change=board.refresh if on_change is None else lambda: (board.refresh(), on_change()),
                          log_event=hub.log, state_dir=config.state_dir,
                          tune_settings=TuneSettings(debug_update_scale=config.debug_tune_scale,
                                                     accept_adapters=config.accept_adapters),
                          on_model_id=model_id_changed, link_error=LinkError, speculate=config.speculate)
        inbox.deliver_to(mesh)
        signaling.serve_with(links.signaling_routes()[0].handler)
        board.attach_mesh(mesh.status_view)
        await links.start()
        self._background.append(tasks.create_task(mesh.run()))
        try:
            await discovery.start()
        except OSError as error:  # no multicast here: --join still works
            hub.log("error", f"mDNS discovery unavailable ({error}); use --join HOST:PORT")
        # On stop, in this order: hand the layers over, say goodbye on mDNS, Bye on every
        # link, stop answering signaling.
        self._cleanup += [mesh.leave, discovery.close, lambda: links.close("meshllm down"), signal_server.stop]
        for address in config.join:
            self._background.append(tasks.create_task(mesh.keep_joined(address)))
        hub.log("info", f"mesh '{config.mesh_name}': peers reach this node at "
                        f"{config.signal_host}:{signal_server.port}")
        return mesh

    def _fail(self, message: str) -> None:
        self._failure = StartupError(message)
        self.request_stop()

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

