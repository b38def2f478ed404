"""The mesh logic over an in-memory network: one coordinator, one plan, exact answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.mesh import MeshSettings, MeshUnavailable
from meshllm.model.sampling import SamplingParams
from meshllm.session import Token
from tests.mesh.memnet import memory_net
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
        coordinators = {m.election.coordinator_id for m in net.meshes.values()}
        assert len(coordinators) == 1
        plan = net.meshes["a"].book.active
        assert plan is not None
        assert plan.stages[0][1] == 0 and plan.stages[-1][2] == 6
        assert len(plan.stages) == 3  # throughput objective: every node takes a share
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
        victim = next(n for n in ("b", "c") if n != net.meshes["a"].election.coordinator_id)
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
        plan = net.meshes["a"].book.active
        assert plan is not None and victim not in plan.node_ids


async def test_a_single_node_is_a_mesh_of_one(tiny_mistral: Path) -> None:
    async with memory_net() as net:
        mesh = await net.add("solo", tiny_mistral)
        await net.wait_active()
        assert mesh.election.coordinator_id == "solo"
        prompt = mesh.runtime.engine.chat_prompt(PROMPTS[4])
        assert await answer(mesh, prompt) == reference_greedy(tiny_mistral, prompt, 32)


async def test_a_partition_that_heals_leaves_one_coordinator_and_one_plan(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b", "c", "d"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        for x in ("a", "b"):
            for y in ("c", "d"):
                net.disconnect(x, y)
        await net.wait_active(nodes=["a", "b"])
        await net.wait_active(nodes=["c", "d"])
        sides = {net.meshes["a"].election.coordinator_id, net.meshes["c"].election.coordinator_id}
        assert len(sides) == 2  # each side elected its own coordinator and serves alone
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        want = reference_greedy(tiny_llama, prompt, 32)
        assert await answer(net.meshes["a"], prompt) == want
        assert await answer(net.meshes["d"], prompt) == want
        for x in ("a", "b"):
            for y in ("c", "d"):
                net.connect(x, y)
        await net.wait_active()
        for _ in range(100):  # let the election settle after the heal
            coords = {m.election.coordinator_id for m in net.meshes.values()}
            terms = {m.election.term for m in net.meshes.values()}
            if len(coords) == 1 and len(terms) == 1:
                break
            await asyncio.sleep(0.05)
        await net.wait_active()
        coords = {m.election.coordinator_id for m in net.meshes.values()}
        terms = {m.election.term for m in net.meshes.values()}
        assert len(coords) == 1 and len(terms) == 1
        winner = net.meshes[coords.pop()]
        assert winner.election.term == max(terms)
        plans = {m.book.active.key for m in net.meshes.values() if m.book.active}
        assert len(plans) == 1
        assert await answer(net.meshes["b"], prompt) == want


async def test_too_little_memory_fails_fast_with_the_shortfall_then_recovers(tiny_llama: Path) -> None:
    async with memory_net() as net:
        first = await net.add("a", tiny_llama)
        shape = first.runtime.engine.shape
        budget = shape.embed_head_bytes + 2 * shape.layer_bytes  # two of the six layers each
        await net.kill("a")
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, mem_budget_bytes=budget)
        net.connect_all()
        await net.wait_active()
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        want = reference_greedy(tiny_llama, prompt, 16)
        victim = next(n for n in ("b", "c") if n != net.meshes["a"].election.coordinator_id)
        await net.kill(victim)
        with pytest.raises(MeshUnavailable, match=r"bytes"):
            await asyncio.wait_for(answer(net.meshes["a"], prompt, SamplingParams(max_tokens=16)), 10)
        await net.add("d", tiny_llama, mem_budget_bytes=budget)
        for other in list(net.meshes):
            if other != "d":
                net.connect(other, "d")
        await net.wait_active()
        assert await answer(net.meshes["a"], prompt, SamplingParams(max_tokens=16)) == want


async def test_a_seeded_sampled_answer_is_reproducible_across_a_lost_stage(tiny_llama: Path) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=40)
    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[2])
        undisturbed = await answer(net.meshes["a"], prompt, params)
        victim = next(n for n in ("b", "c") if n != net.meshes["a"].election.coordinator_id)
        got: list[int] = []
        async for item in net.meshes["a"].generate(prompt, params):
            if isinstance(item, Token):
                got.append(item.id)
                if len(got) == 12:
                    await net.kill(victim)
        assert got == undisturbed


async def test_a_stage_that_turns_slow_is_given_fewer_layers(tiny_llama: Path) -> None:
    from meshllm.balance import BalanceSettings

    fast = BalanceSettings(min_reports=3, min_drift_s=0.3, min_interval_s=0.5, min_steps=3)

    def settings(delay_s: float) -> MeshSettings:
        return MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0, report_interval_s=0.1,
                            balance=fast, debug_delay_s=delay_s)

    async with memory_net() as net:
        await net.add("a", tiny_llama, settings=settings(0.0))
        await net.add("b", tiny_llama, settings=settings(0.02))  # busy: 20 ms more per step
        await net.add("c", tiny_llama, settings=settings(0.0))
        net.connect_all()
        await net.wait_active()
        before = net.meshes["a"].book.active
        assert before is not None
        layers_before = dict((n, e - s) for n, s, e in before.stages)
        assert layers_before.get("b", 0) == 2
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        want = reference_greedy(tiny_llama, prompt, 200)
        got = await answer(net.meshes["a"], prompt, SamplingParams(max_tokens=200))
        assert got == want  # re-planned mid-answer, and still exact
        after = net.meshes["a"].book.active
        assert after is not None and after.key != before.key
        layers_after = dict((n, e - s) for n, s, e in after.stages)
        assert layers_after.get("b", 0) < 2


async def test_bad_tensors_from_a_peer_are_refused_and_the_mesh_carries_on(tiny_llama: Path) -> None:
    import numpy as np

    from meshllm import wire

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        plan = net.meshes["a"].book.active
        assert plan is not None
        stage = plan.node_ids[1]
        sender = next(n for n in ("a", "b", "c") if n != stage)
        seen: list[wire.Message] = []
        original = net.meshes[sender].on_message
        net.meshes[sender].on_message = lambda peer, msg: (seen.append(msg), original(peer, msg))  # type: ignore[method-assign]
        term, epoch = plan.key
        bad = [
            np.zeros((1, 32), np.float32),  # wrong hidden size
            np.zeros((3, 64, 2), np.float32),  # wrong rank
        ]
        for i, hidden in enumerate(bad):
            fwd = wire.Forward(f"{sender}/bad{i}", 0, term, epoch, 0, wire.encode_tensor(hidden, "f32"), (sender,))
            await net.links[sender].send(stage, fwd, channel="activation")
        wrong_codec = wire.Forward(f"{sender}/bad9", 0, term, epoch, 0,
                                   wire.encode_tensor(np.zeros((1, 64), np.float32), "f16"), (sender,))
        await net.links[sender].send(stage, wrong_codec, channel="activation")
        for _ in range(100):
            if len([m for m in seen if isinstance(m, wire.StepFailed)]) >= 3:
                break
            await asyncio.sleep(0.02)
        failed = [m for m in seen if isinstance(m, wire.StepFailed)]
        assert len(failed) == 3 and all(m.code == "bad_step" for m in failed)
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        assert await answer(net.meshes["a"], prompt) == reference_greedy(tiny_llama, prompt, 32)


async def test_a_newcomer_left_out_of_the_plan_still_learns_it_and_can_ask(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        key = net.meshes["a"].book.active.key  # type: ignore[union-attr]
        await net.add("z", tiny_llama, mem_budget_bytes=0)  # holds no layers: the plan stays as it is
        net.connect("a", "z")
        net.connect("b", "z")
        await net.wait_active()
        assert net.meshes["z"].book.active.key == key  # type: ignore[union-attr]
        prompt = net.meshes["z"].runtime.engine.chat_prompt(PROMPTS[3])
        assert await answer(net.meshes["z"], prompt) == reference_greedy(tiny_llama, prompt, 32)


async def test_a_stage_that_always_fails_ends_the_request_with_an_error_not_a_hang(tiny_llama: Path) -> None:
    async with memory_net() as net:
        for nid in ("a", "b"):
            await net.add(nid, tiny_llama)
        net.connect_all()
        await net.wait_active()
        plan = net.meshes["a"].book.active
        assert plan is not None
        broken = net.meshes[plan.node_ids[-1]]

        def refuse(session_id: str, hidden, start_pos: int):  # type: ignore[no-untyped-def]
            raise ValueError("this stage is broken")

        broken.runtime.forward = refuse  # type: ignore[method-assign]
        prompt = net.meshes["a"].runtime.engine.chat_prompt(PROMPTS[0])
        with pytest.raises(MeshUnavailable, match="keep failing"):
            await asyncio.wait_for(answer(net.meshes["a"], prompt), 30)
