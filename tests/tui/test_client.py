"""tui.client against a small HTTP server on 127.0.0.1 that speaks docs/api.md."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tui.client import ChatDelta, DaemonClient, DaemonError, DaemonUnavailable
from tui.demo import node, status

SNAPSHOT = status([node("n-laptop", "laptop", (0, 30), is_self=True, coordinator=True)])
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
    return data({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})


class Daemon:
    """The test's daemon: handlers write exactly the bytes a test gives them."""

    def __init__(self) -> None:
        self.chat_bodies: list[dict[str, Any]] = []
        self.chat_script: list[bytes] = []
        self.chat_hold = asyncio.Event()
        """Set to let a held chat stream finish."""
        self.hold_chat_after: int | None = None
        self.client_went_away = asyncio.Event()
        self.events_script: list[bytes] = []
        self.down_calls = 0
        self.chat_status = 200

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/events", self.events)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/down", self.down)
        return app

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(SNAPSHOT)

    async def down(self, request: web.Request) -> web.Response:
        assert await request.json() == {}
        self.down_calls += 1
        return web.json_response({"ok": True})

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        for piece in self.events_script:
            await response.write(piece)
        await response.write_eof()
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.chat_bodies.append(await request.json())
        if self.chat_status != 200:
            return web.json_response(
                {"error": {"message": "the prompt is 9000 tokens; the model takes 8192",
                           "type": "invalid_request_error", "param": "messages", "code": None}},
                status=self.chat_status)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            for index, piece in enumerate(self.chat_script):
                if index == self.hold_chat_after:
                    await self.chat_hold.wait()
                    for _ in range(1000):  # keep talking until the write fails: the client hung up
                        await response.write(chunk({"content": "more"}))
                        await asyncio.sleep(0.01)
                await response.write(piece)
        except (ConnectionResetError, asyncio.CancelledError):
            self.client_went_away.set()
            raise
        return response


@pytest.fixture
async def daemon() -> AsyncIterator[tuple[Daemon, DaemonClient]]:
    fake = Daemon()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield fake, DaemonClient(str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def test_status_and_down(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    assert await client.status() == SNAPSHOT
    await client.down()
    assert fake.down_calls == 1


async def test_events_carry_status_snapshots_and_log_lines(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    log = {"type": "log", "ts": 1.5, "kind": "join", "message": "desktop joined"}
    raw = data({"type": "status", "status": SNAPSHOT}) + b": ping\n\n" + data(log)
    fake.events_script = [raw[:7], raw[7:100], raw[100:], data({"type": "gossip"}), b"data: {oops\n\n"]
    events = await collect(client.events())
    assert events == [{"type": "status", "status": SNAPSHOT}, log]  # unknown and garbled ones skipped


async def test_a_chat_streams_text_mesh_states_and_the_finish(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    fake.chat_script = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({}, meshllm={"state": "replanning"}),
        chunk({}, meshllm={"state": "running"}),
        chunk({"content": "lo 🙂"}),
        chunk({}, "stop"),
        data({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
        b"data: [DONE]\n\n",
    ]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                {"role": "user", "content": "again"}]
    deltas = await collect(client.chat(messages, max_tokens=32, temperature=0.0, seed=7))
    assert deltas == [
        ChatDelta(text="Hel"), ChatDelta(state="replanning"), ChatDelta(state="running"),
        ChatDelta(text="lo 🙂"), ChatDelta(finish_reason="stop"), ChatDelta(completion_tokens=3),
    ]
    body = fake.chat_bodies[0]
    assert body["messages"] == messages and body["stream"] is True
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (32, 0.0, 7)
    assert "top_p" not in body and "top_k" not in body


async def test_an_error_answer_raises_daemon_error_with_its_message(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    fake.chat_status = 400
    with pytest.raises(DaemonError, match="the model takes 8192"):
        await collect(client.chat([{"role": "user", "content": "x"}], max_tokens=8, temperature=0))


async def test_an_error_event_mid_stream_raises_daemon_error(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    fake.chat_script = [chunk({"content": "par"}),
                        data({"error": {"message": "generation failed: out of memory", "type": "server_error"}})]
    seen: list[ChatDelta] = []
    with pytest.raises(DaemonError, match="out of memory"):
        async for delta in client.chat([{"role": "user", "content": "x"}], max_tokens=8, temperature=0):
            seen.append(delta)
    assert seen == [ChatDelta(text="par")]


async def test_a_stream_cut_short_raises_daemon_unavailable(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    fake.chat_script = [chunk({"content": "half an ans"})]
    with pytest.raises(DaemonUnavailable, match="before the answer ended"):
        await collect(client.chat([{"role": "user", "content": "x"}], max_tokens=8, temperature=0))


async def test_closing_the_answer_early_hangs_up_on_the_daemon(daemon: tuple[Daemon, DaemonClient]) -> None:
    fake, client = daemon
    fake.chat_script = [chunk({"content": "one"}), chunk({"content": "two"})]
    fake.hold_chat_after = 1
    stream = client.chat([{"role": "user", "content": "x"}], max_tokens=8, temperature=0)
    assert await anext(stream) == ChatDelta(text="one")
    await stream.aclose()  # what the app does when the user stops the answer
    fake.chat_hold.set()
    await asyncio.wait_for(fake.client_went_away.wait(), timeout=10)


@pytest.mark.parametrize("call", [
    lambda c: c.status(),
    lambda c: c.down(),
    lambda c: collect(c.events()),
    lambda c: collect(c.chat([{"role": "user", "content": "x"}], max_tokens=8, temperature=0)),
])
async def test_nothing_listening_raises_daemon_unavailable(
        call: Callable[[DaemonClient], Awaitable[object]]) -> None:
    client = DaemonClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DaemonUnavailable, match="cannot reach the daemon"):
        await call(client)


async def test_a_bad_url_raises_daemon_unavailable() -> None:
    with pytest.raises(DaemonUnavailable, match="not a valid API URL"):
        await DaemonClient("127.0.0.1:8470").status()


async def test_a_silent_event_stream_times_out_as_unavailable() -> None:
    """A daemon that stops answering without closing (no pings) counts as gone."""
    hold = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(data({"type": "status", "status": SNAPSHOT}))
        await hold.wait()
        return response

    app = web.Application()
    app.router.add_get("/v1/events", silent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = DaemonClient(str(server.make_url("")).rstrip("/"), idle_timeout_s=0.2)
        seen = []
        with pytest.raises(DaemonUnavailable, match="stopped answering"):
            async for event in client.events():
                seen.append(event["type"])
        assert seen == ["status"]
    finally:
        hold.set()
        await server.close()


def test_the_client_imports_no_textual() -> None:
    import subprocess
    import sys

    code = "import sys, tui.client; assert 'textual' not in sys.modules, 'textual imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
