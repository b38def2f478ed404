"""A whole node in this process on the tiny model: ready line, answers, stops, start-up failures.

Every node here runs in loopback mode under a mesh name of its own, so it never advertises on
a real interface and never joins another test's mesh. Alone, it is a mesh of one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.node.config import NodeConfig
from daemon.node.node import Node, StartupError
from meshllm.errors import ModelSourceError
from tests.tinymodel import chat_ids, reference_greedy
from tui.client import DaemonClient, DaemonError, DaemonUnavailable, run_sync

HELLO = [{"role": "user", "content": "hello"}]
"""The tiny model's greedy answer to this runs past 100 tokens (no early EOS)."""


def node_config(tmp_path: Path, model_dir: Path, **changes: Any) -> NodeConfig:
    settings: dict[str, Any] = dict(
        model=str(model_dir), api_port=0, state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
        threads=1, name="testnode", loopback=True, mesh_name=f"test-{uuid.uuid4().hex[:8]}",
    )
    settings.update(changes)
    return NodeConfig(**settings)


def make_node(tmp_path: Path, model_dir: Path, *, lines: list[str], handle_signals: bool = False,
              **changes: Any) -> Node:
    return Node(node_config(tmp_path, model_dir, **changes), announce=lines.append,
                handle_signals=handle_signals)


async def start(node: Node) -> asyncio.Task[None]:
    task = asyncio.create_task(node.run())
    ready = asyncio.create_task(asyncio.to_thread(node.ready.wait, 60))
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        await task  # raises the start-up error
    assert await ready
    return task


async def test_ready_line_then_answers_like_the_reference_then_down_stops(
        tmp_path: Path, tiny_llama: Path) -> None:
    lines: list[str] = []
    node = make_node(tmp_path, tiny_llama, lines=lines)
    task = await start(node)
    assert node.api_url is not None and node.api_url.startswith("http://127.0.0.1:")
    assert lines == [f"meshllm ready: {node.api_url} (model {tiny_llama.name}, 6 layers, f32 weights "
                     "on transformers (torch float32, the exact reference))"]
    expected = reference_greedy(tiny_llama, chat_ids(tiny_llama, HELLO), 8)
    client = DaemonClient(node.api_url)
    answer = await client.complete(HELLO, max_tokens=8, temperature=0)
    assert answer["meshllm"]["token_ids"] == expected
    assert answer["usage"]["completion_tokens"] == 8
    status = await client.status()
    assert status["self_id"] == (tmp_path / "state" / "node_id").read_text().strip()
    assert status["nodes"][0]["address"] == node.api_url.removeprefix("http://")
    assert status["plan"]["state"] == "active"
    assert [(s["start_layer"], s["end_layer"]) for s in status["plan"]["stages"]] == [(1, 5)]
    assert status["model"]["private_layers"] == 1
    assert status["stats"]["decode_steps"] >= 7  # the 7 tokens after the first
    assert status["model"]["kernel"].startswith("transformers") and status["model"]["batch_invariant"] is False
    await client.down()
    await asyncio.wait_for(task, 30)


async def test_node_id_survives_a_restart(tmp_path: Path, tiny_llama: Path) -> None:
    ids = []
    for _ in range(2):
        node = make_node(tmp_path, tiny_llama, lines=[])
        task = await start(node)
        ids.append((await DaemonClient(node.api_url).status())["self_id"])
        node.request_stop()
        await asyncio.wait_for(task, 30)
    assert ids[0] == ids[1]


async def test_sigterm_stops_cleanly(tmp_path: Path, tiny_llama: Path) -> None:
    node = make_node(tmp_path, tiny_llama, lines=[], handle_signals=True)
    task = await start(node)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 30)
    with pytest.raises(DaemonUnavailable, match="cannot reach the daemon"):
        await DaemonClient(node.api_url).status()


async def test_stopping_ends_a_running_stream_with_an_error(tmp_path: Path, tiny_llama: Path) -> None:
    node = make_node(tmp_path, tiny_llama, lines=[], debug_delay_ms=20.0)  # ~20 ms per token
    task = await start(node)
    answer = DaemonClient(node.api_url).chat(HELLO, max_tokens=200, temperature=0)
    while not (await anext(answer)).text:
        pass  # until the answer is under way
    node.request_stop()
    with pytest.raises(DaemonError, match="is stopping"):
        async for _ in answer:
            pass
    await asyncio.wait_for(task, 30)


async def test_model_error_is_a_startup_error(tmp_path: Path, tiny_llama: Path) -> None:
    def broken(_config: NodeConfig) -> Any:
        raise ModelSourceError("model path does not exist: /nowhere")

    lines: list[str] = []
    node = Node(node_config(tmp_path, tiny_llama), runtime_loader=broken, announce=lines.append,
                handle_signals=False)
    with pytest.raises(StartupError, match="model path does not exist: /nowhere"):
        await asyncio.wait_for(node.run(), 30)
    assert lines == []


async def test_port_in_use_is_a_startup_error(tmp_path: Path, tiny_llama: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = make_node(tmp_path, tiny_llama, lines=[], api_port=port)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            await asyncio.wait_for(node.run(), 30)


def test_up_with_tui_runs_the_tui_on_a_serving_node(tmp_path: Path, tiny_llama: Path) -> None:
    from daemon.cli import EXIT_OK, up_with_tui

    seen: dict[str, object] = {}

    def fake_tui(api_url: str, on_quit: Callable[[], None], *, api_key: str | None = None) -> None:
        seen["status"] = run_sync(DaemonClient(api_url).status())
        on_quit()

    config = node_config(tmp_path, tiny_llama, no_tui=False)
    assert up_with_tui(config, fake_tui) == EXIT_OK
    status = seen["status"]
    assert isinstance(status, dict) and status["nodes"][0]["state"] == "ready"


def test_up_with_tui_reports_a_start_up_failure(tmp_path: Path, tiny_llama: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.cli import EXIT_FAILURE, up_with_tui

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 32)

    def never(api_url: str, on_quit: Callable[[], None], *, api_key: str | None = None) -> None:
        raise AssertionError("the TUI must not start")

    config = node_config(tmp_path, tiny_llama, model=str(bad))
    assert up_with_tui(config, never) == EXIT_FAILURE
    assert capsys.readouterr().err == f"meshllm: not a GGUF file (bad magic): {bad}\n"


def test_the_weights_option_reaches_the_model(tiny_llama: Path) -> None:
    """`--weights` / MESHLLM_WEIGHTS is what the node loads (auto keeps a float32 folder f32)."""
    from daemon.node.config import NodeConfig
    from daemon.node.node import load_runtime
    from meshllm.model import kernels

    for asked, loaded in (("int8", "int8"), ("auto", "f32")):
        config = NodeConfig.from_sources({"model": str(tiny_llama)}, {"MESHLLM_WEIGHTS": asked})
        runtime = load_runtime(config)
        assert runtime.engine.info.weights == loaded
        torch_numerics = loaded != "f32" and not runtime.engine.info.batch_invariant
        assert runtime.engine.info.model_id.endswith(f"-{loaded}" + ("-torch" if torch_numerics else ""))
        # which kernels compute it: meshllm's own (batch-invariant) for int8 where they build,
        # torch's where there is no C compiler
        info = runtime.engine.info
        if loaded == "f32":
            assert info.kernel.startswith("transformers") and not info.batch_invariant
        else:
            built = kernels.get() is not None
            assert info.kernel.startswith("meshllm kernels" if built else "torch kernels")
            assert info.batch_invariant == built
