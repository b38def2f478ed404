"""Every weight format: one node and a chain of uneven shards answer token for token alike;
the lean decoder does transformers' arithmetic; a 4-bit GGUF is read from its blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meshllm.model import quant
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.formats import format_file, resolve_format
from meshllm.model.sampling import SamplingParams
from meshllm.model.shape import load_config, model_shape
from meshllm.model.source import resolve
from tests.tinymodel import PROMPTS

QUANTIZED = ["f16", "int8", "int4"]


def _greedy(engine: Engine, messages, n: int = 24) -> list[int]:  # type: ignore[no-untyped-def]
    return [t.id for t in engine.generate(engine.chat_prompt(messages), SamplingParams(max_tokens=n))]


@pytest.mark.parametrize("weights", QUANTIZED)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_split_model_answers_like_one_node_in_every_format(arch: str, weights: str, request) -> None:  # type: ignore[no-untyped-def]
    prepared = prepare(resolve(request.getfixturevalue(f"tiny_{arch}")))
    whole = Engine(prepared, weights=weights)
    split = Engine(prepared, [(0, 1), (1, 4), (4, 6)], weights=weights)
    assert whole.info.weights == weights and split.shards[1].weights == weights
    for messages in PROMPTS[:6]:  # 6 of 6, in every format
        assert _greedy(split, messages) == _greedy(whole, messages)


def _with_dense_linears(engine: Engine) -> Engine:
    """The lean decoder of `engine`, its linears swapped for float32 ones from the f32 weights."""
    files = engine.prepared.weight_files
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})

    def dense(stems: list[str]) -> quant.DenseLinear:
        w = torch.cat([tensors[f"{s}.weight"] for s in stems])
        biases = [tensors.get(f"{s}.bias") for s in stems]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(tensors[f"{s}.weight"].shape[0]) for s, b in zip(stems, biases)])
        return quant.DenseLinear(w, bias)

    shard = engine.shards[0]
    for i, layer in enumerate(shard.layers):
        p = f"model.layers.{i}"
        layer.qkv = dense([f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"])
        layer.o = dense([f"{p}.self_attn.o_proj"])
        layer.gate_up = dense([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        layer.down = dense([f"{p}.mlp.down_proj"])
    return engine


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_lean_decoder_does_transformers_arithmetic(arch: str, request) -> None:  # type: ignore[no-untyped-def]
    """With float32 linears, the lean layers give transformers' hidden states, in prefill and
    in decode steps, past Mistral's sliding window too."""
    prepared = prepare(resolve(request.getfixturevalue(f"tiny_{arch}")))
    lean = _with_dense_linears(Engine(prepared, weights="f16")).shards[0]
    ref = Engine(prepared, weights="f32").shards[0]
    ids = Engine(prepared, spans=[], weights="f32").chat_prompt(PROMPTS[4])
    with torch.inference_mode():
        prompt = ref.embed(ids[:20])  # float32 rows for both (the lean one keeps int8 rows)
        torch.testing.assert_close(lean.forward("s", prompt, 0), ref.forward("s", prompt, 0), rtol=1e-4, atol=1e-4)
        pos = 20
        for token in ids[20:] + [7] * 20:  # decode one position at a time, past the window of 24
            want = ref.forward("s", ref.embed([token]), pos)
            got = lean.forward("s", ref.embed([token]), pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            pos += 1


def test_model_id_and_memory_figures_follow_the_format(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    config = load_config(prepared)
    ids = {w: Engine(prepared, spans=[], weights=w).info.model_id for w in ("f32", "int4")}
    assert ids["f32"] != ids["int4"]  # to a mesh, two formats of one file are two models
    sizes = {w: model_shape(config, w).layer_bytes for w in quant.FORMATS}
    assert sizes["int4"] < sizes["int8"] < sizes["f16"] < sizes["f32"]
    shard = Engine(prepared, [(0, 6)], weights="int4").shards[0]
    planned = 6 * model_shape(config, "int4").layer_bytes + model_shape(config, "int4").embed_head_bytes
    assert 0.8 * planned <= shard.nbytes <= 1.2 * planned


def test_auto_keeps_the_files_precision(tiny_llama: Path) -> None:
    assert resolve_format(prepare(resolve(tiny_llama)), "auto") == "f32"  # a float32 folder
    assert resolve_format(prepare(resolve(None)), "auto") == "int4"  # the default Q4_1 GGUF


def _assert_int4_is_the_f32_conversion(prepared, linears: int, every: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Dequantized, the int4 weights equal the float32 conversion's: codes read from the blocks."""
    path = format_file(prepared, "int4")
    with safe_open(str(path), framework="pt") as q, safe_open(str(prepared.weight_files[0]), framework="pt") as f:
        stems = [k.removesuffix(".codes") for k in q.keys() if k.endswith(".codes")]
        assert len(stems) == linears
        for stem in stems[::every]:
            codes = quant.unpack_nibbles(q.get_tensor(f"{stem}.codes"))
            n, k = codes.shape
            w = (codes.reshape(n, k // 32, 32).float() - 8) * q.get_tensor(f"{stem}.scale")[..., None]
            w = (w + q.get_tensor(f"{stem}.zero")[..., None]).reshape(n, k)
            torch.testing.assert_close(w, f.get_tensor(f"{stem}.weight"), rtol=0, atol=1e-6)


def test_the_default_gguf_runs_int4_from_its_own_blocks(default_engine: Engine) -> None:
    """Every 4-bit linear of the default model (Q4_1) is its GGUF codes."""
    _assert_int4_is_the_f32_conversion(default_engine.prepared, 30 * 7, every=17)


@pytest.fixture(scope="module")
def tiny_q4_0_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama GGUF with Q4_0 linears and random weights, written by the benchmark's script."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path_factory.mktemp("gguf") / "tiny-q4_0.gguf"
    subprocess.run([sys.executable, "scripts/make_synthetic_gguf.py", str(out), "--tiny", "--std", "0.2"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


def test_a_q4_0_gguf_runs_int4_from_its_blocks_written_into_a_fresh_cache(tiny_q4_0_gguf: Path,
                                                                        tmp_path: Path) -> None:
    prepared = prepare(resolve(tiny_q4_0_gguf), tmp_path)  # nothing cached: converted and written here
    whole = Engine(prepared, weights="auto")
    assert whole.info.weights == "int4"
    _assert_int4_is_the_f32_conversion(prepared, 2 * 7)  # q and k rows in transformers' order too
    split = Engine(prepared, [(0, 1), (1, 2)], weights="auto")
    for messages in PROMPTS[:3]:
        answer = _greedy(whole, messages, 16)
        assert len(answer) > 0 and _greedy(split, messages, 16) == answer


@pytest.mark.parametrize("weights", QUANTIZED)
def test_each_format_is_written_once_into_a_fresh_cache(tiny_llama: Path, tmp_path: Path, weights: str) -> None:
    prepared = prepare(resolve(tiny_llama), tmp_path)
    first = Engine(prepared, weights=weights)
    path = format_file(prepared, weights)
    assert path.is_relative_to(tmp_path)
    written = path.stat().st_mtime_ns
    again = Engine(prepared, [(0, 3), (3, 6)], weights=weights)
    assert path.stat().st_mtime_ns == written  # read, not written again
    assert _greedy(again, PROMPTS[1]) == _greedy(first, PROMPTS[1])


def test_the_default_model_answers_in_int4(default_auto_engine: Engine) -> None:
    engine = default_auto_engine
    assert engine.info.weights == "int4"
    text = "".join(t.text for t in engine.generate(
        engine.chat_prompt([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]),
        SamplingParams(max_tokens=20)))
    assert "Paris" in text


_NO_AVX2_PROBE = """
import json, sys, torch
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.sampling import SamplingParams
from meshllm.model.source import resolve
prepared = prepare(resolve(sys.argv[1]))
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for weights in ("f16", "int8", "int4"):
    answers = []
    for spans in ([(0, 6)], [(0, 2), (2, 6)]):
        engine = Engine(prepared, spans, weights=weights)
        prompt = engine.chat_prompt([{"role": "user", "content": "hello world"}])
        answers.append([t.id for t in engine.generate(prompt, SamplingParams(max_tokens=12))])
    out[weights] = answers
print(json.dumps(out))
"""


def test_every_format_runs_on_a_cpu_without_avx2(tiny_llama: Path) -> None:
    """Without AVX2 (forced here with ATEN_CPU_CAPABILITY=default) the quantized kernels take
    their plain loops and fbgemm is not used: slower, and still one answer whole or split."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", _NO_AVX2_PROBE, str(tiny_llama)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["capability"] == "DEFAULT"
    for weights in ("f16", "int8", "int4"):
        whole, split = result[weights]
        assert len(whole) > 0 and whole == split, weights


@pytest.mark.parametrize("weights", ["f32", "int4"])
def test_a_full_shard_still_replays_its_own_sessions(tiny_llama: Path, weights: str) -> None:
    from meshllm.model.shard import open_shard

    shard = open_shard(prepare(resolve(tiny_llama)), 0, 6, weights=weights, max_sessions=1)
    with torch.inference_mode():
        shard.forward("a", shard.embed([1, 2, 3]), 0)
        with pytest.raises(RuntimeError, match="too many sessions"):
            shard.forward("b", shard.embed([1, 2, 3]), 0)
        with pytest.raises(ValueError, match="holds 3 positions"):
            shard.forward("a", shard.embed([4]), 5)
        shard.forward("a", shard.embed([1, 2, 3]), 0)  # a replay from the start: its own cache, rebuilt
        assert shard.cache_length("a") == 3 and shard.session_ids == ("a",)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
                                  {"rope_type": "linear", "factor": 2.0}])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_lean_rotary_tables_are_transformers_bit_for_bit(arch: str, rope) -> None:  # type: ignore[no-untyped-def]
    """The lean decoder computes its rotary tables without transformers' modelling code (a
    serving node then never imports it): the same bits, scaled ropes included."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from meshllm.model.lean import _Rotary, _rotary_class

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    config = cls(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, rope_scaling=rope)
    ids = torch.arange(700).unsqueeze(0)
    ours = _Rotary(config, 16, torch.device("cpu"))(torch.zeros(1), ids)
    theirs = _rotary_class(arch)(config=config)(torch.zeros(1), ids)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
