"""The one client of a daemon's HTTP API (docs/api.md): the CLI, the TUI, the benchmark, the
local-mesh launcher, the scripts and the tests all talk to a daemon through it.

- ``SseParser``: a sans-IO reader of server-sent events; ``read_sse`` runs it over a response.
- ``DaemonClient``: asyncio (aiohttp). ``status``, ``down``, ``events``, ``chat`` (streamed,
  as ``ChatDelta`` pieces) and ``complete`` (one non-streamed answer, as the daemon's JSON).
- ``run_sync`` / ``iterate_sync``: the same calls from code without an event loop (threads,
  scripts, the launcher), each on a private loop.

No Textual here: the app is handed anything that satisfies ``MeshClient`` (the tests give it a
fake, ``tui.demo.FakeClient``). Connection failures, refused connections, timeouts and streams
cut short raise ``DaemonUnavailable``; answers the daemon gives as errors raise ``DaemonError``.
Reconnecting is the caller's job (the app retries with ``tui.backoff.Backoff``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:  # aiohttp is imported on first use: `meshllm --help` stays quick
    import aiohttp

log = logging.getLogger(__name__)

T = TypeVar("T")
MeshState = Literal["replanning", "running"]
DONE = "[DONE]"
DEFAULT_MAX_EVENT_BYTES = 1 << 20


# == server-sent events ===========================================================================


class SseError(ValueError):
    """The stream is not server-sent events, or an event is larger than the bound."""


class SseComment(str):
    """A comment line (``: ping``), returned only by a parser made with ``comments=True``."""


class SseParser:
    """Splits a byte stream into events; ``feed()`` returns the completed events' data.

    Feed it the bytes as they arrive, in chunks of any size; it returns the ``data`` of every
    event that a blank line completed. Comment lines (``: ping``, the keep-alive) are dropped
    unless ``comments`` is set, and then returned as ``SseComment`` (the whole line); the other
    fields (``event``, ``id``, ``retry``) are read and dropped: the daemon's API puts
    everything in ``data``.
    """

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, comments: bool = False) -> None:
        self._max_event_bytes = max_event_bytes
        self._comments = comments
        self._partial_line = bytearray()
        self._data_lines: list[str] = []
        self._event_bytes = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Take the next bytes of the stream; return the data of each event they complete."""
        self._partial_line += chunk
        events: list[str] = []
        while True:
            end = self._partial_line.find(b"\n")
            if end < 0:
                break
            raw = bytes(self._partial_line[:end])
            del self._partial_line[: end + 1]
            event = self._line(raw.removesuffix(b"\r"))
            if event is not None:
                events.append(event)
        if len(self._partial_line) + self._event_bytes > self._max_event_bytes:
            raise SseError(f"an event is larger than {self._max_event_bytes} bytes")
        return events

    def _line(self, raw: bytes) -> str | None:
        if not raw:  # a blank line ends the event
            if not self._data_lines:
                return None
            data = "\n".join(self._data_lines)
            self._data_lines.clear()
            self._event_bytes = 0
            return data
        self._event_bytes += len(raw)
        if self._event_bytes > self._max_event_bytes:
            raise SseError(f"an event is larger than {self._max_event_bytes} bytes")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SseError(f"an event line is not UTF-8: {error}") from None
        if line.startswith(":"):  # a comment: keep-alive
            return SseComment(line) if self._comments else None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        return None


async def read_sse(response: aiohttp.ClientResponse, *, comments: bool = False) -> AsyncIterator[str]:
    """The data of each event of an open ``text/event-stream`` response, as it arrives (and
    each comment line, as ``SseComment``, when ``comments`` is set)."""
    parser = SseParser(comments=comments)
    async for chunk in response.content.iter_any():
        for data in parser.feed(chunk):
            yield data


# == the client ====================================================================================


class DaemonUnavailable(ConnectionError):
    """Nothing answers at the API URL, it is not a URL, or the connection to the daemon broke."""


class DaemonError(RuntimeError):
    """The daemon answered, with an error; the message is the daemon's own."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status when the daemon refused the request; None for an error mid-stream."""


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
    token_ids: tuple[int, ...] | None = None
    """meshllm extension, on the last chunk: the generated token ids (EOS included)."""
    served_by: str | None = None
    """meshllm extension, from the opening chunk: "mesh", or "fallback" when the daemon's local
    fallback model answers because the mesh cannot serve right now."""
    model: str | None = None
    """With ``served_by``: the model that answers (the fallback's own name for a fallback)."""


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
    """``MeshClient`` over HTTP, and a non-streamed ``complete``.

    Used as is, every call opens a short-lived aiohttp session: no state to close. Used as
    ``async with DaemonClient(url) as client:``, the calls inside share one session (and its
    connections), as the benchmark wants.
    """

    def __init__(
        self,
        api_url: str,
        *,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
        idle_timeout_s: float = 15.0,
        chat_idle_timeout_s: float | None = None,
        api_key: str | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        """Sent as ``Authorization: Bearer``; None: the one ``tui.api_key.find_api_key`` finds."""
        self._api_key_problem: str | None = None
        if api_key is None:
            from tui.api_key import ApiKeyFileError, find_api_key

            try:
                self._api_key = find_api_key(self.api_url)
            except ApiKeyFileError as error:  # said on the first call, as a DaemonError
                self._api_key_problem = str(error)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        """Whole requests: status, down, a non-streamed answer."""
        self._idle_timeout_s = idle_timeout_s
        """The daemon pings the event stream every 5 s; this much silence means it is gone."""
        self._chat_idle_timeout_s = chat_idle_timeout_s
        """Silence that ends a streamed answer. None (the default): while the mesh re-plans, a
        stream may be quiet for a long time."""
        self._shared: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DaemonClient:
        import aiohttp

        self._shared = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._shared is not None:
            await self._shared.close()
            self._shared = None

    # -- calls -----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        body = await self._request("GET", "/v1/status")
        if not isinstance(body, dict):
            raise DaemonError("the daemon's status is not a JSON object")
        return body

    async def down(self) -> None:
        await self._request("POST", "/v1/down", json_body={})

    async def complete(self, messages: Sequence[dict[str, str]], *, max_tokens: int,
                       temperature: float = 0.0, **options: Any) -> dict[str, Any]:
        """One non-streamed answer: the daemon's ``chat.completion`` object (with ``usage`` and
        ``meshllm.token_ids``). ``options`` are more request fields (seed, top_p, stop...)."""
        body = {"messages": list(messages), "max_tokens": max_tokens, "temperature": temperature, **options}
        answer = await self._request("POST", "/v1/chat/completions", json_body=body)
        if not isinstance(answer, dict):
            raise DaemonError("the daemon's answer is not a JSON object")
        return answer

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async with self._stream("GET", "/v1/events", None, self._idle_timeout_s) as response:
            try:
                async for data in read_sse(response):
                    event = _decode_event(data)
                    if event is not None:
                        yield event
            except SseError as error:
                raise DaemonError(f"the daemon's event stream is garbled: {error}") from None

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
        async with self._stream("POST", "/v1/chat/completions", body, self._chat_idle_timeout_s) as response:
            try:
                async for data in read_sse(response):
                    if data == DONE:
                        return
                    for delta in _chat_deltas(data):
                        yield delta
            except SseError as error:
                raise DaemonError(f"the daemon's answer stream is garbled: {error}") from None
        raise DaemonUnavailable("the daemon closed the stream before the answer ended")

    async def tune(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``POST /v1/tune``: join a federated fine-tuning job with ``body["examples"]`` and
        yield its progress events until one of type ``done`` or ``error`` (docs/api.md)."""
        async with self._stream("POST", "/v1/tune", body, self._chat_idle_timeout_s) as response:
            try:
                async for data in read_sse(response):
                    event = _decode_event(data, TUNE_EVENTS)
                    if event is not None:
                        yield event
                        if event.get("type") in ("done", "error"):
                            return
            except SseError as error:
                raise DaemonError(f"the daemon's tune stream is garbled: {error}") from None
        raise DaemonUnavailable("the daemon closed the tune stream before the job ended")

    # -- HTTP ------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._api_key_problem is not None:
            raise DaemonError(self._api_key_problem)
        return {} if self._api_key is None else {"Authorization": f"Bearer {self._api_key}"}

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiohttp.ClientSession]:
        import aiohttp

        if self._shared is not None:
            yield self._shared
            return
        async with aiohttp.ClientSession() as session:
            yield session

    async def _request(self, method: str, path: str, *, json_body: Any = None) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s, sock_connect=self._connect_timeout_s)
        headers = self._headers()
        try:
            async with self._session() as session:
                async with session.request(method, f"{self.api_url}{path}", json=json_body,
                                           timeout=timeout, headers=headers) as response:
                    await _raise_for_status(response)
                    return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._translate(error) from None
        except ValueError as error:  # the body is not JSON
            raise DaemonError(f"the daemon's answer to {method} {path} is not JSON: {error}") from None

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, json_body: Any,
                      idle_timeout_s: float | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open streaming response; errors while it is read become DaemonUnavailable."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s,
                                        sock_read=idle_timeout_s)
        headers = self._headers()
        try:
            async with self._session() as session:
                async with session.request(method, f"{self.api_url}{path}", json=json_body,
                                           timeout=timeout, headers=headers) as response:
                    await _raise_for_status(response)
                    yield response
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._translate(error) from None

    def _translate(self, error: Exception) -> DaemonUnavailable | DaemonError:
        import aiohttp

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
    raise DaemonError(message, status=response.status)


TUNE_EVENTS = ("progress", "base", "done", "error")
"""The event types of a /v1/tune stream."""


def _decode_event(data: str, known: tuple[str, ...] = ("status", "log")) -> dict[str, Any] | None:
    """One event of /v1/events (or of another stream whose types are `known`), or None
    (logged) when it is not one this client knows."""
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("skipping an event that is not JSON: %.200s", data)
        return None
    if not isinstance(event, dict) or event.get("type") not in known:
        log.warning("skipping an unknown event: %.200s", data)
        return None
    return event


def _chat_deltas(data: str) -> list[ChatDelta]:
    """The deltas in one ``chat.completion.chunk`` (for the opening role-only chunk, only who
    serves the answer, when the daemon says it)."""
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
    extension = extension if isinstance(extension, dict) else {}
    if extension.get("served_by") in ("mesh", "fallback") and any(
            isinstance(c, dict) and isinstance(c.get("delta"), dict) and "role" in c["delta"]
            for c in chunk.get("choices") or []):
        model = chunk.get("model")
        deltas.append(ChatDelta(served_by=extension["served_by"], model=model if isinstance(model, str) else None))
    if extension.get("state") in ("replanning", "running"):
        deltas.append(ChatDelta(state=extension["state"]))
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        finish_reason = choice.get("finish_reason")
        if text or finish_reason:
            deltas.append(ChatDelta(text=str(text or ""), finish_reason=finish_reason))
    ids = extension.get("token_ids")
    if isinstance(ids, list):
        ids = tuple(int(i) for i in ids)
        if deltas and deltas[-1].finish_reason:
            deltas[-1] = dataclasses.replace(deltas[-1], token_ids=ids)
        else:
            deltas.append(ChatDelta(token_ids=ids))
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        deltas.append(ChatDelta(completion_tokens=usage["completion_tokens"]))
    return deltas


# == without an event loop =========================================================================


def run_sync(call: Awaitable[T]) -> T:
    """Run one client call (``run_sync(DaemonClient(url).status())``) to its end, on a private
    event loop: on this thread, or on a helper thread when this one already runs a loop."""

    async def main() -> T:
        return await call

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def iterate_sync(stream: AsyncIterator[T]) -> Iterator[T]:
    """Iterate a client stream (``DaemonClient(url).chat(...)``) from code without an event
    loop. Each item is computed on a private loop of this thread, so what the caller does
    between items (a callback, a kill) runs on the caller's thread; breaking off closes it."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(_next(stream))
            except StopAsyncIteration:
                return
    finally:
        with contextlib.suppress(Exception):
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                loop.run_until_complete(aclose())
        loop.close()


def _next(stream: AsyncIterator[T]) -> Coroutine[Any, Any, T]:
    async def step() -> T:
        return await anext(stream)

    return step()
