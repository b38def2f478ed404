"""A whole node in this process (fake engine): ready line, stops, start-up failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from daemon.config import NodeConfig
from daemon.node import Node, StartupError
from meshllm.errors import ModelSourceError
from tests.daemon.fake_engine import FakeEngine
from tests.daemon.sse import sse_items

HELLO = [{"role": "user", "content": "hello"}]


def make_node(tmp_path: Path, engine: FakeEngine | None = None, *, lines: list[str],
              port: int = 0, handle_signals: bool = False) -> Node:
    config = NodeConfig(api_port=port, state_dir=tmp_path / "state", threads=1, name="testnode")
    fake = engine or FakeEngine()
    return Node(config, engine_loader=lambda _config: fake, announce=lines.append,
                handle_signals=handle_signals)


async def start(node: Node) -> asyncio.Task[None]:
    task = asyncio.create_task(node.run())
    ready = asyncio.create_task(asyncio.to_thread(node.ready.wait, 30))
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        await task  # raises the start-up error
    assert await ready
    return task


async def test_ready_line_then_serves_then_down_stops(tmp_path: Path) -> None:
    lines: list[str] = []
    node = make_node(tmp_path, lines=lines)
    task = await start(node)
    assert node.api_url is not None and node.api_url.startswith("http://127.0.0.1:")
    assert lines == [f"meshllm ready: {node.api_url} (model fake-model, 4 layers)"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{node.api_url}/v1/chat/completions", json={"messages": HELLO}) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == "echo: hello"
        async with session.get(f"{node.api_url}/v1/status") as r:
            status = await r.json()
        assert status["self_id"] == (tmp_path / "state" / "node_id").read_text().strip()
        assert status["nodes"][0]["address"] == node.api_url.removeprefix("http://")
        async with session.post(f"{node.api_url}/v1/down", json={}) as r:
            assert await r.json() == {"ok": True}
    await asyncio.wait_for(task, 30)


async def test_node_id_survives_a_restart(tmp_path: Path) -> None:
    ids = []
    for _ in range(2):
        node = make_node(tmp_path, lines=[])
        task = await start(node)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{node.api_url}/v1/status") as r:
                ids.append((await r.json())["self_id"])
        node.request_stop()
        await asyncio.wait_for(task, 30)
    assert ids[0] == ids[1]


async def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    node = make_node(tmp_path, lines=[], handle_signals=True)
    task = await start(node)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"{node.api_url}/v1/status")


async def test_stopping_ends_a_running_stream_with_an_error(tmp_path: Path) -> None:
    engine = FakeEngine(token_delay_s=0.01, endless=True)
    node = make_node(tmp_path, engine, lines=[])
    task = await start(node)
    body = {"messages": HELLO, "stream": True, "max_tokens": 4096}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{node.api_url}/v1/chat/completions", json=body) as response:
            items = sse_items(response)
            await anext(items)
            node.request_stop()
            rest = [item async for item in items]
    assert rest[-1] == {"error": {"message": "the daemon is stopping", "type": "server_error",
                                  "param": None, "code": None}}
    await asyncio.wait_for(task, 30)


async def test_model_error_is_a_startup_error(tmp_path: Path) -> None:
    def broken(_config: NodeConfig) -> FakeEngine:
        raise ModelSourceError("model path does not exist: /nowhere")

    lines: list[str] = []
    config = NodeConfig(api_port=0, state_dir=tmp_path, threads=1)
    node = Node(config, engine_loader=broken, announce=lines.append, handle_signals=False)
    with pytest.raises(StartupError, match="model path does not exist: /nowhere"):
        await asyncio.wait_for(node.run(), 30)
    assert lines == []


async def test_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = make_node(tmp_path, lines=[], port=port)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            await asyncio.wait_for(node.run(), 30)


def test_up_with_tui_runs_the_tui_on_a_serving_node(tmp_path: Path) -> None:
    from daemon.cli import EXIT_OK, up_with_tui

    seen: dict[str, object] = {}

    def fake_tui(api_url: str, on_quit: Callable[[], None]) -> None:
        with urllib.request.urlopen(f"{api_url}/v1/status", timeout=10) as response:
            seen["status"] = json.load(response)
        on_quit()

    config = NodeConfig(api_port=0, state_dir=tmp_path, threads=1, no_tui=False)
    assert up_with_tui(config, fake_tui, engine_loader=lambda _c: FakeEngine()) == EXIT_OK
    status = seen["status"]
    assert isinstance(status, dict) and status["nodes"][0]["state"] == "ready"


def test_up_with_tui_reports_a_start_up_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import EXIT_FAILURE, up_with_tui

    def broken(_config: NodeConfig) -> FakeEngine:
        raise ModelSourceError("not a GGUF file (bad magic): x.gguf")

    def never(api_url: str, on_quit: Callable[[], None]) -> None:
        raise AssertionError("the TUI must not start")

    config = NodeConfig(api_port=0, state_dir=tmp_path, threads=1)
    assert up_with_tui(config, never, engine_loader=broken) == EXIT_FAILURE
    assert capsys.readouterr().err == "meshllm: not a GGUF file (bad magic): x.gguf\n"
