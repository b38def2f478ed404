"""The one LoRA linear (meshllm.model.lora): peft's arithmetic bit for bit, forward and
backward, on any base; the fused form of the lean decoder is the sum of its parts' updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from meshllm.model import quant
from meshllm.model.lora import LoraLinear, adapters_off, base_of, fused


def _peft_linear(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float):  # type: ignore[no-untyped-def]
    """peft's own LoRA Linear around `base`, with A and B set."""
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

    holder = Holder()
    get_peft_model(holder, LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    layer = holder.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def test_the_forward_and_gradients_are_peft_own_bit_for_bit() -> None:
    # (an earlier test may leave a half-consumed `Engine.generate` holding inference mode)
    with torch.inference_mode(False), torch.enable_grad():
        _forward_and_gradients()


def _forward_and_gradients() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(48, 4) * 0.1
    x = torch.randn(1, 5, 64)
    theirs = _peft_linear(base, a, b, alpha=8.0)
    ours = LoraLinear(base, nn.Parameter(a.clone()), nn.Parameter(b.clone()), 8.0 / 4)
    y_theirs, y_ours = theirs(x), ours(x)
    assert torch.equal(y_theirs, y_ours)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    assert torch.equal(theirs.lora_A["default"].weight.grad, ours.lora_A.grad)
    assert torch.equal(theirs.lora_B["default"].weight.grad, ours.lora_B.grad)
    with adapters_off(ours), torch.no_grad():
        assert torch.equal(ours(x), base(x))
    assert ours.enabled and base_of(ours) is base and base_of(base) is base
    assert (ours.in_features, ours.out_features, ours.bias is base.bias) == (64, 48, True)
    assert ours.nbytes == (64 * 48 + 48) * 4 + ours.lora_nbytes


@pytest.mark.parametrize("fmt", ["f16", "int8", "int4"])
def test_a_fused_linear_adds_each_part_own_update(fmt: str) -> None:
    """q/k/v fused: k carries no adapter; the result is each part's own base(x) + update."""
    torch.manual_seed(1)
    rows = [64, 32, 32]
    w = torch.randn(sum(rows), 64) * 0.1
    parts = {"f16": lambda m: (m.half(),), "int8": quant.quantize_int8_rows,
             "int4": quant.quantize_int4_groups}[fmt]
    base = quant.build_linear(fmt, [parts(m) for m in w.split(rows)], None, torch.device("cpu"))
    rng = np.random.default_rng(2)
    pairs = [(rng.normal(0, 0.1, (4, 64)).astype(np.float32), rng.normal(0, 0.1, (n, 4)).astype(np.float32))
             if i != 1 else None for i, n in enumerate(rows)]
    linear = fused(base, pairs, rows, 2.0, torch.device("cpu"))
    assert isinstance(linear, LoraLinear) and linear.lora_A.shape == (8, 64) and linear.lora_B.shape == (128, 8)
    assert linear.invariant == base.invariant and linear.kernel == base.kernel
    assert fused(base, [None, None, None], rows, 2.0, torch.device("cpu")) is base
    x = torch.randn(3, 64)
    with torch.inference_mode():
        got = linear(x)
        want = base(x) + torch.cat([x @ torch.from_numpy(p[0]).T @ torch.from_numpy(p[1]).T * 2.0 if p is not None
                                    else torch.zeros(3, n) for p, n in zip(pairs, rows)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
