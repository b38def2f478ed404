"""Multi-process meshes on loopback, shared by the mesh tests of one module."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import pytest


def unique_mesh_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def chat(url: str, messages: list[dict[str, str]], max_tokens: int = 32, timeout_s: float = 300, **extra: Any) -> dict[str, Any]:
    """A non-streaming, greedy chat completion; returns the response JSON."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.load(r)


def token_ids(response: dict[str, Any]) -> list[int]:
    return list(response["meshllm"]["token_ids"])


@pytest.fixture
def mesh_name() -> str:
    return unique_mesh_name()


class StreamedAnswer:
    """What a streaming client saw: text pieces, mesh states, the final token ids."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.states: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.errors: list[dict[str, Any]] = []


def stream_chat(url: str, messages: list[dict[str, str]], max_tokens: int,
                on_piece: Any = None, timeout_s: float = 300) -> StreamedAnswer:
    """Stream a greedy answer; `on_piece(n)` is called after the n-th text piece."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    out = StreamedAnswer()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out.errors.append(event["error"])
                continue
            if "meshllm" in event and "state" in event["meshllm"]:
                out.states.append(event["meshllm"]["state"])
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    out.pieces.append(text)
                    if on_piece is not None:
                        on_piece(len(out.pieces))
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
                    out.token_ids = list(event.get("meshllm", {}).get("token_ids", []))
    return out
