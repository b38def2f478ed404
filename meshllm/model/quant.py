"""Weight formats in memory, and the linear layers that compute with them.

A node keeps its weights in one of four formats:

| format | a linear's weights | kernel (CPU) |
|---|---|---|
| ``f32`` | float32 | ``F.linear``: the exact reference path (transformers' own modules) |
| ``f16`` | fbgemm-packed float16 | fbgemm fp16 GEMM, float32 activations |
| ``int8`` | int8 per output row, one scale a row | ``_weight_int8pack_mm``, bfloat16 activations |
| ``int4`` | 4-bit codes in groups of 32 along K, a scale and a zero a group | ``_weight_int4pack_mm_for_cpu``, bfloat16 activations |

int4 computes ``w = (q - 8) * scale + zero`` per group: GGUF's Q4_0, Q4_1 and Q4_K blocks map
onto it exactly (see ``gguf_blocks``), so their codes are used as they are, never requantized.
The kernels that take int8 and int4 weights are fast only with bfloat16 activations, so those
formats round activations to bfloat16 at each linear.

The int8 and int4 kernels are fast for one position and slow for many: 2x slower than a
float32 GEMM for a 512-token prompt. From ``PREFILL_ROWS`` positions on, a linear dequantizes
its weights (one linear at a time, freed at once) into a bfloat16 GEMM where the CPU has bf16
matrix instructions (AMX or AVX512-BF16; 5x faster than float32 there), else a float32 one.
Which path a step takes depends only on its number of positions, and a session always replays
in its original chunking, so the choice never changes a token between a mesh and one node.

The embedding (and the lm_head, tied or not) is kept as int8 rows with a float32 scale a row
in every format but f32, so the largest matrix of a small model is not held in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMATS: tuple[str, ...] = ("f32", "f16", "int8", "int4")
CHOICES: tuple[str, ...] = ("auto", *FORMATS)
GROUP = 32
"""int4 group size along K (GGUF's block size)."""


def check_format(name: str) -> str:
    """`name` if it is a weight format (or ``auto``); else ValueError with the choices."""
    if name not in CHOICES:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(CHOICES)}")
    return name


def bytes_per_weight(fmt: str) -> float:
    """Bytes in memory per element of a linear's weight matrix in `fmt` (int4 counts its scales)."""
    return {"f32": 4.0, "f16": 2.0, "int8": 1.0, "int4": 0.5 + 4.0 / GROUP}[fmt]


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous and at a 64-byte aligned address (copied if it is not): the int8 kernel
    crashes on tables that sit at an odd offset, as tensors read from a file can."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


PREFILL_ROWS = 32
"""From this many positions on, int8 and int4 linears dequantize into one GEMM (see above)."""


def prefill_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies bf16 matrices natively, else float32."""
    cpu = torch.cpu
    fast = getattr(cpu, "_is_amx_tile_supported", lambda: False)() or \
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if fast else torch.float32


def _has_fbgemm() -> bool:
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# -- quantizers (from float weights) ------------------------------------------------------------


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~= q * scale[:, None]. Returns (q int8, scale float32)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, groups of 32 along K: w ~= (q - 8) * scale + zero.

    Returns codes (N, K) uint8 in 0..15, scale and zero (N, K // 32) float32.
    """
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 needs K divisible by {GROUP}, got {k}")
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    zero = lo + 8.0 * scale
    return q.reshape(n, k), scale, zero


def dense_weights(fmt: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Float32 weights from a format's stored parts: f16 (weight), int8 (q, scale) or int4
    (codes 0..15, scale, zero). For a GPU, or a shape the int4 kernel refuses."""
    if fmt == "f16":
        return parts[0].float()
    if fmt == "int8":
        return parts[0].float() * parts[1].float()[:, None]
    codes, scale, zero = parts
    n, k = codes.shape
    g = codes.reshape(n, k // GROUP, GROUP).float()
    return ((g - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) bytes, even k in the low nibble (the cache's layout)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out


# -- linear layers ------------------------------------------------------------------------------


class QLinear:
    """y = x @ W.T + b for x (M, K) float32 -> (M, N) float32, with W held in some format."""

    out_features: int
    in_features: int
    bias: torch.Tensor | None
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class DenseLinear(QLinear):
    """float32 (or, on a GPU, float16) weights and a plain matmul."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        self.weight = w.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.out_features, self.in_features = w.shape
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class F16Linear(QLinear):
    """fbgemm fp16 weights, float32 activations (nearly lossless). Without fbgemm (no AVX2),
    the float16 weights are widened per call: slower, same memory."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else bias.float()
        self._packed = None
        self._half = None
        if _has_fbgemm():
            self._packed = torch.ops._quantized.wrapped_fbgemm_pack_gemm_matrix_fp16(w.float().contiguous())
        else:
            self._half = w.half().contiguous()
        self.nbytes = self.out_features * self.in_features * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            y = torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(x, self._packed, self.bias, self.out_features)
            return y
        return F.linear(x, self._half.float(), self.bias)  # type: ignore[union-attr]


class Int8Linear(QLinear):
    """int8 weights with a scale per output row; bfloat16 activations."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.q = aligned(q.to(torch.int8))
        self.scale = aligned(scale.to(torch.bfloat16))
        self.bias = None if bias is None else bias.float()
        self.out_features, self.in_features = q.shape
        self.nbytes = self.q.numel() + self.scale.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= PREFILL_ROWS:
            dtype = prefill_dtype()
            w = self.q.to(dtype) * self.scale.to(dtype)[:, None]
            return self._add_bias(F.linear(x.to(dtype), w).float())
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)
        return self._add_bias(y.float())


class Int4Linear(QLinear):
    """4-bit codes in groups of 32 along K with a scale and a zero each; bfloat16 activations.

    ``w[n, k] = (codes[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        n, k = codes.shape
        if k % GROUP or n % 16:
            raise ValueError(f"int4 needs K divisible by {GROUP} and N by 16, got ({n}, {k})")
        self.out_features, self.in_features = n, k
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # (K / 32, N, 2): the kernel's layout for scales and zeros
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.float()
        self.nbytes = self.packed.numel() + self.scale_zero.numel() * 2
        self._block = _int4pack_block(n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= PREFILL_ROWS and self._block:
            dtype = prefill_dtype()
            return self._add_bias(F.linear(x.to(dtype), self.dequantize(dtype)).float())
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scale_zero)
        return self._add_bias(y.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weights the kernel computes with, read back from its packed layout."""
        n, k, b = self.out_features, self.in_features, self._block
        if not b:
            raise ValueError("this CPU's int4 layout is not one this code can read back")
        w = _unpack_int4pack(self.packed, n, k, b, dtype).view(n, k // GROUP, GROUP)
        scale = self.scale_zero[..., 0].t().to(dtype).unsqueeze(-1)  # (N, K / 32, 1)
        zero = self.scale_zero[..., 1].t().to(dtype).unsqueeze(-1)
        return w.mul_(scale).add_(zero - 8 * scale).view(n, k)  # (q - 8) * scale + zero


def _unpack_int4pack(packed: torch.Tensor, n: int, k: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes (N, K) from the CPU kernel's packing: per block of `block` rows, K rows of
    block / 2 bytes, byte j holding row j (low nibble) and row j + block / 2 (high)."""
    p = packed.view(n // block, k, block // 2)
    out = torch.empty(n // block, 2, block // 2, k, dtype=dtype)
    out[:, 0] = (p & 15).transpose(1, 2)
    out[:, 1] = (p >> 4).transpose(1, 2)
    return out.view(n, k)


_BLOCKS: dict[tuple[int, int], int] = {}


def _int4pack_block(n: int, k: int) -> int:
    """The row block of this CPU's int4 packing for (n, k) weights, or 0 when none of the
    layouts `_unpack_int4pack` reads matches (then prompts stay on the int4 kernel).
    Checked once per shape on random codes."""
    if (n, k) not in _BLOCKS:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        _BLOCKS[(n, k)] = next(
            (b for b in (64, 32, 16) if n % b == 0 and packed.numel() * 2 == n * k
             and torch.equal(_unpack_int4pack(packed, n, k, b, torch.int32), codes)), 0)
    return _BLOCKS[(n, k)]


def int4_fits(n: int, k: int) -> bool:
    return k % GROUP == 0 and n % 16 == 0


# -- embedding and tied head -------------------------------------------------------------------


@dataclass
class Int8Embedding:
    """Token embedding as int8 rows and a float32 scale a row; doubles as the tied lm_head."""

    q: torch.Tensor  # (vocab, hidden) int8
    scale: torch.Tensor  # (vocab,) float32

    def __post_init__(self) -> None:
        self.q = aligned(self.q)
        self._scale_bf16 = aligned(self.scale.to(torch.bfloat16))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 6

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (positions,) -> (positions, hidden) float32."""
        return self.q[ids].float() * self.scale[ids][:, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, hidden) float32 -> (M, vocab) float32."""
        if self.q.device.type != "cpu":  # no int8 CPU kernel there: a float16 matmul
            return F.linear(x.half(), self.q.half() * self.scale.half()[:, None]).float()
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self._scale_bf16).float()
