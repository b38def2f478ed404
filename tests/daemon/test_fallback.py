"""The local fallback model: which one (none, builtin, a PATH), when a request goes to it
(the grace period), and how the API says it (``meshllm.served_by``, the model field).

The mesh here is a stand-in (an answer generator and a health function) and both models are
fake engines, so every case runs in milliseconds; tests/mesh/test_fallback.py runs the real
thing with two daemons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.answer import Serving
from daemon.api.app import ApiServer, create_app
from daemon.api.completions import Completions
from daemon.api.events import EventHub
from daemon.api.status import ModelSummary, SelfState, StatusBoard
from daemon.node.config import ConfigError, NodeConfig
from daemon.node.fallback import (
    BUILTIN, NONE, Fallback, FallbackChoice, FallbackError, FallbackPolicy, choose_fallback,
    estimate_bytes,
)
from daemon.node.worker import GenerationWorker
from meshllm.errors import MeshUnavailable
from meshllm.model.sampling import SamplingParams
from meshllm.mesh.session import StateChange, Token
from tests.daemon.fake_engine import FakeEngine, reply_for
from tests.waiting import async_wait_until

HELLO = [{"role": "user", "content": "hello"}]


# -- which model ---------------------------------------------------------------------------------


def test_none_is_no_fallback(tmp_path: Path) -> None:
    choice = choose_fallback(NONE, tmp_path / "served.gguf", 100, 10**9)
    assert not choice.enabled and choice.reserved_bytes == 0 and choice.off_reason


def test_builtin_is_the_bundled_gguf() -> None:
    from meshllm.model.source import default_gguf_path

    served = Path("/models/another-model.gguf")
    choice = choose_fallback(BUILTIN, served, 10**9, 10**10)
    assert choice.enabled and not choice.same_as_served
    assert choice.path == default_gguf_path() and choice.path.suffix == ".gguf"
    assert choice.name == "SmolLM2-135M-Instruct"
    assert choice.reserved_bytes == estimate_bytes(default_gguf_path()) > choice.path.stat().st_size


def test_builtin_for_the_bundled_model_itself_only_when_this_node_holds_all_of_it(tmp_path: Path) -> None:
    bundled = tmp_path / "bundled.gguf"
    bundled.write_bytes(b"GGUF" + bytes(100))
    whole = 5000
    alone = choose_fallback(BUILTIN, bundled, whole, whole, builtin=lambda: bundled)
    assert alone.enabled and alone.same_as_served and alone.reserved_bytes == whole
    part = choose_fallback(BUILTIN, bundled, whole, whole - 1, builtin=lambda: bundled)
    assert not part.enabled and "budget" in str(part.off_reason)


def test_builtin_that_does_not_fit_the_budget_is_off_not_an_error(tmp_path: Path) -> None:
    choice = choose_fallback(BUILTIN, tmp_path / "big.gguf", 10**10, 1000, estimate=lambda _p: 2000)
    assert not choice.enabled and "needs about" in str(choice.off_reason)


def test_a_path_is_resolved_and_reserves_its_bytes(tmp_path: Path, tiny_llama: Path) -> None:
    choice = choose_fallback(str(tiny_llama), tmp_path / "served.gguf", 10**9, 10**9)
    assert choice.enabled and choice.path == tiny_llama.resolve() and choice.name == tiny_llama.name
    assert choice.reserved_bytes == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FallbackError, match="does not exist"):
        choose_fallback(str(missing), tmp_path / "served.gguf", 100, 10**9)
    with pytest.raises(ConfigError, match="fallback model"):
        NodeConfig.from_sources({"fallback_model": str(missing)}, {})
    with pytest.raises(ConfigError, match="fallback model"):
        NodeConfig.from_sources({}, {"MESHLLM_FALLBACK_MODEL": str(missing)})


def test_a_path_too_big_for_the_budget_is_an_error(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(FallbackError, match="mem-budget"):
        choose_fallback(str(tiny_llama), tmp_path / "served.gguf", 10**9, 10)


def test_the_option_defaults_to_builtin_and_reads_the_environment(tiny_llama: Path) -> None:
    assert NodeConfig.from_sources({}, {}).fallback_model == BUILTIN
    assert NodeConfig.from_sources({}, {"MESHLLM_FALLBACK_MODEL": "none"}).fallback_model == NONE
    assert NodeConfig.from_sources({"fallback_model": str(tiny_llama)},
                                   {"MESHLLM_FALLBACK_MODEL": "none"}).fallback_model == str(tiny_llama)


# -- when ------------------------------------------------------------------------------------------


def test_no_active_plan_sends_requests_to_the_fallback_after_the_grace_period() -> None:
    policy = FallbackPolicy(grace_s=3.0)
    policy.observe((1, 1), None, now=0.0)
    assert policy.due_at(0.0, False, now=0.0) is None and policy.trouble is None
    policy.observe(None, None, now=10.0)  # a peer left: no plan for now
    assert "no active plan" in str(policy.trouble)
    assert not policy.fallback_due(11.0, False, now=12.9)
    assert policy.fallback_due(11.0, False, now=13.0)  # counted from the trouble, not the request
    policy.observe(None, "2 MB short", now=11.0)  # the coordinator cannot place it: same trouble
    assert policy.due_at(20.0, False, now=20.0) == 13.0
    assert policy.trouble == "the mesh cannot hold the model: 2 MB short"
    policy.observe(None, "the mesh cannot hold the model: 6 layers...", now=12.0)  # not said twice
    assert policy.trouble == "the mesh cannot hold the model: 6 layers..."
    policy.mesh_failed("an answer's own words for it", now=12.5)  # the mesh's state says it better
    assert policy.trouble == "the mesh cannot hold the model: 6 layers..."


def test_switch_and_return_are_said_once_each() -> None:
    policy = FallbackPolicy(grace_s=1.0)
    policy.observe(None, "too little memory", now=0.0)
    line = policy.switched()
    assert line is not None and "too little memory" in line and policy.serving_fallback
    assert policy.switched() is None
    assert policy.observe(None, "too little memory", now=5.0) is None
    back = policy.observe((2, 1), None, now=6.0)
    assert back is not None and "back to" in back and not policy.serving_fallback
    assert policy.observe((2, 1), None, now=7.0) is None and policy.trouble is None


def test_a_request_that_failed_on_the_mesh_counts_from_its_own_start() -> None:
    policy = FallbackPolicy(grace_s=3.0, retry_s=30.0)
    policy.observe((1, 1), None, now=0.0)
    policy.mesh_failed("steps keep failing: busy", now=12.0)  # the request started at 10
    assert policy.due_at(10.0, True, now=12.0) == 13.0
    assert policy.due_at(12.5, False, now=12.5) == 15.0  # a new request: from the failure
    assert policy.observe((1, 1), None, now=12.6) is None  # the same plan: still failing
    assert "steps keep failing" in str(policy.trouble)
    assert policy.observe((1, 2), None, now=13.0) is None and policy.trouble is None  # a new plan


def test_failing_steps_on_a_plan_that_stays_are_tried_again_later() -> None:
    policy = FallbackPolicy(grace_s=3.0, retry_s=30.0)
    policy.observe((1, 1), None, now=0.0)
    policy.mesh_failed("steps keep failing", now=1.0)
    assert policy.fallback_due(2.0, False, now=20.0)
    assert not policy.fallback_due(40.0, False, now=40.0) and policy.trouble is None


# -- routing, with a stand-in mesh ------------------------------------------------------------------


class FallbackEngine(FakeEngine):
    """The fallback's fake engine: another name, and weights to count."""

    def __init__(self) -> None:
        super().__init__()
        self.info = dataclasses.replace(self.info, name="fake-fallback", model_id="fallback0123456")

    @property
    def weight_bytes(self) -> int:
        return 4321


class StandInMesh:
    """`generate` like MeshDriver's: a scripted answer; `health` like the driver's core."""

    def __init__(self) -> None:
        self.active: object | None = (1, 1)
        self.placement_error: str | None = None
        self.mode = "answer"
        """answer (tokens), hang (no token ever), fail (MeshUnavailable at once)."""
        self.calls = 0
        self.closed = 0

    def health(self) -> tuple[object | None, str | None]:
        return self.active, self.placement_error

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       should_stop: Callable[[], bool] = lambda: False) -> AsyncIterator[Token | StateChange]:
        self.calls += 1
        try:
            if self.mode == "fail":
                raise MeshUnavailable("steps keep failing: busy")
            if self.mode == "hang":
                yield StateChange("replanning")
                await asyncio.Event().wait()
            for ch in "mesh":
                yield Token(ord(ch), ch)
            yield Token(0, "", "stop")
        finally:
            self.closed += 1


@pytest.fixture
async def worker() -> AsyncIterator[GenerationWorker]:
    w = GenerationWorker(threads=1)
    w.start()
    yield w
    w.stop()
    await asyncio.to_thread(w.join, 5.0)


def make_fallback(worker: GenerationWorker, mesh: StandInMesh, *, grace_s: float,
                  logs: list[tuple[str, str]]) -> tuple[Fallback, FallbackEngine]:
    engine = FallbackEngine()
    choice = FallbackChoice("fake", Path("/fake-fallback"), "fake-fallback", reserved_bytes=5000)
    fallback = Fallback(choice, worker, load=lambda: engine, policy=FallbackPolicy(grace_s=grace_s),
                        log_event=lambda kind, message: logs.append((kind, message)))
    fallback.watch(mesh.health)
    return fallback, engine


async def answer(fallback: Fallback, mesh: StandInMesh) -> list[Any]:
    params = SamplingParams(temperature=0, max_tokens=64)
    ids = FakeEngine().chat_prompt(HELLO)
    items = [item async for item in fallback.answer(
        lambda: mesh.generate(ids, params), "fake-model", HELLO, params, lambda: False)]
    return items


def text_of(items: list[Any]) -> str:
    return "".join(item.text for item in items if isinstance(item, Token))


async def test_a_mesh_that_serves_answers_and_the_fallback_stays_unloaded(worker: GenerationWorker) -> None:
    mesh, logs = StandInMesh(), []
    fallback, _ = make_fallback(worker, mesh, grace_s=0.0, logs=logs)
    items = await answer(fallback, mesh)
    assert items[0] == Serving("mesh", "fake-model") and text_of(items) == "mesh"
    view = fallback.status_view()
    assert view["state"] == "standby" and view["serving"] is False and view["weight_bytes"] == 0
    assert view["reserved_bytes"] == 5000 and logs == []


async def test_no_plan_past_the_grace_period_is_answered_by_the_fallback(worker: GenerationWorker) -> None:
    mesh, logs = StandInMesh(), []
    fallback, engine = make_fallback(worker, mesh, grace_s=0.0, logs=logs)
    mesh.active, mesh.placement_error = None, "the nodes are 1 MB short"
    fallback.mesh_changed()
    items = await answer(fallback, mesh)
    assert items[0] == Serving("fallback", "fake-fallback")
    assert text_of(items) == reply_for(HELLO) and mesh.calls == 0
    assert engine.generate_threads == ["meshllm-worker"]  # on the node's worker thread
    kinds = [kind for kind, _ in logs]
    assert kinds.count("fallback") == 3  # the switch, loading, loaded
    assert any("1 MB short" in message for _, message in logs)
    view = fallback.status_view()
    assert view["state"] == "loaded" and view["serving"] is True and view["weight_bytes"] == 4321
    # the mesh can serve again: said once, and the next answer is the mesh's
    mesh.active, mesh.placement_error = (2, 1), None
    fallback.mesh_changed()
    assert any("back to" in message for _, message in logs[3:])
    items = await answer(fallback, mesh)
    assert items[0].by == "mesh" and text_of(items) == "mesh"
    assert fallback.status_view()["serving"] is False


async def test_an_answer_waiting_on_the_mesh_moves_to_the_fallback_when_the_grace_ends(
        worker: GenerationWorker) -> None:
    mesh, logs = StandInMesh(), []
    fallback, _ = make_fallback(worker, mesh, grace_s=0.2, logs=logs)
    mesh.mode = "hang"  # the mesh waits for a plan that does not come
    task = asyncio.create_task(answer(fallback, mesh))
    await async_wait_until(lambda: mesh.calls == 1, 10, "the answer tried the mesh first")
    mesh.active = None
    fallback.mesh_changed()
    items = await asyncio.wait_for(task, 30)
    assert items[0].by == "fallback"  # the mesh's "replanning" before it is dropped
    assert not any(isinstance(item, StateChange) for item in items)
    assert text_of(items) == reply_for(HELLO)
    assert mesh.closed == 1  # the mesh's session was closed, not left behind


async def test_steps_that_keep_failing_go_to_the_fallback(worker: GenerationWorker) -> None:
    mesh, logs = StandInMesh(), []
    fallback, _ = make_fallback(worker, mesh, grace_s=0.1, logs=logs)
    mesh.mode = "fail"
    items = await asyncio.wait_for(answer(fallback, mesh), 30)
    assert items[0].by == "fallback" and mesh.calls >= 1
    assert any("keep failing" in message for _, message in logs)


async def test_a_healthy_mesh_keeps_its_answer_even_if_the_mesh_breaks_later(worker: GenerationWorker) -> None:
    mesh, logs = StandInMesh(), []
    fallback, _ = make_fallback(worker, mesh, grace_s=0.0, logs=logs)
    params = SamplingParams(temperature=0, max_tokens=64)
    stream = fallback.answer(lambda: mesh.generate([1], params), "fake-model", HELLO, params, lambda: False)
    first, token = await anext(stream), await anext(stream)
    assert first.by == "mesh" and token.text == "m"
    mesh.active = None  # the mesh breaks under way: this answer stays on it
    fallback.mesh_changed()
    rest = [item async for item in stream]
    assert text_of([token, *rest]) == "mesh"


# -- the API says it -------------------------------------------------------------------------------


@pytest.fixture
async def served(worker: GenerationWorker) -> AsyncIterator[tuple[str, StandInMesh, Fallback, StatusBoard]]:
    mesh, hub = StandInMesh(), EventHub()
    board = StatusBoard(SelfState(node_id="n-test", name="testnode", address="127.0.0.1:0",
                                  mem_budget_bytes=1 << 30), hub)
    engine = FakeEngine()
    board.update(state="ready", model=ModelSummary(engine.info.model_id, engine.info.name, 4))
    fallback, _ = make_fallback(worker, mesh, grace_s=0.0, logs=[])
    board.attach_fallback(fallback.status_view)
    completions = Completions(worker)
    completions.attach(engine, mesh, fallback)  # type: ignore[arg-type]
    server = await ApiServer.start(create_app(completions, board, hub, lambda: None), "127.0.0.1", 0,
                                   shutdown_timeout_s=1.0)
    yield f"http://127.0.0.1:{server.port}", mesh, fallback, board
    hub.close()
    await server.stop()
    completions.close()


async def test_the_response_says_who_answered(served: tuple[str, StandInMesh, Fallback, StatusBoard]) -> None:
    url, mesh, fallback, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json={"messages": HELLO}) as response:
            body = await response.json()
        assert body["model"] == "fake-model" and body["meshllm"]["served_by"] == "mesh"
        assert body["choices"][0]["message"]["content"] == "mesh"
        mesh.active = None
        fallback.mesh_changed()
        async with session.post(f"{url}/v1/chat/completions", json={"messages": HELLO}) as response:
            body = await response.json()
        assert response.status == 200, body
        assert body["model"] == "fake-fallback" and body["meshllm"]["served_by"] == "fallback"
        assert body["choices"][0]["message"]["content"] == reply_for(HELLO)
        async with session.get(f"{url}/v1/status") as response:
            status = await response.json()
        assert status["fallback"]["serving"] is True and status["fallback"]["model"] == "fake-fallback"


async def streamed_chunks(url: str) -> list[dict]:  # type: ignore[type-arg]
    """Every JSON chunk of a streamed chat answer to HELLO."""
    chunks = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions",
                                json={"messages": HELLO, "stream": True}) as response:
            async for line in response.content:
                if line.startswith(b"data: {"):
                    chunks.append(json.loads(line[6:]))
    return chunks


async def test_every_chunk_of_a_fallback_stream_says_it(served: tuple[str, StandInMesh, Fallback, StatusBoard]) -> None:
    url, mesh, fallback, _ = served
    mesh.active = None
    fallback.mesh_changed()
    chunks = await streamed_chunks(url)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["model"] == "fake-fallback" and c["meshllm"]["served_by"] == "fallback" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply_for(HELLO)
    assert chunks[-1]["meshllm"]["token_ids"][-1] == 0


async def test_a_mesh_stream_says_mesh_in_every_chunk(served: tuple[str, StandInMesh, Fallback, StatusBoard]) -> None:
    url, _, _, _ = served
    chunks = await streamed_chunks(url)
    assert all(c["model"] == "fake-model" and c["meshllm"]["served_by"] == "mesh" for c in chunks)


# -- the TUI and `meshllm status` show it -------------------------------------------------------------
# (here rather than under tests/tui/, which another engineer owns right now)


FALLBACK_STATUS = {"model": "SmolLM2-135M-Instruct", "path": "/x.gguf", "state": "loaded", "serving": True,
                   "reserved_bytes": 118_000_000, "weight_bytes": 112_000_000,
                   "mesh_trouble": "the mesh cannot hold the model: 40 MB short", "note": None}


def test_the_client_reads_who_serves_from_the_opening_chunk() -> None:
    from tui.client import ChatDelta, _chat_deltas

    opening = {"model": "fake-fallback", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
               "meshllm": {"served_by": "fallback"}}
    assert _chat_deltas(json.dumps(opening)) == [ChatDelta(served_by="fallback", model="fake-fallback")]
    piece = {"model": "fake-fallback", "choices": [{"index": 0, "delta": {"content": "hi"}}],
             "meshllm": {"served_by": "fallback"}}
    assert _chat_deltas(json.dumps(piece)) == [ChatDelta(text="hi")]


def test_status_and_the_status_table_show_the_fallback() -> None:
    from tui.demo import node, status
    from tui.mesh_status import MeshStatus
    from tui.status_table import format_status
    from tui.views.mesh import format_facts

    snapshot = {**status([node("n-laptop", "laptop", None, is_self=True, coordinator=True)], plan_state="active"),
                "fallback": FALLBACK_STATUS}
    parsed = MeshStatus.from_json(snapshot)
    assert parsed.fallback is not None and parsed.fallback.serving and parsed.fallback.weight_bytes == 112_000_000
    assert "SmolLM2-135M-Instruct answering" in format_facts(parsed).plain
    assert "40 MB short" in format_facts(parsed).plain
    table = format_status(snapshot)
    assert "fallback: SmolLM2-135M-Instruct (loaded, 112.0 MB); ANSWERING" in table
    standby = {**FALLBACK_STATUS, "state": "standby", "serving": False, "weight_bytes": 0, "mesh_trouble": None}
    assert "fallback: SmolLM2-135M-Instruct (standby, 118.0 MB)" in format_status({**snapshot, "fallback": standby})
    off = {**FALLBACK_STATUS, "state": "off", "model": None, "note": "--fallback-model none"}
    assert "fallback: none (--fallback-model none)" in format_status({**snapshot, "fallback": off})
    assert MeshStatus.from_json({**snapshot, "fallback": None}).fallback is None


async def test_the_chat_marks_an_answer_from_the_fallback() -> None:
    from tests.tui.pilot_tools import app_wait_until
    from textual.widgets import Input
    from tui.app import MeshApp
    from tui.demo import FakeClient, node, status
    from tui.settings import TuiSettings
    from tui.widgets.chat_log import ChatLog

    fake = FakeClient()
    fake.push_status({**status([node("n-laptop", "laptop", None, is_self=True, coordinator=True)]),
                      "fallback": FALLBACK_STATUS})
    app = MeshApp(fake, settings=TuiSettings(chat_max_tokens=50, chat_temperature=0.0), initial_view="chat")
    async with app.run_test(size=(100, 30)) as pilot:
        await app_wait_until(pilot, lambda: "fallback SmolLM2-135M-Instruct answers"
                             in str(app.query_one("#chat-status").render()), "the status line says it")
        app.query_one("#prompt", Input).insert_text_at_cursor("hello")
        await pilot.press("enter")
        await app_wait_until(pilot, lambda: len(fake.chats) == 1, "the question sent")
        call = fake.chats[0]
        call.serve("fallback", "SmolLM2-135M-Instruct")
        call.send("Hi!")
        call.finish("stop")
        log = app.query_one(ChatLog)
        await app_wait_until(pilot, lambda: [(e.role, e.text) for e in log.entries][-1] == ("assistant", "Hi!")
                             and "done" in str(app.query_one("#chat-status").render()), "the answer ended")
        roles = [(e.role, e.text) for e in log.entries]
        assert roles[1][0] == "note" and "fallback model SmolLM2-135M-Instruct" in roles[1][1]
        assert log.entries[-1].has_class("fallback")
        assert "fallback SmolLM2-135M-Instruct" in str(app.query_one("#chat-status").render())
