"""The shape of a Llama-family decoder layer, read from its transformers config: the attention's
heads (query heads, key/value heads, the size of a head) and the (in, out) of each projection.

The one place these are derived from a config: a config may leave out ``num_key_value_heads``
(then every query head has its own: MHA) and ``head_dim`` (then it is hidden / heads). Pure
Python: reading it costs no import.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AttentionShape", "attention_shape", "projection_dims"]


@dataclass(frozen=True)
class AttentionShape:
    """Query heads, key/value heads and the size of a head."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        """Width of the queries (and of the attention's output): heads x head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the keys, and of the values: kv_heads x head_dim."""
        return self.kv_heads * self.head_dim


def attention_shape(config) -> AttentionShape:  # type: ignore[no-untyped-def]
    """The attention shape of the model of `config` (a transformers config, or anything with
    its attributes)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return AttentionShape(heads, kv_heads, head_dim)


def projection_dims(config) -> dict[str, tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(in, out) of each projection of a decoder layer, in layer order (q, k, v, o, gate, up,
    down)."""
    hidden, inter = int(config.hidden_size), int(config.intermediate_size)
    shape = attention_shape(config)
    q, kv = shape.q_size, shape.kv_size
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
