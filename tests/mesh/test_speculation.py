"""Speculative decoding (issue 22): answers that draft give the same tokens as answers that do
not, on one node and on a mesh, also across a lost stage; f32 never drafts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshllm.mesh.session import Token
from meshllm.model.sampling import SamplingParams
from tests.mesh.memnet import memory_net
from tests.tinymodel import PROMPTS, reference_greedy

TOKENS = 40


def prompts(engine) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Conversations whose answers may copy from the prompt (and tiny random models loop: their
    own answers repeat, which prompt lookup drafts well)."""
    quote = "Repeat this exactly: " + " ".join(m["content"] for m in PROMPTS[6]) * 2
    return [engine.chat_prompt(p) for p in (PROMPTS[0], [{"role": "user", "content": quote}], PROMPTS[3],
                                            PROMPTS[1], PROMPTS[4], PROMPTS[5])]


async def answer(mesh, prompt: list[int], params: SamplingParams | None = None  # type: ignore[no-untyped-def]
                 ) -> tuple[list[int], tuple[int, int, int] | None]:
    """The answer's tokens and its drafting; it must run undisturbed (a verify step that its
    stages could not take would be lost, and the answer only saved by a rebuild)."""
    ids: list[int] = []
    drafting = None
    async for t in mesh.generate(prompt, params or SamplingParams(max_tokens=TOKENS)):
        if isinstance(t, Token):
            ids.append(t.id)
            drafting = t.speculation or drafting
        else:
            raise AssertionError(f"the answer was disturbed: {t.state}")
    return ids, drafting


@pytest.mark.parametrize("weights", ["int4", "int8", "f16"])
async def test_answers_that_draft_equal_answers_that_do_not_on_one_node_and_a_mesh(
        tiny_llama: Path, weights: str) -> None:
    async with memory_net() as net:
        plain = await net.add("plain", tiny_llama, weights=weights, speculate="off")
        await net.wait_active(nodes=["plain"])
        asks = prompts(plain.runtime.engine)
        want = [(await answer(plain, p))[0] for p in asks]

    for mode in ("ngram", "auto"):
        async with memory_net() as net:
            solo = await net.add("solo", tiny_llama, weights=weights, speculate=mode)
            await net.wait_active(nodes=["solo"])
            got = [await answer(solo, p) for p in asks]
            assert [ids for ids, _ in got] == want
            if mode == "ngram":  # it drafted (a random model's drafts seldom stand, and auto waits
                # for a 2-token match: the default model's test below has drafts stand)
                assert any(d is not None and d[2] > 0 for _, d in got)

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights=weights, private_layers=1, speculate="ngram")
        net.connect_all()
        await net.wait_active()
        entries = [net.meshes[n] for n in ("a", "b", "c", "a", "b", "c")]
        got = await asyncio.gather(*(answer(m, p) for m, p in zip(entries, asks)))
        assert [ids for ids, _ in got] == want


QUOTE = ("Repeat the following paragraph exactly, word for word: A mesh of ordinary devices can run one "
         "language model together. Each device holds some of the decoder layers, and the activations "
         "stream between them over encrypted links.")


async def test_the_default_model_accepts_drafts_and_answers_the_same_on_one_node_and_a_mesh() -> None:
    """With a real model, prompt lookup's drafts stand (several tokens a trip) and the answer
    is token for token the one without speculation."""
    from meshllm.model.source import default_gguf_path

    model = default_gguf_path()
    params = SamplingParams(max_tokens=48)
    async with memory_net() as net:
        plain = await net.add("plain", model, weights="auto", speculate="off", private_layers=1)
        await net.wait_active(nodes=["plain"])
        prompt = plain.runtime.engine.chat_prompt([{"role": "user", "content": QUOTE}])
        want, none = await answer(plain, prompt, params)
        assert none is None

    async with memory_net() as net:
        for nid in ("a", "b"):
            await net.add(nid, model, weights="auto", speculate="ngram", private_layers=1)
        net.connect_all()
        await net.wait_active()
        for entry in ("a", "b"):
            got, drafting = await answer(net.meshes[entry], prompt, params)
            assert got == want
            assert drafting is not None
            drafted, accepted, trips = drafting
            assert accepted > 0 and (accepted + trips) / trips > 1.5  # tokens a verify trip


async def test_a_stage_lost_while_an_answer_drafts_gives_the_same_answer(tiny_llama: Path) -> None:
    async with memory_net() as net:
        plain = await net.add("plain", tiny_llama, weights="int4", speculate="off")
        await net.wait_active(nodes=["plain"])
        prompt = prompts(plain.runtime.engine)[1]
        want, _ = await answer(plain, prompt)

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights="int4", private_layers=1, speculate="ngram")
        net.connect_all()
        await net.wait_active()
        entry = net.meshes["a"]
        victim = next(n for n in ("b", "c") if n != entry.core.coordinator_id)
        got: list[int] = []
        states: list[str] = []
        drafting = None
        async for item in entry.generate(prompt, SamplingParams(max_tokens=TOKENS)):
            if isinstance(item, Token):
                got.append(item.id)
                drafting = item.speculation or drafting
                if len(got) >= 10 and victim in net.meshes:
                    await net.kill(victim)
            else:
                states.append(item.state)
        assert got == want
        assert "replanning" in states
        assert drafting is not None and drafting[2] > 0


async def test_a_seeded_sampled_answer_that_drafts_is_the_same_on_a_mesh_and_one_node(tiny_llama: Path) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=TOKENS)
    async with memory_net() as net:
        solo = await net.add("solo", tiny_llama, weights="int8", speculate="ngram")
        await net.wait_active(nodes=["solo"])
        asks = prompts(solo.runtime.engine)
        want = [(await answer(solo, p, params))[0] for p in asks]

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights="int8", private_layers=1, speculate="ngram")
        net.connect_all()
        await net.wait_active()
        got = [(await answer(net.meshes["b"], p, params))[0] for p in asks]
        assert got == want


async def test_a_draft_model_drafts_and_the_answers_stay_the_same(tiny_llama: Path) -> None:
    """int8 served, its own weights in int4 drafting (`--draft-model`): drafts stand, and a
    3-node mesh answers what one node answers without speculation."""
    async with memory_net() as net:
        plain = await net.add("plain", tiny_llama, weights="int8", speculate="off")
        await net.wait_active(nodes=["plain"])
        asks = prompts(plain.runtime.engine)
        want = [(await answer(plain, p))[0] for p in asks]

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, weights="int8", private_layers=1, speculate="draft",
                          draft_model=tiny_llama, draft_weights="int4")
        net.connect_all()
        await net.wait_active()
        got = await asyncio.gather(*(answer(net.meshes[n], p) for n, p in zip(("a", "b", "c") * 2, asks)))
        assert [ids for ids, _ in got] == want
        drafting = [d for _, d in got if d is not None]
        assert drafting and sum(d[1] for d in drafting) > 0  # the int4 copy's drafts stand
        assert net.meshes["a"].status_view()["speculation"]["draft_ms_per_token"] is not None  # type: ignore[index]


async def test_f32_answers_that_draft_are_the_same_on_a_mesh_and_one_node_also_across_a_lost_stage(
        tiny_llama: Path) -> None:
    """f32 (transformers' GEMMs, not batch-invariant) drafts too: a mesh answers what one node
    with the same flags answers (the same verify steps, the same shapes), and a stage lost
    mid-answer replays the answer in its original steps, fallen drafts included, so the answer
    does not change either."""
    async with memory_net() as net:
        solo = await net.add("solo", tiny_llama, speculate="ngram")
        await net.wait_active(nodes=["solo"])
        asks = prompts(solo.runtime.engine)
        alone = [await answer(solo, p) for p in asks]
        want = [ids for ids, _ in alone]
        assert any(d is not None and d[2] > 0 for _, d in alone)

    async with memory_net() as net:
        for nid in ("a", "b", "c"):
            await net.add(nid, tiny_llama, private_layers=1, speculate="ngram")
        net.connect_all()
        await net.wait_active()
        assert [(await answer(net.meshes["a"], p))[0] for p in asks] == want
        entry = net.meshes["a"]
        victim = next(n for n in ("b", "c") if n != entry.core.coordinator_id)
        got: list[int] = []
        states: list[str] = []
        async for item in entry.generate(asks[1], SamplingParams(max_tokens=TOKENS)):
            if isinstance(item, Token):
                got.append(item.id)
                if len(got) >= 12 and victim in net.meshes:
                    await net.kill(victim)
            else:
                states.append(item.state)
        assert got == want[1]
        assert "replanning" in states


async def test_f32_with_sliding_window_layers_never_drafts(tiny_mistral: Path) -> None:
    """transformers' sliding-window layers cannot cut fallen drafts off: no drafting there."""
    async with memory_net() as net:
        solo = await net.add("solo", tiny_mistral, speculate="ngram")
        await net.wait_active(nodes=["solo"])
        for prompt in prompts(solo.runtime.engine):
            ids, drafting = await answer(solo, prompt)
            assert ids == reference_greedy(tiny_mistral, prompt, TOKENS)
            assert drafting is None
        assert solo.status_view()["speculation"]["mode"] == "off"  # type: ignore[index]


async def test_f32_drafts_only_when_asked_by_name(tiny_llama: Path) -> None:
    """`auto` keeps f32 answers recoverable from the logs (an f32 answer that drafted is replayed
    whole after a loss): it does not draft there; `ngram` does."""
    async with memory_net() as net:
        solo = await net.add("solo", tiny_llama, speculate="auto")
        await net.wait_active(nodes=["solo"])
        prompt = prompts(solo.runtime.engine)[1]
        ids, drafting = await answer(solo, prompt)
        assert drafting is None and ids == reference_greedy(tiny_llama, prompt, TOKENS)
        assert solo.status_view()["speculation"]["mode"] == "off"  # type: ignore[index]
