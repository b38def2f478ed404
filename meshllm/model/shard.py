"""A shard: the embedding, final norm and lm_head, plus decoder layers [start_layer, end_layer).

The decoder layers are transformers' own. A shard builds a model skeleton on the meta device
whose config is narrowed to the span, then assigns just the span's tensors read from the
weight cache, so memory grows with the span and nothing else is allocated.

transformers' modelling code (the model classes, the cache and the mask builders: with them
``torch._dynamo`` and sympy, ~80 MB) is imported only where the f32 :class:`Shard` uses it. A
node serving a quantized format runs :class:`meshllm.model.lean.LeanShard` and never loads it;
:func:`span_config` needs only the config (the config itself and the sizes it implies are
read in :mod:`meshllm.model.shape`). :func:`open_shard` opens the kind of shard a weight format
needs.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from meshllm.errors import ModelSourceError
from meshllm.model.adapter import TARGETS, Adapter, block_of, check_adapter
from meshllm.model.allocator import map_large_allocations, release_free_memory
from meshllm.model.cache import PreparedModel
from meshllm.model.lora import LoraLinear, base_of
from meshllm.model.shape import load_config
from meshllm.model.span import ShardLike, SpanSessions

if TYPE_CHECKING:
    from transformers import DynamicCache

log = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def span_config(config: PretrainedConfig, start_layer: int, end_layer: int) -> PretrainedConfig:
    """A copy of `config` whose decoder has only the layers [start_layer, end_layer).

    Layers inside a shard use local indexes 0..n-1, so their KV cache has n entries and
    transformers' mask code (which looks at the first full-attention layer) sees real data.
    """
    local = copy.deepcopy(config)
    local.num_hidden_layers = end_layer - start_layer
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        local.layer_types = list(layer_types[start_layer:end_layer])
    return local


def _layer_types(config: PretrainedConfig) -> list[str]:
    """Each layer's attention kind, as transformers' model classes pick their masks: Qwen2
    names them in `layer_types`; Mistral slides on every layer when it has a window."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return list(kinds)
    sliding = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * int(config.num_hidden_layers)


def _tensor_index(prepared: PreparedModel) -> dict[str, str]:
    index: dict[str, str] = {}
    for path in prepared.weight_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                index[key] = str(path)
    return index


class Shard(SpanSessions["DynamicCache"]):
    """Embedding, norm and head, plus a contiguous span of decoder layers, with per-session KV caches.

    Not thread-safe: one worker thread drives it.
    """

    batch_invariant = False
    """transformers' float kernels may round a position differently with the batch or chunk it
    is in: a rebuild recomputes this shard's layers in the original chunking (meshllm.mesh.rebuild)."""

    def __init__(
        self,
        prepared: PreparedModel,
        start_layer: int,
        end_layer: int,
        *,
        dtype: torch.dtype = torch.float32,
        max_sessions: int = 64,
        device: str | torch.device = "cpu",
        adapter: Adapter | None = None,
        share: Shard | None = None,
    ) -> None:
        """`adapter`: a LoRA adapter applied to the span's layers (see `set_adapter`);
        `share`: a shard of the same model, dtype and device whose embedding, final norm and
        head this one uses rather than read its own copy."""
        from transformers import AutoModelForCausalLM

        config = load_config(prepared)
        super().__init__(start_layer, end_layer, int(config.num_hidden_layers), max_sessions)
        self.config = config
        self.dtype = dtype
        self.weights = "f32"
        self.device = torch.device(device)
        self._local_config = span_config(config, start_layer, end_layer)
        self._layer_types = _layer_types(self._local_config)

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self._local_config, dtype=dtype)
        if share is not None and (share.dtype != dtype or share.device != self.device):
            share = None
        state = self._read_span_tensors(prepared, layers_only=share is not None)
        missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        allowed_missing = {"lm_head.weight"} if tied else set()
        if share is not None:
            allowed_missing |= {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}
            skeleton.model.embed_tokens = share.embed_tokens
            skeleton.model.norm = share.norm
            skeleton.lm_head = share.lm_head
            tied = False  # shared as they are
        if unexpected or set(missing) - allowed_missing:
            raise ModelSourceError(
                f"weights do not match the {config.model_type} config: "
                f"missing {sorted(set(missing) - allowed_missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        if tied:
            skeleton.lm_head.weight = skeleton.model.embed_tokens.weight
        inner = skeleton.model
        # Buffers that are not saved (rotary inv_freq) are still on meta: rebuild them.
        inner.rotary_emb = type(inner.rotary_emb)(config=self._local_config).to(self.device)
        self.norm: nn.Module = inner.norm
        inner.norm = nn.Identity()  # the decoder stack must not normalise; the head does.
        self._inner = inner
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.lm_head: nn.Linear = skeleton.lm_head
        skeleton.eval()
        for name, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers()):
            if t.is_meta:
                raise ModelSourceError(f"tensor {name} was not loaded")
        self.adapter: Adapter | None = None
        if adapter is not None:
            self.set_adapter(adapter)

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Serve `adapter` from now on (None: the base model): each projection of the span that
        the adapter targets gains its low-rank update, taken from the adapter's tensors of the
        same global layer. The base weights are not touched. Raises AdapterError when the
        adapter does not fit the model."""
        if adapter is not None:
            check_adapter(adapter, self.config)
        for i, layer in enumerate(self._inner.layers):
            for target in TARGETS:
                parent = getattr(layer, block_of(target))
                module = getattr(parent, target)
                base = base_of(module)
                pair = adapter.pair(self.start_layer + i, target) if adapter is not None else None
                if pair is not None:
                    a, b = (torch.from_numpy(np.array(t)).to(device=self.device, dtype=self.dtype) for t in pair)
                    base = LoraLinear(base, a, b, adapter.spec.scaling)  # type: ignore[union-attr]
                setattr(parent, target, base)
        self.adapter = adapter

    def _read_span_tensors(self, prepared: PreparedModel, layers_only: bool = False) -> dict[str, torch.Tensor]:
        index = _tensor_index(prepared)
        wanted: dict[str, str] = {}
        for key in index:
            m = _LAYER_KEY.match(key)
            if m:
                layer = int(m.group(1))
                if self.start_layer <= layer < self.end_layer:
                    wanted[key] = f"model.layers.{layer - self.start_layer}.{m.group(2)}"
            elif not layers_only and key.startswith(("model.embed_tokens.", "model.norm.", "lm_head.")):
                wanted[key] = key
        state: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            by_file.setdefault(index[key], []).append(key)
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    state[wanted[key]] = f.get_tensor(key).to(device=self.device, dtype=self.dtype)
        return state

    # -- shape ---------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the weights this shard holds (a tied head counted once)."""
        seen = {id(p): p for p in (*self._inner.parameters(), *self.norm.parameters(), *self.lm_head.parameters())}
        lora = sum(m.lora_nbytes for m in self._inner.modules() if isinstance(m, LoraLinear))
        return sum(p.numel() * p.element_size() for p in seen.values()) + lora

    def logits_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, positions, hidden) -> logits of every position (positions, vocab)."""
        return self.lm_head(self.norm(hidden.to(device=self.device, dtype=self.dtype)))[0].float().cpu()

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # -- sessions ------------------------------------------------------------------------

    def _new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self._local_config)

    def _layer_lengths(self, cache: DynamicCache) -> list[int]:
        return [int(layer.get_seq_length()) for layer in cache.layers]

    def _keep(self, cache: DynamicCache, lo: int, hi: int, positions: int) -> DynamicCache:
        from transformers.cache_utils import DynamicLayer

        fresh = self._new_cache()
        for i, layer in enumerate(cache.layers):
            if not lo <= i < hi:
                continue
            have = int(layer.get_seq_length())
            if have == positions:
                fresh.layers[i] = layer
            elif have > positions and type(layer) is DynamicLayer:  # a sliding layer cannot always be cut
                layer.crop(positions - have)
                fresh.layers[i] = layer
        return fresh

    def _layer_kv(self, cache: DynamicCache, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        from transformers.cache_utils import DynamicLayer

        layer = cache.layers[i]
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            return None  # a sliding layer keeps only its window: rebuilt, not handed over
        return layer.keys[0], layer.values[0]

    def _set_layer_kv(self, cache: DynamicCache, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        from transformers.cache_utils import DynamicLayer

        if type(cache.layers[i]) is not DynamicLayer:
            return
        layer = DynamicLayer()
        layer.update(k.to(device=self.device, dtype=self.dtype).unsqueeze(0),
                     v.to(device=self.device, dtype=self.dtype).unsqueeze(0))
        cache.layers[i] = layer

    def _adopt(self, cache: DynamicCache, offset: int, old_layers: int) -> DynamicCache:
        fresh = self._new_cache()
        for i in range(len(fresh.layers)):
            j = i - offset
            if 0 <= j < old_layers:
                fresh.layers[i] = cache.layers[j]
        return fresh

    # -- forward -------------------------------------------------------------------------

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """Token ids -> hidden states (1, positions, hidden)."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.embed_tokens(ids)

    def forward(self, session_id: str, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Run this shard's layers on hidden states (1, positions, hidden) at positions start_pos...

        The session's KV cache must hold exactly `start_pos` positions: prefill starts at 0,
        each decode step continues where the last one ended, and a replay starts again at 0.
        """
        if self.num_span_layers == 0:
            self._check_hidden(hidden)
            return hidden
        cache = self._step_cache(session_id, hidden, start_pos)
        return self._forward_layers(cache, hidden, start_pos, 0, self.num_span_layers)

    def _forward_layers(self, cache: DynamicCache, hidden: torch.Tensor, start_pos: int, lo: int,
                        hi: int) -> torch.Tensor:
        """transformers' own decoder loop (its model's forward) over local layers [lo, hi), so a
        rebuild of some layers repeats the arithmetic of the step that first ran them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        x = hidden.to(device=self.device, dtype=self.dtype)
        positions = x.shape[1]
        position_ids = torch.arange(start_pos, start_pos + positions, device=self.device).unsqueeze(0)
        masks: dict[str, object] = {}
        embeddings = self._inner.rotary_emb(x, position_ids=position_ids)
        for i in range(lo, hi):
            kind = self._layer_types[i]
            if kind not in masks:
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[kind] = make(config=self._local_config, inputs_embeds=x, attention_mask=None, cache=cache,
                                   position_ids=position_ids, layer_idx=lo)
            x = self._inner.layers[i](x, attention_mask=masks[kind], position_embeddings=embeddings,
                                      position_ids=position_ids, cache=cache, use_cache=True)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (1, positions, hidden) -> logits of the last position (vocab,), on the CPU."""
        normed = self.norm(hidden.to(device=self.device, dtype=self.dtype))
        return self.lm_head(normed[:, -1, :])[0].float().cpu()


def open_shard(prepared: PreparedModel, start_layer: int, end_layer: int, *, weights: str = "f32",
               device: str | torch.device = "cpu", max_sessions: int = 64,
               reuse: ShardLike | None = None, adapter: Adapter | None = None) -> ShardLike:
    """A shard of layers [start_layer, end_layer) in weight format `weights` (not `auto`).

    f32 runs transformers' own layers (the exact reference); the other formats run the lean
    decoder on quantized weights, read from the format's cache file (written on first use);
    with `reuse` (the shard of another span), the layers both hold and the embedding and head
    are shared rather than read again where it is a lean shard of this format and device.
    `adapter`: a LoRA adapter the span's layers apply. Memory freed while loading is handed
    back to the system before it returns.
    """
    map_large_allocations()  # once per process
    shard: ShardLike
    if weights == "f32":
        shard = Shard(prepared, start_layer, end_layer, device=device, max_sessions=max_sessions, adapter=adapter,
                      share=reuse if isinstance(reuse, Shard) else None)
    else:
        from meshllm.model.formats import format_file
        from meshllm.model.lean import LeanShard

        shard = LeanShard(load_config(prepared), start_layer, end_layer, weights,
                          str(format_file(prepared, weights)), max_sessions=max_sessions, device=device,
                          reuse=reuse, adapter=adapter)
    release_free_memory()
    return shard
