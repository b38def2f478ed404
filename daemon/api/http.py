"""The HTTP plumbing every route shares: JSON bodies in (bounded in size and in time),
OpenAI-shaped errors and server-sent events out."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0
"""A request body must arrive whole within this long (a client that stalls is answered 408)."""
BODY_TIMEOUT = web.AppKey("body_timeout_s", float)
"""An app's own body timeout (create_app sets it); BODY_TIMEOUT_S without one."""
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None) -> web.Response:
    """An error in OpenAI's shape."""
    body = {"error": {**error_body(message, status), "param": param, "code": code}}
    return web.json_response(body, status=status)


def too_many_requests(message: str, *, code: str, retry_after_s: int) -> web.Response:
    """A 429 in OpenAI's shape whose ``Retry-After`` says when to try again, in seconds."""
    response = error_response(429, message, code=code)
    response.headers["Retry-After"] = str(retry_after_s)
    return response


def error_body(message: str, status: int = 500) -> dict[str, Any]:
    """The ``error`` object of OpenAI's shape (also an error event in a stream)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"message": message, "type": kind, "param": None, "code": None}


class BodyError(Exception):
    """The request body cannot be read as JSON; answered with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_json_body(request: web.Request, *, allow_empty: bool = False,
                         max_bytes: int = MAX_BODY_BYTES) -> object:
    """The request's decoded JSON body; raises BodyError (415, 413, 408 or 400)."""
    if request.content_type != "application/json":
        raise BodyError(415, "send the body as JSON with 'Content-Type: application/json'")
    limit = min(max_bytes, request.client_max_size)
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(413, f"the request body is larger than {limit} bytes")
    timeout_s = request.config_dict.get(BODY_TIMEOUT, BODY_TIMEOUT_S)
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"the request body is larger than {limit} bytes") from None
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    if len(raw) > limit:
        raise BodyError(413, f"the request body is larger than {limit} bytes")
    if allow_empty and not raw.strip():
        return None
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise BodyError(400, f"the request body is not valid JSON: {error}") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


async def send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    """One server-sent event with `data` as its JSON."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    await response.write(b"data: " + payload.encode() + b"\n\n")
