"""Many answers at once (issue 21): the same prompts alone and as concurrent requests, on one
node and on a 3-node mesh, give the same tokens, in every weight format; and the steps of
concurrent answers really ran batched (`/v1/status`'s "compute")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshllm.mesh.session import PREFILL_CHUNK_POSITIONS, Token
from meshllm.model.sampling import SamplingParams
from tests.mesh.memnet import memory_net
from tests.tinymodel import PROMPTS, reference_greedy

TOKENS = 24


def six_prompts(engine) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Six conversations; two of them longer than a few prompt chunks, so chunks of one prompt
    run beside the decode steps of the others."""
    text = " ".join(m["content"] for p in PROMPTS for m in p)
    long = engine.chat_prompt([{"role": "user", "content": text + " " + text}])
    assert len(long) > 7 * PREFILL_CHUNK_POSITIONS
    short = [engine.chat_prompt(PROMPTS[i]) for i in (0, 2, 3, 6)]
    # within the tiny models' context window, with room for the answer
    return [short[0], long[:7 * PREFILL_CHUNK_POSITIONS - 3], short[1], short[2],
            long[-(3 * PREFILL_CHUNK_POSITIONS + 5):], short[3]]


async def answer(mesh, prompt: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    return [t.id async for t in mesh.generate(prompt, SamplingParams(max_tokens=TOKENS)) if isinstance(t, Token)]


@pytest.mark.parametrize("weights", ["int4", "int8", "f16"])
async def test_six_concurrent_answers_equal_their_answers_alone_on_one_node_and_a_mesh(
        tiny_llama: Path, weights: str) -> None:
    async with memory_net() as net:
        alone = await net.add("solo", tiny_llama, weights=weights)
        await net.wait_active(nodes=["solo"])
        assert alone.runtime.batch_invariant
        prompts = six_prompts(alone.runtime.engine)
        want = [await answer(alone, p) for p in prompts]  # one at a time: nothing to batch with
        assert alone.status_view()["compute"]["largest_batch"] == 1  # type: ignore[index]

        together = await asyncio.gather(*(answer(alone, p) for p in prompts))
        assert together == want
        compute = alone.status_view()["compute"]
        assert compute["largest_batch"] > 1 and compute["batched_steps"] > 0  # type: ignore[index]

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights=weights, private_layers=1)
        net.connect_all()
        await net.wait_active()
        entries = [net.meshes[nid] for nid in ("a", "b", "c", "a", "b", "c")]
        got = await asyncio.gather(*(answer(mesh, p) for mesh, p in zip(entries, prompts)))
        assert got == want
        assert any(m.status_view()["compute"]["largest_batch"] > 1 for m in net.meshes.values())  # type: ignore[index]


async def test_concurrent_f32_answers_are_transformers_generate(tiny_qwen2: Path) -> None:
    """f32 runs one step at a time (transformers' GEMMs are not batch-invariant): concurrent
    answers still interleave, and each is plain `generate`."""
    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_qwen2)
        net.connect_all()
        await net.wait_active()
        prompts = six_prompts(net.meshes["a"].runtime.engine)
        entries = [net.meshes[nid] for nid in ("a", "b", "c", "a", "b", "c")]
        got = await asyncio.gather(*(answer(mesh, p) for mesh, p in zip(entries, prompts)))
        assert got == [reference_greedy(tiny_qwen2, p, TOKENS) for p in prompts]
        assert all(m.status_view()["compute"]["largest_batch"] == 1 for m in net.meshes.values())  # type: ignore[index]


async def test_a_stage_lost_with_four_answers_in_flight_all_four_finish_unchanged(tiny_llama: Path) -> None:
    """Recovery under load: a middle stage dies while 4 answers decode; the 4 answers finish,
    each token for token what it is alone (one node, same format)."""
    async with memory_net() as net:
        alone = await net.add("solo", tiny_llama, weights="int4")
        await net.wait_active(nodes=["solo"])
        prompts = six_prompts(alone.runtime.engine)[:4]
        want = [await answer(alone, p) for p in prompts]

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights="int4", private_layers=1)
        net.connect_all()
        await net.wait_active()
        entry = net.meshes["a"]
        victim = next(n for n in ("b", "c") if n != entry.core.coordinator_id)
        killed = asyncio.Event()

        async def streamed(prompt: list[int], first: bool) -> tuple[list[int], list[str]]:
            got: list[int] = []
            states: list[str] = []
            async for item in entry.generate(prompt, SamplingParams(max_tokens=TOKENS)):
                if isinstance(item, Token):
                    got.append(item.id)
                    if first and len(got) == 8 and not killed.is_set():
                        killed.set()
                        await net.kill(victim)
                else:
                    states.append(item.state)
            return got, states

        results = await asyncio.gather(*(streamed(p, i == 0) for i, p in enumerate(prompts)))
        assert killed.is_set()
        assert [got for got, _ in results] == want
        assert any("replanning" in states for _, states in results)
        plan = entry.core.book.active
        assert plan is not None and victim not in plan.node_ids
