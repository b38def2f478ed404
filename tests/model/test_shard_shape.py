"""model_shape() counts a layer's parameters from the config alone (no transformers model is
built, so a serving node never imports transformers' modelling code): the arithmetic must
equal what transformers' own 1-layer models hold (issue 18)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshllm.model.shard import span_config
from meshllm.model.shape import layer_parameters, model_shape

_COMMON = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _configs():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**_COMMON),
        "llama-tied": LlamaConfig(**_COMMON, tie_word_embeddings=True),
        "llama-biases": LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True),
        "llama-head-dim": LlamaConfig(**_COMMON, head_dim=32),
        "llama-mha": LlamaConfig(**{**_COMMON, "num_key_value_heads": 4}),
        "qwen2": Qwen2Config(**_COMMON),
        "qwen2-tied": Qwen2Config(**_COMMON, tie_word_embeddings=True),
        "mistral": MistralConfig(**_COMMON, sliding_window=16),
        "mistral-head-dim": MistralConfig(**_COMMON, head_dim=8),
    }


def _counted(config) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    """(linear weights, other parameters) of layer 0 of a real 1-layer transformers model, and
    its embedding's and final norm's sizes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(span_config(config, 0, 1), dtype=torch.float32)
    layer = m.model.layers[0]
    linear = sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, nn.Linear))
    other = sum(p.numel() for p in layer.parameters()) - linear
    return linear, other, m.model.embed_tokens.weight.numel(), sum(p.numel() for p in m.model.norm.parameters())


@pytest.mark.parametrize("name", list(_configs()))
@pytest.mark.parametrize("weights", ["f32", "f16", "int8", "int4"])
def test_the_arithmetic_equals_a_real_layer(name: str, weights: str) -> None:
    from meshllm.model.quant import bytes_per_weight

    config = _configs()[name]
    linear, other, embed, norm = _counted(config)
    assert layer_parameters(config) == (linear, other)

    shape = model_shape(config, weights)
    tables = 1 if config.tie_word_embeddings else 2
    table_bytes = embed * 4 if weights == "f32" else embed + config.vocab_size * 6
    assert shape.layer_bytes == int(linear * bytes_per_weight(weights)) + other * 4
    assert shape.embed_head_bytes == tables * table_bytes + norm * 4
    assert (shape.model_type, shape.num_layers, shape.hidden_size, shape.vocab_size, shape.max_positions) == (
        config.model_type, 3, 64, 400, 256)


@pytest.mark.parametrize("name", list(_configs()))
def test_the_attention_shape_and_projections_are_a_real_layer_own(name: str) -> None:
    """meshllm.model.layer_shape: the one reader of heads, kv heads and head size from a config."""
    from transformers import AutoModelForCausalLM

    from meshllm.model.layer_shape import attention_shape, projection_dims

    config = _configs()[name]
    with torch.device("meta"):
        layer = AutoModelForCausalLM.from_config(span_config(config, 0, 1), dtype=torch.float32).model.layers[0]
    shape = attention_shape(config)
    attn = layer.self_attn
    assert (shape.head_dim, shape.heads // shape.kv_heads) == (attn.head_dim, attn.num_key_value_groups)
    assert (shape.q_size, shape.kv_size) == (attn.q_proj.out_features, attn.k_proj.out_features)
    for target, dims in projection_dims(config).items():
        module = getattr(attn if target in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, target)
        assert dims == (module.in_features, module.out_features), target
