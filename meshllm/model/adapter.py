"""LoRA adapters: the low-rank update a mesh serves on top of its frozen base weights.

An adapter holds, for each decoder layer and each target projection (q, k, v, o, gate, up,
down), two matrices: A `(rank, in)` and B `(out, rank)`. A projection then computes
``base(x) + B(A(x)) * alpha / rank``, as peft's LoRA ``Linear`` does (no dropout at
inference). The tensors are keyed exactly as peft's ``get_peft_model_state_dict`` keys them
for a transformers causal LM, and `save_adapter` writes peft's own folder format, so an
adapter trained here loads into ``PeftModel.from_pretrained`` and one trained with peft loads
here.

Every node applies the adapter to the layers it holds; the adapter's digest is part of the
model id, so nodes serving different adapters never share a mesh.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from meshllm.model.layer_shape import projection_dims

__all__ = [
    "TARGETS", "Adapter", "AdapterError", "AdapterSpec", "adapter_key", "adapter_shapes", "block_of", "check_adapter",
    "init_adapter", "load_adapter", "save_adapter",
]

TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every projection of a Llama-family decoder layer an adapter may target, in layer order."""

MAX_RANK = 1024
MAX_ADAPTER_BYTES = 1 << 30
"""An adapter file larger than this is refused (a rank-1024 adapter of a 7B model is ~2 GiB
in float32; the ranks federated fine-tuning uses are a few MiB)."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_ATTN = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used: the message says which file or tensor, and what is wrong."""


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of an adapter: its rank, its alpha (scaling = alpha / rank) and the projections
    it targets (kept in `TARGETS` order)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"rank must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise AdapterError(f"alpha must be a finite number above 0, got {alpha!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise AdapterError(f"targets must be a non-empty subset of {', '.join(TARGETS)}; got {list(targets)}")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, eq=False)
class Adapter:
    """An adapter's spec and tensors (peft state-dict keys -> float32 arrays, read-only copies).

    Two adapters are equal when their digests are."""

    spec: AdapterSpec
    tensors: Mapping[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        frozen: dict[str, np.ndarray] = {}
        for name in sorted(self.tensors):
            a = np.array(self.tensors[name], dtype=np.float32, order="C", copy=True)
            a.setflags(write=False)
            frozen[name] = a
        object.__setattr__(self, "tensors", frozen)

    @cached_property
    def digest(self) -> str:
        """16 hex digits of a SHA-256 over the spec and every tensor's name, shape and bytes."""
        h = hashlib.sha256()
        h.update(json.dumps({"rank": self.spec.rank, "alpha": self.spec.alpha, "targets": self.spec.targets},
                            sort_keys=True).encode())
        for name in sorted(self.tensors):
            a = self.tensors[name]
            h.update(f"\0{name}\0{','.join(map(str, a.shape))}\0".encode())
            h.update(a.astype("<f4", copy=False).tobytes())
        return h.hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Adapter) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def pair(self, layer: int, target: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(A, B) of one projection of global layer `layer`, or None when it is not targeted."""
        a = self.tensors.get(adapter_key(layer, target, "A"))
        b = self.tensors.get(adapter_key(layer, target, "B"))
        return None if a is None or b is None else (a, b)


def block_of(target: str) -> str:
    """The submodule of a decoder layer that holds `target`: "self_attn" or "mlp"."""
    return "self_attn" if target in _ATTN else "mlp"


def adapter_key(layer: int, target: str, which: str) -> str:
    """peft's state-dict key of one LoRA matrix: which is "A" (rank, in) or "B" (out, rank)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"base_model.model.model.layers.{layer}.{block_of(target)}.{target}.lora_{which}.weight"


def adapter_shapes(config, spec: AdapterSpec) -> dict[str, tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Every key of an adapter of `spec` on the model of `config`, with its shape, ordered by
    layer, then target, then A before B. A is (rank, in), B is (out, rank)."""
    dims = projection_dims(config)
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(int(config.num_hidden_layers)):
        for target in spec.targets:
            n_in, n_out = dims[target]
            shapes[adapter_key(layer, target, "A")] = (spec.rank, n_in)
            shapes[adapter_key(layer, target, "B")] = (n_out, spec.rank)
    return shapes


def check_adapter(adapter: Adapter, config) -> None:  # type: ignore[no-untyped-def]
    """AdapterError unless `adapter` has exactly the tensors of its spec on this model."""
    want = adapter_shapes(config, adapter.spec)
    missing = [k for k in want if k not in adapter.tensors]
    extra = [k for k in adapter.tensors if k not in want]
    if missing or extra:
        raise AdapterError(
            f"the adapter does not fit this model ({int(config.num_hidden_layers)} layers, targets "
            f"{', '.join(adapter.spec.targets)}): " + "; ".join(
                part for part in (f"{len(missing)} tensors missing, e.g. {missing[0]}" if missing else "",
                                  f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else "") if part))
    for key, shape in want.items():
        got = tuple(adapter.tensors[key].shape)
        if got != shape:
            raise AdapterError(f"tensor {key} has shape {got}; this model needs {shape}")


def init_adapter(config, spec: AdapterSpec, seed: int) -> Adapter:  # type: ignore[no-untyped-def]
    """A fresh adapter as peft initialises one: A uniform in +-1/sqrt(in) (kaiming-uniform with
    a = sqrt(5), nn.Linear's default), B zeros, so it starts as the base model. Pure numpy:
    the same seed gives the same adapter everywhere."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for key, (rows, cols) in adapter_shapes(config, spec).items():
        if key.endswith(".lora_A.weight"):
            bound = 1.0 / math.sqrt(cols)
            tensors[key] = rng.uniform(-bound, bound, size=(rows, cols)).astype(np.float32)
        else:
            tensors[key] = np.zeros((rows, cols), dtype=np.float32)
    return Adapter(spec, tensors)


# -- peft's folder format -------------------------------------------------------------------


def save_adapter(adapter: Adapter, folder: Path, base_model: str = "") -> None:
    """Write `adapter` into `folder` in peft's format (adapter_config.json and
    adapter_model.safetensors). Each file is written to a temporary name, then renamed."""
    from safetensors.numpy import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.spec.rank,
        "lora_alpha": adapter.spec.alpha,
        "target_modules": list(adapter.spec.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
    }
    data = save({k: np.ascontiguousarray(v) for k, v in adapter.tensors.items()},
                metadata={"format": "pt", "meshllm_digest": adapter.digest})
    _write_atomic(folder / WEIGHTS_FILE, data)
    _write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_config(folder: Path) -> AdapterSpec:
    path = folder / CONFIG_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > 1 << 20:
        raise AdapterError(f"{path} is over 1 MiB: not an adapter config")
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise AdapterError(f"{path}: {flag} is set; only plain LoRA is supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias is {cfg.get('bias')!r}; only bias 'none' is supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{path}: {key} is set; only one rank and alpha for every projection is supported")
    for key in ("modules_to_save", "layers_to_transform", "layer_replication", "trainable_token_indices"):
        if cfg.get(key):
            raise AdapterError(f"{path}: {key} is set; only LoRA on the decoder projections is supported")
    r, alpha, targets = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise AdapterError(f"{path}: r must be an integer in [1, {MAX_RANK}], got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{path}: lora_alpha must be a finite number above 0, got {alpha!r}")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets \
            or not all(isinstance(t, str) and t in TARGETS for t in targets):
        raise AdapterError(f"{path}: target_modules must be a list of names among {', '.join(TARGETS)}; "
                           f"got {targets!r}")
    return AdapterSpec(rank=r, alpha=float(alpha), targets=tuple(targets))


def load_adapter(folder: Path, config=None) -> Adapter:  # type: ignore[no-untyped-def]
    """Read an adapter written in peft's format (by `save_adapter` or peft's `save_pretrained`).

    Checks the config (plain LoRA, sane rank and alpha, known targets), the file size (at most
    1 GiB), every tensor (its key, a float dtype, finite values, A and B shapes that agree with
    the rank), and, with `config` (the model's transformers config), that the adapter has
    exactly the tensors that model needs. Raises AdapterError naming what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    spec = _read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder} holds adapter_model.bin (pickle); only {WEIGHTS_FILE} is read")
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}")
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise AdapterError(f"{path} is {size / (1 << 30):.1f} GiB; adapters over 1 GiB are refused")
    tensors = _read_tensors(path)
    for key, a in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (not a LoRA matrix of a decoder projection)")
        target, which = m.group(3), m.group(4)
        if target not in spec.targets or key != adapter_key(int(m.group(1)), target, which):
            raise AdapterError(f"{path}: tensor {key} is not among the adapter's target_modules")
        if a.ndim != 2 or (which == "A" and a.shape[0] != spec.rank) or (which == "B" and a.shape[1] != spec.rank):
            raise AdapterError(f"{path}: tensor {key} has shape {tuple(a.shape)}, which does not match rank {spec.rank}")
        if not np.isfinite(a).all():
            raise AdapterError(f"{path}: tensor {key} holds NaN or infinite values")
    for key in tensors:
        other = key[: -len("A.weight")] + ("B.weight" if key.endswith("A.weight") else "A.weight")
        if other not in tensors:
            raise AdapterError(f"{path}: tensor {key} has no partner {other}")
    if not tensors:
        raise AdapterError(f"{path} holds no tensors")
    adapter = Adapter(spec, tensors)
    if config is not None:
        try:
            check_adapter(adapter, config)
        except AdapterError as e:
            raise AdapterError(f"{folder}: {e}") from None
    return adapter


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not t.is_floating_point():
                    raise AdapterError(f"{path}: tensor {key} is {t.dtype}, not a float tensor")
                out[key] = t.to(torch.float32).numpy()
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file: {e}") from None
    return out
