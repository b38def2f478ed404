"""The draft model drafts the greedy tokens of its own weights, whatever the served model
accepted of its last draft, and refuses a model whose tokenizer is not the served model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from meshllm.model.cache import prepare
from meshllm.model.draft import MAX_DRAFT_TOKENS, DraftModel
from meshllm.model.engine import Engine
from meshllm.model.sampling import SamplingParams
from meshllm.model.source import resolve
from meshllm.model.text import load_tokenizer
from tests.tinymodel import PROMPTS, TINY_MAX_POSITIONS, chat_ids, reference_greedy

ANSWER_TOKENS = 24


def transformers_model(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def load_draft(folder: Path, **kwargs) -> DraftModel:  # type: ignore[no-untyped-def]
    return DraftModel.load(folder, served_tokenizer=load_tokenizer(folder), **kwargs)


def walk_the_answer(draft: DraftModel, session: str, prompt: list[int], answer: list[int], k: int) -> None:
    """Draft along `answer` (the served model's greedy tokens) as a speculating entry node
    would: after each draft the served model keeps 0..k of it (a pattern), then adds its own
    token. Every draft equals the answer's next tokens."""
    pos, step = 0, 0
    while pos < len(answer) and pos + k <= ANSWER_TOKENS:
        drafted = draft.propose(session, prompt + answer[:pos], k)
        assert drafted == answer[pos:pos + k], (k, pos)
        accepted = (step * 5 + k) % (len(drafted) + 1)
        pos += accepted + 1
        step += 1


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # full-attention caches, and sliding-window ones
def test_drafts_from_the_served_weights_are_its_greedy_answer_whatever_was_accepted(
        arch: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}")
    draft = load_draft(folder)
    model = transformers_model(folder)
    prompt = chat_ids(folder, PROMPTS[0])
    answer = reference_greedy(folder, prompt, ANSWER_TOKENS, model=model)
    for k in range(1, 9):
        walk_the_answer(draft, f"s{k}", prompt, answer, k)
    for k in (8, 3, 1):
        walk_the_answer(draft, "one session, every k", prompt, answer, k)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_draft_after_a_partly_rejected_one_continues_from_the_served_models_token(
        arch: str, request: pytest.FixtureRequest) -> None:
    """The served model accepts part of the draft and then picks another token than the
    draft's: the next draft is the greedy answer to that context, and the next one again
    after the session goes back to a shorter context."""
    folder = request.getfixturevalue(f"tiny_{arch}")
    draft = load_draft(folder)
    model = transformers_model(folder)
    prompt = chat_ids(folder, PROMPTS[1])
    for k, accepted in ((1, 0), (3, 1), (8, 5)):
        session = f"k{k}-a{accepted}"
        drafted = draft.propose(session, prompt, k)
        assert drafted == reference_greedy(folder, prompt, k, model=model)
        other = (drafted[accepted] + 1) % 400 if accepted < len(drafted) else drafted[0]
        context = prompt + drafted[:accepted] + [other]
        assert draft.propose(session, context, k) == reference_greedy(folder, context, k, model=model), (k, accepted)
        shorter = prompt[:-3]
        assert draft.propose(session, shorter, k) == reference_greedy(folder, shorter, k, model=model)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_int4_drafts_equal_the_same_models_own_greedy_answers_after_rewinds(
        arch: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}")
    engine = Engine(prepare(resolve(folder)), weights="int4")
    draft = load_draft(folder, weights="int4")
    assert draft.weights == "int4" and draft.nbytes < load_draft(folder, weights="f32").nbytes

    def greedy(context: list[int], n: int) -> list[int]:
        return [t.id for t in engine.generate(context, SamplingParams(temperature=0.0, max_tokens=n))]

    prompts = [engine.chat_prompt(messages) for messages in PROMPTS[2:]]
    answers = [greedy(prompt, ANSWER_TOKENS) for prompt in prompts]
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):  # some end on EOS, at once or later
        for k in (1, 4, 8):
            walk_the_answer(draft, f"walk{i}-{k}", prompt, answer, k)
    prompt, answer = next((p, a) for p, a in zip(prompts, answers) if len(a) == ANSWER_TOKENS)
    for k, accepted in ((4, 1), (8, 3), (8, 0)):
        session = f"branch{k}-{accepted}"
        context = prompt + answer[:5]
        drafted = draft.propose(session, context, k)
        assert drafted == answer[5:5 + k]
        accepted = min(accepted, len(drafted) - 1)  # the answer may end sooner
        context += drafted[:accepted] + [(drafted[accepted] + 7) % 400]
        assert draft.propose(session, context, k) == greedy(context, k)
        assert draft.propose(session, prompt, k) == answer[:k]


def test_a_draft_sharing_an_engines_weights_leaves_the_engines_answers_alone(tiny_llama: Path) -> None:
    engine = Engine(prepare(resolve(tiny_llama)), weights="int4")
    draft = DraftModel.from_engine(engine, served_tokenizer=engine.tokenizer)
    assert draft.nbytes == engine.weight_bytes
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt = engine.chat_prompt(PROMPTS[3])
    alone = [t.id for t in engine.generate(prompt, params)]
    interleaved = []
    for token in engine.generate(prompt, params):
        interleaved.append(token.id)
        rest = alone[len(interleaved):len(interleaved) + 3]  # the answer may end before the draft
        assert draft.propose("s", prompt + interleaved, 3)[:len(rest)] == rest
    assert interleaved == alone


def test_a_draft_ends_at_its_eos_token_and_goes_on_after_it(tiny_llama: Path) -> None:
    full = load_draft(tiny_llama)
    prompt = chat_ids(tiny_llama, PROMPTS[0])
    answer = full.propose("s", prompt, 8)
    eos = answer[3]
    assert eos not in answer[:3]
    draft = DraftModel(full.shard, full.tokenizer, name="tiny", eos_token_ids={eos},
                       max_positions=full.max_positions, digest=full.tokenizer_digest)
    assert draft.propose("s", prompt, 8) == answer[:4]
    assert draft.propose("s", prompt + answer[:4], 4) == full.propose("t", prompt + answer[:4], 4)


def copy_with_tokenizer_change(source: Path, target: Path, change: str) -> Path:
    shutil.copytree(source, target)
    if change == "swapped ids":
        path = target / "tokenizer.json"
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        path.write_text(json.dumps(data))
    else:
        path = target / "tokenizer_config.json"
        data = json.loads(path.read_text())
        data["eos_token"] = "<|endoftext|>"
        path.write_text(json.dumps(data))
    return target


@pytest.mark.parametrize(("change", "detail"), [
    ("swapped ids", "token 'b' is id 67 in the draft, 68 in the served model"),
    ("another eos", "eos id 0 in the draft, 2 in the served model"),
])
def test_a_model_with_another_tokenizer_is_refused_with_one_line(tiny_llama: Path, tmp_path: Path, change: str,
                                                                detail: str) -> None:
    other = copy_with_tokenizer_change(tiny_llama, tmp_path / "other-tok", change)
    with pytest.raises(ValueError) as refused:
        DraftModel.load(other, served_tokenizer=load_tokenizer(tiny_llama), served_name="tiny-llama")
    message = str(refused.value)
    assert "\n" not in message
    assert message == f"the draft model other-tok does not share the tokenizer of tiny-llama: {detail}"


def test_another_architecture_with_the_same_tokenizer_may_draft(tiny_llama: Path, tiny_qwen2: Path) -> None:
    draft = DraftModel.load(tiny_qwen2, served_tokenizer=load_tokenizer(tiny_llama))
    prompt = chat_ids(tiny_llama, PROMPTS[0])
    assert draft.propose("s", prompt, 4) == reference_greedy(tiny_qwen2, prompt, 4)


def test_drop_frees_the_cache_and_the_least_recently_used_session_makes_room(tiny_llama: Path) -> None:
    draft = load_draft(tiny_llama, max_sessions=2)
    prompts = {name: chat_ids(tiny_llama, PROMPTS[i]) for i, name in enumerate("abc")}
    want = {name: draft.propose(name, prompt, 4) for name, prompt in prompts.items()}
    assert draft.sessions == ("b", "c")
    assert len(draft.shard.session_ids) == 2
    draft.propose("b", prompts["b"] + want["b"][:2], 2)  # b is now the most recent
    assert draft.propose("a", prompts["a"], 4) == want["a"]
    assert draft.sessions == ("b", "a")
    draft.drop("a")
    assert draft.sessions == ("b",) and draft.cached_positions("a") == 0
    assert draft.shard.session_ids == ("draft:b",)
    draft.drop("never seen")
    assert draft.propose("a", prompts["a"], 4) == want["a"]


def test_a_context_beyond_the_window_gets_no_draft_and_one_near_its_end_a_short_one(tiny_llama: Path) -> None:
    draft = load_draft(tiny_llama)
    model = transformers_model(tiny_llama)
    prompt = chat_ids(tiny_llama, PROMPTS[4])
    filler = [(7 * i) % 300 + 3 for i in range(TINY_MAX_POSITIONS)]
    assert draft.propose("s", (prompt + filler)[:TINY_MAX_POSITIONS], 4) == []
    assert draft.propose("s", (prompt + filler)[:TINY_MAX_POSITIONS + 9], 1) == []
    near = (prompt + filler)[:TINY_MAX_POSITIONS - 3]
    assert draft.propose("s", near, 8) == reference_greedy(tiny_llama, near, 3, model=model)


def test_the_draft_length_is_checked_and_the_cost_per_token_measured(tiny_llama: Path) -> None:
    draft = load_draft(tiny_llama)
    prompt = chat_ids(tiny_llama, PROMPTS[0])
    for bad in (0, MAX_DRAFT_TOKENS + 1):
        with pytest.raises(ValueError):
            draft.propose("s", prompt, bad)
    with pytest.raises(ValueError):
        draft.propose("s", [], 4)
    assert draft.ms_per_token is None
    assert len(draft.propose("s", prompt, MAX_DRAFT_TOKENS)) == MAX_DRAFT_TOKENS
    assert draft.ms_per_token is not None and draft.ms_per_token > 0


def test_the_builtin_model_drafts_the_default_models_own_answer(default_auto_engine) -> None:  # type: ignore[no-untyped-def]
    """The default model served in its own 4-bit format, with the bundled copy drafting."""
    engine = default_auto_engine
    draft = DraftModel.load("builtin", served_tokenizer=engine.tokenizer, served_name=engine.info.name)
    assert draft.name == engine.info.name and draft.weights == engine.weights
    prompt = engine.chat_prompt(PROMPTS[0])
    answer = [t.id for t in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))]
    pos = 0
    for accepted in (4, 0, 2, 4):
        drafted = draft.propose("s", prompt + answer[:pos], 4)
        assert drafted == answer[pos:pos + 4]
        pos += accepted + 1
