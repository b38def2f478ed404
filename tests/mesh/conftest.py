"""Multi-process meshes on loopback, shared by the mesh tests of one module."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tui.client import DaemonClient, DaemonError, iterate_sync, run_sync


def unique_mesh_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def chat(url: str, messages: list[dict[str, str]], max_tokens: int = 32, timeout_s: float = 300, **extra: Any) -> dict[str, Any]:
    """A non-streaming, greedy chat completion; returns the response JSON."""
    client = DaemonClient(url, request_timeout_s=timeout_s)
    return run_sync(client.complete(messages, max_tokens=max_tokens, temperature=0, **extra))


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
        self.errors: list[str] = []


def stream_chat(url: str, messages: list[dict[str, str]], max_tokens: int,
                on_piece: Callable[[int], None] | None = None, timeout_s: float = 300) -> StreamedAnswer:
    """Stream a greedy answer; `on_piece(n)` is called (on this thread) after the n-th text piece.

    An error the daemon sends mid-stream ends the answer and is kept in ``errors``.
    """
    client = DaemonClient(url, chat_idle_timeout_s=timeout_s)
    out = StreamedAnswer()
    try:
        for delta in iterate_sync(client.chat(messages, max_tokens=max_tokens, temperature=0)):
            if delta.state is not None:
                out.states.append(delta.state)
            if delta.text:
                out.pieces.append(delta.text)
                if on_piece is not None:
                    on_piece(len(out.pieces))
            if delta.finish_reason:
                out.finish_reason = delta.finish_reason
                out.token_ids = list(delta.token_ids or ())
    except DaemonError as error:
        out.errors.append(str(error))
    return out
