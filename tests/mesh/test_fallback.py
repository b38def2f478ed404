"""The local fallback in a real mesh: two daemons whose memory budgets each hold only part of
the model serve it together; stop one, and the other answers new requests from its fallback
model, flagged; start it again, and new requests are served by the mesh again.

The fallback here is a second tiny model (another architecture and seed), so its answer is
known exactly; tests/daemon/test_fallback.py checks that ``builtin`` is the bundled GGUF.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from daemon.node.fallback import estimate_bytes
from tests.mesh.conftest import chat, token_ids, unique_mesh_name
from tests.tinymodel import PROMPTS, build_tiny_model, chat_ids, reference_greedy
from tests.waiting import wait_until
from tui.client import DaemonClient, run_sync
from tui.launcher import LocalMesh

TOKENS = 12


@pytest.fixture(scope="module")
def tiny_fallback(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-fallback"), "qwen2", num_layers=2, seed=7)


def part_of_the_model(model: Path, fallback: Path) -> list[str]:
    """A budget for 4 of the 6 layers (with the embedding and head) plus the fallback: no
    node can hold the model alone, two can."""
    from meshllm.model.cache import prepare
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve

    shape = model_shape(load_config(prepare(resolve(model))))
    budget = shape.embed_head_bytes + 4 * shape.layer_bytes + estimate_bytes(fallback)
    return ["--mem-budget", str(budget), "--fallback-model", str(fallback)]


async def _fallback_logs(url: str, wanted: int, timeout_s: float) -> list[str]:
    """The event log's "fallback" lines, as a client attaching now sees them (the daemon
    replays its recent log after the first status)."""
    lines: list[str] = []
    async with asyncio.timeout(timeout_s):
        async for event in DaemonClient(url).events():
            if event.get("type") == "log" and event.get("kind") == "fallback":
                lines.append(str(event.get("message")))
                if len(lines) >= wanted and any("back to" in line for line in lines):
                    break
    return lines


def test_a_mesh_that_loses_a_node_answers_from_the_fallback_then_from_the_mesh_again(
        tiny_llama: Path, tiny_fallback: Path) -> None:
    prompt = list(PROMPTS[0])
    mesh_reference = reference_greedy(tiny_llama, chat_ids(tiny_llama, prompt), TOKENS)
    fallback_reference = reference_greedy(tiny_fallback, chat_ids(tiny_fallback, prompt), TOKENS)
    mesh = LocalMesh(2, model=str(tiny_llama), threads=1,
                     extra_args=["--mesh-name", unique_mesh_name(), *part_of_the_model(tiny_llama, tiny_fallback)])
    mesh.start()
    try:
        mesh.wait_ready(180)
        url = mesh.nodes[0].url
        status = mesh.status(0)
        assert len(status["plan"]["stages"]) == 2  # neither node can hold it alone
        assert status["fallback"]["state"] == "standby" and status["fallback"]["model"] == tiny_fallback.name
        together = chat(url, prompt, TOKENS)
        assert together["meshllm"]["served_by"] == "mesh" and together["model"] == tiny_llama.name
        assert token_ids(together) == mesh_reference

        mesh.stop_node(1)
        wait_until(lambda: mesh.status(0)["fallback"]["mesh_trouble"], 60, "node1 sees the mesh cannot serve")
        alone = chat(url, prompt, TOKENS)
        assert alone["meshllm"]["served_by"] == "fallback"
        assert alone["model"] == tiny_fallback.name
        assert token_ids(alone) == fallback_reference  # the fallback model answered, on this node
        fallback_status: dict[str, Any] = mesh.status(0)["fallback"]
        assert fallback_status["serving"] and fallback_status["state"] == "loaded"
        assert fallback_status["weight_bytes"] > 0

        mesh.start_node(1)
        mesh.wait_ready(180)
        wait_until(lambda: (mesh.status(0)["plan"] or {}).get("state") == "active"
                   and not mesh.status(0)["fallback"]["serving"], 120, "node0 serves from the mesh again")
        again = chat(url, prompt, TOKENS)
        assert again["meshllm"]["served_by"] == "mesh" and again["model"] == tiny_llama.name
        assert token_ids(again) == mesh_reference

        lines = run_sync(_fallback_logs(url, 2, 60))
        assert any("answering new requests from the fallback model" in line for line in lines), lines
        assert any("back to" in line for line in lines), lines
    finally:
        mesh.stop()
