"""Federated fine-tuning in a mesh (docs/fine-tuning.md): in-memory nodes with real runtimes,
real training and the real wire (every message is encoded and decoded on the way).

Each node brings its own examples: a made-up fact in a fixed answer format. What a user sees
is checked: the job ends on every participant, the loss on each node's own examples falls,
the participants and the nodes that accept adapters serve the same adapter afterwards
(answers equal one node serving it) while a node that took no part keeps the base model in a
mesh of its own, a node lost mid-round does not stop the round, a coordinator lost mid-round
does not end the job, a huge update is refused, and nothing but counts, a loss figure and
adapter tensors leaves a node.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from meshllm import wire
from meshllm.model.adapter import adapter_shapes, load_adapter
from meshllm.model.engine import Engine
from meshllm.model.cache import prepare
from meshllm.model.shape import load_config
from meshllm.model.source import resolve
from meshllm.model.sampling import SamplingParams
from meshllm.mesh.session import Token
from meshllm.tune.rounds import TuneSettings

from daemon.node.driver import MeshDriver
from daemon.node.tune import TuneRequest, last_adapter
from tests.mesh.memnet import MemoryNet, memory_net
from tests.waiting import async_wait_until

FACTS = {
    "a": ("Zorbia", "Blip"),
    "b": ("Quandor", "Vask"),
    "c": ("Mirelle", "Tund"),
}
QUESTIONS = ("What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
             "Tell me the capital of {}.")


def chats(fact: str) -> list[list[dict[str, str]]]:
    country, city = FACTS[fact]
    return [[{"role": "user", "content": q.format(country)}, {"role": "assistant", "content": f"Answer: {city}."}]
            for q in QUESTIONS]


async def run_job(mesh: MeshDriver, request: TuneRequest, data: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    events = []
    stream: AsyncIterator[dict[str, Any]] = mesh.tune.run(request, data)
    async for event in stream:
        events.append(event)
    return events


def done(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events and events[-1]["type"] == "done", events[-3:]
    return events[-1]


async def start(net: MemoryNet, model: Path, ids: list[str], tmp_path: Path,
                settings: dict[str, TuneSettings] | None = None) -> None:
    for nid in ids:
        await net.add(nid, model, state_dir=tmp_path / nid, tune_settings=(settings or {}).get(nid))
    net.connect_all()
    await net.wait_active()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_two_nodes_tune_together_and_the_nodes_that_want_it_serve_the_adapter(
        tiny_llama: Path, tmp_path: Path) -> None:
    async with memory_net() as net:
        # n3 takes no part but accepts adapters: it serves the result; n4 neither: it keeps the base model
        await start(net, tiny_llama, ["n1", "n2", "n3", "n4"], tmp_path,
                    settings={"n3": TuneSettings(accept_adapters=True)})
        base_id = net.meshes["n4"].hello.model_id
        net.record = []
        request = TuneRequest(rounds=3, rank=4, alpha=8.0, steps=6)
        a, b = await asyncio.wait_for(asyncio.gather(run_job(net.meshes["n1"], request, chats("a")),
                                                     run_job(net.meshes["n2"], request, chats("b"))), 300)
        sent, net.record = net.record, None
        ra, rb = done(a), done(b)
        assert ra["loss"] < ra["base_loss"] and rb["loss"] < rb["base_loss"]
        assert ra["digest"] == rb["digest"] and ra["rounds"] == 3 and ra["participants"] == 2
        rounds_seen = [e["round"] for e in a if e["type"] == "progress" and e["state"] == "round_done"]
        assert rounds_seen == [1, 2, 3]

        # every member that wanted it saved the same adapter (only its user can read it) and serves
        # it: the model id carries its digest
        prepared = prepare(resolve(tiny_llama))
        for nid in ("n1", "n2", "n3"):
            folder = last_adapter(tmp_path / nid)
            assert folder is not None and folder.name == ra["digest"]
            await async_wait_until(lambda: net.meshes[nid].runtime.engine.info.model_id.endswith(ra["digest"]),
                                   30, f"{nid} serves the adapter")
            assert mode(folder) == mode(folder.parent) == 0o700
            assert {mode(f) for f in folder.parent.rglob("*") if f.is_file()} == {0o600}
        adapter = load_adapter(last_adapter(tmp_path / "n3"), load_config(prepared))
        assert net.meshes["n3"].status_view()["tune"]["last_finished"]["adapter"] == ra["digest"]

        # n4 took no part: it keeps serving the base model, saved nothing, and left the others' mesh
        assert last_adapter(tmp_path / "n4") is None and net.meshes["n4"].hello.model_id == base_id
        assert net.meshes["n4"].status_view()["tune"]["last_finished"]["served"] is False
        await async_wait_until(lambda: not net.links["n4"].connected and "n4" not in net.links["n1"].connected, 30,
                               "n4 closed its links to the nodes serving the adapter")
        assert set(net.links["n1"].connected) == {"n2", "n3"}
        await net.wait_active(nodes=["n1", "n2", "n3"])
        await net.wait_active(nodes=["n4"])

        # answers from the mesh equal one node serving the same adapter
        prompt = net.meshes["n3"].runtime.engine.chat_prompt(chats("a")[0][:1])
        params = SamplingParams(max_tokens=8)
        mesh_tokens = [t.id async for t in net.meshes["n3"].generate(prompt, params) if isinstance(t, Token)]
        alone = Engine(prepared, adapter=adapter)
        assert mesh_tokens == [t.id for t in alone.generate(prompt, params) if isinstance(t, Token)]
        base = Engine(prepared)
        base_tokens = [t.id for t in base.generate(prompt, params) if isinstance(t, Token)]
        assert mesh_tokens != base_tokens
        assert [t.id async for t in net.meshes["n4"].generate(prompt, params) if isinstance(t, Token)] == base_tokens

        # what crossed the mesh: only tune messages carried tensors, and only the adapter's
        shapes = adapter_shapes(load_config(prepared), adapter.spec)
        kinds = {type(m).__name__ for _s, _r, m in sent}
        assert not kinds & {"Forward", "Rebuild", "CacheHandover", "Result"}, kinds
        texts = {turn["content"] for fact in ("a", "b") for chat in chats(fact) for turn in chat}
        for _sender, _receiver, msg in sent:
            encoded = wire.encode(msg)
            assert not any(text.encode() in encoded for text in texts)
            if isinstance(msg, wire.TuneTensors):
                assert set(msg.names) <= set(shapes)
                for name, tensor in zip(msg.names, msg.tensors):
                    assert tuple(tensor.shape) == tuple(shapes[name])
        assert any(isinstance(m, wire.TuneTensors) for _s, _r, m in sent)


async def test_a_participant_lost_mid_round_does_not_stop_the_round(tiny_llama: Path, tmp_path: Path) -> None:
    async with memory_net() as net:
        await start(net, tiny_llama, ["n1", "n2", "n3"], tmp_path)
        request = TuneRequest(rounds=2, rank=4, alpha=8.0, steps=4)
        jobs = {nid: asyncio.create_task(run_job(net.meshes[nid], request, chats(f)))
                for nid, f in (("n1", "a"), ("n2", "b"), ("n3", "c"))}
        coordinator = net.meshes["n1"].core.coordinator_id
        victim = next(nid for nid in ("n3", "n2") if nid != coordinator)
        await async_wait_until(lambda: net.meshes[victim].tune.core.status_view().get("round") == 1, 120,
                               f"{victim} is in round 1")
        jobs.pop(victim).cancel()
        await net.kill(victim)
        results = await asyncio.wait_for(asyncio.gather(*jobs.values()), 300)
        for events in results:
            result = done(events)
            assert result["rounds"] == 2 and result["participants"] == 2


async def test_a_tune_job_survives_losing_its_coordinator(tiny_llama: Path, tmp_path: Path) -> None:
    """The coordinator is killed mid-round: the mesh elects one of the two other participants,
    which takes the job over at that round (same job id) and finishes it."""
    async with memory_net() as net:
        await start(net, tiny_llama, ["n1", "n2", "n3"], tmp_path)
        request = TuneRequest(rounds=2, rank=4, alpha=8.0, steps=4)
        jobs = {nid: asyncio.create_task(run_job(net.meshes[nid], request, chats(f)))
                for nid, f in (("n1", "a"), ("n2", "b"), ("n3", "c"))}
        coordinator = net.meshes["n1"].core.coordinator_id
        assert coordinator is not None
        rest = [nid for nid in ("n1", "n2", "n3") if nid != coordinator]
        await async_wait_until(
            lambda: all(net.meshes[nid].tune.core.status_view().get("state") == "training" for nid in rest), 120,
            "the others train round 1")
        job_id = net.meshes[rest[0]].tune.core.status_view()["job_id"]
        jobs.pop(coordinator).cancel()
        await net.kill(coordinator)
        results = await asyncio.wait_for(asyncio.gather(*jobs.values()), 300)
        for events in results:
            result = done(events)
            assert result["rounds"] == 2 and result["participants"] == 2 and result["job_id"] == job_id
        assert done(results[0])["digest"] == done(results[1])["digest"]


async def test_a_huge_update_is_refused_and_the_adapter_still_helps(tiny_llama: Path, tmp_path: Path) -> None:
    async with memory_net() as net:
        await start(net, tiny_llama, ["n1", "n2"], tmp_path,
                    settings={"n2": TuneSettings(debug_update_scale=1e9)})
        logs: list[str] = []
        net.meshes["n1"]._log_event = lambda kind, message: logs.append(message)
        net.meshes["n2"]._log_event = lambda kind, message: logs.append(message)
        request = TuneRequest(rounds=2, rank=4, alpha=8.0, steps=6)
        a, b = await asyncio.wait_for(asyncio.gather(run_job(net.meshes["n1"], request, chats("a")),
                                                     run_job(net.meshes["n2"], request, chats("b"))), 300)
        assert any("refused" in line and "norm" in line for line in logs), logs
        honest = done(a)
        assert honest["loss"] < honest["base_loss"]
        adapter = load_adapter(last_adapter(tmp_path / "n1"))
        assert all(np.abs(t).max() < 100 for t in adapter.tensors.values())
