"""Local LoRA training: one node's round of federated fine-tuning.

A `LocalTrainer` holds a whole copy of the model as transformers' own causal LM, each targeted
projection wrapped in the serving code's `LoraLinear` (peft's arithmetic) with a LoRA adapter of
the mesh's `AdapterSpec`. Only the adapter trains. In the f32 format the base is transformers'
float32 linears; in the others (f16, int8, int4) every decoder projection is a frozen module
over the format's weight file, the very weights a node serves from (built as the lean decoder
builds them: `quant.read_linear`), so the model trained is the model served. Those modules
compute their forward with the serving kernels and their input gradient with weights
dequantized on the fly, one linear at a time; their float32 weights are never held.

Every method may be called on a worker thread that has entered `torch.inference_mode()`:
each one leaves it for its own work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meshllm.errors import ModelSourceError
from meshllm.model import quant
from meshllm.model.adapter import (
    TARGETS, AdapterError, AdapterSpec, adapter_key, adapter_shapes, block_of, init_adapter,
)
from meshllm.model.cache import PreparedModel
from meshllm.model.formats import resolve_format
from meshllm.model.lora import LoraLinear, adapters_off
from meshllm.tune.aggregate import TRAIN_BETAS, TRAIN_LR
from meshllm.tune.data import IGNORE, Example

__all__ = ["DEFAULT_LR", "FrozenQuantLinear", "LocalTrainer"]

log = logging.getLogger(__name__)

DEFAULT_LR = TRAIN_LR
"""AdamW learning rate for the LoRA matrices. Measured on the default model (rank 8, alpha 16,
four phrasings of one made-up fact): alone, one node learns it within one round of 10 steps
(loss 2.24 -> 0.04) and still answers unrelated questions as before; 2e-4 needs 3 rounds.
The margin is for federated rounds, where the node holding a fact has its update averaged
with the others'. The coordinator's bound on an update's norm follows from it
(`meshllm.tune.aggregate.adamw_norm_bound`)."""
MAX_GRAD_NORM = 1.0


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T + b through a frozen quantized linear. Backward gives the input's gradient
    only, with W dequantized for the moment it takes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "FrozenQuantLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return module.compute(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[no-untyped-def, override]
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.module.dense()  # (out, in) float32, freed on return
        return (grad.to(w.dtype) @ w).to(grad.dtype), None


class FrozenQuantLinear(nn.Module):
    """A decoder projection in a quantized format, frozen: no parameters; a `LoraLinear` wraps
    it like any linear."""

    def __init__(self, linear: quant.QLinear, fmt: str, dense_parts: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.fmt = fmt
        self.infeatures, self.outfeatures = linear.in_features, linear.out_features
        self._dense_parts = dense_parts  # only for an int4 layout the kernel's packing cannot be read back from

    @property
    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in self._dense_parts) if self._dense_parts else 0
        return int(self.linear.nbytes) + extra

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.linear(x.reshape(-1, shape[-1]).float())
        return y.reshape(*shape[:-1], self.outfeatures)

    def dense(self) -> torch.Tensor:
        """The (out, in) float32 weights the forward computes with."""
        lin = self.linear
        if isinstance(lin, quant.Int8Linear):
            return lin.dequantize(torch.float32)
        if isinstance(lin, quant.Int4Linear):
            if self._dense_parts is not None:
                packed, scale, zero = self._dense_parts
                return quant.dense_weights("int4", [quant.unpack_nibbles(packed), scale, zero])
            return lin.dequantize(torch.float32)
        if isinstance(lin, quant.HalfLinear):
            return lin.weight.float()
        if isinstance(lin, quant.DenseLinear):
            return lin.weight.float()
        raise TypeError(f"no dense weights for {type(lin).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.infeatures}, out_features={self.outfeatures}"


class LocalTrainer:
    """A whole model with a LoRA adapter that trains on this node's examples.

    Drive it from one worker thread. Deterministic for a given seed and call sequence.
    """

    def __init__(self, prepared: PreparedModel, weights: str, spec: AdapterSpec, *, device: str = "cpu",
                 lr: float = DEFAULT_LR, seed: int = 0) -> None:
        from meshllm.model.shape import load_config

        self.prepared = prepared
        self.weights = resolve_format(prepared, weights)
        self.spec = spec
        self.device = torch.device(device)
        self.lr = float(lr)
        self.seed = seed
        self.config = load_config(prepared)
        self._shapes = adapter_shapes(self.config, spec)
        self._cursor = 0
        self._optimizer: torch.optim.Optimizer | None = None
        """AdamW over the adapter, kept from one `train` call to the next within a round."""
        with torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            self._params: dict[str, nn.Parameter] = {}
            """The adapter's A and B, keyed as adapter.py keys them, in the model's order."""
            self.model = self._build()
        if set(self._params) != set(self._shapes):
            raise RuntimeError(f"{len(self._params)} trainable tensors, expected {len(self._shapes)}")
        self.set_adapter(init_adapter(self.config, spec, seed).tensors)

    # -- building ---------------------------------------------------------------------------

    def _build(self) -> nn.Module:
        """transformers' model on the meta device, its tensors assigned from the weight cache
        (the quantized projections from the format's file), frozen; then each targeted
        projection wrapped in a `LoraLinear` whose A and B train."""
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        config = self.config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        quantized = self.weights != "f32"
        projections = {f"model.layers.{i}.{block_of(t)}.{t}" for i in range(int(config.num_hidden_layers))
                       for t in TARGETS}
        if quantized:
            self._install_quantized(model)
        state: dict[str, torch.Tensor] = {}
        for path in self.prepared.weight_files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if quantized and key.rsplit(".", 1)[0] in projections:
                        continue
                    state[key] = f.get_tensor(key).to(device=self.device, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        del state
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        allowed = {"lm_head.weight"} if tied else set()
        if unexpected or set(missing) - allowed:
            raise ModelSourceError(f"weights do not match the {config.model_type} config: missing "
                                   f"{sorted(set(missing) - allowed)[:5]}, unexpected {sorted(unexpected)[:5]}")
        # buffers that are not saved (rotary inv_freq) are still on meta: rebuild them
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(self.device)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta:
                raise ModelSourceError(f"tensor {name} was not loaded")
        model.config.use_cache = False
        model.eval()  # no dropout anywhere: training is deterministic
        model.requires_grad_(False)
        for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
            for target in self.spec.targets:
                parent = getattr(layer, block_of(target))
                a, b = (adapter_key(i, target, which) for which in ("A", "B"))
                for key in (a, b):
                    self._params[key] = nn.Parameter(torch.zeros(self._shapes[key], device=self.device))
                setattr(parent, target, LoraLinear(getattr(parent, target), self._params[a], self._params[b],
                                                   self.spec.scaling))
        return model

    def _install_quantized(self, model: nn.Module) -> None:
        """Every decoder projection becomes a FrozenQuantLinear over the format file's weights."""
        from safetensors import safe_open

        from meshllm.model.formats import format_file

        fmt = self.weights
        path = str(format_file(self.prepared, fmt))
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
                for target in TARGETS:
                    stem = f"model.layers.{i}.{block_of(target)}.{target}"
                    parent = getattr(layer, block_of(target))
                    setattr(parent, target, self._quantized(f, keys, stem, fmt))

    def _quantized(self, f, keys: set[str], stem: str, fmt: str) -> FrozenQuantLinear:  # type: ignore[no-untyped-def]
        def get(name: str) -> torch.Tensor:
            if name not in keys:
                raise ModelSourceError(f"tensor {name} is missing from the {fmt} weights")
            return f.get_tensor(name).clone()

        linear = quant.read_linear(get, keys, [stem], fmt, self.device, readable=True)
        if isinstance(linear, quant.Int4Linear) and not linear.readable:  # keep the codes for the backward
            return FrozenQuantLinear(linear, fmt, [get(f"{stem}.codes"), get(f"{stem}.scale"), get(f"{stem}.zero")])
        return FrozenQuantLinear(linear, fmt)

    # -- the adapter ------------------------------------------------------------------------

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load an adapter (adapter.py keys; the mesh's global adapter at the start of a round)."""
        missing = [k for k in self._shapes if k not in tensors]
        extra = [k for k in tensors if k not in self._shapes]
        if missing or extra:
            raise AdapterError(f"the adapter does not fit this trainer: {len(missing)} tensors missing, "
                               f"{len(extra)} unexpected" + (f", e.g. {(missing or extra)[0]}"))
        for key, shape in self._shapes.items():
            if tuple(np.shape(tensors[key])) != shape:
                raise AdapterError(f"tensor {key} has shape {tuple(np.shape(tensors[key]))}; expected {shape}")
        with torch.inference_mode(False), torch.no_grad():
            for key, p in self._params.items():
                p.copy_(torch.from_numpy(np.array(tensors[key], dtype=np.float32)))
        self._optimizer = None  # a new round starts with fresh optimizer state

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        """The current adapter, float32 copies keyed as adapter.py keys them."""
        return {k: p.detach().float().cpu().numpy().copy() for k, p in self._params.items()}

    # -- training ---------------------------------------------------------------------------

    def train(self, examples: Sequence[Example], steps: int) -> float:
        """`steps` AdamW steps on the adapter, one example each, taking the examples in order
        from where the last call stopped (round robin). The mean training loss of the steps.

        The optimizer's state carries over from one call to the next until `set_adapter`
        starts a new round: a round trained one step a call (so that a node's answers
        interleave with its training) is the round trained in one call."""
        if not examples:
            raise ValueError("no examples to train on")
        if steps <= 0:
            return float("nan")
        losses: list[float] = []
        with torch.inference_mode(False), torch.enable_grad():
            params = list(self._params.values())
            if self._optimizer is None:
                self._optimizer = torch.optim.AdamW(params, lr=self.lr, betas=TRAIN_BETAS, weight_decay=0.0)
            optimizer = self._optimizer
            for _ in range(steps):
                example = examples[self._cursor % len(examples)]
                self._cursor += 1
                ids, labels = self._tensors(example)
                loss = self.model(input_ids=ids, labels=labels, use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
        return float(np.mean(losses))

    def loss(self, examples: Sequence[Example], *, base: bool = False) -> float:
        """Mean negative log-likelihood a token over the learned tokens of `examples`, with the
        adapter (or, `base=True`, without it)."""
        total, count = 0.0, 0
        with torch.inference_mode(False), torch.no_grad(), (adapters_off(self.model) if base else nullcontext()):
            for example in examples:
                ids, labels = self._tensors(example)
                logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1]  # (positions - 1, vocab)
                targets = labels[0, 1:]
                keep = targets != IGNORE
                total += float(F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"))
                count += int(keep.sum())
        return total / max(1, count)

    def _tensors(self, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([example.input_ids], dtype=torch.long, device=self.device)
        labels = torch.tensor([example.labels], dtype=torch.long, device=self.device)
        return ids, labels

    @property
    def nbytes(self) -> int:
        """Bytes of the model held: parameters and buffers (a tied head counted once), the
        quantized projections, and the adapter."""
        seen = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        quantized = sum(m.nbytes for m in self.model.modules() if isinstance(m, FrozenQuantLinear))
        return sum(t.numel() * t.element_size() for t in seen.values()) + quantized
