"""4-bit GGUF blocks read as int4 groups, without dequantizing and requantizing.

Every 4-bit block type here stores 32 (or 8 x 32) 4-bit codes with a scale and an offset,
and each maps exactly onto ``w = (q - 8) * scale + zero`` per group of 32 along a row:

| type | block | w | scale | zero |
|---|---|---|---|---|
| Q4_0 | f16 d, 16 bytes of codes | d * (q - 8) | d | 0 |
| Q4_1 | f16 d, f16 m, 16 bytes | d * q + m | d | m + 8 d |
| Q4_K | 256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes | d sc q - dmin mn | d sc | 8 d sc - dmin mn |

In Q4_0 and Q4_1 the byte j of a block holds value j in its low nibble and value j + 16 in
its high nibble; in Q4_K each 32 bytes hold two sub-blocks of 32, low nibbles then high.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})


def _f16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float32, little-endian float16."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _split_nibbles_16(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def read_int4(type_name: str, data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of one tensor (rows, bytes per row) -> codes (rows, cols) uint8, scale and zero
    (rows, cols // 32) float32, such that w = (codes - 8) * scale + zero, group by group."""
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)
    if type_name == "Q4_0":
        b = raw.reshape(rows, cols // 32, 18)
        d = _f16(b[..., 0:2])
        codes = _split_nibbles_16(b[..., 2:18])
        return codes.reshape(rows, cols), d, np.zeros_like(d)
    if type_name == "Q4_1":
        b = raw.reshape(rows, cols // 32, 20)
        d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        codes = _split_nibbles_16(b[..., 4:20])
        return codes.reshape(rows, cols), d, (m + 8.0 * d).astype(np.float32)
    if type_name == "Q4_K":
        b = raw.reshape(rows, cols // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])  # (rows, superblocks, 8) each
        qs = b[..., 16:144].reshape(rows, cols // 256, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=3)  # (rows, sb, 4, 2, 32): sub-block 2i, 2i+1
        scale = d[..., None] * sc
        zero = 8.0 * scale - dmin[..., None] * mn
        return (codes.reshape(rows, cols), scale.reshape(rows, -1).astype(np.float32),
                zero.reshape(rows, -1).astype(np.float32))
    raise ValueError(f"not a 4-bit block type: {type_name}")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins (as float32)."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequantize_int4(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    rows, cols = codes.shape
    g = codes.reshape(rows, cols // 32, 32).astype(np.float32)
    return ((g - 8.0) * scale[..., None] + zero[..., None]).reshape(rows, cols)


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the q/k row order that GGUF converters use for Llama-family rotary embeddings
    (pairs of halves interleaved per head); rows move, so codes and scales move alike."""
    rows = a.shape[0]
    rest = a.shape[1:]
    return a.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# -- the tensor directory of a GGUF file ---------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]
    """GGUF order: the row length first."""
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    nbytes: int


def read_tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """The tensor directory of a GGUF, read without decoding its metadata values.

    gguf's own reader turns every metadata value (a tokenizer's 50,000 strings) into numpy
    views, which takes seconds; this skips them. Raises ValueError on a malformed file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        size = len(mm)
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            width = struct.calcsize(fmt)
            if pos + width > size:
                raise ValueError(f"truncated GGUF header in {path.name}")
            (value,) = struct.unpack_from(fmt, mm, pos)
            pos += width
            return value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise ValueError(f"truncated GGUF header in {path.name}")
            pos += n
            return bytes(mm[pos - n:pos]).decode("utf-8", "replace")

        def skip(value_type: int) -> Any:
            nonlocal pos
            if value_type in _SCALAR:
                return take(_SCALAR[value_type])
            if value_type == _STRING:
                return string()
            if value_type == _ARRAY:
                item_type, count = take("<I"), take("<Q")
                if item_type in _SCALAR:  # fixed width: jump over the whole array
                    pos += struct.calcsize(_SCALAR[item_type]) * count
                else:
                    for _ in range(count):
                        skip(item_type)
                return None
            raise ValueError(f"unknown GGUF value type {value_type} in {path.name}")

        if take("<4s") != b"GGUF":
            raise ValueError(f"not a GGUF file: {path.name}")
        version, n_tensors, n_values = take("<I"), take("<Q"), take("<Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old: {path.name}")
        alignment = 32
        for _ in range(n_values):
            key = string()
            value = skip(take("<I"))
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        raw = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(take("<Q") for _ in range(n_dims))
            raw.append((name, take("<I"), shape, take("<Q")))
        data_start = -(-pos // alignment) * alignment
        infos: dict[str, TensorInfo] = {}
        for name, type_id, shape, offset in raw:
            kind = GGMLQuantizationType(type_id)  # ValueError for an unknown type
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name} has a type of unknown size: {kind.name}")
            block, block_bytes = GGML_QUANT_SIZES[kind]
            count = 1
            for d in shape:
                count *= d
            nbytes = count // block * block_bytes
            if data_start + offset + nbytes > size:
                raise ValueError(f"tensor {name} runs past the end of {path.name}")
            infos[name] = TensorInfo(name, kind.name, shape, data_start + offset, nbytes)
        return infos


def read_tensor_bytes(path: Path, info: TensorInfo) -> np.ndarray:
    """One tensor's raw bytes (blocks, for a quantized type)."""
    with path.open("rb") as f:
        f.seek(info.offset)
        return np.frombuffer(f.read(info.nbytes), dtype=np.uint8)
