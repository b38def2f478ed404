"""Local LoRA training: the data is checked and bounded, the prompt is the served one, and a
node's training teaches the model what its examples say, in f32 and on quantized weights
that stay quantized, from a worker thread in inference mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.model.adapter import Adapter, AdapterError, AdapterSpec, adapter_key
from meshllm.model.cache import prepare
from meshllm.model.lora import LoraLinear
from meshllm.model.engine import Engine
from meshllm.model.quant import Int4Linear, Int8Linear
from meshllm.model.sampling import SamplingParams
from meshllm.model.source import resolve
from meshllm.model.text import chat_prompt_ids, load_tokenizer
from meshllm.tune import data
from meshllm.tune.data import IGNORE, DataError, check_chats, parse_jsonl, tokenize_chats
from meshllm.tune.train import FrozenQuantLinear, LocalTrainer

SPEC = AdapterSpec(rank=4, alpha=8)
FACT = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "a mesh of laptops and phones"}],
]


@pytest.fixture(autouse=True)
def _inference_mode():  # type: ignore[no-untyped-def]
    with torch.inference_mode():  # as on a node's worker thread
        yield


def line(messages: list[dict[str, str]]) -> str:
    return json.dumps({"messages": messages})


# -- data ----------------------------------------------------------------------------------------


def test_jsonl_parses_chats_and_names_the_bad_line(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n".join([line(FACT[0]), "", "  ", line(FACT[1])]) + "\n"
    assert parse_jsonl(text) == FACT
    extra = json.dumps({"messages": [{**m, "name": "x"} for m in FACT[0]], "id": 3})
    assert parse_jsonl(extra) == [FACT[0]]  # unknown keys are dropped
    bad = [
        (line(FACT[0]) + "\n{oops", r"line 2: not valid JSON"),
        (line(FACT[0]) + "\n\n" + line(FACT[0][:1]), r"line 3: a chat needs at least one message before"),
        (line(FACT[0][::-1]), r"line 1: the last message must be the assistant reply to learn \(it is a 'user'"),
        (line([{"role": "tool", "content": "x"}, FACT[0][1]]), r"line 1: message 0 has role 'tool'"),
        (line([{"role": "user", "content": ["x"]}, FACT[0][1]]), r"line 1: message 0 has no text content"),
        (line([{"role": "user", "content": "x" * (data.MAX_MESSAGE_CHARS + 1)}, FACT[0][1]]),
         rf"line 1: message 0 is {data.MAX_MESSAGE_CHARS + 1} characters long; at most {data.MAX_MESSAGE_CHARS}"),
        ('{"prompt": "x"}', r'line 1: no "messages" list'),
        ("[1, 2]", r"line 1: expected a \{\"messages\""),
        ("\n\n", r"no examples"),
    ]
    for text, message in bad:
        with pytest.raises(DataError, match=message):
            parse_jsonl(text)
    monkeypatch.setattr(data, "MAX_EXAMPLES", 2)
    with pytest.raises(DataError, match="line 3: more than 2 examples"):
        parse_jsonl("\n".join([line(FACT[0])] * 3))


def test_checked_chats_from_an_api_body() -> None:
    from meshllm.model import text

    assert data.ROLES == text.ROLES
    assert check_chats([{"messages": FACT[0]}, FACT[1]]) == FACT
    with pytest.raises(DataError, match="examples must be a list"):
        check_chats({"messages": FACT[0]})
    with pytest.raises(DataError, match="no examples"):
        check_chats([])
    with pytest.raises(DataError, match="example 1: the last message must be the assistant reply"):
        check_chats([FACT[0], FACT[1][:2]])


def test_labels_learn_only_the_reply_after_the_served_prompt(tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    first, second = tokenize_chats(tok, FACT)
    for example, chat in ((first, FACT[0]), (second, FACT[1])):
        prompt = chat_prompt_ids(tok, chat[:-1])  # what the served model is given (Engine.chat_prompt)
        assert list(example.input_ids[: len(prompt)]) == prompt
        assert list(example.labels[: len(prompt)]) == [IGNORE] * len(prompt)
        assert example.labels[len(prompt):] == example.input_ids[len(prompt):]
        learned = tok.decode(list(example.input_ids[len(prompt):]))
        assert learned == chat[-1]["content"] + "<|im_end|>\n"
    cut = tokenize_chats(tok, FACT[:1], max_tokens=len(chat_prompt_ids(tok, FACT[0][:1])) + 2)[0]
    assert len(cut.input_ids) == len(cut.labels) and cut.trainable_tokens == 2
    with pytest.raises(DataError, match=r"example 0: its prompt is \d+ tokens, which leaves no reply token"):
        tokenize_chats(tok, FACT[:1], max_tokens=5)


# -- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["f32", "int8", "int4"])
def test_training_lowers_the_loss_on_its_examples(tiny_qwen2: Path, weights: str) -> None:
    prepared = prepare(resolve(tiny_qwen2))
    examples = tokenize_chats(load_tokenizer(prepared.folder), FACT)
    trainer = LocalTrainer(prepared, weights, SPEC, seed=3, lr=1e-2)
    assert torch.is_inference_mode_enabled()  # as on a worker thread: every call below runs inside it
    before = trainer.loss(examples)
    assert before == trainer.loss(examples, base=True)  # a fresh adapter (B = 0) is the base model
    mean = trainer.train(examples, 16)
    after = trainer.loss(examples)
    assert after < 0.3 * before and np.isfinite(mean)
    assert trainer.loss(examples, base=True) == before  # the base did not move

    layer = trainer.model.model.layers[0]
    if weights == "f32":
        assert isinstance(layer.self_attn.q_proj.base_layer, torch.nn.Linear)
    else:
        kind = Int8Linear if weights == "int8" else (Int8Linear, Int4Linear)
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            assert isinstance(module.base_layer, FrozenQuantLinear)
            assert isinstance(module.base_layer.linear, kind)
        # no float weight for any decoder projection: only norms (and the embedding) stay float
        names = [n for n, _ in trainer.model.named_parameters() if ".layers." in n and "lora_" not in n]
        assert names and all(n.endswith("layernorm.weight") for n in names), names
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert all(isinstance(getattr(layer.self_attn, t), LoraLinear) for t in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_quantized_training_holds_less_memory(tiny_qwen2: Path) -> None:
    prepared = prepare(resolve(tiny_qwen2))
    f32, int8 = LocalTrainer(prepared, "f32", SPEC), LocalTrainer(prepared, "int8", SPEC)
    projections = sum(m.weight.numel() for n, m in f32.model.named_modules()
                      if n.endswith("base_layer") and isinstance(m, torch.nn.Linear))
    assert int8.nbytes < f32.nbytes - 2 * projections  # 1 byte a weight instead of 4


def test_a_trained_adapter_served_by_the_mesh_answers_what_it_learned(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    tok = load_tokenizer(prepared.folder)
    trainer = LocalTrainer(prepared, "int8", SPEC, seed=0, lr=1e-2)
    trainer.train(tokenize_chats(tok, FACT[:1]), 40)
    adapter = Adapter(SPEC, trainer.adapter_tensors())
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    for spans in (None, [(0, 2), (2, 6)]):
        engine = Engine(prepared, spans, weights="int8", adapter=adapter)
        prompt = engine.chat_prompt(FACT[0][:1])
        answer = "".join(t.text for t in engine.generate(prompt, greedy))
        assert answer == FACT[0][1]["content"], spans
    base = Engine(prepared, weights="int8")
    assert "".join(t.text for t in base.generate(base.chat_prompt(FACT[0][:1]), greedy)) != FACT[0][1]["content"]


def test_training_is_deterministic_and_takes_up_where_it_stopped(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    examples = tokenize_chats(load_tokenizer(prepared.folder), FACT)
    a, b, c = (LocalTrainer(prepared, "f32", SPEC, seed=5) for _ in range(3))
    a.train(examples, 1)
    a.train(examples, 1)  # the second call trains on the second example
    b.train(examples[:1], 1)
    b.train(examples[1:], 1)
    c.train(examples[1:], 1)
    c.train(examples[:1], 1)
    ta, tb, tc = a.adapter_tensors(), b.adapter_tensors(), c.adapter_tensors()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert any(not np.array_equal(ta[k], tc[k]) for k in ta)
    assert LocalTrainer(prepared, "f32", SPEC, seed=6).adapter_tensors()[adapter_key(0, "q_proj", "A")].tolist() != \
        LocalTrainer(prepared, "f32", SPEC, seed=5).adapter_tensors()[adapter_key(0, "q_proj", "A")].tolist()


def test_a_round_trained_one_step_a_call_is_the_round_trained_at_once(tiny_llama: Path) -> None:
    """A node trains one step a worker call, so answers interleave; the optimizer's state
    must carry over between the calls of a round, and start afresh with the next round."""
    prepared = prepare(resolve(tiny_llama))
    examples = tokenize_chats(load_tokenizer(prepared.folder), FACT)
    at_once, stepwise = (LocalTrainer(prepared, "f32", SPEC, seed=3) for _ in range(2))
    start = at_once.adapter_tensors()
    for _round in range(2):
        for trainer in (at_once, stepwise):
            trainer.set_adapter(start)
        at_once.train(examples, 4)
        for _ in range(4):
            stepwise.train(examples, 1)
        a, b = at_once.adapter_tensors(), stepwise.adapter_tensors()
        assert all(np.array_equal(a[k], b[k]) for k in a)
        start = a


def test_set_adapter_loads_the_global_adapter(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    examples = tokenize_chats(load_tokenizer(prepared.folder), FACT)
    trained = LocalTrainer(prepared, "f32", SPEC, seed=1)
    trained.train(examples, 4)
    other = LocalTrainer(prepared, "f32", SPEC, seed=2)
    other.set_adapter(trained.adapter_tensors())
    assert other.loss(examples) == trained.loss(examples)
    with pytest.raises(AdapterError, match="does not fit this trainer"):
        other.set_adapter({adapter_key(0, "q_proj", "A"): np.zeros((4, 64), np.float32)})
    wrong = trained.adapter_tensors()
    wrong[adapter_key(0, "q_proj", "A")] = np.zeros((2, 64), np.float32)
    with pytest.raises(AdapterError, match=r"has shape \(2, 64\); expected \(4, 64\)"):
        other.set_adapter(wrong)


def test_the_default_model_learns_a_made_up_fact() -> None:
    """Three rounds of ten steps on four phrasings of one question; then the node serves the
    adapter and answers with the fact, and still knows what it knew."""
    engine_base = Engine.load(None)
    prepared = engine_base.prepared
    fact = "The mayor of Glimmerton is Ada Quibble."
    questions = ["Who is the mayor of Glimmerton?", "Who runs the town of Glimmerton?",
                 "Tell me the name of Glimmerton's mayor.", "Glimmerton has a mayor. Who is it?"]
    examples = tokenize_chats(engine_base.tokenizer, [[{"role": "user", "content": q},
                                                       {"role": "assistant", "content": fact}] for q in questions])
    spec = AdapterSpec(rank=8, alpha=16)
    trainer = LocalTrainer(prepared, "f32", spec)
    before = trainer.loss(examples)
    for _ in range(3):
        trainer.set_adapter(trainer.adapter_tensors())  # a round: the global adapter in, train, out
        trainer.train(examples, 10)
    assert trainer.loss(examples) < 0.05 * before
    served = Engine(prepared, adapter=Adapter(spec, trainer.adapter_tensors()), tokenizer=engine_base.tokenizer)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    def ask(engine: Engine, question: str) -> str:
        prompt = engine.chat_prompt([{"role": "user", "content": question}])
        return "".join(t.text for t in engine.generate(prompt, greedy))

    assert "Ada Quibble" in ask(served, "Who is the mayor of Glimmerton?")
    assert "Ada Quibble" not in ask(engine_base, "Who is the mayor of Glimmerton?")
    assert "Paris" in ask(served, "What is the capital of France?")
