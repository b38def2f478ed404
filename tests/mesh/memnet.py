"""An in-memory network of `Mesh` nodes in one event loop: the mesh logic without WebRTC.

Every message is encoded and decoded on the way, so the wire format is exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from meshllm import wire
from meshllm.placement.linkstats import LinkStats
from meshllm.model.cache import prepare
from meshllm.model.runtime import Runtime
from meshllm.model.source import resolve
from meshllm.tune.rounds import TuneSettings

from daemon.net.links import LinkError
from daemon.node.driver import MeshDriver, MeshSettings
from daemon.node.worker import GenerationWorker
from tests.waiting import async_wait_until


class MemoryLinks:
    def __init__(self, net: "MemoryNet", node_id: str) -> None:
        self.net = net
        self.node_id = node_id
        self.connected: dict[str, wire.Hello] = {}

    async def send(self, peer_id: str, msg: wire.Message, *, channel: str = "control") -> int:
        if peer_id not in self.connected:
            raise LinkError(f"no link to {peer_id}", peer_id)
        data = wire.encode(msg)
        decoded = wire.decode(data)
        if self.net.record is not None:
            self.net.record.append((self.node_id, peer_id, decoded))
        if isinstance(decoded, wire.Bye):  # as LinkManager does: a Bye closes the link on both sides
            asyncio.get_running_loop().call_soon(self.net.disconnect, self.node_id, peer_id, "bye")
            return len(data)
        target = self.net.meshes[peer_id]
        asyncio.get_running_loop().call_soon(target.on_message, self.node_id, decoded)
        return len(data)

    def peers(self) -> dict[str, wire.Hello]:
        return dict(self.connected)

    def rtt_ms(self, peer_id: str) -> float | None:
        return 0.1 if peer_id in self.connected else None

    def link_stats(self, peer_id: str) -> LinkStats | None:
        return None  # in memory there is no link to measure


class MemoryNet:
    def __init__(self) -> None:
        self.meshes: dict[str, MeshDriver] = {}
        self.links: dict[str, MemoryLinks] = {}
        self.workers: dict[str, GenerationWorker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.record: list[tuple[str, str, wire.Message]] | None = None
        """When a list: every message sent from now on, as (sender, receiver, message)."""

    async def add(self, node_id: str, model: Path, *, mem_budget_bytes: int = 10**9,
                  ms_per_layer: float = 1.0, settings: MeshSettings | None = None,
                  state_dir: Path | None = None, tune_settings: TuneSettings | None = None,
                  private_layers: int = 0, weights: str = "f32", speculate: str = "auto",
                  draft_model: Path | None = None, draft_weights: str = "auto") -> MeshDriver:
        worker = GenerationWorker(1, name=f"worker-{node_id}")
        worker.start()
        prepared = prepare(resolve(model))
        runtime = await worker.call(lambda: Runtime.load(prepared, weights=weights,
                                                                 private_layers=private_layers))
        if draft_model is not None:
            from meshllm.model.draft import DraftModel

            runtime.draft = await worker.call(lambda: DraftModel.load(
                draft_model, served_tokenizer=runtime.engine.tokenizer, weights=draft_weights))
        hello = wire.Hello(node_id, node_id, wire.PROTOCOL_VERSION, "test", prepared.model_id, 8000,
                           mem_budget_bytes, ms_per_layer, True)
        links = MemoryLinks(self, node_id)
        if private_layers or weights != "f32":
            hello = dataclasses.replace(hello, model_id=runtime.mesh_model_id)
        mesh = MeshDriver(hello, runtime, worker, links,
                          settings=settings or MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0),
                          state_dir=state_dir, tune_settings=tune_settings or TuneSettings(), speculate=speculate)
        self.meshes[node_id], self.links[node_id], self.workers[node_id] = mesh, links, worker
        self.tasks[node_id] = asyncio.get_running_loop().create_task(mesh.run())
        return mesh

    def connect(self, a: str, b: str) -> None:
        ha, hb = self.meshes[a].hello, self.meshes[b].hello
        self.links[a].connected[b] = hb
        self.links[b].connected[a] = ha
        self.meshes[a].on_link_up(b, hb)
        self.meshes[b].on_link_up(a, ha)

    def disconnect(self, a: str, b: str, reason: str = "heartbeat timeout") -> None:
        self.links[a].connected.pop(b, None)
        self.links[b].connected.pop(a, None)
        self.meshes[a].on_link_down(b, reason)
        self.meshes[b].on_link_down(a, reason)

    def connect_all(self) -> None:
        ids = sorted(self.meshes)
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                self.connect(a, b)

    async def kill(self, node_id: str) -> None:
        """The node vanishes: every peer sees its links go down."""
        for peer in list(self.links[node_id].connected):
            self.links[peer].connected.pop(node_id, None)
            self.meshes[peer].on_link_down(node_id, "heartbeat timeout")
        self.links[node_id].connected.clear()
        self.tasks[node_id].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.tasks[node_id]
        self.workers[node_id].stop()
        del self.meshes[node_id]

    async def close(self) -> None:
        for nid in list(self.meshes):
            self.tasks[nid].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.tasks[nid]
            self.workers[nid].stop()

    async def wait_active(self, timeout_s: float = 20.0, nodes: list[str] | None = None) -> None:
        """Until every node (or the given ones) has the same active plan."""
        def keys() -> set[object]:
            chosen = [self.meshes[n] for n in nodes] if nodes else list(self.meshes.values())
            return {m.core.book.active.key if m.core.book.active else None for m in chosen}

        await async_wait_until(lambda: None not in keys() and len(keys()) == 1, timeout_s,
                               "one active plan on every node", interval_s=0.02)


@contextlib.asynccontextmanager
async def memory_net() -> AsyncIterator[MemoryNet]:
    net = MemoryNet()
    try:
        yield net
    finally:
        await net.close()
