"""Reading server-sent events in tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

DONE = "[DONE]"


async def sse_items(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """Yield each event's data (decoded JSON, or "[DONE]"), and ": ..." comments as str."""
    async for raw_line in response.content:
        line = raw_line.decode().rstrip("\r\n")
        if not line:
            continue
        if line.startswith(":"):
            yield line
        elif line.startswith("data: "):
            data = line[len("data: "):]
            yield DONE if data == DONE else json.loads(data)
        else:
            raise AssertionError(f"not an SSE line: {line!r}")


async def read_all(response: aiohttp.ClientResponse) -> list[Any]:
    return [item async for item in sse_items(response)]
