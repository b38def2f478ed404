"""LoRA adapters: peft's own folder format, and a mesh serving one answers like peft does.

f32 on one node is held to peft's `generate` token for token; a chain of spans is held to one
node in every format; and an adapter that is set changes the answer (it is really applied).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.model import adapter as adapter_mod
from meshllm.model.adapter import (
    TARGETS, Adapter, AdapterError, AdapterSpec, adapter_key, adapter_shapes, init_adapter, load_adapter, save_adapter,
)
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.runtime import Runtime
from meshllm.model.shape import load_config
from meshllm.model.source import resolve
from tests.tinymodel import PROMPTS, chat_ids, reference_greedy

_sessions = itertools.count()


def random_adapter(config, *, seed: int = 1, rank: int = 4, alpha: float = 8.0,  # type: ignore[no-untyped-def]
                   targets: tuple[str, ...] = TARGETS, b_std: float = 0.1) -> Adapter:
    """A trained-looking adapter: peft's initial A and a random (non-zero) B."""
    fresh = init_adapter(config, AdapterSpec(rank, alpha, targets), seed)
    rng = np.random.default_rng(seed + 1000)
    tensors = {k: (rng.normal(0.0, b_std, v.shape).astype(np.float32) if ".lora_B." in k else v)
               for k, v in fresh.tensors.items()}
    return Adapter(fresh.spec, tensors)


def greedy(shards, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    """n greedy tokens through a chain of shards: prefill, then one position at a time."""
    sid = f"t/{next(_sessions)}"
    out: list[int] = []
    feed, pos = list(prompt), 0
    with torch.inference_mode():
        for _ in range(n):
            hidden = shards[0].embed(feed)
            for shard in shards:
                hidden = shard.forward(sid, hidden, pos)
            pos += len(feed)
            out.append(int(torch.argmax(shards[-1].head(hidden))))
            feed = [out[-1]]
    for shard in shards:
        shard.drop(sid)
    return out


@pytest.fixture(scope="module")
def llama(tiny_llama: Path):  # type: ignore[no-untyped-def]
    prepared = prepare(resolve(tiny_llama))
    return prepared, load_config(prepared)


# -- the peft format ------------------------------------------------------------------------------


def test_keys_and_shapes_are_peft_own(llama) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    prepared, config = llama
    spec = AdapterSpec(rank=4, alpha=8)
    model = AutoModelForCausalLM.from_pretrained(prepared.folder, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0,
                                                  bias="none", task_type="CAUSAL_LM"))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    ours = adapter_shapes(config, spec)
    assert ours == theirs
    assert list(ours)[:2] == [adapter_key(0, "q_proj", "A"), adapter_key(0, "q_proj", "B")]
    assert adapter_key(3, "down_proj", "B") == "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    # a fresh adapter starts as the base model: B is zero, A is peft's default init range
    fresh = init_adapter(config, spec, seed=0)
    assert all(not v.any() for k, v in fresh.tensors.items() if ".lora_B." in k)
    a = fresh.tensors[adapter_key(0, "down_proj", "A")]
    assert 0.5 / np.sqrt(128) < np.abs(a).max() <= 1 / np.sqrt(128)
    assert init_adapter(config, spec, seed=0).digest == fresh.digest != init_adapter(config, spec, seed=1).digest


def test_a_saved_adapter_round_trips_and_loads_into_peft(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    prepared, config = llama
    adapter = random_adapter(config, targets=("q_proj", "v_proj", "down_proj"))
    folder = tmp_path / "adapter"
    save_adapter(adapter, folder, base_model=str(prepared.folder))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert saved["target_modules"] == ["q_proj", "v_proj", "down_proj"]

    back = load_adapter(folder, config)
    assert back == adapter and back.digest == adapter.digest and back.spec == adapter.spec

    model = AutoModelForCausalLM.from_pretrained(prepared.folder, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, folder)
    state = get_peft_model_state_dict(peft_model)
    assert set(state) == set(adapter.tensors)
    for key, value in state.items():
        assert np.array_equal(value.numpy(), adapter.tensors[key]), key

    # and an adapter peft saved itself loads here, unchanged
    peft_folder = tmp_path / "from-peft"
    peft_model.save_pretrained(peft_folder, save_embedding_layers=False)  # (no hub look-up)
    assert load_adapter(peft_folder, config) == adapter


def test_bad_adapter_folders_say_what_is_wrong(llama, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.numpy import save_file

    prepared, config = llama
    good = random_adapter(config, rank=2, targets=("q_proj",))

    def folder(name: str, cfg: dict | None = None, tensors: dict | None = None) -> Path:  # type: ignore[type-arg]
        f = tmp_path / name
        save_adapter(good, f)
        if cfg is not None:
            base = json.loads((f / "adapter_config.json").read_text())
            (f / "adapter_config.json").write_text(json.dumps({**base, **cfg}))
        if tensors is not None:
            save_file(tensors, str(f / "adapter_model.safetensors"))
        return f

    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_adapter(tmp_path / "nowhere")
    missing = folder("missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        load_adapter(missing)
    broken = folder("broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(broken)
    with pytest.raises(AdapterError, match="r must be an integer"):
        load_adapter(folder("rank0", {"r": 0}))
    with pytest.raises(AdapterError, match="lora_alpha must be a finite number"):
        load_adapter(folder("alpha", {"lora_alpha": -1}))
    with pytest.raises(AdapterError, match="target_modules must be a list"):
        load_adapter(folder("targets", {"target_modules": ["embed_tokens"]}))
    with pytest.raises(AdapterError, match="use_dora is set"):
        load_adapter(folder("dora", {"use_dora": True}))
    with pytest.raises(AdapterError, match="only LORA"):
        load_adapter(folder("ia3", {"peft_type": "IA3"}))

    a_key, b_key = adapter_key(0, "q_proj", "A"), adapter_key(0, "q_proj", "B")
    a, b = good.tensors[a_key], good.tensors[b_key]
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_adapter(folder("nan", tensors={a_key: a, b_key: np.full_like(b, np.nan)}))
    with pytest.raises(AdapterError, match="does not match rank 2"):
        load_adapter(folder("shape", tensors={a_key: np.zeros((3, 64), np.float32), b_key: b}))
    with pytest.raises(AdapterError, match="not a float tensor"):
        load_adapter(folder("ints", tensors={a_key: a.astype(np.int32), b_key: b}))
    with pytest.raises(AdapterError, match="unexpected tensor 'model.norm.weight'"):
        load_adapter(folder("extra", tensors={a_key: a, b_key: b, "model.norm.weight": np.ones(64, np.float32)}))
    with pytest.raises(AdapterError, match="has no partner"):
        load_adapter(folder("half", tensors={a_key: a}))
    garbage = folder("garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(garbage)
    # an adapter of another model (here: one layer only) does not fit this one
    one_layer = folder("other-model", tensors={a_key: a, b_key: b})
    assert load_adapter(one_layer).spec.rank == 2  # fine on its own
    with pytest.raises(AdapterError, match=r"does not fit this model \(6 layers.*10 tensors missing"):
        load_adapter(one_layer, config)
    with pytest.raises(AdapterError, match="does not fit"):
        Engine(prepared, adapter=load_adapter(one_layer))
    monkeypatch.setattr(adapter_mod, "MAX_ADAPTER_BYTES", 100)
    with pytest.raises(AdapterError, match="over 1 GiB are refused"):
        load_adapter(folder("big"))
    with pytest.raises(AdapterError, match="rank must be"):
        AdapterSpec(rank=0, alpha=1)
    with pytest.raises(AdapterError, match="targets must be"):
        AdapterSpec(rank=1, alpha=1, targets=("lm_head",))


def test_the_digest_follows_every_tensor_and_the_spec(llama) -> None:  # type: ignore[no-untyped-def]
    _prepared, config = llama
    adapter = random_adapter(config)
    key = adapter_key(5, "up_proj", "B")
    changed = dict(adapter.tensors)
    changed[key] = changed[key].copy()
    changed[key][3, 1] += 1e-6
    assert Adapter(adapter.spec, changed).digest != adapter.digest
    assert Adapter(adapter.spec, dict(adapter.tensors)).digest == adapter.digest
    assert Adapter(AdapterSpec(4, 16.0), adapter.tensors).digest != adapter.digest
    assert len(adapter.digest) == 16 and int(adapter.digest, 16) >= 0
    assert adapter.nbytes == sum(4 * r * c for r, c in adapter_shapes(config, adapter.spec).values())
    with pytest.raises(ValueError):
        adapter.tensors[key][0, 0] = 1.0  # read-only: the digest stays true


# -- serving ---------------------------------------------------------------------------------------


def test_f32_engine_serving_an_adapter_matches_peft_generate(llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prepared, config = llama
    adapter = random_adapter(config)
    save_adapter(adapter, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(prepared.folder, dtype=torch.float32),
                                           tmp_path / "a")
    engine = Engine(prepared, adapter=load_adapter(tmp_path / "a", config))
    base = Engine(prepared)
    assert engine.info.model_id == f"{base.info.model_id}-a{adapter.digest}"
    assert engine.weight_bytes == base.weight_bytes + adapter.nbytes
    differs = 0
    for messages in PROMPTS[:4]:
        prompt = chat_ids(prepared.folder, messages)
        want = reference_greedy(prepared.folder, prompt, 24, model=peft_model)
        assert greedy(engine.shards, prompt, len(want)) == want, messages
        differs += greedy(base.shards, prompt, len(want)) != want
    assert differs >= 3  # the adapter is really applied


@pytest.mark.parametrize("arch, weights", [("llama", "f32"), ("llama", "int8"), ("llama", "int4"),
                                           ("qwen2", "int8"), ("qwen2", "int4")])
def test_a_split_mesh_serving_an_adapter_matches_one_node(request: pytest.FixtureRequest, arch: str,
                                                          weights: str) -> None:
    prepared = prepare(resolve(request.getfixturevalue(f"tiny_{arch}")))
    config = load_config(prepared)
    # q and v only: the fused qkv linear also carries a part (k) the adapter leaves alone
    adapter = random_adapter(config, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    one = Engine(prepared, weights=weights, adapter=adapter)
    split = Engine(prepared, [(0, 2), (2, 6)], weights=weights, adapter=adapter)
    base = Engine(prepared, weights=weights)
    assert one.info.model_id == split.info.model_id == f"{base.info.model_id}-a{adapter.digest}"
    differs = 0
    for messages in PROMPTS[:3]:
        prompt = chat_ids(prepared.folder, messages)
        want = greedy(one.shards, prompt, 24)
        assert greedy(split.shards, prompt, 24) == want, messages
        differs += greedy(base.shards, prompt, 24) != want
    assert differs >= 2


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_runtime_set_adapter_applies_at_once_and_to_later_spans(llama, weights: str) -> None:  # type: ignore[no-untyped-def]
    prepared, config = llama
    adapter = random_adapter(config, seed=7)
    prompt = chat_ids(prepared.folder, PROMPTS[0])
    want_base = greedy(Engine(prepared, weights=weights).shards, prompt, 20)
    want = greedy(Engine(prepared, weights=weights, adapter=adapter).shards, prompt, 20)
    assert want != want_base

    a = Runtime.load(prepared, weights=weights)
    a.load_span(0, 6)
    base_id = a.engine.info.model_id
    assert greedy([a.shard], prompt, 20) == want_base
    a.set_adapter(adapter)  # at once, on the layers held
    assert a.engine.info.model_id == f"{base_id}-a{adapter.digest}"
    assert greedy([a.shard], prompt, 20) == want
    a.load_span(0, 4)  # a re-plan: kept layers (shared, in int8) get the adapter once, not twice
    b = Runtime.load(prepared, weights=weights, adapter=adapter)
    b.load_span(4, 6)
    assert greedy([a.shard, b.shard], prompt, 20) == want
    a.load_span(0, 3)
    b.load_span(3, 6)
    assert greedy([a.shard, b.shard], prompt, 20) == want

    with pytest.raises(AdapterError, match="does not fit"):
        a.set_adapter(Adapter(AdapterSpec(4, 8.0, ("q_proj",)),
                              {adapter_key(0, "q_proj", "A"): np.zeros((4, 64), np.float32),
                               adapter_key(0, "q_proj", "B"): np.zeros((64, 4), np.float32)}))
    assert a.engine.info.model_id == f"{base_id}-a{adapter.digest}"  # a refused adapter changes nothing
    assert greedy([a.shard, b.shard], prompt, 20) == want

    assert wrapped(a.shard) == 3 and wrapped(b.shard) == 3
    a.set_adapter(None)
    b.set_adapter(None)
    assert a.engine.info.model_id == base_id
    assert greedy([a.shard, b.shard], prompt, 20) == want_base
    a.load_span(0, 6)
    assert greedy([a.shard], prompt, 20) == want_base
    assert wrapped(a.shard) == 0  # without an adapter, no wrapper is left: the base runs as fast as ever


def wrapped(shard) -> int:  # type: ignore[no-untyped-def]
    """Layers of a shard with at least one projection wrapped with an adapter."""
    from meshllm.model.lean import LeanShard
    from meshllm.model.lora import LoraLinear

    if isinstance(shard, LeanShard):
        return sum(any(isinstance(x, LoraLinear) for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
                   for layer in shard.layers)
    return sum(any(isinstance(m, LoraLinear) for m in layer.modules()) for layer in shard._inner.layers)


# -- the coordinator's bound on a trained update (meshllm.tune.aggregate) -------------------------


def _gradients(kind: str, steps: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if kind == "constant":
        return [np.full(size, 0.3)] * steps
    if kind == "alternating":
        return [np.full(size, (-1.0) ** t) for t in range(steps)]
    if kind == "growing":
        return [np.full(size, 1.5 ** t) for t in range(steps)]
    if kind == "spike":
        return [np.full(size, 1e-6)] * (steps - 1) + [np.full(size, 1e3)]
    return [rng.normal(0, 10.0 ** rng.integers(-4, 3), size) for _ in range(steps)]


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("kind", ["constant", "alternating", "growing", "spike", "random"])
def test_adamw_never_moves_an_adapter_past_the_coordinators_bound(steps: int, kind: str) -> None:
    from meshllm.tune.aggregate import TRAIN_BETAS, TRAIN_LR, adamw_norm_bound, adamw_step_sum
    from meshllm.tune.train import DEFAULT_LR

    assert DEFAULT_LR == TRAIN_LR
    size = 64
    param = torch.nn.Parameter(torch.zeros(size, dtype=torch.float32))
    optimizer = torch.optim.AdamW([param], lr=TRAIN_LR, betas=TRAIN_BETAS, weight_decay=0.0)
    for grad in _gradients(kind, steps, size, np.random.default_rng(steps)):
        param.grad = torch.tensor(grad, dtype=torch.float32)
        optimizer.step()
    moved = param.detach().double().numpy()
    assert np.abs(moved).max() <= TRAIN_LR * adamw_step_sum(steps) * (1 + 1e-5)
    assert np.linalg.norm(moved) <= adamw_norm_bound(steps, size)
    if kind == "constant":  # one direction all along: lr a step, and the bound is not much more
        np.testing.assert_allclose(moved, -steps * TRAIN_LR, rtol=1e-4)
        assert adamw_step_sum(steps) <= 1.3 * steps
