"""No input from a peer ends a daemon (issue 20): what a handler raises for a peer's message
is logged and counted against that peer's bad-frame budget, per message, and a peer over it
is dropped; a timer that raises is logged and the node carries on."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import pytest

from daemon.node.driver import MeshDriver
from meshllm import wire
from meshllm.mesh.checks import PeerFaults
from tests.waiting import async_wait_until
from tests.daemon.stand_ins import hello, stand_in_runtime


class Refused(Exception):
    """Stands for the link layer's error."""


class RecordingLinks:
    """A link layer that is linked to everyone it is told about and records drops."""

    def __init__(self) -> None:
        self.linked: dict[str, wire.Hello] = {}
        self.dropped: list[tuple[str, str]] = []

    async def connect(self, address: str) -> str:
        raise Refused("no dialling here")

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int:
        return 1

    def drop(self, peer_id: str, reason: str) -> None:
        self.dropped.append((peer_id, reason))

    def peers(self) -> dict[str, wire.Hello]:
        return dict(self.linked)

    def rtt_ms(self, peer_id: str) -> float | None:
        return None

    def link_stats(self, peer_id: str) -> None:
        return None


class IdleWorker:
    """Takes jobs and never runs them (this test computes nothing)."""

    def submit(self, run: Any) -> Future[Any]:
        return Future()


def linked_driver(links: RecordingLinks, **kwargs: Any) -> MeshDriver:
    mesh = MeshDriver(hello("a"), stand_in_runtime(), worker=None, links=links,  # type: ignore[arg-type]
                      link_error=Refused, **kwargs)
    links.linked["b"] = hello("b")
    mesh.on_link_up("b", hello("b"))
    return mesh


POISON = wire.DropSession("b/1")
"""The message that makes a handler raise (as a bug that a peer's input reaches would)."""


def poisoned(mesh: MeshDriver) -> None:
    receive = mesh.core.receive

    def failing(sender: str, msg: wire.Message, now: float) -> None:
        if msg == POISON:
            raise KeyError("a state no test foresaw")
        receive(sender, msg, now)

    mesh.core.receive = failing  # type: ignore[method-assign]


async def test_a_handler_that_raises_leaves_the_node_serving_and_repeated_ones_drop_the_peer() -> None:
    links = RecordingLinks()
    mesh = linked_driver(links, peer_faults=PeerFaults(limit=5, window_s=3600.0))
    poisoned(mesh)
    mesh.on_message("b", POISON)  # raises nothing
    mesh.on_message("b", wire.Coordinator(1, "b"))  # still serving: it follows b's claim
    assert mesh.core.coordinator_id == "b" and links.dropped == []
    for _ in range(3):
        mesh.on_message("b", POISON)
    assert links.dropped == []  # four failures: within the budget
    mesh.on_message("b", POISON)
    assert links.dropped == [("b", "too many bad frames")]


async def test_a_timer_that_raises_is_logged_and_the_node_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    links = RecordingLinks()
    mesh = MeshDriver(hello("a"), stand_in_runtime(), worker=IdleWorker(), links=links,  # type: ignore[arg-type]
                      link_error=Refused)
    handle_timer = mesh.core.handle_timer
    calls: list[float] = []

    def failing_once(now: float) -> None:
        calls.append(now)
        if len(calls) == 1:
            raise OverflowError("a term that does not encode")
        handle_timer(now)

    mesh.core.handle_timer = failing_once  # type: ignore[method-assign]
    task = asyncio.create_task(mesh.run())
    try:
        # alone, it elects itself once its election timer runs (the second time)
        await async_wait_until(lambda: mesh.core.coordinator_id == "a" or task.done(), 30, "a coordinator")
        assert not task.done() and len(calls) >= 2
        assert "a timer of the mesh failed" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
