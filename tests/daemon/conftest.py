"""A real API server on an ephemeral 127.0.0.1 port, serving the fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from daemon.api.app import ApiServer, create_app
from daemon.api.completions import Completions, MeshAnswers
from daemon.api.events import EventHub
from daemon.api.status import ModelSummary, SelfState, StatusBoard
from daemon.node.worker import GenerationWorker
from tests.daemon.fake_engine import FakeEngine


@dataclass
class Served:
    url: str
    engine: FakeEngine
    hub: EventHub
    board: StatusBoard
    completions: Completions
    stop_requested: asyncio.Event
    session: aiohttp.ClientSession


MakeApi = Callable[..., Awaitable[Served]]


@pytest.fixture
async def make_api() -> AsyncIterator[MakeApi]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(engine: FakeEngine | None = None, *, keepalive_s: float = 5.0,
                   loaded: bool = True, mesh: MeshAnswers | None = None, **app_options: Any) -> Served:
        """``mesh``: answers come from it (as on a node), not from the engine on the worker;
        ``app_options`` go to create_app."""
        engine = engine if engine is not None else FakeEngine()
        hub = EventHub()
        board = StatusBoard(
            SelfState(node_id="n-test", name="testnode", address="127.0.0.1:0",
                      mem_budget_bytes=1 << 30),
            hub,
        )
        worker = GenerationWorker(threads=1)
        worker.start()
        completions = Completions(worker)
        if loaded:
            completions.attach(engine, mesh)
            info = engine.info
            board.update(state="ready", model=ModelSummary(info.model_id, info.name, info.num_layers, info.weights),
                         ms_per_layer=engine.measure_ms_per_layer())
        stop_requested = asyncio.Event()
        app = create_app(completions, board, hub, stop_requested.set, keepalive_s=keepalive_s, **app_options)
        server = await ApiServer.start(app, "127.0.0.1", 0, shutdown_timeout_s=1.0)
        session = aiohttp.ClientSession()

        async def cleanup() -> None:
            await session.close()
            hub.close()
            worker.stop()
            await server.stop()
            completions.close()
            await asyncio.to_thread(worker.join, 5.0)

        cleanups.append(cleanup)
        return Served(f"http://127.0.0.1:{server.port}", engine, hub, board, completions,
                      stop_requested, session)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def api(make_api: MakeApi) -> Served:
    return await make_api()
