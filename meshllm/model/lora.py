"""The LoRA linear: a projection plus an adapter's low-rank update, with peft's arithmetic.

``out = base(x) + (dropout(x) @ A.T @ B.T) * scaling``, A ``(rank, in)``, B ``(out, rank)``,
exactly as peft's LoRA ``Linear`` computes it (``lora_B(lora_A(dropout(x))) * scaling``). One
class serves every place a projection takes an adapter:

- the f32 shard: the base is transformers' ``nn.Linear``, A and B plain tensors;
- the lean decoder: the base is a quantized `QLinear`, maybe several projections fused along
  the output rows (`fused`: A stacked, B block-diagonal); where the base runs on meshllm's
  batch-invariant kernels, the low-rank product runs on the fixed-order float kernel, so the
  layer stays invariant;
- training: A and B are ``nn.Parameter`` (they train), the base is frozen.

The base is never changed (a quantized one stays quantized).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meshllm.model import kernels
from meshllm.model.quant import QLinear

__all__ = ["LoraLinear", "adapters_off", "base_of", "fused"]


class LoraLinear(nn.Module, QLinear):
    """`base_layer` (an ``nn.Module`` or a `QLinear`) plus ``(dropout(x) @ lora_A.T @ lora_B.T) * scaling``.

    Also a `QLinear` (``out_features``, ``in_features``, ``bias``, ``nbytes``, ``invariant``,
    ``kernel``), so the lean decoder holds it where it holds any linear."""

    def __init__(self, base_layer: Any, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = lora_A  # (rank, in); an nn.Parameter registers as one
        self.lora_B = lora_B  # (out, rank)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.enabled = True
        """False: the base alone (`adapters_off`)."""
        k = None
        if getattr(base_layer, "invariant", False) and lora_A.device.type == "cpu" and not lora_A.requires_grad:
            k = kernels.get()
        # the low-rank product through the fixed-order float kernel keeps an invariant base invariant
        self._ab = (kernels.FloatMatrix(lora_A, k), kernels.FloatMatrix(lora_B, k)) if k is not None else None
        self.invariant = self._ab is not None
        self.kernel = getattr(base_layer, "kernel", "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        if self._ab is not None:
            return result + self._ab[1].matmul(self._ab[0].matmul(x)) * self.scaling
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        return result + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return int(self.lora_B.shape[0])

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return int(self.lora_A.shape[1])

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return getattr(self.base_layer, "bias", None)

    @property
    def lora_nbytes(self) -> int:
        return self.lora_A.nbytes + self.lora_B.nbytes

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        base = self.base_layer
        held = base.nbytes if hasattr(base, "nbytes") else sum(p.nbytes for p in base.parameters())
        return int(held) + self.lora_nbytes

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling}"


def base_of(linear: Any) -> Any:
    """The base of a `LoraLinear`; any other linear as it is."""
    return linear.base_layer if isinstance(linear, LoraLinear) else linear


def fused(base: QLinear, pairs: Sequence[tuple[np.ndarray, np.ndarray] | None], rows: Sequence[int],
          scaling: float, device: torch.device) -> QLinear:
    """`base`, a linear of several projections fused along its output rows (`rows` each, in
    order), plus the low-rank update of those with an (A, B) pair in `pairs`: A the pairs' A
    stacked (sum of ranks, in), B block-diagonal (out, sum of ranks), zero rows for a part
    without a pair. `base` itself when no part has one."""
    used = [p for p in pairs if p is not None]
    if not used:
        return base
    a = np.concatenate([p[0] for p in used], axis=0)  # (parts * rank, in)
    b = np.zeros((sum(rows), sum(p[0].shape[0] for p in used)), dtype=np.float32)  # block-diagonal
    row, col = 0, 0
    for n, pair in zip(rows, pairs):
        if pair is not None:
            rank = pair[0].shape[0]
            b[row:row + n, col:col + rank] = pair[1]
            col += rank
        row += n
    return LoraLinear(base, torch.from_numpy(a).to(device), torch.from_numpy(b).to(device), scaling)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base model for a while: every `LoraLinear` in it adds nothing (peft's
    ``disable_adapter``)."""
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in wrapped:
        m.enabled = False
    try:
        yield
    finally:
        for m in wrapped:
            m.enabled = True
