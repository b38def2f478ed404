"""Which weight format a model runs in, and the cache file that holds each format.

``auto`` keeps the file's precision class: a GGUF whose linears are Q4_x runs as int4 (codes
read straight from its blocks), Q5/Q6/Q8 and other quantized types as int8, F16/BF16 as f16,
F32 as f32; a Hugging Face folder keeps its dtype (bf16 runs as f16).

Each format but f32 is written once into the weight cache as ``formats/weights-<fmt>.safetensors``
beside the float32 conversion, with one entry per tensor, so a span still reads only its own
bytes. The float32 conversion stays the source of the config, the tokenizer and every tensor
that is not read from 4-bit blocks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from meshllm.model.cache import PreparedModel
from meshllm.errors import ModelSourceError
from meshllm.model.gguf_blocks import INT4_TYPES, TensorInfo, read_tensor_infos
from meshllm.model.layer_shape import attention_shape
from meshllm.model.quant import FORMATS, check_format

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_LAYER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_linear_types(path: Path) -> Counter[str]:
    """How many of the file's decoder linears are of each GGUF type (Q4_1, Q8_0, F16...)."""
    counts: Counter[str] = Counter()
    for t in _tensor_infos(path).values():
        m = _GGUF_BLOCK.match(t.name)
        if m and m.group(2) in _GGUF_LINEARS:
            counts[t.type_name] += 1
    return counts


def _tensor_infos(path: Path) -> dict[str, TensorInfo]:
    try:
        return read_tensor_infos(path)
    except (ValueError, OSError) as e:
        raise ModelSourceError(f"cannot read the tensors of {path.name}: {e}") from e


def _cached_linear_types(prepared: PreparedModel) -> Counter[str]:
    """`gguf_linear_types`, kept beside the conversion: reading a GGUF's metadata takes seconds
    (its tokenizer), and every start asks."""
    assert prepared.gguf_path is not None
    path = prepared.folder / "gguf-linear-types.json"
    try:
        return Counter(json.loads(path.read_text()))
    except (OSError, ValueError):
        counts = gguf_linear_types(prepared.gguf_path)
        fd, tmp = tempfile.mkstemp(prefix=".types-", dir=prepared.folder)  # nodes may race: each its own
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(counts))
        os.replace(tmp, path)
        return counts


def auto_format(prepared: PreparedModel) -> str:
    """The format `auto` picks for this model (see the module docstring)."""
    if prepared.gguf_path is not None:
        counts = _cached_linear_types(prepared)
        if not counts:
            return "f32"
        kind = counts.most_common(1)[0][0]
        if kind in INT4_TYPES:
            return "int4"
        if kind in ("F16", "BF16"):
            return "f16"
        if kind == "F32":
            return "f32"
        return "int8"
    dtypes = _folder_dtypes(prepared)
    if dtypes and dtypes <= {"F32"}:
        return "f32"
    if dtypes & {"F16", "BF16"}:
        return "f16"
    return "f32"


def _folder_dtypes(prepared: PreparedModel) -> set[str]:
    from meshllm.model.cache import _safetensors_header

    found: set[str] = set()
    for path in prepared.weight_files:
        header = json.loads(_safetensors_header(path))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and k.endswith(".weight")}
    return found


def resolve_format(prepared: PreparedModel, weights: str) -> str:
    """`weights` with `auto` replaced by the file's own format."""
    check_format(weights)
    return auto_format(prepared) if weights == "auto" else weights


def format_file(prepared: PreparedModel, fmt: str) -> Path:
    """The cache file holding `prepared` in `fmt` (not for f32); written on first use."""
    if fmt not in FORMATS or fmt == "f32":
        raise ValueError(f"no format file for {fmt!r}")
    folder = prepared.formats_folder or prepared.folder / "formats"
    path = folder / f"weights-{fmt}.safetensors"
    marker = folder / f"weights-{fmt}.json"
    if _complete(marker):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".weights-{fmt}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(marker):
            log.info("writing the %s weights of %s once into the weight cache", fmt, prepared.name)
            _write_format(prepared, fmt, path)
            marker.write_text(json.dumps({"version": FORMAT_VERSION, "format": fmt}))
    return path


def _complete(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text()).get("version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _write_format(prepared: PreparedModel, fmt: str, path: Path) -> None:
    """Convert every tensor of the float32 weights into `fmt`, 4-bit blocks read as they are.

    Written tensor by tensor (`TensorWriter`): memory stays in proportion to the largest
    tensor, not to the model."""
    from meshllm.model.allocator import map_large_allocations
    from meshllm.model.shape import load_config
    from meshllm.model.stwriter import TensorWriter, header_room

    map_large_allocations()  # each tensor's temporaries go back to the system when freed
    config = load_config(prepared)
    blocks = _GgufInt4Blocks(prepared, config) if fmt == "int4" and prepared.gguf_path else None
    shapes = _source_shapes(prepared)
    room = header_room([(f"{k}.parts", s) for k, s in shapes.items() for _ in range(3)],  # 3 parts at most
                       sum(4 * math.prod(s) for s in shapes.values()))
    tmp = Path(tempfile.mkstemp(prefix=".weights-", suffix=".tmp", dir=path.parent)[1])
    out = TensorWriter(tmp, room)
    try:
        _convert_tensors(prepared, fmt, out, blocks)
        out.close()
        shutil.move(str(tmp), path)
    except BaseException:
        out.abort()
        raise
    finally:
        tmp.unlink(missing_ok=True)
    if blocks is not None:
        log.info("int4: %d of %d linears read losslessly from 4-bit blocks", len(blocks.exact),
                 sum(1 for k in out if k.endswith(".codes")))


def _source_shapes(prepared: PreparedModel) -> dict[str, tuple[int, ...]]:
    from meshllm.model.cache import _safetensors_header

    shapes: dict[str, tuple[int, ...]] = {}
    for file in prepared.weight_files:
        header = json.loads(_safetensors_header(file))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


_ROWS_BYTES = 32 << 20
"""An embedding or head larger than this (in float32) is quantized in runs of rows."""


def _convert_tensors(prepared: PreparedModel, fmt: str, out, blocks) -> None:  # type: ignore[no-untyped-def]
    """Each float32 tensor of `prepared` in `fmt`, written into `out` one at a time.

    The file is opened (mapped) for one tensor at a time: the pages of a mapping stay resident
    until it is closed, and the whole model's float32 would pile up."""
    import torch
    from safetensors import safe_open

    from meshllm.model import quant

    for file in prepared.weight_files:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            stem = key.removesuffix(".weight")
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                # int8 per row, in runs of rows: the same bits as the whole at once
                with safe_open(str(file), framework="pt") as f:
                    rows, cols = f.get_slice(key).get_shape()
                step = max(1, _ROWS_BYTES // (4 * cols))
                scales = []
                out.begin(f"{stem}.q", "I8", (rows, cols))
                for r in range(0, rows, step):
                    with safe_open(str(file), framework="pt") as f:
                        part = f.get_slice(key)[r:r + step].float()
                    q, s = quant.quantize_int8_rows(part)
                    out.append(q)
                    scales.append(s)
                    del part, q
                out.end()
                out[f"{stem}.scale"] = torch.cat(scales)
                continue
            with safe_open(str(file), framework="pt") as f:
                w = f.get_tensor(key).float()
            if _LAYER_LINEAR.match(key):
                if fmt == "f16":
                    out[key] = w.half()
                elif fmt == "int8":
                    q, s = quant.quantize_int8_rows(w)
                    out[f"{stem}.q"], out[f"{stem}.scale"] = q, s
                else:
                    codes, scale, zero = _int4_for(stem, w, blocks)
                    out[f"{stem}.codes"] = quant.pack_nibbles(codes)
                    out[f"{stem}.scale"], out[f"{stem}.zero"] = scale, zero
            else:
                out[key] = w  # norms and biases stay float32
            del w


def _int4_for(stem: str, w: torch.Tensor, blocks: "_GgufInt4Blocks | None") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit blocks of `stem` when the GGUF has them, else `w` quantized group by group."""
    import torch

    from meshllm.model import quant

    found = blocks.find(stem, w) if blocks is not None else None
    if found is not None:
        codes, scale, zero = found
        return torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zero)
    return quant.quantize_int4_groups(w)


class _GgufInt4Blocks:
    """Codes, scales and zeros of the 4-bit linears in the GGUF, keyed by HF name, in the row
    order of the float32 conversion (checked against it), read one tensor at a time."""

    def __init__(self, prepared: PreparedModel, config) -> None:  # type: ignore[no-untyped-def]
        assert prepared.gguf_path is not None
        self.path = prepared.gguf_path
        shape = attention_shape(config)
        self.heads = {"attn_q": shape.heads, "attn_k": shape.kv_heads}
        self.infos: dict[str, tuple[str, TensorInfo]] = {}
        """HF stem -> (GGUF kind of linear, its tensor), for the 4-bit linears."""
        for t in _tensor_infos(self.path).values():
            m = _GGUF_BLOCK.match(t.name)
            if m and m.group(2) in _GGUF_LINEARS and t.type_name in INT4_TYPES:
                self.infos[f"model.layers.{m.group(1)}.{_GGUF_LINEARS[m.group(2)]}"] = (m.group(2), t)
        self.exact: set[str] = set()
        """The stems read from their blocks so far."""

    def find(self, stem: str, w: torch.Tensor):  # type: ignore[no-untyped-def]
        """(codes, scale, zero) of `stem` whose values are `w` (its float32 conversion), or None."""
        import numpy as np

        from meshllm.model.gguf_blocks import dequantize_int4, read_int4, read_tensor_bytes, unpermute_rows

        if stem not in self.infos:
            return None
        kind, t = self.infos[stem]
        cols, rows = (int(x) for x in t.shape[:2])
        codes, scale, zero = read_int4(t.type_name, read_tensor_bytes(self.path, t), rows, cols)
        ref = w.float().numpy()
        candidates = [(codes, scale, zero)]
        if kind in self.heads:
            n = self.heads[kind]
            candidates.append(tuple(unpermute_rows(a, n) for a in (codes, scale, zero)))
        tol = 1e-5 * float(np.abs(ref).max()) + 1e-7
        for c, s, z in candidates:
            if np.abs(dequantize_int4(c, s, z) - ref).max() <= tol:
                self.exact.add(stem)
                return np.ascontiguousarray(c), np.ascontiguousarray(s), np.ascontiguousarray(z)
        log.warning("%s: 4-bit blocks do not match the float32 conversion; requantizing it", t.name)
        return None
