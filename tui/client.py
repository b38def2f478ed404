"""An asyncio client of the daemon's HTTP API (docs/api.md), for the terminal UI.

No Textual here: the app is handed anything that satisfies ``MeshClient`` (the tests give it a
fake). Connection failures, refused connections and streams cut short raise
``DaemonUnavailable``; answers the daemon gives as errors raise ``DaemonError``. Reconnecting
is the caller's job (the app retries with ``tui.backoff.Backoff``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from tui.sse import SseError, SseParser

log = logging.getLogger(__name__)

MeshState = Literal["replanning", "running"]
DONE = "[DONE]"


class DaemonUnavailable(ConnectionError):
    """Nothing answers at the API URL, or the connection to the daemon broke."""


class DaemonError(RuntimeError):
    """The daemon answered, with an error; the message is the daemon's own."""


@dataclass(frozen=True)
class ChatDelta:
    """One piece of a streamed answer. Exactly the fields the chunk carried are set."""

    text: str = ""
    """New answer text ("" when the chunk carried none)."""
    state: MeshState | None = None
    """meshllm extension: "replanning" while the mesh moves layers, "running" once tokens flow again."""
    finish_reason: str | None = None
    """"stop" or "length" on the last chunk of the answer."""
    completion_tokens: int | None = None
    """From the final usage chunk: how many tokens the answer had."""


class MeshClient(Protocol):
    """What the app needs from a daemon. ``DaemonClient`` talks HTTP; tests pass a fake."""

    api_url: str

    async def status(self) -> dict[str, Any]:
        """The body of ``GET /v1/status``."""
        ...

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """The events of ``GET /v1/events``, each a dict with ``type`` "status" or "log".

        Ends when the daemon closes the stream; raises DaemonUnavailable when it cannot connect
        or the connection breaks.
        """
        ...

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[ChatDelta]:
        """Stream one answer to the conversation ``messages``. Closing the iterator cancels it."""
        ...

    async def down(self) -> None:
        """Ask the daemon to leave the mesh cleanly and stop."""
        ...


class DaemonClient:
    """``MeshClient`` over HTTP. One short-lived aiohttp session per call: no state to close."""

    def __init__(
        self,
        api_url: str,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
        idle_timeout_s: float = 15.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._idle_timeout_s = idle_timeout_s
        """The daemon pings the event stream every 5 s; this much silence means it is gone."""

    async def status(self) -> dict[str, Any]:
        body = await self._request("GET", "/v1/status")
        if not isinstance(body, dict):
            raise DaemonError("the daemon's status is not a JSON object")
        return body

    async def down(self) -> None:
        await self._request("POST", "/v1/down", json_body={})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout_s, sock_read=self._idle_timeout_s
        )
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{self.api_url}/v1/events") as response:
                    await _raise_for_status(response)
                    parser = SseParser()
                    async for chunk in response.content.iter_any():
                        for data in parser.feed(chunk):
                            event = _decode_event(data)
                            if event is not None:
                                yield event
        except SseError as error:
            raise DaemonError(f"the daemon's event stream is garbled: {error}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._translate(error) from None

    async def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[ChatDelta]:
        body: dict[str, Any] = {
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key, value in (("top_p", top_p), ("top_k", top_k), ("seed", seed)):
            if value is not None:
                body[key] = value
        # no read timeout: while the mesh re-plans, the stream may be quiet for a long time
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(f"{self.api_url}/v1/chat/completions", json=body) as response:
                    await _raise_for_status(response)
                    parser = SseParser()
                    async for chunk in response.content.iter_any():
                        for data in parser.feed(chunk):
                            if data == DONE:
                                return
                            for delta in _chat_deltas(data):
                                yield delta
            raise DaemonUnavailable("the daemon closed the stream before the answer ended")
        except SseError as error:
            raise DaemonError(f"the daemon's answer stream is garbled: {error}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._translate(error) from None

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s, sock_connect=self._connect_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.request(method, f"{self.api_url}{path}", json=json_body) as response:
                    await _raise_for_status(response)
                    return await response.json()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._translate(error) from None
        except ValueError as error:  # the body is not JSON
            raise DaemonError(f"the daemon's answer to {method} {path} is not JSON: {error}") from None

    def _translate(self, error: aiohttp.ClientError | TimeoutError) -> DaemonUnavailable | DaemonError:
        if isinstance(error, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
            return DaemonUnavailable(f"not a valid API URL: {self.api_url!r} (expected http://HOST:PORT)")
        if isinstance(error, aiohttp.ClientConnectorError):
            errno = error.os_error.errno
            reason = os.strerror(errno) if errno else str(error.os_error)
            return DaemonUnavailable(f"cannot reach the daemon at {self.api_url}: {reason.lower()}")
        if isinstance(error, TimeoutError):
            return DaemonUnavailable(f"the daemon at {self.api_url} stopped answering (timed out)")
        if isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            detail = str(error) or type(error).__name__
            return DaemonUnavailable(f"the connection to the daemon at {self.api_url} broke: {detail}")
        return DaemonError(f"the daemon at {self.api_url} did not answer properly: {error}")


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status == 200:
        return
    text = await response.text()
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status}: {text.strip()[:200]}"
    raise DaemonError(message)


def _decode_event(data: str) -> dict[str, Any] | None:
    """One event of /v1/events, or None (logged) when it is not one this client knows."""
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("skipping an event that is not JSON: %.200s", data)
        return None
    if not isinstance(event, dict) or event.get("type") not in ("status", "log"):
        log.warning("skipping an unknown event: %.200s", data)
        return None
    return event


def _chat_deltas(data: str) -> list[ChatDelta]:
    """The deltas in one ``chat.completion.chunk`` (none for the opening role-only chunk)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise DaemonError(f"the daemon sent a chunk that is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise DaemonError(f"the daemon sent a chunk that is not an object: {data[:200]!r}")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else None
        raise DaemonError(str(message or error))
    deltas: list[ChatDelta] = []
    extension = chunk.get("meshllm")
    if isinstance(extension, dict) and extension.get("state") in ("replanning", "running"):
        deltas.append(ChatDelta(state=extension["state"]))
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        finish_reason = choice.get("finish_reason")
        if text or finish_reason:
            deltas.append(ChatDelta(text=str(text or ""), finish_reason=finish_reason))
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        deltas.append(ChatDelta(completion_tokens=usage["completion_tokens"]))
    return deltas
