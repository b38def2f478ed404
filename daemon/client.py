"""A small client of a daemon's HTTP API, for the CLI commands (ask, status, down)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

CONNECT_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 30.0


class DaemonUnreachable(ConnectionError):
    """Nothing answers at the API URL (or it is not a URL)."""


class DaemonError(RuntimeError):
    """The daemon answered with an error; the message is the daemon's."""


def _unreachable(api_url: str, error: Exception) -> DaemonUnreachable:
    if isinstance(error, aiohttp.InvalidURL):
        return DaemonUnreachable(f"not a valid API URL: {api_url!r} (expected http://HOST:PORT)")
    if isinstance(error, aiohttp.ClientConnectorError):
        errno = error.os_error.errno
        reason = os.strerror(errno) if errno else str(error.os_error)
    else:
        reason = str(error) or type(error).__name__
    return DaemonUnreachable(
        f"cannot reach the daemon at {api_url}: {reason.lower()} (is `meshllm up` running?)"
    )


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = await response.text()
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status}: {text.strip()[:200]}"


async def stream_chat(api_url: str, body: dict[str, Any]) -> AsyncIterator[str]:
    """Yield the answer's text pieces as they stream in. Raises DaemonUnreachable / DaemonError."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"{api_url}/v1/chat/completions",
                                    json={**body, "stream": True}) as response:
                if response.status != 200:
                    raise DaemonError(await _error_message(response))
                async for raw_line in response.content:
                    line = raw_line.decode("utf-8").strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise DaemonError(chunk["error"]["message"])
                    for choice in chunk.get("choices", []):
                        content = choice.get("delta", {}).get("content")
                        if content:
                            yield content
                raise DaemonError("the daemon closed the stream before the answer ended")
    except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as error:
        raise _unreachable(api_url, error) from None
    except (aiohttp.ClientError, ValueError) as error:  # a broken connection or a garbled chunk
        raise DaemonError(f"the connection to the daemon broke: {error}") from None


async def _control(api_url: str, method: str, path: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
            async with session.request(method, f"{api_url}{path}", **kwargs) as response:
                if response.status != 200:
                    raise DaemonError(await _error_message(response))
                return await response.json()
    except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as error:
        raise _unreachable(api_url, error) from None
    except (aiohttp.ClientError, TimeoutError) as error:
        raise DaemonError(f"the daemon at {api_url} did not answer properly: {error}") from None


async def get_status(api_url: str) -> dict[str, Any]:
    return await _control(api_url, "GET", "/v1/status")  # type: ignore[no-any-return]


async def request_down(api_url: str) -> None:
    await _control(api_url, "POST", "/v1/down")
