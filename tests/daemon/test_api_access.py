"""The API on a hostile network, as a client sees it: the bearer token of an API beyond
loopback, the routes only this device may call, the bound on requests in progress per client,
and both HTTP servers (the API, the mesh's signaling) dropping clients that stall.

Requests come from 127.0.0.1. A client on another device is played by a test-only middleware
put in front of the app: it gives a request the peer address of its ``X-Test-Remote`` header,
as a request from that address would have (the daemon's own code is unchanged).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from yarl import URL

from daemon.api.access import (ApiKeyError, bearer_token, is_loopback_client, is_loopback_host, load_api_key,
                               token_matches)
from daemon.api.app import ApiServer, create_app
from daemon.api.completions import Completions
from daemon.api.events import EventHub
from daemon.api.status import ModelSummary, SelfState, StatusBoard
from daemon.cli import main
from daemon.net.signaling import SIGNAL_PATH
from daemon.net.signaling_http import SignalingEndpoint
from daemon.node.config import NodeConfig, default_state_dir
from daemon.node.worker import GenerationWorker
from tests.daemon.fake_engine import FakeEngine, reply_for
from tui.api_key import ApiKeyFileError, default_key_path, find_api_key
from tui.client import DONE, DaemonClient, DaemonError, read_sse

KEY = "k3y-" + "x" * 40
HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"Authorization": f"Bearer {KEY}"}
SOMEONE = "192.0.2.7"
"""A client on another device (TEST-NET-1: never a real peer)."""
SOMEONE_ELSE = "198.51.100.9"


class GatedEngine(FakeEngine):
    """The fake engine, holding every answer before its first token until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def generate(self, prompt_ids, params, should_stop=None):  # type: ignore[no-untyped-def]
        self.gate.wait()
        yield from super().generate(prompt_ids, params, should_stop)


@web.middleware
async def pretend_remote(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    remote = request.headers.get("X-Test-Remote")
    return await handler(request if remote is None else request.clone(remote=remote))


def from_(address: str, **headers: str) -> dict[str, str]:
    return {"X-Test-Remote": address, **headers}


@dataclass
class Api:
    url: str
    port: int
    engine: FakeEngine
    stop_requested: asyncio.Event
    session: aiohttp.ClientSession
    board: StatusBoard | None = None


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api() -> AsyncIterator[MakeApi]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(engine: FakeEngine | None = None, *, api_key: str | None = None,
                   header_timeout_s: float = 30.0, body_timeout_s: float = 30.0, **options: Any) -> Api:
        engine = engine if engine is not None else FakeEngine()
        hub = EventHub()
        board = StatusBoard(SelfState(node_id="n-test", name="testnode", address="127.0.0.1:0",
                                      mem_budget_bytes=1 << 30), hub)
        worker = GenerationWorker(threads=1)
        worker.start()
        completions = Completions(worker)
        completions.attach(engine)
        info = engine.info
        board.update(state="ready", model=ModelSummary(info.model_id, info.name, info.num_layers, info.weights))
        stop_requested = asyncio.Event()
        app = create_app(completions, board, hub, stop_requested.set, api_key=api_key,
                         allowed_hosts=None if api_key else frozenset({"127.0.0.1"}),
                         body_timeout_s=body_timeout_s, **options)
        app.middlewares.insert(0, pretend_remote)
        server = await ApiServer.start(app, "127.0.0.1", 0, shutdown_timeout_s=1.0,
                                       header_timeout_s=header_timeout_s, lingering_s=0.5)
        session = aiohttp.ClientSession()

        async def cleanup() -> None:
            if isinstance(engine, GatedEngine):
                engine.gate.set()
            await session.close()
            hub.close()
            worker.stop()
            await server.stop()
            completions.close()
            await asyncio.to_thread(worker.join, 5.0)

        cleanups.append(cleanup)
        return Api(f"http://127.0.0.1:{server.port}", server.port, engine, stop_requested, session, board)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


async def get(api: Api, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with api.session.get(f"{api.url}{path}", headers=headers) as response:
        return response.status, await response.json(), response.headers


async def post(api: Api, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with api.session.post(f"{api.url}{path}", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


def assert_error(status: int, body: Any, expected: int, *words: str) -> None:
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    for word in words:
        assert word in body["error"]["message"], body


# -- the bearer token ------------------------------------------------------------------------------


async def test_beyond_loopback_a_request_without_the_key_is_a_401(make_api: MakeApi) -> None:
    api = await make_api(api_key=KEY)
    for path in ("/v1/status", "/v1/models", "/v1/events", "/v1/tune"):
        status, body, headers = await get(api, path)
        assert_error(status, body, 401, "needs a key", "Authorization: Bearer")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO})
    assert_error(status, body, 401, "needs a key")
    for wrong in ("Bearer " + KEY[:-1], "Bearer " + KEY + "x", "Basic " + KEY, KEY, "Bearer"):
        status, body, _ = await get(api, "/v1/status", {"Authorization": wrong})
        assert_error(status, body, 401)
    status, body, _ = await post(api, "/v1/down", {})
    assert_error(status, body, 401)
    assert not api.stop_requested.is_set()


async def test_beyond_loopback_the_key_opens_every_route(make_api: MakeApi) -> None:
    api = await make_api(api_key=KEY)
    status, body, _ = await get(api, "/v1/status", AUTH)
    assert status == 200 and body["self_id"] == "n-test"
    status, body, _ = await get(api, "/v1/models", {"authorization": f"bearer  {KEY} "})
    assert status == 200 and body["data"][0]["id"] == "fake-model"
    status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO}, AUTH)
    assert status == 200 and body["choices"][0]["message"]["content"] == reply_for(HELLO)


async def test_the_openai_client_request_is_answered(make_api: MakeApi) -> None:
    """What openai-python (3.63) sends for ``OpenAI(base_url=URL + "/v1", api_key=KEY)
    .chat.completions.create(model=..., messages=...)``, header for header."""
    api = await make_api(api_key=KEY)
    headers = {
        "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive", "Authorization": f"Bearer {KEY}",
        "Accept": "application/json", "Content-Type": "application/json", "User-Agent": "OpenAI/Python 3.63.0",
        "x-stainless-lang": "python", "x-stainless-package-version": "3.63.0", "x-stainless-os": "Linux",
        "x-stainless-arch": "x64", "x-stainless-runtime": "CPython", "x-stainless-runtime-version": "3.11.7",
        "x-stainless-async": "false", "x-stainless-retry-count": "0", "x-stainless-read-timeout": "600",
    }
    body = b'{"model":"fake-model","messages":[{"role":"user","content":"hello"}]}'
    async with api.session.post(f"{api.url}/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": reply_for(HELLO)}
    wrong = {**headers, "Authorization": "Bearer sk-not-the-key"}
    async with api.session.post(f"{api.url}/v1/chat/completions", data=body, headers=wrong) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"


async def test_on_loopback_no_key_is_needed_and_a_given_one_is_fine(make_api: MakeApi) -> None:
    api = await make_api()
    assert (await get(api, "/v1/status"))[0] == 200
    assert (await get(api, "/v1/status", AUTH))[0] == 200
    status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO}, AUTH)
    assert status == 200 and body["choices"][0]["message"]["content"] == reply_for(HELLO)


def test_tokens_are_read_from_the_bearer_header_and_compared_whole() -> None:
    assert bearer_token(f"Bearer {KEY}") == KEY
    assert bearer_token(f"bearer   {KEY}  ") == KEY
    assert bearer_token(f"Basic {KEY}") is None and bearer_token(None) is None and bearer_token("Bearer ") is None
    assert token_matches(KEY, KEY)
    assert not token_matches(KEY[:-1], KEY) and not token_matches(KEY + "a", KEY) and not token_matches(None, KEY)
    assert not token_matches("é" * 44, KEY)


def test_which_hosts_and_clients_are_this_device() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.168.1.4", "my-laptop.local", ""))
    assert all(is_loopback_client(a) for a in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.9"))
    assert not any(is_loopback_client(a) for a in (SOMEONE, "::ffff:192.0.2.7", "fe80::1%eth0", "", None, "x"))


# -- the key file -------------------------------------------------------------------------------------


def test_the_first_start_beyond_loopback_makes_a_private_key_and_says_it_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = load_api_key(None, state)
    assert made.created and made.path == state / "api.key"
    assert made.path.read_text().strip() == made.value and len(made.value) >= 32
    assert stat.S_IMODE(made.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert made.value in made.notice("http://0.0.0.0:8470")
    again = load_api_key(None, state)
    assert again.value == made.value and not again.created
    assert made.value not in again.notice("http://0.0.0.0:8470")
    assert str(made.path) in again.notice("http://0.0.0.0:8470")


def test_an_api_key_file_is_used_as_it_is_and_must_hold_a_key(tmp_path: Path) -> None:
    key_file = tmp_path / "my.key"
    key_file.write_text(f"  {KEY}\n")
    assert load_api_key(key_file, tmp_path / "state").value == KEY
    assert not (tmp_path / "state").exists()
    with pytest.raises(ApiKeyError, match="cannot read the API key file .*missing.key"):
        load_api_key(tmp_path / "missing.key", tmp_path / "state")
    for bad in ("short", "two words here and more", "", "k\x00" * 20):
        key_file.write_text(bad)
        with pytest.raises(ApiKeyError, match="must hold one word"):
            load_api_key(key_file, tmp_path / "state")


def test_api_key_file_is_an_option_of_up_with_its_variable(tmp_path: Path) -> None:
    flags = {"api_key_file": str(tmp_path / "a.key")}
    assert NodeConfig.from_sources(flags, {}).api_key_file == tmp_path / "a.key"
    env = {"MESHLLM_API_KEY_FILE": str(tmp_path / "b.key")}
    assert NodeConfig.from_sources({}, env).api_key_file == tmp_path / "b.key"


# -- the clients read the key themselves ---------------------------------------------------------------


def test_clients_find_the_key_of_a_daemon_on_this_device(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "api.key").write_text(KEY + "\n")
    env = {"MESHLLM_STATE_DIR": str(state)}
    assert find_api_key("http://127.0.0.1:8470", env) == KEY
    assert find_api_key("http://localhost:8470", env) == KEY
    assert find_api_key("http://[::1]:8470", env) == KEY
    assert find_api_key("http://192.168.1.4:8470", env) is None, "this device's key goes to no other device"
    named = tmp_path / "other.key"
    named.write_text("other-key-0123456789")
    assert find_api_key("http://192.168.1.4:8470", {**env, "MESHLLM_API_KEY_FILE": str(named)}) == \
        "other-key-0123456789"
    assert find_api_key("http://192.168.1.4:8470", env, key_file=named) == "other-key-0123456789"
    assert find_api_key("http://127.0.0.1:8470", {"MESHLLM_STATE_DIR": str(tmp_path / "none")}) is None
    with pytest.raises(ApiKeyFileError, match="missing"):
        find_api_key("http://127.0.0.1:8470", {"MESHLLM_API_KEY_FILE": str(tmp_path / "missing")})


def test_clients_look_in_the_state_dir_the_daemon_uses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for xdg in (str(tmp_path / "xdg"), None):
        if xdg is None:
            monkeypatch.delenv("XDG_STATE_HOME", raising=False)
        else:
            monkeypatch.setenv("XDG_STATE_HOME", xdg)
        assert default_key_path(os.environ) == default_state_dir() / "api.key"


async def test_the_tui_client_sends_the_key(make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    api = await make_api(api_key=KEY)
    monkeypatch.setenv("MESHLLM_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MESHLLM_API_KEY_FILE", raising=False)
    with pytest.raises(DaemonError) as refused:
        await DaemonClient(api.url).status()
    assert refused.value.status == 401
    (tmp_path / "api.key").write_text(KEY)
    client = DaemonClient(api.url)  # finds the key in the state dir
    assert (await client.status())["self_id"] == "n-test"
    assert "".join([d.text async for d in client.chat(HELLO, max_tokens=50, temperature=0)]) == reply_for(HELLO)
    assert (await DaemonClient(api.url, api_key=KEY).complete(HELLO, max_tokens=50)
            )["choices"][0]["message"]["content"] == reply_for(HELLO)
    events = DaemonClient(api.url).events()
    assert (await anext(events))["type"] == "status"
    await events.aclose()


async def test_meshllm_commands_send_the_key(make_api: MakeApi, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = await make_api(api_key=KEY)
    monkeypatch.setenv("MESHLLM_STATE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("MESHLLM_API_KEY_FILE", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    assert await asyncio.to_thread(main, ["status", "--api", api.url, "--json"]) == 1
    assert "needs a key" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["status", "--api", api.url, "--json", "--api-key-file", str(key_file)]) == 0
    assert json.loads(capsys.readouterr().out)["self_id"] == "n-test"
    monkeypatch.setenv("MESHLLM_API_KEY_FILE", str(key_file))
    assert await asyncio.to_thread(main, ["ask", "hello", "--api", api.url]) == 0
    assert capsys.readouterr().out == reply_for(HELLO) + "\n"
    assert await asyncio.to_thread(main, ["down", "--api", api.url]) == 0
    assert api.stop_requested.is_set()
    assert await asyncio.to_thread(main, ["status", "--api", api.url, "--api-key-file", str(tmp_path / "nope")]) == 1
    assert "cannot read the API key file" in capsys.readouterr().err


# -- only this device may stop the daemon or tune it ---------------------------------------------------


@pytest.mark.parametrize("api_key", [KEY, None])
async def test_down_and_tune_answer_only_clients_on_this_device(make_api: MakeApi, api_key: str | None) -> None:
    api = await make_api(api_key=api_key)
    with_key = AUTH if api_key else {}
    for headers in (from_(SOMEONE, **with_key), from_(SOMEONE)):
        status, body, _ = await post(api, "/v1/down", {}, headers)
        assert_error(status, body, 403, "/v1/down", "own device")
        status, body, _ = await post(api, "/v1/tune", {"examples": []}, headers)
        assert_error(status, body, 403, "/v1/tune")
        status, body, _ = await get(api, "/v1/tune", headers)
        assert_error(status, body, 403, "/v1/tune")
        async with api.session.post(URL(f"{api.url}/v1/%64own", encoded=True), json={}, headers=headers) as response:
            assert response.status == 403, "the same route, spelt otherwise"
    assert not api.stop_requested.is_set()
    assert (await get(api, "/v1/status", from_(SOMEONE, **with_key)))[0] == 200
    status, body, _ = await post(api, "/v1/down", {}, with_key)
    assert (status, body) == (200, {"ok": True})
    assert api.stop_requested.is_set()


async def test_only_a_client_on_this_device_sees_the_invite_code(make_api: MakeApi) -> None:
    api = await make_api(api_key=KEY)
    assert api.board is not None
    api.board.update(invite="meshllm1-the-code")
    assert (await get(api, "/v1/status", AUTH))[1]["invite"] == "meshllm1-the-code"
    status, body, _ = await get(api, "/v1/status", from_(SOMEONE, **AUTH))
    assert status == 200 and body["invite"] is None  # the code carries the mesh key


# -- requests in progress per client ---------------------------------------------------------------------


async def test_one_request_more_than_the_bound_is_a_429_until_one_ends(make_api: MakeApi) -> None:
    engine = GatedEngine()
    api = await make_api(engine, api_key=KEY, max_per_client=3)
    held = []
    for i in range(3):  # three answers in progress: their streams are open, no token yet
        response = await api.session.post(f"{api.url}/v1/chat/completions", headers=from_(SOMEONE, **AUTH),
                                          json={"messages": [{"role": "user", "content": f"q{i}"}], "stream": True})
        assert response.status == 200
        held.append(response)
    status, body, headers = await post(api, "/v1/chat/completions", {"messages": HELLO}, from_(SOMEONE, **AUTH))
    assert_error(status, body, 429, "too many requests in progress", "at most 3")
    assert int(headers["Retry-After"]) >= 1
    assert_error(*(await get(api, "/v1/status", from_(SOMEONE, **AUTH)))[:2], 429)
    assert (await get(api, "/v1/status", from_(SOMEONE_ELSE, **AUTH)))[0] == 200, "another client is served"
    assert (await get(api, "/v1/status", AUTH))[0] == 200, "and so is this device"
    engine.gate.set()
    for i, response in enumerate(held):
        pieces = [json.loads(d) if d != DONE else d async for d in read_sse(response)]
        response.release()
        assert pieces[-1] == DONE
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces[:-1] if p["choices"])
        assert text == reply_for([{"role": "user", "content": f"q{i}"}])
    while True:  # the ended requests are let go of as their handlers return
        status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO}, from_(SOMEONE, **AUTH))
        if status != 429:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and body["choices"][0]["message"]["content"] == reply_for(HELLO)


async def test_the_default_bound_is_eight(make_api: MakeApi) -> None:
    api = await make_api(api_key=KEY)
    streams = []
    for _ in range(8):
        response = await api.session.get(f"{api.url}/v1/events", headers=from_(SOMEONE, **AUTH))
        assert response.status == 200
        streams.append(response)
    assert_error(*(await get(api, "/v1/events", from_(SOMEONE, **AUTH)))[:2], 429)
    for response in streams:
        response.close()


# -- clients that stall (slowloris) --------------------------------------------------------------------


async def stalled(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Everything the server sent until it closed the connection (waits for the close)."""
    data = await reader.read()
    writer.close()
    return data


async def test_a_client_stalling_in_its_headers_is_dropped_while_others_are_served(make_api: MakeApi) -> None:
    api = await make_api(header_timeout_s=3.0)
    slow = await stalled(api.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    idle = await stalled(api.port, b"")
    status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO})
    assert status == 200 and body["choices"][0]["message"]["content"] == reply_for(HELLO)
    assert await closed_by_server(*slow) == b""
    assert await closed_by_server(*idle) == b""


async def test_a_client_stalling_in_its_body_gets_a_408_and_is_dropped(make_api: MakeApi) -> None:
    api = await make_api(body_timeout_s=3.0)
    slow = await stalled(api.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messa")
    status, body, _ = await post(api, "/v1/chat/completions", {"messages": HELLO})
    assert status == 200 and body["choices"][0]["message"]["content"] == reply_for(HELLO)
    answer = await closed_by_server(*slow)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"did not arrive within 3 s" in answer


async def signaling_server(*, header_timeout_s: float, body_timeout_s: float) -> ApiServer:
    """The signaling server as a node starts it (daemon/node/node.py), answering offers."""
    nothing: Any = None  # what a malformed offer never reaches: the keys, the links
    endpoint = SignalingEndpoint(
        auth=nothing, hello=lambda: types.SimpleNamespace(node_id="n-test"),  # type: ignore[arg-type, return-value]
        is_compatible=lambda hello: None, loopback=True, connect_timeout_s=5.0, table=nothing, new_link=nothing,
        is_running=lambda: True, body_timeout_s=body_timeout_s)
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post(SIGNAL_PATH, endpoint.handle)
    return await ApiServer.start(app, "127.0.0.1", 0, shutdown_timeout_s=1.0, header_timeout_s=header_timeout_s,
                                 lingering_s=0.5)


async def offer_answered(port: int) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}{SIGNAL_PATH}", json={"not": "an offer"}) as response:
            return response.status, await response.json()


async def test_the_signaling_server_drops_clients_that_stall_and_answers_others() -> None:
    server = await signaling_server(header_timeout_s=3.0, body_timeout_s=3.0)
    try:
        in_headers = await stalled(server.port, f"POST {SIGNAL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        in_body = await stalled(server.port, f"POST {SIGNAL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{".encode())
        status, body = await offer_answered(server.port)
        assert status == 400 and body["error"]["code"] == 400, body  # answered: a malformed offer
        assert await closed_by_server(*in_headers) == b""
        answer = await closed_by_server(*in_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive" in answer, answer
    finally:
        await server.stop()


async def test_the_signaling_server_reads_an_offer_sent_in_pieces() -> None:
    server = await signaling_server(header_timeout_s=30.0, body_timeout_s=30.0)
    try:
        body = json.dumps({"not": "an offer", "pad": "x" * 2000}).encode()
        reader, writer = await stalled(server.port, f"POST {SIGNAL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                    f"Content-Type: application/json\r\nConnection: close\r\n"
                                                    f"Content-Length: {len(body)}\r\n\r\n".encode())
        for start in range(0, len(body), 500):
            writer.write(body[start:start + 500])
            await writer.drain()
            await asyncio.sleep(0.01)
        answer = await closed_by_server(reader, writer)
        assert answer.startswith(b"HTTP/1.1 400 "), answer  # read whole: valid JSON, not an offer
        assert b"not JSON" not in answer
    finally:
        await server.stop()


# -- where the servers listen ----------------------------------------------------------------------------


def listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def loopback_config(tmp_path: Path, tiny_llama: Path) -> Iterator[NodeConfig]:
    yield NodeConfig(model=str(tiny_llama), api_port=0, state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
                     threads=1, name="testnode", loopback=True, mesh_name=f"test-{uuid.uuid4().hex[:8]}",
                     fallback_model="none")


async def test_a_loopback_node_listens_on_127_0_0_1_only(loopback_config: NodeConfig) -> None:
    from daemon.node.node import Node

    before = listening()
    node = Node(loopback_config, announce=lambda line: None, handle_signals=False)
    task = asyncio.create_task(node.run())
    try:
        assert await asyncio.to_thread(node.ready.wait, 120)
        opened = listening() - before
        api_port = int((node.api_url or "").rsplit(":", 1)[1])
        assert ("127.0.0.1", api_port) in opened
        assert len(opened) >= 2, opened  # the API and the signaling server
        assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 60)
