"""The daemon's HTTP server: the OpenAI-compatible API and the control API (docs/api.md).

Handlers are thin: they check input, hand work to ``Completions`` and write OpenAI shapes.
No request can crash the daemon: every failure becomes a JSON error (or an error event in a
stream), and a client that disconnects cancels only its own generation. Who may call what, and
how much at once, is `daemon.api.access`; how many answers this node serves at once, and who
waits, is `daemon.api.admission`. A client that sends half a request and stalls is
dropped: headers must arrive within HEADER_TIMEOUT_S, a body within BODY_TIMEOUT_S (both
servers of a node, this API and the mesh's signaling, are started by ``ApiServer.start``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from daemon.answer import AnswerStream, Serving, WorkerStopped
from daemon.api.access import DEFAULT_MAX_PER_CLIENT, AccessGuard, is_loopback_client
from daemon.api.admission import Admission, Busy
from daemon.api.chat_request import RequestError, parse_chat_request
from daemon.api.completions import Completions, NotReady, PreparedChat
from daemon.api.events import EventHub
from daemon.api.http import (BODY_TIMEOUT, BODY_TIMEOUT_S, MAX_BODY_BYTES, SSE_HEADERS, BodyError, error_body,
                             error_response, read_json_body, send_event, too_many_requests)
from daemon.api.status import StatusBoard
from daemon.api.stop_strings import StopScanner
from daemon.api.tune import MAX_TUNE_BODY_BYTES, TuneEndpoint

from meshllm.errors import MeshllmError
from meshllm.mesh.session import StateChange, Token

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
SHUTDOWN_TIMEOUT_S = 5.0
HEADER_TIMEOUT_S = 30.0
"""A connection's request line and headers must arrive within this long of its opening (or of
the end of its last response); then it is closed. Also how long an idle keep-alive lasts."""
LINGER_S = 10.0
"""After answering a request whose body did not all arrive (413, 408), the server reads and
drops the rest for at most this long, so that the client sees the answer, then closes."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Finished:
    """The end of a generation as the client sees it."""

    reason: str
    """"stop", "length", or "cancelled" (the daemon is stopping)."""
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    """The generated token ids (EOS included), reported as the `meshllm.token_ids` extension."""
    speculation: tuple[int, int, int] | None = None
    """(drafted, accepted, verify steps) when the answer drafted (meshllm.mesh.speculate)."""

    def extension(self) -> dict[str, Any]:
        """The `meshllm` object's figures of the answer."""
        out: dict[str, Any] = {"token_ids": list(self.token_ids)}
        if self.speculation is not None:
            drafted, accepted, trips = self.speculation
            out["speculation"] = {"drafted": drafted, "accepted": accepted, "trips": trips}
        return out


class ApiHandlers:
    """The request handlers, with what they need."""

    def __init__(
        self,
        completions: Completions,
        board: StatusBoard,
        hub: EventHub,
        request_stop: Callable[[], None],
        admission: Admission,
        *,
        keepalive_s: float = KEEPALIVE_S,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._completions = completions
        self._admission = admission
        self._board = board
        self._hub = hub
        self._request_stop = request_stop
        self._keepalive_s = keepalive_s

    # -- OpenAI-compatible ---------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        name = self._completions.model_name
        data = []
        if name is not None:
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "meshllm"})
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_body(request, max_bytes=self._max_body_bytes)
        try:
            prepared = await self._completions.prepare(parse_chat_request(body))
        except RequestError as error:
            return error_response(error.status, error.message, param=error.param, code=error.code)
        except NotReady as error:
            return error_response(503, str(error))
        try:
            slot = await self._admission.acquire()  # a client that goes away meanwhile leaves the queue
        except Busy as busy:
            return too_many_requests(busy.message, code=busy.code, retry_after_s=busy.retry_after_s)
        with slot:  # given back as the answer ends, fails, or its client goes away
            try:
                tokens = self._completions.generate(prepared)
            except (NotReady, WorkerStopped):
                return error_response(503, "the daemon is stopping")
            try:
                if prepared.request.stream:
                    return await self._stream_chat(request, prepared, tokens)
                return await self._whole_chat(prepared, tokens)
            finally:
                tokens.close()  # a client that went away (or a stop string) cancels the generation

    async def _whole_chat(self, prepared: PreparedChat, tokens: AnswerStream) -> web.Response:
        pieces: list[str] = []
        finished = Finished("cancelled", 0)
        served = Serving("mesh", prepared.model_name)
        try:
            async for piece in _text_pieces(tokens, prepared.request.stop):
                if isinstance(piece, Finished):
                    finished = piece
                elif isinstance(piece, Serving):
                    served = piece
                elif isinstance(piece, str):
                    pieces.append(piece)
        except WorkerStopped:
            return error_response(503, "the daemon is stopping")
        except MeshllmError as error:  # the mesh cannot answer (too little memory, no plan)
            self._hub.log("error", str(error))
            return error_response(503, str(error))
        except Exception as error:  # the engine failed: this request gets a 500, the daemon goes on
            log.exception("generation failed")
            self._hub.log("error", f"generation failed: {error}")
            return error_response(500, f"generation failed: {error}")
        if finished.reason == "cancelled":
            return error_response(503, "the daemon is stopping")
        return web.json_response(
            {
                "id": _completion_id(),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": finished.reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(len(prepared.prompt_ids), finished.completion_tokens),
                "meshllm": {**finished.extension(), "served_by": served.by},
            }
        )

    async def _stream_chat(self, request: web.Request, prepared: PreparedChat,
                           tokens: AnswerStream) -> web.StreamResponse:
        chat = prepared.request
        ident, created = _completion_id(), int(time.time())
        served = Serving("mesh", prepared.model_name)
        opened = False

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extension: Any) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                             "logprobs": None}],
                "meshllm": {**extension, "served_by": served.by},
            }
            if chat.include_usage:
                body["usage"] = None
            return body

        async def open_answer() -> None:
            nonlocal opened
            if not opened:
                opened = True
                await send_event(response, chunk({"role": "assistant", "content": ""}))

        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await response.prepare(request)
            if not tokens.announces:  # else the first item says who serves it
                await open_answer()
            finished = Finished("cancelled", 0)
            try:
                async for piece in _text_pieces(tokens, chat.stop):
                    if isinstance(piece, Serving):
                        served = piece
                        await open_answer()
                        continue
                    await open_answer()
                    if isinstance(piece, Finished):
                        finished = piece
                    elif isinstance(piece, StateChange):
                        await send_event(response, chunk({}, state=piece.state))
                    else:
                        await send_event(response, chunk({"content": piece}))
            except WorkerStopped:
                await send_event(response, {"error": error_body("the daemon is stopping")})
                return response
            except MeshllmError as error:  # the mesh cannot answer (too little memory, no plan)
                self._hub.log("error", str(error))
                await send_event(response, {"error": error_body(str(error), 503)})
                return response
            except Exception as error:  # the engine failed: end this stream with an error event
                log.exception("generation failed")
                self._hub.log("error", f"generation failed: {error}")
                await send_event(response, {"error": error_body(f"generation failed: {error}")})
                return response
            if finished.reason == "cancelled":
                await send_event(response, {"error": error_body("the daemon is stopping")})
                return response
            await send_event(response, chunk({}, finished.reason, **finished.extension()))
            if chat.include_usage:
                usage = _usage(len(prepared.prompt_ids), finished.completion_tokens)
                await send_event(response, {**chunk({}), "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            log.debug("client went away during a stream")
        return response

    # -- control -------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(_for_client(self._board.snapshot(), request))

    async def events(self, request: web.Request) -> web.StreamResponse:
        subscription = self._hub.subscribe()
        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await response.prepare(request)
            await send_event(response, {"type": "status", "status": _for_client(self._board.snapshot(), request)})
            for past in self._hub.recent_logs():
                await send_event(response, past.to_json())
            while True:
                try:
                    event = await subscription.next_event(self._keepalive_s)
                except StopAsyncIteration:
                    break
                if event is None:
                    await response.write(b": ping\n\n")
                else:
                    data = event.to_json()
                    if data.get("type") == "status":
                        data = {**data, "status": _for_client(data["status"], request)}
                    await send_event(response, data)
            await response.write_eof()
        except ConnectionResetError:
            log.debug("event client went away")
        finally:
            subscription.close()
        return response

    async def down(self, request: web.Request) -> web.StreamResponse:
        await read_json_body(request, allow_empty=True, max_bytes=self._max_body_bytes)
        self._hub.log("leave", "stopping: asked to go down over the API")
        response = web.json_response({"ok": True})
        await response.prepare(request)
        await response.write_eof()
        self._request_stop()
        return response


async def _text_pieces(tokens: AnswerStream, stops: tuple[str, ...]
                       ) -> AsyncIterator[str | StateChange | Serving | Finished]:
    """Visible text pieces of a generation, then one Finished. Honours stop strings. Mesh
    states and who serves the answer (`Serving`) pass through as they come."""
    scanner = StopScanner(stops)
    count = 0
    ids: list[int] = []
    drafting: tuple[int, int, int] | None = None
    async for token in tokens:
        if not isinstance(token, Token):  # a mesh state change between tokens, or who serves
            yield token
            continue
        drafting = token.speculation or drafting
        if token.id >= 0:
            count += 1
            ids.append(token.id)
        text, stopped = scanner.push(token.text)
        if text:
            yield text
        if stopped:
            tokens.close()
            yield Finished("stop", count, tuple(ids), drafting)
            return
        if token.finish_reason is not None:
            rest = scanner.flush()
            if rest:
                yield rest
            yield Finished(token.finish_reason, count, tuple(ids), drafting)
            return
    yield Finished("cancelled", count, tuple(ids), drafting)  # ended without a last token: the worker is stopping


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _error_middleware(allowed_hosts: frozenset[str] | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if allowed_hosts is not None and _host_name(request.host) not in allowed_hosts:
            # a browser page that rebinds its DNS name to 127.0.0.1 would arrive with its own Host
            return error_response(403, f"host {request.host!r} is not allowed")
        try:
            return await handler(request)
        except BodyError as error:
            response = error_response(error.status, error.message)
            if error.status == 408:  # the client stalled: it gets no second request on this connection
                response.force_close()
            return response
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return error_response(error.status, f"{request.method} {request.path}: {error.reason}")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug in a handler: answer 500, keep serving others
            log.exception("request %s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {error}")

    return middleware


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def create_app(
    completions: Completions,
    board: StatusBoard,
    hub: EventHub,
    request_stop: Callable[[], None],
    *,
    keepalive_s: float = KEEPALIVE_S,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
    tune: TuneEndpoint | None = None,
    api_key: str | None = None,
    max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    body_timeout_s: float = BODY_TIMEOUT_S,
    admission: Admission | None = None,
) -> web.Application:
    """The aiohttp application. ``allowed_hosts`` guards against DNS rebinding (None: any).
    ``api_key``: the bearer token every request needs (None: none, for an API on loopback).
    ``max_per_client``: requests one client address may have in progress (429 beyond).
    Bodies are bounded by ``max_body_bytes`` (a tune request's by MAX_TUNE_BODY_BYTES) and
    must arrive within ``body_timeout_s``. ``admission``: the node's answer slots and queue
    (default: MAX_DEFAULT_SESSIONS slots); the status shows them."""
    if admission is None:
        admission = Admission()
    admission.watch(board.refresh)
    board.attach_sessions(admission.view)
    handlers = ApiHandlers(completions, board, hub, request_stop, admission, keepalive_s=keepalive_s,
                           max_body_bytes=max_body_bytes)
    tune = tune or TuneEndpoint()
    app = web.Application(client_max_size=max(max_body_bytes, MAX_TUNE_BODY_BYTES),
                          middlewares=[_error_middleware(allowed_hosts),
                                       AccessGuard(api_key, max_per_client=max_per_client).middleware])
    app[BODY_TIMEOUT] = body_timeout_s
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/status", handlers.status)
    app.router.add_get("/v1/events", handlers.events)
    app.router.add_post("/v1/down", handlers.down)
    app.router.add_post("/v1/tune", tune.start)
    app.router.add_get("/v1/tune", tune.status)
    return app


class ApiServer:
    """The running HTTP server of one node."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @classmethod
    async def start(cls, app: web.Application, host: str, port: int, *,
                    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
                    header_timeout_s: float = HEADER_TIMEOUT_S, lingering_s: float = LINGER_S) -> ApiServer:
        """Listen on host:port (0 = a free port). Raises OSError when it cannot listen.
        A connection whose request headers are not all there ``header_timeout_s`` after it
        opened (or after its last response) is closed; others are served meanwhile."""
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s,
                               access_log=logging.getLogger("daemon.access"),
                               keepalive_timeout=header_timeout_s, lingering_time=lingering_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = runner.addresses[0][1] if runner.addresses else port
        return cls(runner, host, bound_port)

    async def stop(self) -> None:
        await self._runner.cleanup()


def _for_client(snapshot: dict[str, Any], request: web.Request) -> dict[str, Any]:
    """The status as `request`'s client may see it: the invite code carries the mesh key, so
    only a client on this device gets it (an API key admits other devices to chat, not to the mesh)."""
    if snapshot.get("invite") is None or is_loopback_client(request.remote):
        return snapshot
    return {**snapshot, "invite": None}
