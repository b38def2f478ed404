"""The TUI against a real local mesh: two `meshllm up --loopback` daemons on the tiny model.

A prompt typed in the chat view gets the same answer as `meshllm ask`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import Input

from tests.mesh.conftest import chat, unique_mesh_name
from tests.tui.pilot_tools import app_wait_until, screen_text
from tui.app import MeshApp
from tui.client import DaemonClient
from tui.launcher import LocalMesh
from tui.settings import TuiSettings
from tui.widgets.chat_log import ChatLog
from tui.mesh_status import PRIVATE
from tui.widgets.layer_map import LayerMap

REPO = Path(__file__).resolve().parents[2]
PROMPT = "What is the capital of France?"
MAX_TOKENS = 12
SETTINGS = TuiSettings(chat_max_tokens=MAX_TOKENS, chat_temperature=0.0)


@pytest.fixture
def mesh(tiny_llama: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(2, model=str(tiny_llama), threads=1, extra_args=["--mesh-name", unique_mesh_name()])
    mesh.start()
    try:
        mesh.wait_ready(90)
        yield mesh
    finally:
        mesh.stop()


async def meshllm_ask(api_url: str, prompt: str) -> str:
    """What `meshllm ask --max-tokens N --temperature 0` prints, less the newline it adds."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli", "ask", "--api", api_url, "--max-tokens", str(MAX_TOKENS),
        "--temperature", "0", prompt,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode(errors="replace")
    printed = out.decode("utf-8")
    assert printed.endswith("\n")
    return printed[:-1]


def owners(plan: dict) -> tuple[str, ...]:  # type: ignore[type-arg]
    """The node holding each layer under `plan`, and each entry node its private layers
    at both ends (the plan places the layers between)."""
    stages = plan["stages"]
    k = stages[0]["start_layer"]
    return ((PRIVATE,) * k + tuple(stage["node_id"] for stage in stages
                                   for _ in range(stage["start_layer"], stage["end_layer"])) + (PRIVATE,) * k)


async def test_a_prompt_typed_in_the_chat_gets_the_answer_meshllm_ask_gives(mesh: LocalMesh) -> None:
    api_url = mesh.nodes[0].url
    expected = await meshllm_ask(api_url, PROMPT)
    assert expected.strip(), "the tiny model gave an empty answer; pick another prompt"
    reference = chat(api_url, [{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, timeout_s=60)
    assert reference["choices"][0]["message"]["content"] == expected
    tokens = reference["usage"]["completion_tokens"]

    app = MeshApp(DaemonClient(api_url), settings=SETTINGS)
    async with app.run_test(size=(100, 30)) as pilot:
        # the mesh view: both nodes, and a layer map with every layer held by the plan's node
        await app_wait_until(pilot, lambda: app.mesh_status is not None and len(app.mesh_status.nodes) == 2,
                             "both nodes in the mesh view", 30)
        screen = screen_text(app)
        assert "node1" in screen and "node2" in screen
        layer_map = app.mesh_view.query_one(LayerMap)
        assert app.mesh_status is not None and len(layer_map.owners) == app.mesh_status.num_layers
        # the plan may move (runtime balancing re-plans when measured speeds drift): the map
        # must show the plan in force
        await app_wait_until(pilot, lambda: layer_map.owners == owners(mesh.status(0)["plan"]),
                             "the layer map shows the plan in force", 30)
        assert None not in layer_map.owners

        # the chat view: type the prompt key by key, send it, wait for the whole answer
        await pilot.press("f3")
        assert app.active_view == "chat"
        await pilot.press(*PROMPT)
        assert app.query_one("#prompt", Input).value == PROMPT
        await pilot.press("enter")
        await app_wait_until(pilot, lambda: not app.chat_view.streaming and len(app.chat_view.messages) == 2,
                             "the answer finished", 60)

        assert app.chat_view.messages == [{"role": "user", "content": PROMPT},
                                          {"role": "assistant", "content": expected}]
        shown = [(entry.role, entry.text) for entry in app.query_one(ChatLog).entries]
        assert shown[:2] == [("user", PROMPT), ("assistant", expected)]
        status_line = str(app.query_one("#chat-status").render())
        assert "on 2 nodes" in status_line and "done" in status_line and "tok/s" in status_line
        assert f"· {tokens} tokens ·" in status_line  # the daemon's count, not the text pieces'
