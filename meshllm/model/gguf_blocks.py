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
