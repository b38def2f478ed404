"""Tensor codecs: hidden states (float32 numpy arrays) <-> :class:`TensorPayload`.

Codecs (all little-endian):

- ``f32``: the float32 values as they are. Exact.
- ``f16``: IEEE half precision, round to nearest even. Relative error at most 2**-11 for
  ``|x| >= 2**-14``; absolute error at most 2**-25 below that. ``|x| > 65504`` does not fit.
- ``bf16``: the top 16 bits of the float32, round to nearest even. Relative error at most
  2**-8 (absolute at most 2**-134 for float32 subnormals). Same range as float32.
- ``int8``: per row (a row is one vector along the last axis), a float32 scale
  ``max(|row|) / 127`` followed by symmetric int8 values ``rint(x / scale)``. Absolute error at
  most about ``scale / 2 = max(|row|) / 254`` per element. Data: all scales, then all values.

Then zstd, adaptively: with ``compress="auto"`` the codec output is compressed and kept only
when it saves at least :data:`ZSTD_MIN_SAVING` of the bytes; ``TensorPayload.zstd`` says
whether it was applied. Values must be finite (NaN and inf are refused both ways).

This module uses numpy, never torch.
"""

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import zstandard

from meshllm.errors import WireError
from meshllm.wire.schema import Bool, Bytes, Text, TupleOf, UInt, WireStruct

CODECS: tuple[str, ...] = ("f32", "f16", "bf16", "int8")
"""The tensor codec names, as they appear in ``TensorPayload.codec`` and ``Plan.codec``."""

MAX_TENSOR_DIMS = 8
MAX_TENSOR_ELEMENTS = 2**28
"""Hard ceiling on elements in any payload (1 GiB as float32); see also ``max_elements``."""

DEFAULT_MAX_ELEMENTS = 2**24
"""Default ``max_elements`` of :func:`decode_tensor`: 64 MiB as float32."""

ZSTD_LEVEL = 3
ZSTD_MIN_SAVING = 0.05
"""With ``compress="auto"``, zstd is kept only when it makes the data at least 5% smaller."""

_BYTES_PER_ELEMENT = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}
_INT8_SCALE_BYTES = 4
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_I8 = np.dtype("i1")


def raw_size_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Bytes of a codec's output for a tensor of ``shape`` before zstd."""
    elements = math.prod(shape)
    size = elements * _BYTES_PER_ELEMENT[codec]
    if codec == "int8":
        size += (elements // shape[-1]) * _INT8_SCALE_BYTES
    return size


def _zstd_bound(size: int) -> int:
    """Largest zstd output for ``size`` input bytes (ZSTD_COMPRESSBOUND) plus frame header."""
    small_margin = ((128 * 1024 - size) >> 11) if size < 128 * 1024 else 0
    return size + (size >> 8) + small_margin + 32


@dataclass(frozen=True)
class TensorPayload(WireStruct):
    """One tensor on the wire: travels as the CBOR array ``[codec, shape, zstd, data]``."""

    codec: Annotated[str, Text(max_len=8, choices=CODECS)]
    """Which codec produced ``data``: one of :data:`CODECS`."""
    shape: Annotated[
        tuple[int, ...], TupleOf(UInt(min_value=1, max_value=2**31 - 1), MAX_TENSOR_DIMS, 1)
    ]
    """The tensor's shape, e.g. ``(positions, hidden)``; 1 to 8 dims, each at least 1."""
    zstd: Annotated[bool, Bool()]
    """Whether ``data`` is one zstd frame of the codec's output."""
    data: Annotated[bytes, Bytes(max_len=2**40)]
    """The codec's output, zstd-compressed when ``zstd`` is true."""

    def _check_invariants(self) -> None:
        elements = math.prod(self.shape)
        if elements > MAX_TENSOR_ELEMENTS:
            raise WireError(
                f"TensorPayload.shape: {elements} elements; at most {MAX_TENSOR_ELEMENTS}"
            )
        expected = raw_size_bytes(self.codec, self.shape)
        if not self.zstd:
            if len(self.data) != expected:
                raise WireError(
                    f"TensorPayload.data: {len(self.data)} bytes, but a {self.codec} tensor "
                    f"of shape {self.shape} takes {expected}"
                )
            return
        if len(self.data) > _zstd_bound(expected):
            raise WireError(
                f"TensorPayload.data: {len(self.data)} zstd bytes is more than zstd can "
                f"produce from {expected} bytes"
            )
        try:
            content_size = zstandard.frame_content_size(self.data)
        except zstandard.ZstdError as exc:
            raise WireError(f"TensorPayload.data: not a zstd frame ({exc})") from None
        if content_size != expected:
            raise WireError(
                f"TensorPayload.data: zstd frame declares {content_size} bytes of content; "
                f"a {self.codec} tensor of shape {self.shape} takes {expected}"
            )


def encode_tensor(
    arr: np.ndarray, codec: str, *, compress: bool | Literal["auto"] = "auto"
) -> TensorPayload:
    """Encode a float32 array with ``codec`` (one of :data:`CODECS`).

    ``compress``: ``"auto"`` applies zstd only when it saves at least 5%; ``True`` always
    applies it; ``False`` never does. Raises WireError for a non-float32 or empty array,
    NaN/inf values, values out of the codec's range, or an unknown codec.
    """
    if compress not in ("auto", True, False) or not isinstance(compress, (bool, str)):
        raise WireError(f"compress must be 'auto', True or False, got {compress!r}")
    if codec not in CODECS:
        raise WireError(f"unknown tensor codec {codec!r}; known: {', '.join(CODECS)}")
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
        dtype = getattr(arr, "dtype", type(arr).__name__)
        raise WireError(f"encode_tensor takes a float32 numpy array, got {dtype}")
    if arr.ndim == 0 or arr.size == 0:
        raise WireError(f"cannot encode a tensor of shape {arr.shape}: needs >= 1 dim, no empty")
    if not np.isfinite(arr).all():
        raise WireError("cannot encode a tensor with NaN or inf values")
    raw = _pack(np.ascontiguousarray(arr), codec)
    zstd = False
    if compress is not False:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw)
        if compress is True or len(packed) <= len(raw) * (1 - ZSTD_MIN_SAVING):
            raw, zstd = packed, True
    return TensorPayload(codec=codec, shape=tuple(arr.shape), zstd=zstd, data=raw)


def decode_tensor(
    payload: TensorPayload,
    *,
    expect_shape: tuple[int | None, ...] | None = None,
    expect_codec: str | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """Decode a payload into a new, writable float32 array of ``payload.shape``.

    ``expect_shape`` (``None`` entries match any size, e.g. ``(None, 576)``) and
    ``expect_codec`` reject a tensor that does not fit what the model expects;
    ``max_elements`` bounds what gets allocated. Every failure raises WireError.
    """
    if not isinstance(payload, TensorPayload):
        raise WireError(f"decode_tensor takes a TensorPayload, got {type(payload).__name__}")
    shape = payload.shape
    if expect_codec is not None and payload.codec != expect_codec:
        raise WireError(f"tensor codec is {payload.codec!r}; expected {expect_codec!r}")
    if expect_shape is not None and (
        len(expect_shape) != len(shape)
        or any(want is not None and want != got for want, got in zip(expect_shape, shape))
    ):
        raise WireError(f"tensor shape is {shape}; expected {expect_shape}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise WireError(f"tensor of shape {shape} has {elements} elements; limit {max_elements}")
    expected = raw_size_bytes(payload.codec, shape)
    raw = payload.data
    if payload.zstd:
        # The frame's declared content size was checked against `expected` when the payload was
        # built; zstandard allocates whatever a frame declares, so that check must come first.
        try:
            raw = zstandard.ZstdDecompressor().decompress(
                raw, max_output_size=expected, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise WireError(f"tensor zstd data is corrupt: {exc}") from None
        if len(raw) != expected:
            raise WireError(f"tensor zstd data gave {len(raw)} bytes; expected {expected}")
    arr = _unpack(raw, payload.codec, shape)
    if not np.isfinite(arr).all():
        raise WireError("tensor carries NaN or inf values")
    return arr


def _pack(arr: np.ndarray, codec: str) -> bytes:
    if codec == "f32":
        return arr.astype(_F32, copy=False).tobytes()
    if codec == "f16":
        half = arr.astype(_F16)
        _check_no_overflow(half, arr, "f16")
        return half.tobytes()
    if codec == "bf16":
        bf = _to_bf16_bits(arr)
        _check_no_overflow(_from_bf16_bits(bf), arr, "bf16")
        return bf.tobytes()
    rows = arr.reshape(-1, arr.shape[-1])  # (rows, last)
    scales = (np.abs(rows).max(axis=1) / np.float32(127)).astype(_F32)  # (rows,)
    safe = np.where(scales > 0, scales, np.float32(1))
    quantised = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(_I8)
    return scales.tobytes() + quantised.tobytes()


def _unpack(raw: bytes, codec: str, shape: tuple[int, ...]) -> np.ndarray:
    if codec == "f32":
        return np.frombuffer(raw, dtype=_F32).astype(np.float32).reshape(shape)
    if codec == "f16":
        return np.frombuffer(raw, dtype=_F16).astype(np.float32).reshape(shape)
    if codec == "bf16":
        return _from_bf16_bits(np.frombuffer(raw, dtype=_U16)).reshape(shape)
    rows = math.prod(shape) // shape[-1]
    scale_bytes = rows * _INT8_SCALE_BYTES
    scales = np.frombuffer(raw, dtype=_F32, count=rows)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise WireError("int8 tensor has a negative or non-finite row scale")
    quantised = np.frombuffer(raw, dtype=_I8, offset=scale_bytes).reshape(rows, shape[-1])
    values = quantised.astype(np.float32) * scales.astype(np.float32)[:, None]
    return values.reshape(shape)


def _to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = arr.astype(_F32, copy=False).view(_U32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)  # inputs are finite: no wrap
    return rounded.astype(_U16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(_U32) << np.uint32(16)).view(_F32).astype(np.float32)


def _check_no_overflow(converted: np.ndarray, original: np.ndarray, codec: str) -> None:
    if not np.isfinite(converted).all():
        largest = float(np.abs(original).max())
        raise WireError(f"tensor value {largest:g} is out of {codec} range")
