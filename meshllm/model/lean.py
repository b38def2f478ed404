"""A lean decoder for Llama-family layers (Llama, Qwen2, Mistral) with quantized weights.

transformers' eager layers spend about 16 ms a token outside the matmuls on the default
model; this path does the same arithmetic in a few tensor ops a layer, with q/k/v and
gate/up fused into one matmul each. It serves the f16, int8 and int4 formats; ``--weights
f32`` keeps transformers' own modules as the exact reference. transformers stays the loader
(config, rotary tables) and the reference that the tests compare against.

``LeanShard`` is a ``ShardLike`` (``meshllm.model.span``), as ``Shard`` is: hidden states are
(1, positions, hidden).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import PretrainedConfig

from meshllm.errors import ModelSourceError
from meshllm.model import kernels, quant
from meshllm.model.adapter import Adapter, check_adapter
from meshllm.model.allocator import map_large_allocations, release_free_memory  # noqa: F401  (their old home)
from meshllm.model.layer_shape import attention_shape, projection_dims
from meshllm.model.lora import LoraLinear, base_of, fused
from meshllm.model.quant import QLinear
from meshllm.model.span import ShardLike, SpanSessions

_ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
"""The activations of Llama-family configs, without transformers' activations module (which
pulls in accelerate and sympy: 54 MB of a serving node's memory)."""


def _activation(name: str):  # type: ignore[no-untyped-def]
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class _Rotary:
    """The rotary tables exactly as transformers' Llama-family rotary modules compute them,
    without importing their modelling code (torch._dynamo and more: 42 MB): inverse
    frequencies from the config's rope parameters, then cos and sin of position x frequency."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device) -> None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        self._module = None
        if rope_type == "dynamic":  # the frequencies change with the length: transformers' module
            self._module = _rotary_class(config.model_type)(config=config).to(device)
            return
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.inv_freq = inv_freq.to(device)
        self.scaling = float(scaling)

    def __call__(self, probe: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._module is not None:
            return self._module(probe, ids)
        freqs = ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def _rotary_class(model_type: str):  # type: ignore[no-untyped-def]
    if model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as R
    elif model_type == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as R
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as R
    return R


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LeanLayer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: QLinear
    o: QLinear
    gate_up: QLinear
    down: QLinear


_FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
"""Each linear of a `LeanLayer` and the projections fused into it, in row order."""


class _KV:
    """One session's keys and values for every layer of a span, grown in place, layer by
    layer (a rebuild fills some layers while others already hold every position)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.lens = [0] * layers
        self._shape = (kv_heads, head_dim)
        self._device = device
        self.k: list[torch.Tensor] = [self._empty() for _ in range(layers)]
        self.v: list[torch.Tensor] = [self._empty() for _ in range(layers)]

    def _empty(self) -> torch.Tensor:
        return torch.empty(self._shape[0], 0, self._shape[1], device=self._device)

    def reserve(self, i: int, total: int) -> None:
        cap = self.k[i].shape[1]
        if total <= cap:
            return
        new_cap = max(total, 2 * cap, 64)
        n = self.lens[i]
        for store in (self.k, self.v):
            grown = torch.empty(self._shape[0], new_cap, self._shape[1], device=self._device)
            grown[:, :n] = store[i][:, :n]
            store[i] = grown

    def keep(self, lo: int, hi: int, positions: int) -> "_KV":
        for i in range(len(self.lens)):
            if lo <= i < hi:
                self.lens[i] = min(self.lens[i], positions)
            else:
                self.lens[i] = 0
                self.k[i], self.v[i] = self._empty(), self._empty()
        return self

    def adopt(self, old: "_KV", offset: int) -> "_KV":
        for i in range(len(self.lens)):
            j = i - offset
            if 0 <= j < len(old.lens):
                self.k[i], self.v[i], self.lens[i] = old.k[j], old.v[j], old.lens[j]
        return self


class LeanShard(SpanSessions[_KV]):
    """Embedding, norm and head, plus decoder layers [start_layer, end_layer), in a quantized format.

    Not thread-safe: one worker thread drives it.
    """

    def __init__(self, config: PretrainedConfig, start_layer: int, end_layer: int, fmt: str, weights_file: str,
                 *, max_sessions: int = 64, device: str | torch.device = "cpu",
                 reuse: ShardLike | None = None, adapter: Adapter | None = None) -> None:
        """`reuse`: a shard of another span of this model; where it is a lean shard of this
        format on this device, the layers both hold, the embedding and the head are shared,
        not read again (a re-plan reads only the layers a node gains)."""
        super().__init__(start_layer, end_layer, int(config.num_hidden_layers), max_sessions)
        self.config = config
        self.weights = fmt
        self.dtype = torch.float32
        self.device = torch.device(device)
        shape = attention_shape(config)
        self.n_heads, self.n_kv, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.eps = float(config.rms_norm_eps)
        self.act = _activation(config.hidden_act)
        self._silu = config.hidden_act in ("silu", "swish")
        self.scaling = self.head_dim ** -0.5
        window = getattr(config, "sliding_window", None)
        use_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
        self.window = int(window) if window and use_window else None
        self._rotary = _Rotary(config, self.head_dim, self.device)
        self._k = kernels.get() if self.device.type == "cpu" else None
        """meshllm's kernels for the attention, norms and activation (None: torch's ops)."""
        self._cos = torch.empty(0, self.head_dim, device=self.device)
        self._sin = torch.empty(0, self.head_dim, device=self.device)
        self.nbytes = 0
        self._reuse = reuse if isinstance(reuse, LeanShard) and reuse.weights == fmt and reuse.device == self.device \
            else None
        self._load(weights_file, fmt)
        self._base_nbytes = self.nbytes
        self.adapter: Adapter | None = None
        if adapter is not None or any(isinstance(x, LoraLinear) for layer in self.layers
                                      for x in (layer.qkv, layer.o, layer.gate_up, layer.down)):
            self.set_adapter(adapter)  # (layers reused from a shard with an adapter come wrapped)

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Serve `adapter` from now on (None: the base model). Each layer is replaced by one
        whose fused linears add the low-rank update of their targeted parts; the quantized
        base linears are shared with the old layer objects, never changed (a shard this one
        reused layers from keeps its own). Raises AdapterError when the adapter does not fit."""
        if adapter is not None:
            check_adapter(adapter, self.config)
        self.layers = [self._adapted(layer, self.start_layer + i, adapter) for i, layer in enumerate(self.layers)]
        self.adapter = adapter
        self.nbytes = self._base_nbytes + sum(
            x.lora_nbytes for layer in self.layers for x in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if isinstance(x, LoraLinear))

    def _adapted(self, layer: LeanLayer, global_layer: int, adapter: Adapter | None) -> LeanLayer:
        dims = projection_dims(self.config)
        linears = {}
        for name, targets in _FUSED.items():
            pairs = [adapter.pair(global_layer, t) if adapter is not None else None for t in targets]
            scaling = adapter.spec.scaling if adapter is not None else 1.0
            linears[name] = fused(base_of(getattr(layer, name)), pairs, [dims[t][1] for t in targets], scaling,
                                  self.device)
        return replace(layer, **linears)

    # -- loading -------------------------------------------------------------------------

    def _load(self, path: str, fmt: str) -> None:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
        opened: list = []  # the file, mapped for one layer at a time (see `layer_by_layer`)

        def get(key: str) -> torch.Tensor:
            if key not in keys:
                raise ModelSourceError(f"tensor {key} is missing from the {fmt} weights")
            # a copy: tensors read from the file may sit at any byte offset, and the int8
            # kernel reads past alignment it assumes (a crash, seen on the f16 file's table)
            return opened[-1].get_tensor(key).clone()

        def linear(stems: list[str]) -> QLinear:
            return quant.read_linear(get, keys, stems, fmt, self.device)

        def layer_by_layer(items):  # type: ignore[no-untyped-def]
            """Map the file anew for each item: the pages read from a mapping count as this
            process's memory until it closes, which doubled the peak of a 1.1B model's load."""
            for item in items:
                with safe_open(path, framework="pt") as f:
                    opened.append(f)
                    yield item
                    opened.pop()

        held = self._reuse
        self.layers: list[LeanLayer] = []
        for i in range(self.start_layer, self.end_layer):
            if held is not None and held.start_layer <= i < held.end_layer:
                layer = held.layers[i - held.start_layer]  # a layer this node holds already
                self.layers.append(layer)
                self.nbytes += sum(base_of(x).nbytes for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
                self.nbytes += 2 * layer.attn_norm.numel() * 4
                continue
            for _ in layer_by_layer([i]):
                self.layers.append(self._read_layer(i, get, linear))
            layer = self.layers[-1]
            self.nbytes += sum(x.nbytes for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
            self.nbytes += 2 * layer.attn_norm.numel() * 4
        self._reuse = None
        if held is not None:
            self.norm_weight, self.embedding, self.head_table = held.norm_weight, held.embedding, held.head_table
            self.nbytes += self.embedding.nbytes + (0 if self.head_table is self.embedding else self.head_table.nbytes)
            return
        for _ in layer_by_layer([None]):
            self.norm_weight = get("model.norm.weight").float().to(self.device)
            self.embedding = self._embedding(get, "model.embed_tokens")
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.head_table = self.embedding
        if not tied and "lm_head.q" in keys:
            for _ in layer_by_layer([None]):
                self.head_table = self._embedding(get, "lm_head")
        self.nbytes += self.embedding.nbytes + (0 if self.head_table is self.embedding else self.head_table.nbytes)

    def _read_layer(self, i: int, get, linear) -> LeanLayer:  # type: ignore[no-untyped-def]
        p = f"model.layers.{i}"
        return LeanLayer(
            attn_norm=get(f"{p}.input_layernorm.weight").float().to(self.device),
            mlp_norm=get(f"{p}.post_attention_layernorm.weight").float().to(self.device),
            qkv=linear([f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"]),
            o=linear([f"{p}.self_attn.o_proj"]),
            gate_up=linear([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]),
            down=linear([f"{p}.mlp.down_proj"]),
        )

    def _embedding(self, get, stem: str) -> quant.Int8Embedding:  # type: ignore[no-untyped-def]
        q, scale = get(f"{stem}.q"), get(f"{stem}.scale").float()
        return quant.Int8Embedding(q.to(self.device), scale.to(self.device))

    @property
    def batch_invariant(self) -> bool:
        """Whether a position's hidden states have the same bits whatever the step computing it
        (alone, in a chunk, in a batch): every linear and the attention on meshllm's kernels.
        Then a rebuild may recompute many positions in one pass; else it must repeat the
        session's original chunking."""
        if self._k is None or not self._silu or not self.embedding.invariant:
            return False
        return all(x.invariant for layer in self.layers for x in (layer.qkv, layer.o, layer.gate_up, layer.down))

    @property
    def kernel(self) -> str:
        """What computes the linears: ``meshllm-<isa>`` or ``torch`` (or a mix, comma-separated)."""
        names = sorted({x.kernel for layer in self.layers for x in (layer.qkv, layer.o, layer.gate_up, layer.down)})
        return ",".join(names) or ("meshllm-" + self._k.isa if self._k is not None else "torch")

    # -- shape and sessions --------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _new_cache(self) -> _KV:
        return _KV(self.num_span_layers, self.n_kv, self.head_dim, self.device)

    def _layer_lengths(self, cache: _KV) -> list[int]:
        return list(cache.lens)

    def _keep(self, cache: _KV, lo: int, hi: int, positions: int) -> _KV:
        return cache.keep(lo, hi, positions)

    def _adopt(self, cache: _KV, offset: int, old_layers: int) -> _KV:
        return self._new_cache().adopt(cache, offset)

    def _layer_kv(self, cache: _KV, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = cache.lens[i]
        return cache.k[i][:, :n], cache.v[i][:, :n]

    def _set_layer_kv(self, cache: _KV, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache.k[i] = k.to(device=self.device, dtype=torch.float32).contiguous()
        cache.v[i] = v.to(device=self.device, dtype=torch.float32).contiguous()
        cache.lens[i] = k.shape[1]

    # -- forward -------------------------------------------------------------------------

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.embedding.lookup(ids).unsqueeze(0)  # (1, positions, hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, positions, hidden) -> logits of the last position (vocab,), on the CPU."""
        return self.logits_all(hidden[:, -1:, :])[0]

    def logits_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, positions, hidden) -> logits of every position (positions, vocab)."""
        x = hidden[0].to(device=self.device, dtype=torch.float32)
        return self.head_table.logits(self._rms(x, self.norm_weight)).float().cpu()

    def forward(self, session_id: str, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Run the span on hidden states (1, positions, hidden) at start_pos (see ``Shard.forward``)."""
        if self.num_span_layers == 0:
            self._check_hidden(hidden)
            return hidden
        kv = self._step_cache(session_id, hidden, start_pos)
        return self._forward_layers(kv, hidden, start_pos, 0, self.num_span_layers)

    def forward_batch(self, steps: list[tuple[str, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Run the span on the steps of several sessions at once: each step is (session id,
        hidden states (1, positions, hidden), start_pos). The linears, norms and activation
        see every step's rows together (the weights are read once); attention runs per
        session. Needs meshllm's kernels: with them each position gets the bits it gets when
        its session runs alone (``batch_invariant``). Returns each step's output, in order."""
        if self._k is None or not self._silu:
            return [self.forward(sid, h, start) for sid, h, start in steps]
        if len({sid for sid, _, _ in steps}) != len(steps):
            raise ValueError("a batch holds one step per session")
        if self.num_span_layers == 0:
            for _, h, _ in steps:
                self._check_hidden(h)
            return [h for _, h, _ in steps]
        caches = [self._step_cache(sid, h, start) for sid, h, start in steps]
        xs = [h[0].to(device=self.device, dtype=torch.float32) for _, h, _ in steps]
        sizes = [x.shape[0] for x in xs]
        x = torch.cat(xs).contiguous()  # (all positions, hidden)
        sessions = [(kv, start, *self._rope(start, start + n)) for kv, (_, _, start), n in zip(caches, steps, sizes)]
        for i, layer in enumerate(self.layers):
            for kv, start, cos, _ in sessions:
                kv.reserve(i, start + cos.shape[0])
            x = self._layer_kernels(layer, x, i, sessions)
            for kv, start, cos, _ in sessions:
                kv.lens[i] = start + cos.shape[0]
        return [part.unsqueeze(0) for part in x.split(sizes)]

    def _forward_layers(self, kv: _KV, hidden: torch.Tensor, start_pos: int, lo: int, hi: int) -> torch.Tensor:
        x = hidden[0].to(device=self.device, dtype=torch.float32)  # (positions, hidden)
        positions = x.shape[0]
        end = start_pos + positions
        cos, sin = self._rope(start_pos, end)
        mask, causal = self._mask(start_pos, positions)
        for i in range(lo, hi):
            kv.reserve(i, end)
            x = self._layer(self.layers[i], x, kv, i, start_pos, cos, sin, mask, causal)
            kv.lens[i] = end
        return x.unsqueeze(0)

    def _layer(self, layer: LeanLayer, x: torch.Tensor, kv: _KV, i: int, start: int,
               cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        if self._k is not None and self._silu:
            return self._layer_kernels(layer, x, i, [(kv, start, cos, sin)])
        t = x.shape[0]
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        qkv = layer.qkv(self._rms(x, layer.attn_norm))  # (positions, (nq + 2 nkv) hd)
        qk = qkv[:, : (nq + nkv) * hd].view(t, nq + nkv, hd).transpose(0, 1)  # q and k heads: one rotation
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:nq], qk[nq:]
        v = qkv[:, (nq + nkv) * hd:].view(t, nkv, hd).transpose(0, 1)
        end = start + t
        kv.k[i][:, start:end] = k
        kv.v[i][:, start:end] = v
        keys, values = kv.k[i][:, :end], kv.v[i][:, :end]
        if self.window is not None and mask is None and end > self.window:  # one position, a window
            keys, values = keys[:, end - self.window:], values[:, end - self.window:]
        if t == 1:  # decode: two small matmuls beat the fused kernel's set-up tenfold
            scores = torch.bmm(q.reshape(nkv, nq // nkv, hd), keys.transpose(1, 2)) * self.scaling
            a = torch.bmm(torch.softmax(scores, dim=-1), values).reshape(1, nq * hd)
        else:
            a = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                               attn_mask=mask, is_causal=causal, scale=self.scaling,
                                               enable_gqa=nq != nkv)[0].transpose(0, 1).reshape(t, nq * hd)
        x = x + layer.o(a)
        gu = layer.gate_up(self._rms(x, layer.mlp_norm))
        n = gu.shape[1] // 2
        return x + layer.down(self.act(gu[:, :n]) * gu[:, n:])

    def _layer_kernels(self, layer: LeanLayer, x: torch.Tensor, i: int,
                       sessions: list[tuple[_KV, int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The same layer on meshllm's kernels for the rows `x` of one or more sessions' steps,
        in order; `sessions` gives each step's cache, start and rotary tables (its row count).
        The linears, norms and activation see every row at once, attention runs per session;
        every op gives a position the same bits whatever else the step holds (batch-invariant)."""
        k = self._k
        assert k is not None
        x = x.contiguous()
        qkv = layer.qkv(kernels.rmsnorm(k, x, layer.attn_norm, self.eps))  # (positions, (nq + 2 nkv) hd)
        parts = qkv.split([cos.shape[0] for _, _, cos, _ in sessions])
        a = [kernels.attention(k, part.contiguous(), self.n_heads, self.n_kv, self.head_dim, cos, sin, kv.k[i],
                               kv.v[i], start, self.window, self.scaling)  # (positions, nq hd); writes k and v
             for part, (kv, start, cos, sin) in zip(parts, sessions)]
        x = x + layer.o(a[0] if len(a) == 1 else torch.cat(a))
        gu = layer.gate_up(kernels.rmsnorm(k, x, layer.mlp_norm, self.eps))
        return x + layer.down(kernels.silu_mul(k, gu))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._k is not None:
            return kernels.rmsnorm(self._k, x.contiguous(), weight, self.eps)
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (positions, head_dim) for positions [start, end), from a table grown on demand."""
        if end > self._cos.shape[0]:
            size = max(end, 2 * self._cos.shape[0], 256)
            ids = torch.arange(size, device=self.device).unsqueeze(0)
            probe = torch.zeros(1, device=self.device)
            cos, sin = self._rotary(probe, ids)
            self._cos, self._sin = cos[0].float(), sin[0].float()
        return self._cos[start:end], self._sin[start:end]

    def _mask(self, start: int, positions: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA: none for one position, causal from 0, else explicit."""
        end = start + positions
        windowed = self.window is not None and end > self.window
        if positions == 1 and not windowed:
            return None, False
        if start == 0 and not windowed:
            return None, True
        if positions == 1:
            return None, False  # the window is applied by slicing the keys
        rows = torch.arange(start, end, device=self.device)[:, None]
        cols = torch.arange(end, device=self.device)[None, :]
        allowed = cols <= rows
        if self.window is not None:
            allowed &= cols > rows - self.window
        return allowed, False
