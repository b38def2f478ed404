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
