"""The mesh driver over an in-memory network, with the real model: exact answers.

The mesh logic's scenarios (partitions, lost stages and coordinators, leaves, memory,
late joiners, balancing) run as pure tests, one file per role of the core:
tests/unit/test_mesh_{transition,coordinator,stage,entry,status,core}.py; these check the
driver, the worker and the model together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.node.driver import MeshSettings, MeshUnavailable
from meshllm.model.sampling import SamplingParams
from meshllm.mesh.session import Token
from tests.mesh.memnet import memory_net
from tests.waiting import async_wait_until
from tests.tinymodel import PROMPTS, reference_greedy

GREEDY_32 = SamplingParams(max_tokens=32)


async def answer(mesh, prompt: list[int], params: SamplingParams = GREEDY_32) -> list[int]:  # type: ignore[no-untyped-def]
    return [t.id async for t in mesh.generate(prompt, params) if isinstance(t, Token)]


async def test_three_nodes_elect_one_coordinator_and_answer_exactly(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid, speed in (("a", 1.0), ("b", 1.0), ("c", 1.0)):
            await net.add(nid, tiny_llama, ms_per_layer=speed)
        net.connect_all()
        await net.wait_active()
        coordinators = {m.core.coordinator_id for m in net.meshes.values()}
        assert len(coordinators) == 1
        plan = net.meshes["a"].core.book.active
        assert plan is not None
        assert plan.stages[0].start_layer == 0 and plan.stages[-1].end_layer == 6
        for messages in PROMPTS[:3]:
            prompt = net.meshes["a"].runtime.engine.chat_prompt(messages)
            want = reference_greedy(tiny_llama, prompt, 32)
            for nid in ("a", "b", "c"):
                assert await answer(net.meshes[nid], prompt) == want


async def test_concurrent_sessions_from_two_entry_nodes(tiny_qwen2: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_qwen2)
        net.connect_all()
        await net.wait_active()
        eng = net.meshes["a"].runtime.engine
        p1, p2 = eng.chat_prompt(PROMPTS[0]), eng.chat_prompt(PROMPTS[3])
        got1, got2 = await asyncio.gather(answer(net.meshes["a"], p1), answer(net.meshes["c"], p2))
        assert got1 == reference_greedy(tiny_qwen2, p1, 32)
        assert got2 == reference_greedy(tiny_qwen2, p2, 32)


async def test_a_stage_lost_mid_answer_is_replanned_and_the_answer_is_unchanged(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        eng = net.meshes["a"].runtime.engine
        prompt = eng.chat_prompt(PROMPTS[1])
        want = reference_greedy(tiny_llama, prompt, 48)
        victim = next(n for n in ("b", "c") if n != net.meshes["a"].core.coordinator_id)
        got: list[int] = []
        states: list[str] = []
        async for item in net.meshes["a"].generate(prompt, SamplingParams(max_tokens=48)):
            if isinstance(item, Token):
                got.append(item.id)
                if len(got) == 10:
                    await net.kill(victim)
            else:
                states.append(item.state)
        assert got == want
        assert "replanning" in states and states[-1] == "running"
        plan = net.meshes["a"].core.book.active
        assert plan is not None and victim not in plan.node_ids


async def test_a_single_node_is_a_mesh_of_one(tiny_mistral: Path) -> None:
    async with memory_net() as net:
        mesh = await net.add("solo", tiny_mistral)
        await net.wait_active()
        assert mesh.core.coordinator_id == "solo"
        prompt = mesh.runtime.engine.chat_prompt(PROMPTS[4])
        assert await answer(mesh, prompt) == reference_greedy(tiny_mistral, prompt, 32)


async def test_a_seeded_sampled_answer_is_reproducible_across_a_lost_stage(tiny_llama: Path) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=40)
    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[2])
        undisturbed = await answer(net.meshes["a"], prompt, params)
        victim = next(n for n in ("b", "c") if n != net.meshes["a"].core.coordinator_id)
        got: list[int] = []
        async for item in net.meshes["a"].generate(prompt, params):
            if isinstance(item, Token):
                got.append(item.id)
                if len(got) == 12:
                    await net.kill(victim)
        assert got == undisturbed


async def test_bad_tensors_from_a_peer_are_refused_and_the_mesh_carries_on(tiny_llama: Path) -> None:
    import numpy as np

    from meshllm import wire

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        plan = net.meshes["a"].core.book.active
        assert plan is not None
        # from the stage before it, for an answer of its own: in its role, with bad tensors
        stage, sender = plan.node_ids[1], plan.node_ids[0]
        route = plan.node_ids[2:] + (sender,)
        seen: list[wire.Message] = []
        original = net.meshes[sender].on_message
        net.meshes[sender].on_message = lambda peer, msg: (seen.append(msg), original(peer, msg))  # type: ignore[method-assign]
        term, epoch = plan.key
        bad = [
            np.zeros((1, 32), np.float32),  # wrong hidden size
            np.zeros((3, 64, 2), np.float32),  # wrong rank
        ]
        for i, hidden in enumerate(bad):
            fwd = wire.Forward(f"{sender}/{900 + i}", 0, term, epoch, 0, wire.encode_tensor(hidden, "f32"), route)
            await net.links[sender].send(stage, fwd, channel="activation")
        wrong_codec = wire.Forward(f"{sender}/909", 0, term, epoch, 0,
                                   wire.encode_tensor(np.zeros((1, 64), np.float32), "f16"), route)
        await net.links[sender].send(stage, wrong_codec, channel="activation")
        def refusals() -> list[wire.StepFailed]:
            return [m for m in seen if isinstance(m, wire.StepFailed)]

        await async_wait_until(lambda: len(refusals()) >= 3, 10, "three refusals", interval_s=0.02)
        failed = refusals()
        assert len(failed) == 3 and all(m.code == "bad_step" for m in failed)
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        assert await answer(net.meshes["a"], prompt) == reference_greedy(tiny_llama, prompt, 32)


async def test_a_newcomer_left_out_of_the_plan_still_learns_it_and_can_ask(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        key = net.meshes["a"].core.book.active.key  # type: ignore[union-attr]
        await net.add("z", tiny_llama, mem_budget_bytes=0)  # holds no layers: the plan stays as it is
        net.connect("a", "z")
        net.connect("b", "z")
        await net.wait_active()
        assert net.meshes["z"].core.book.active.key == key  # type: ignore[union-attr]
        prompt = net.meshes["z"].runtime.engine.chat_prompt(PROMPTS[3])
        assert await answer(net.meshes["z"], prompt) == reference_greedy(tiny_llama, prompt, 32)


async def test_a_stage_that_always_fails_ends_the_request_with_an_error_not_a_hang(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        plan = net.meshes["a"].core.book.active
        assert plan is not None
        broken = net.meshes[plan.node_ids[-1]]

        def refuse(session_id: str, hidden, start_pos: int):  # type: ignore[no-untyped-def]
            raise ValueError("this stage is broken")

        broken.runtime.shard.forward = refuse  # type: ignore[method-assign]
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        with pytest.raises(MeshUnavailable, match="keep failing"):
            await asyncio.wait_for(answer(net.meshes["a"], prompt), 30)
