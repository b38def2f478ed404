"""A stand-in daemon for the TUI, driven step by step: the TUI's tests and
``scripts/tui_screenshots.py`` play a mesh into the app with it, no daemon needed.

``FakeClient`` satisfies ``tui.client.MeshClient``. Its driver pushes status snapshots
(``status``, ``node`` build them as docs/api.md gives them) and log events into the event
stream, feeds each chat answer piece by piece, and can take the daemon away (``go_away``: the
open stream breaks and new connections are refused) and bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tui.client import ChatDelta, DaemonError, DaemonUnavailable

API_URL = "http://127.0.0.1:8470"
GiB = 2**30


def node(node_id: str, name: str, span: tuple[int, int] | None, *, is_self: bool = False,
         coordinator: bool = False, state: str = "ready", mem_gib: float = 8.0,
         ms_per_layer: float | None = 1.9, rtt_ms: float | None = 0.8) -> dict[str, Any]:
    return {
        "id": node_id, "name": name, "is_self": is_self,
        "role": "coordinator" if coordinator else "member", "state": state,
        "mem_budget_bytes": int(mem_gib * GiB), "ms_per_layer": ms_per_layer,
        "span": list(span) if span is not None else None,
        # int4 weights: 3 MiB a layer plus 27 MiB of embedding and head
        "weight_bytes": (span[1] - span[0] + 9) * 3 * 2**20 if span is not None else None,
        "rtt_ms": None if is_self else rtt_ms, "address": f"127.0.0.1:{8470 + len(node_id)}",
    }


def status(nodes: Sequence[dict[str, Any]], *, term: int = 1, num_layers: int = 30,
           plan_state: str = "active", self_id: str = "n-laptop") -> dict[str, Any]:
    """A snapshot as docs/api.md gives it; the plan is the nodes' spans, in order."""
    coordinator = next((n["id"] for n in nodes if n["role"] == "coordinator"), None)
    stages = [{"node_id": n["id"], "start_layer": n["span"][0], "end_layer": n["span"][1]}
              for n in sorted(nodes, key=lambda n: n["span"][0] if n["span"] else 0) if n["span"]]
    return {
        "self_id": self_id,
        "model": {"id": "b3f1c2", "name": "SmolLM2-135M-Instruct", "num_layers": num_layers, "weights": "int4"},
        "codec": "f16",
        "term": term,
        "coordinator_id": coordinator,
        "plan": {"term": term, "state": plan_state, "stages": stages} if stages else None,
        "nodes": list(nodes),
        "incompatible": [],
        "sessions": {"running": 0, "queued": 0, "max": 4, "queue_max": 16},
    }


@dataclass
class ChatCall:
    """One ``chat()`` the app made: what it sent, and the answer the test feeds."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    feed: asyncio.Queue[ChatDelta | BaseException | None] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    """The app closed the stream before it ended (stopped, or a new chat)."""
    done: bool = False

    async def answer(self) -> AsyncIterator[ChatDelta]:
        """What the test feeds, as the app reads it; closing it early marks the call cancelled."""
        try:
            while True:
                item = await self.feed.get()
                if item is None:
                    self.done = True
                    return
                if isinstance(item, BaseException):
                    self.done = True
                    raise item
                yield item
        finally:
            if not self.done:
                self.cancelled = True

    def send(self, text: str) -> None:
        self.feed.put_nowait(ChatDelta(text=text))

    def state(self, state: str) -> None:
        self.feed.put_nowait(ChatDelta(state=state))  # type: ignore[arg-type]

    def serve(self, by: str, model: str) -> None:
        """Say who answers, as the daemon's opening chunk does ("mesh" or "fallback")."""
        self.feed.put_nowait(ChatDelta(served_by=by, model=model))

    def finish(self, reason: str = "stop") -> None:
        self.feed.put_nowait(ChatDelta(finish_reason=reason))
        self.feed.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self.feed.put_nowait(error)


class FakeClient:
    def __init__(self, api_url: str = API_URL) -> None:
        self.api_url = api_url
        self.available = True
        self.chats: list[ChatCall] = []
        self.connections = 0
        """Event streams opened so far."""
        self._status: dict[str, Any] | None = None
        self._streams: list[asyncio.Queue[dict[str, Any] | BaseException]] = []

    # -- what the test does --------------------------------------------------------------

    def push_status(self, snapshot: dict[str, Any]) -> None:
        self._status = copy.deepcopy(snapshot)
        self._publish({"type": "status", "status": copy.deepcopy(snapshot)})

    def push_log(self, kind: str, message: str, ts: float = 1_700_000_000.0) -> None:
        self._publish({"type": "log", "ts": ts, "kind": kind, "message": message})

    def go_away(self) -> None:
        """The daemon dies: open event streams break, new connections are refused."""
        self.available = False
        for stream in self._streams:
            stream.put_nowait(DaemonUnavailable("connection reset by peer"))
        self._streams.clear()

    def come_back(self) -> None:
        self.available = True

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _publish(self, event: dict[str, Any]) -> None:
        for stream in self._streams:
            stream.put_nowait(copy.deepcopy(event))

    # -- MeshClient ----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        if not self.available:
            raise DaemonUnavailable(f"cannot reach the daemon at {self.api_url}: connection refused")
        if self._status is None:
            raise DaemonError("no status yet")
        return copy.deepcopy(self._status)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        if not self.available:
            raise DaemonUnavailable(f"cannot reach the daemon at {self.api_url}: connection refused")
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._streams.append(queue)
        self.connections += 1
        try:
            if self._status is not None:
                yield {"type": "status", "status": copy.deepcopy(self._status)}
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if queue in self._streams:
                self._streams.remove(queue)

    async def chat(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature: float,
                   top_p: float | None = None, top_k: int | None = None,
                   seed: int | None = None) -> AsyncIterator[ChatDelta]:
        if not self.available:
            raise DaemonUnavailable(f"cannot reach the daemon at {self.api_url}: connection refused")
        call = ChatCall([dict(m) for m in messages], max_tokens, temperature)
        self.chats.append(call)
        async with contextlib.aclosing(call.answer()) as answer:
            async for item in answer:
                yield item

    async def down(self) -> None:
        if not self.available:
            raise DaemonUnavailable("connection refused")
