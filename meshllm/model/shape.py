"""A model's config, read and checked, and the sizes it implies: what the planner and the wire
need to know about a model (`ModelShape`), counted from the config without loading a weight."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from meshllm.errors import ModelSourceError
from meshllm.model.cache import PreparedModel
from meshllm.model.hfconfig import import_config_validators
from meshllm.model.layer_shape import attention_shape, projection_dims
from meshllm.model.quant import bytes_per_weight

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral"})


@dataclass(frozen=True)
class ModelShape:
    """What the planner and the wire need to know about a model, read from its config."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    layer_bytes: int
    """Bytes of one decoder layer's weights in the weight format in use."""
    embed_head_bytes: int
    """Bytes of embedding + final norm + lm_head (counted once when tied)."""


def load_config(prepared: PreparedModel) -> PretrainedConfig:
    import_config_validators()
    config = AutoConfig.from_pretrained(prepared.folder)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"unsupported architecture {config.model_type!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    return config


def layer_parameters(config: PretrainedConfig) -> tuple[int, int]:
    """(weights of the linear projections, every other parameter) of one decoder layer, counted
    from the config as transformers' Llama, Qwen2 and Mistral layers hold them: q/k/v/o and
    gate/up/down; biases on q/k/v for Qwen2, on all four attention projections (Llama's
    ``attention_bias``) and on the MLP (``mlp_bias``) where a Llama config asks; two RMSNorm
    weights. ``tests/model/test_shard_shape.py`` checks it against real transformers models."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    shape = attention_shape(config)
    q, kv = shape.q_size, shape.kv_size
    linear = sum(n_in * n_out for n_in, n_out in projection_dims(config).values())
    other = 2 * hidden  # input_layernorm, post_attention_layernorm
    if config.model_type == "qwen2":
        other += q + 2 * kv
    elif config.model_type == "llama":
        if getattr(config, "attention_bias", False):
            other += q + 2 * kv + hidden
        if getattr(config, "mlp_bias", False):
            other += 2 * inter + hidden
    return linear, other


def model_shape(config: PretrainedConfig, weights: str = "f32") -> ModelShape:
    """Bytes per layer and for embed/norm/head in the weight format `weights`, from the config.

    Linear weights count `bytes_per_weight(weights)` an element; norms and biases stay float32;
    the embedding and head are int8 rows with a float32 scale (and a bfloat16 copy of it) a
    row, except in f32.
    """
    linear, other = layer_parameters(config)
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    tables = 1 if getattr(config, "tie_word_embeddings", False) else 2
    norm = hidden
    table_bytes = vocab * hidden * 4 if weights == "f32" else vocab * (hidden + 6)
    return ModelShape(
        model_type=config.model_type,
        num_layers=int(config.num_hidden_layers),
        hidden_size=hidden,
        vocab_size=vocab,
        max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        layer_bytes=int(linear * bytes_per_weight(weights)) + other * 4,
        embed_head_bytes=tables * table_bytes + norm * 4,
    )
