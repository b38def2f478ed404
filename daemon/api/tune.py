"""``POST /v1/tune`` and ``GET /v1/tune``: a federated fine-tuning job from this node's own
examples (docs/api.md, docs/fine-tuning.md). The examples come from a client on this machine
and stay on this node; the response streams the job's progress as server-sent events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web

from daemon.api.http import SSE_HEADERS, BodyError, error_response, read_json_body, send_event
from daemon.tune_request import TuneRequest, parse_tune_request

log = logging.getLogger(__name__)

MAX_TUNE_BODY_BYTES = 32 << 20
"""Bound of a tune request (its examples); other requests keep the API's 1 MiB."""


class TuneJobs(Protocol):
    """What the routes need of the node's tune runner (`daemon.node.tune.TuneRunner`)."""

    @property
    def busy(self) -> bool:
        """This node takes part in a local job now."""
        ...

    def run(self, request: TuneRequest, chats: list[list[dict[str, str]]]) -> AsyncIterator[dict[str, Any]]:
        """Join (or start) a job with these examples; its progress events until it ends."""
        ...

    def status_view(self) -> dict[str, object]: ...


class TuneEndpoint:
    """The routes' handlers; the node attaches its tune runner once the mesh is up."""

    def __init__(self) -> None:
        self._runner: TuneJobs | None = None

    def attach(self, runner: TuneJobs) -> None:
        self._runner = runner

    async def status(self, request: web.Request) -> web.Response:
        if self._runner is None:
            return web.json_response({"state": "starting"})
        return web.json_response(self._runner.status_view())

    async def start(self, request: web.Request) -> web.StreamResponse:
        from meshllm.tune.data import DataError
        from meshllm.tune.rounds import TuneError

        try:
            body = await read_json_body(request, max_bytes=MAX_TUNE_BODY_BYTES)
        except BodyError as error:
            return error_response(error.status, error.message)
        try:
            tune_request, chats = parse_tune_request(body)
        except (ValueError, DataError) as error:
            return error_response(400, str(error))
        runner = self._runner
        if runner is None:
            return error_response(503, "the node is still starting; try again when it is ready")
        if runner.busy:
            return error_response(409, "this node already takes part in a tune job; wait for it to end")
        events = runner.run(tune_request, chats)
        try:
            first = await anext(events)
        except (TuneError, DataError) as error:
            return error_response(400, str(error))
        except StopAsyncIteration:
            return error_response(500, "the tune job ended before it started")
        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await response.prepare(request)
            await send_event(response, first)
            async for event in events:
                await send_event(response, event)
            await response.write_eof()
        except ConnectionResetError:
            log.info("the tune client went away: this node leaves the job")
        except Exception as error:  # noqa: BLE001 - reported on the stream, the daemon goes on
            log.info("tune job failed", exc_info=True)
            try:
                await send_event(response, _error(f"{type(error).__name__}: {error}"))
                await response.write_eof()
            except ConnectionResetError:
                pass
        finally:
            await events.aclose()
        return response


def _error(message: str) -> dict[str, Any]:
    return {"type": "error", "message": message}
