"""Admission: at most N answers at once, a bounded line behind them, a 429 beyond it.

The limiter alone (`Admission`, its pure helpers), then the API with a mesh whose answers the
test holds and lets go (`GatedMesh`), as a user of ``meshllm up --max-sessions 2`` sees it.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.api.admission import (ASSUMED_ANSWER_S, MAX_DEFAULT_SESSIONS, MAX_RETRY_AFTER_S, Admission, Busy,
                                  kv_bytes_per_session, retry_after_s, session_limits)
from daemon.cli import main
from daemon.node.config import ConfigError, NodeConfig
from meshllm.mesh.session import Token
from meshllm.model.sampling import SamplingParams
from tests.daemon.conftest import MakeApi, Served
from tests.waiting import async_wait_until
from tui.client import DONE, read_sse

# -- the limiter alone ------------------------------------------------------------------------------


async def queued(admission: Admission, count: int) -> None:
    await async_wait_until(lambda: admission.queued == count, 10, f"{count} request(s) waiting")


async def test_waiting_requests_get_slots_in_arrival_order() -> None:
    admission = Admission(2, queue_max=4)
    first, second = await admission.acquire(), await admission.acquire()
    third = asyncio.create_task(admission.acquire())
    await queued(admission, 1)
    fourth = asyncio.create_task(admission.acquire())
    await queued(admission, 2)
    assert admission.view() == {"running": 2, "queued": 2, "max": 2, "queue_max": 4}
    first.release()
    third_slot = await third
    assert admission.view() == {"running": 2, "queued": 1, "max": 2, "queue_max": 4}  # the fourth still waits
    second.release()
    fourth_slot = await fourth
    third_slot.release()
    fourth_slot.release()
    fourth_slot.release()  # a second release counts once
    assert admission.view()["running"] == 0


async def test_a_full_queue_is_refused_at_once_with_a_retry_time() -> None:
    admission = Admission(1, queue_max=1)
    held = await admission.acquire()
    waiting = asyncio.create_task(admission.acquire())
    await queued(admission, 1)
    with pytest.raises(Busy) as refused:
        await admission.acquire()
    assert refused.value.code == "queue_full" and refused.value.retry_after_s >= 1
    assert "busy" in refused.value.message and "--max-sessions 1" in refused.value.message
    held.release()
    (await waiting).release()


async def test_a_waiter_that_gives_up_leaves_the_line() -> None:
    admission = Admission(1, queue_max=2)
    held = await admission.acquire()
    leaving = asyncio.create_task(admission.acquire())
    await queued(admission, 1)
    staying = asyncio.create_task(admission.acquire())
    await queued(admission, 2)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert admission.queued == 1
    held.release()
    (await staying).release()
    assert admission.view()["running"] == 0


async def test_a_slot_given_to_a_waiter_that_just_gave_up_goes_to_the_next() -> None:
    admission = Admission(1, queue_max=2)
    held = await admission.acquire()
    first = asyncio.create_task(admission.acquire())
    await queued(admission, 1)
    second = asyncio.create_task(admission.acquire())
    await queued(admission, 2)
    held.release()  # the slot is the first waiter's now, but it has not run yet...
    first.cancel()  # ...and its client goes away
    with pytest.raises(asyncio.CancelledError):
        await first
    slot = await second
    assert admission.view()["running"] == 1
    slot.release()


async def test_a_request_that_waits_too_long_is_refused() -> None:
    admission = Admission(1, queue_max=1, queue_wait_s=0.01)
    held = await admission.acquire()
    with pytest.raises(Busy) as refused:
        await admission.acquire()
    assert refused.value.code == "queue_timeout" and refused.value.retry_after_s >= 1
    assert admission.view() == {"running": 1, "queued": 0, "max": 1, "queue_max": 1}
    held.release()


async def test_raised_limits_let_waiters_in_and_every_change_is_reported() -> None:
    admission = Admission(1, queue_max=2)
    seen: list[dict[str, Any]] = []
    admission.watch(lambda: seen.append(admission.view()))
    held = await admission.acquire()
    waiting = asyncio.create_task(admission.acquire())
    await queued(admission, 1)
    admission.set_limits(2, 8)
    slot = await waiting
    assert seen == [{"running": 1, "queued": 0, "max": 1, "queue_max": 2},
                    {"running": 1, "queued": 1, "max": 1, "queue_max": 2},
                    {"running": 2, "queued": 0, "max": 2, "queue_max": 8}]
    held.release()
    slot.release()
    with pytest.raises(ValueError):
        admission.set_limits(0, 4)


def test_retry_after_is_the_time_the_line_needs_to_start() -> None:
    assert retry_after_s([], queued=1, max_sessions=2) == round(ASSUMED_ANSWER_S)  # nothing measured yet
    assert retry_after_s([2.0, 4.0], queued=3, max_sessions=2) == 6  # 3 s each, 4 answers, 2 at a time
    assert retry_after_s([0.01], queued=0, max_sessions=8) == 1  # at least 1 s
    assert retry_after_s([600.0], queued=10, max_sessions=1) == MAX_RETRY_AFTER_S


def test_the_default_comes_from_the_kv_cache_of_a_full_context() -> None:
    smollm2 = kv_bytes_per_session(num_layers=30, kv_heads=3, head_dim=64, max_positions=8192)
    assert smollm2 == 30 * 2 * 3 * 64 * 4 * 8192 == 377_487_360
    limits = session_limits(None, kv_bytes=smollm2, mem_budget_bytes=8 * 10**9)
    assert (limits.max_sessions, limits.queue_max) == (5, 20)  # 2 GB hold 5.3 such caches
    assert "377.5 MB of KV cache per session" in limits.describe() and "from memory" in limits.describe()
    assert session_limits(None, kv_bytes=smollm2, mem_budget_bytes=10**9).max_sessions == 1
    assert session_limits(None, kv_bytes=smollm2, mem_budget_bytes=0).max_sessions == 1
    assert session_limits(None, kv_bytes=1000, mem_budget_bytes=10**12).max_sessions == MAX_DEFAULT_SESSIONS
    given = session_limits(40, kv_bytes=smollm2, mem_budget_bytes=10**9)
    assert (given.max_sessions, given.queue_max, given.how) == (40, 160, "--max-sessions")


def test_the_flag_and_its_variable() -> None:
    assert NodeConfig.from_sources({}, {}).max_sessions is None  # from memory
    assert NodeConfig.from_sources({}, {"MESHLLM_MAX_SESSIONS": "2"}).max_sessions == 2
    assert NodeConfig.from_sources({"max_sessions": 3}, {"MESHLLM_MAX_SESSIONS": "2"}).max_sessions == 3
    with pytest.raises(ConfigError, match="max sessions must be at least 1, not 0"):
        NodeConfig.from_sources({"max_sessions": 0}, {})
    with pytest.raises(ConfigError, match="MESHLLM_MAX_SESSIONS must be an integer"):
        NodeConfig.from_sources({}, {"MESHLLM_MAX_SESSIONS": "many"})


def test_up_refuses_zero_sessions_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--max-sessions", "0", "--no-tui"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max sessions must be at least 1, not 0" in err


# -- the API, with answers the test holds -----------------------------------------------------------


@dataclass
class HeldAnswer:
    started: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the test: the answer goes on past its first token."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Its generation has ended: finished, or closed because its client went away."""


class GatedMesh:
    """Answers "ab" across a pretend mesh: "a" at once, the rest once the test opens its gate."""

    def __init__(self) -> None:
        self.answers: defaultdict[str, HeldAnswer] = defaultdict(HeldAnswer)

    def __getitem__(self, question: str) -> HeldAnswer:
        return self.answers[question]

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       should_stop: Callable[[], bool]) -> AsyncIterator[Token]:
        # the fake engine's prompt is "<user>QUESTION<assistant>", one token per character
        question = "".join(map(chr, prompt_ids)).removeprefix("<user>").removesuffix("<assistant>")
        answer = self.answers[question]
        answer.started.set()
        try:
            yield Token(ord("a"), "a")
            await answer.gate.wait()
            yield Token(ord("b"), "b")
            yield Token(0, "", "stop")
        finally:
            answer.ended.set()


def chat(question: str, *, stream: bool = False) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "stream": stream}


async def ask(api: Served, question: str) -> tuple[int, Any, dict[str, str]]:
    async with api.session.post(f"{api.url}/v1/chat/completions", json=chat(question)) as response:
        return response.status, await response.json(), dict(response.headers)


async def open_stream(api: Served, mesh: GatedMesh, question: str) -> aiohttp.ClientResponse:
    """A streamed answer that has started: its first token is on the way."""
    response = await api.session.post(f"{api.url}/v1/chat/completions", json=chat(question, stream=True))
    assert response.status == 200
    await mesh[question].started.wait()
    return response


async def stream_text(response: aiohttp.ClientResponse) -> str:
    events = [data async for data in read_sse(response)]
    response.release()
    assert events[-1] == DONE
    chunks = [json.loads(data) for data in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


async def sessions(api: Served) -> dict[str, Any]:
    async with api.session.get(f"{api.url}/v1/status") as response:
        return (await response.json())["sessions"]  # type: ignore[no-any-return]


@pytest.fixture
async def two_sessions(make_api: MakeApi) -> tuple[Served, GatedMesh, Admission]:
    """A node of ``--max-sessions 2`` with a line of 2."""
    mesh, admission = GatedMesh(), Admission(2, queue_max=2)
    return await make_api(mesh=mesh, admission=admission), mesh, admission


async def test_a_third_and_a_fourth_request_wait_then_run(two_sessions: tuple[Served, GatedMesh, Admission]
                                                          ) -> None:
    api, mesh, admission = two_sessions
    first, second = await open_stream(api, mesh, "q1"), await open_stream(api, mesh, "q2")
    third = asyncio.create_task(ask(api, "q3"))
    await queued(admission, 1)
    fourth = asyncio.create_task(ask(api, "q4"))
    await queued(admission, 2)
    assert await sessions(api) == {"running": 2, "queued": 2, "max": 2, "queue_max": 2}
    assert not mesh["q3"].started.is_set()  # two answers run: the others wait their turn

    mesh["q1"].gate.set()
    assert await stream_text(first) == "ab"
    await mesh["q3"].started.wait()  # the first in line took the slot
    assert await sessions(api) == {"running": 2, "queued": 1, "max": 2, "queue_max": 2}
    for question in ("q2", "q3", "q4"):
        mesh[question].gate.set()
    assert await stream_text(second) == "ab"
    for waited in (third, fourth):
        status, body, _ = await waited
        assert status == 200 and body["choices"][0]["message"]["content"] == "ab"
    await async_wait_until(lambda: admission.view()["running"] == 0, 10, "every slot given back")
    assert await sessions(api) == {"running": 0, "queued": 0, "max": 2, "queue_max": 2}


async def test_a_flood_gets_429_and_the_answers_in_progress_are_unharmed(
        two_sessions: tuple[Served, GatedMesh, Admission]) -> None:
    api, mesh, admission = two_sessions
    running = [await open_stream(api, mesh, f"q{i}") for i in (1, 2)]
    waiting = [asyncio.create_task(ask(api, f"q{i}")) for i in (3, 4)]
    await queued(admission, 2)
    for i in range(5):  # one client after another floods the node
        status, body, headers = await ask(api, f"flood{i}")
        assert status == 429, body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "queue_full" and "busy" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
    assert not any(mesh[f"flood{i}"].started.is_set() for i in range(5))
    for question in ("q1", "q2", "q3", "q4"):
        mesh[question].gate.set()
    assert [await stream_text(response) for response in running] == ["ab", "ab"]
    for task in waiting:
        status, body, _ = await task
        assert status == 200 and body["choices"][0]["message"]["content"] == "ab"


async def test_a_client_that_goes_away_frees_its_slot_for_the_next_in_line(make_api: MakeApi) -> None:
    mesh, admission = GatedMesh(), Admission(1, queue_max=2)
    api = await make_api(mesh=mesh, admission=admission)
    gone = await open_stream(api, mesh, "q1")
    next_in_line = asyncio.create_task(ask(api, "q2"))
    await queued(admission, 1)
    gone.close()  # the client disconnects in the middle of its answer
    await mesh["q1"].ended.wait()  # its generation is cancelled...
    await mesh["q2"].started.wait()  # ...and the waiting request runs
    mesh["q2"].gate.set()
    status, body, _ = await next_in_line
    assert status == 200 and body["choices"][0]["message"]["content"] == "ab"


async def test_a_waiting_client_that_goes_away_leaves_the_line(make_api: MakeApi) -> None:
    mesh, admission = GatedMesh(), Admission(1, queue_max=2)
    api = await make_api(mesh=mesh, admission=admission)
    running = await open_stream(api, mesh, "q1")
    gives_up = asyncio.create_task(ask(api, "q2"))
    await queued(admission, 1)
    gives_up.cancel()  # closes its connection while it waits
    await queued(admission, 0)
    assert (await sessions(api))["queued"] == 0
    third = asyncio.create_task(ask(api, "q3"))
    await queued(admission, 1)
    mesh["q1"].gate.set()
    mesh["q3"].gate.set()
    assert await stream_text(running) == "ab"
    status, body, _ = await third
    assert status == 200 and body["choices"][0]["message"]["content"] == "ab"
    assert not mesh["q2"].started.is_set()  # the one that left never ran


async def test_the_status_events_follow_running_and_waiting(two_sessions: tuple[Served, GatedMesh, Admission]
                                                            ) -> None:
    api, mesh, _ = two_sessions
    seen: list[tuple[int, int]] = []
    async with api.session.get(f"{api.url}/v1/events") as events:
        async def follow() -> None:
            async for data in read_sse(events):
                event = json.loads(data)
                if event.get("type") == "status":
                    counts = (event["status"]["sessions"]["running"], event["status"]["sessions"]["queued"])
                    if not seen or seen[-1] != counts:
                        seen.append(counts)

        following = asyncio.create_task(follow())
        await async_wait_until(lambda: seen, 10, "the first status event")
        streams = [await open_stream(api, mesh, f"q{i}") for i in (1, 2)]
        waiting = asyncio.create_task(ask(api, "q3"))
        await async_wait_until(lambda: (2, 1) in seen, 10, "2 running and 1 waiting")
        for answer in ("q1", "q2", "q3"):
            mesh[answer].gate.set()
        for response in streams:
            await stream_text(response)
        await waiting
        await async_wait_until(lambda: seen[-1] == (0, 0), 10, "all done")
        following.cancel()
    assert seen[:4] == [(0, 0), (1, 0), (2, 0), (2, 1)]


def test_the_tui_shows_running_and_waiting() -> None:
    from tui.mesh_status import MeshStatus
    from tui.views.mesh import format_facts

    snapshot = {"self_id": "n-1", "model": None, "codec": "f32", "term": 0, "coordinator_id": "n-1", "plan": None,
                "nodes": [], "incompatible": [], "sessions": {"running": 2, "queued": 1, "max": 2, "queue_max": 8}}
    assert "sessions 2/2 running, 1/8 waiting" in format_facts(MeshStatus.from_json(snapshot)).plain


# -- a whole node -------------------------------------------------------------------------------------


async def test_a_node_derives_its_limit_from_memory_and_says_so(tmp_path: Path, tiny_llama: Path) -> None:
    from tests.daemon.test_node import make_node, start

    node = make_node(tmp_path, tiny_llama, lines=[])
    task = await start(node)
    try:
        assert node.api_url is not None
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{node.api_url}/v1/status") as response:
                status = await response.json()
            async with session.get(f"{node.api_url}/v1/events") as response:
                logs = []
                async for data in read_sse(response):
                    event = json.loads(data)
                    if event.get("type") == "log":
                        logs.append(event["message"])
                    if any("answer(s) at once" in line for line in logs):
                        break
        limits = status["sessions"]
        assert 1 <= limits["max"] <= MAX_DEFAULT_SESSIONS and limits["queue_max"] == 4 * limits["max"]
        [line] = [line for line in logs if "answer(s) at once" in line]
        assert line.startswith(f"at most {limits['max']} answer(s) at once, {limits['queue_max']} more may wait")
        assert "from memory" in line and "MB of KV cache per session" in line
    finally:
        node.request_stop()
        await task
