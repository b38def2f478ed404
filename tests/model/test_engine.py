"""The engine answers exactly like plain transformers `generate`, whole or split into spans."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.errors import PromptTooLong
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.sampling import SamplingParams
from meshllm.model.source import resolve
from tests.tinymodel import PROMPTS, TINY_MAX_POSITIONS, chat_ids, reference_greedy

GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32)


def load(folder: Path, spans=None) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(prepare(resolve(folder)), spans)


def engine_ids(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY_32) -> list[int]:
    return [t.id for t in engine.generate(prompt, params)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_models_match_generate_token_for_token(arch: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}")
    engine = load(folder)
    from transformers import AutoModelForCausalLM
    import torch

    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for messages in PROMPTS:
        prompt = engine.chat_prompt(messages)
        assert prompt == chat_ids(folder, messages)
        want = reference_greedy(folder, prompt, 32, model=ref_model)
        assert engine_ids(engine, prompt) == want, messages


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_chains_of_uneven_spans_match_the_whole_model(arch: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}")
    whole = load(folder)
    chains = [[(0, 6)], [(0, 1), (1, 6)], [(0, 2), (2, 3), (3, 6)], [(0, 0), (0, 5), (5, 6)]]
    for messages in PROMPTS[:4]:
        prompt = whole.chat_prompt(messages)
        want = reference_greedy(folder, prompt, 32)
        assert engine_ids(whole, prompt) == want
        for spans in chains:
            assert engine_ids(load(folder, spans), prompt) == want, spans


def test_default_model_matches_generate_on_the_gguf(default_engine, default_reference_model) -> None:  # type: ignore[no-untyped-def]
    assert default_engine.info.num_layers == 30
    assert default_engine.info.name == "SmolLM2-135M-Instruct"
    for messages in PROMPTS:
        prompt = default_engine.chat_prompt(messages)
        want = reference_greedy(None, prompt, 32, model=default_reference_model)
        got = list(default_engine.generate(prompt, GREEDY_32))
        assert [t.id for t in got] == want, messages
        text = "".join(t.text for t in got)
        assert text == default_engine.tokenizer.decode(want, skip_special_tokens=True)


def test_default_model_split_in_three_uneven_spans_matches_generate(default_engine, default_reference_model) -> None:  # type: ignore[no-untyped-def]
    split = Engine(default_engine.prepared, [(0, 7), (7, 19), (19, 30)])
    two = Engine(default_engine.prepared, [(0, 23), (23, 30)])
    for messages in PROMPTS[:3]:
        prompt = default_engine.chat_prompt(messages)
        want = reference_greedy(None, prompt, 32, model=default_reference_model)
        assert engine_ids(split, prompt) == want
        assert engine_ids(two, prompt) == want


def test_interleaved_sessions_on_one_shard_do_not_disturb_each_other(tiny_llama: Path) -> None:
    engine = load(tiny_llama)
    a, b = (engine.chat_prompt(PROMPTS[i]) for i in (0, 1))
    want_a, want_b = engine_ids(engine, a), engine_ids(engine, b)
    gen_a, gen_b = engine.generate(a, GREEDY_32), engine.generate(b, GREEDY_32)
    got_a: list[int] = []
    got_b: list[int] = []
    for ta, tb in zip(gen_a, gen_b):
        got_a.append(ta.id)
        got_b.append(tb.id)
    got_a += [t.id for t in gen_a]
    got_b += [t.id for t in gen_b]
    assert (got_a, got_b) == (want_a, want_b)
    assert all(not s.session_ids for s in engine.shards)  # caches freed when answers end


def test_seeded_sampling_is_reproducible(tiny_llama: Path) -> None:
    engine = load(tiny_llama)
    prompt = engine.chat_prompt(PROMPTS[0])
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_tokens=24)
    first = engine_ids(engine, prompt, p)
    assert engine_ids(engine, prompt, p) == first
    others = {tuple(engine_ids(engine, prompt, SamplingParams(temperature=1.5, seed=s, max_tokens=24))) for s in range(4)}
    assert len(others) > 1  # different seeds, different answers
    top1 = SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=24)
    assert engine_ids(engine, prompt, top1) == engine_ids(engine, prompt, SamplingParams(max_tokens=24))


def test_max_tokens_and_stop_reasons(tiny_llama: Path) -> None:
    engine = load(tiny_llama)
    prompt = engine.chat_prompt(PROMPTS[2])
    toks = list(engine.generate(prompt, SamplingParams(max_tokens=5)))
    assert len(toks) <= 5
    assert toks[-1].finish_reason in {"stop", "length"}
    assert all(t.finish_reason is None for t in toks[:-1])
    stopped = list(engine.generate(prompt, SamplingParams(max_tokens=20), should_stop=lambda: True))
    assert [t.finish_reason for t in stopped] == ["cancelled"]


def test_over_long_prompt_names_the_limit(tiny_llama: Path) -> None:
    engine = load(tiny_llama)
    prompt = engine.chat_prompt([{"role": "user", "content": "hello world " * 200}])
    assert len(prompt) >= TINY_MAX_POSITIONS
    with pytest.raises(PromptTooLong, match=str(TINY_MAX_POSITIONS)):
        list(engine.generate(prompt, GREEDY_32))


def test_generation_stops_at_the_context_window(tiny_llama: Path) -> None:
    engine = load(tiny_llama)
    k = 1
    while len(engine.chat_prompt([{"role": "user", "content": "hello " * (k + 1)}])) < TINY_MAX_POSITIONS - 8:
        k += 1
    prompt = engine.chat_prompt([{"role": "user", "content": "hello " * k}])
    room = TINY_MAX_POSITIONS - len(prompt)
    assert 0 < room < 32
    toks = list(engine.generate(prompt, SamplingParams(max_tokens=64)))
    assert len(toks) <= room
