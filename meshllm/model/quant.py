"""Weight formats in memory, and the linear layers that compute with them.

A node keeps its weights in one of four formats:

| format | a linear's weights | kernel (CPU) |
|---|---|---|
| ``f32`` | float32 | ``F.linear``: the exact reference path (transformers' own modules) |
| ``f16`` | float16 | meshllm's float kernel (float32 activations); else fbgemm's fp16 GEMM |
| ``int8`` | int8, a scale per output row | meshllm's int8 x int8 kernel; else ``_weight_int8pack_mm`` (bf16 activations) |
| ``int4`` | 4-bit codes in groups of 32 along K, a scale and a zero a group | meshllm's int4 x int8 kernel; else ``_weight_int4pack_mm_for_cpu`` (bf16 activations) |

int4 computes ``w = (q - 8) * scale + zero`` per group: GGUF's Q4_0, Q4_1 and Q4_K blocks map
onto it exactly (see ``gguf_blocks``), so their codes are used as they are, never requantized.

**meshllm's kernels** (``meshllm.model.kernels``, compiled at first use where a C compiler
exists) multiply 4-bit and 8-bit weights by activations quantized to 8 bits per block of 32,
with integer dot products (AVX2 ``maddubs``, NEON ``sdot``), and sum the per-block partials in a
fixed order: a row's result has the same bits whatever the number of rows, the thread count and
the CPU. Those linears are *batch-invariant* (``QLinear.invariant``). Without the kernels (no
compiler, ``MESHLLM_KERNEL_ISA=off``) the torch kernels below run, as before: fast only with
bfloat16 activations, and for many positions a dequantize-then-GEMM path (from
``PREFILL_ROWS`` positions on) whose rounding depends on the number of positions, so a session
must then replay in its original chunking.

A format's linear is built in one place, `read_linear` (from a format's weight file) and
`build_linear` (from its stored parts): the lean decoder and LoRA training both use them.

The embedding (and the lm_head, tied or not) is kept as int8 rows with a float32 scale a row
in every format but f32, so the largest matrix of a small model is not held in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshllm.model import kernels

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("f32", "f16", "int8", "int4")
CHOICES: tuple[str, ...] = ("auto", *FORMATS)
GROUP = 32
"""int4 group size along K (GGUF's block size)."""


def kernel_description(fmt: str, device: str = "cpu") -> tuple[str, bool]:
    """(what computes a node's layers in `fmt`, whether its numerics are batch-invariant):
    shown when a node starts and in ``/v1/status``."""
    if fmt == "f32":
        return "transformers (torch float32, the exact reference)", False
    if device != "cpu":
        return f"torch float16 on {device}", False
    status = kernels.status()
    return status.describe(), status.isa is not None


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
    invariant: bool = False
    """True when a row's result never depends on the other rows (meshllm's kernels)."""
    kernel: str = "torch"
    """What computes it: ``meshllm-<isa>`` or ``torch``."""

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


class HalfLinear(QLinear):
    """float16 weights widened to float32 per call: slower than `F16Linear`, but the weights it
    computes with stay readable (training's backward reads them)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = w.half().contiguous()
        self.bias = None if bias is None else bias.float()
        self.out_features, self.in_features = w.shape
        self.nbytes = self.weight.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float(), self.bias)


class F16Linear(QLinear):
    """fbgemm fp16 weights, float32 activations (nearly lossless). Without fbgemm (no AVX2),
    the float16 weights are widened per call: slower, same memory."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else bias.float()
        self._packed = None
        self._half = None
        self._mat: kernels.FloatMatrix | None = None
        if (k := kernels.get()) is not None:
            self._mat = kernels.FloatMatrix(w.half(), k)
            self._half = self._mat.w
            self.invariant, self.kernel = True, f"meshllm-{k.isa}"
        elif _has_fbgemm():
            self._packed = torch.ops._quantized.wrapped_fbgemm_pack_gemm_matrix_fp16(w.float().contiguous())
        else:
            self._half = w.half().contiguous()
        self.nbytes = self.out_features * self.in_features * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._mat is not None:
            return self._add_bias(self._mat.matmul(x))
        if self._packed is not None:
            y = torch.ops._quantized.wrapped_fbgemm_linear_fp16_weight(x, self._packed, self.bias, self.out_features)
            return y
        return F.linear(x, self._half.float(), self.bias)  # type: ignore[union-attr]


class Int8Linear(QLinear):
    """int8 weights with a scale per output row: meshllm's kernel (8-bit activations), else
    torch's (bfloat16 activations)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else bias.float()
        self.out_features, self.in_features = q.shape
        self._mat: kernels.Int8Matrix | None = None
        if (k := kernels.get()) is not None and self.in_features % GROUP == 0:
            self._mat = kernels.Int8Matrix(q, scale.float(), k)
            self.packed, self.scale = self._mat.q, scale.float()  # the kernel's layout (kernels.to_quads)
            self.nbytes = self._mat.nbytes
            self.invariant, self.kernel = True, f"meshllm-{k.isa}"
            return
        self.q = aligned(q.to(torch.int8))
        self.scale = aligned(scale.to(torch.bfloat16))
        self.nbytes = self.q.numel() + self.scale.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._mat is not None:
            return self._add_bias(self._mat.matmul(x))
        if x.shape[0] >= PREFILL_ROWS:
            dtype = prefill_dtype()
            w = self.q.to(dtype) * self.scale.to(dtype)[:, None]
            return self._add_bias(F.linear(x.to(dtype), w).float())
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale)
        return self._add_bias(y.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weights it computes with."""
        if self._mat is not None:
            return self._mat.dequantize().to(dtype)
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)


class Int4Linear(QLinear):
    """4-bit codes in groups of 32 along K with a scale and a zero each: meshllm's kernel (8-bit
    activations), else torch's (bfloat16 activations).

    ``w[n, k] = (codes[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        n, k = codes.shape
        if not int4_fits(n, k):
            raise ValueError(f"int4 needs K divisible by {GROUP} and N by 16, got ({n}, {k})")
        self.out_features, self.in_features = n, k
        self.bias = None if bias is None else bias.float()
        self._mat: kernels.Int4Matrix | None = None
        if (kern := kernels.get()) is not None:
            # w = scale * q + mn, mn = zero - 8 scale: the kernel's form of the same weights
            self._mat = kernels.Int4Matrix(codes, scale.float(), zero.float() - 8.0 * scale.float(), kern)
            self.packed = self._mat.codes
            self.nbytes = self._mat.nbytes
            self.invariant, self.kernel = True, f"meshllm-{kern.isa}"
            self._block = 0
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # (K / 32, N, 2): the kernel's layout for scales and zeros
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.nbytes = self.packed.numel() + self.scale_zero.numel() * 2
        self._block = _int4pack_block(n, k)

    @property
    def readable(self) -> bool:
        """Whether `dequantize` can read the weights back (always with meshllm's kernels)."""
        return self._mat is not None or bool(self._block)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._mat is not None:
            return self._add_bias(self._mat.matmul(x))
        if x.shape[0] >= PREFILL_ROWS and self._block:
            dtype = prefill_dtype()
            return self._add_bias(F.linear(x.to(dtype), self.dequantize(dtype)).float())
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scale_zero)
        return self._add_bias(y.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weights the kernel computes with, read back from its packed layout."""
        if self._mat is not None:
            return self._mat.dequantize().to(dtype)
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
    """Whether an (n, k) weight runs as int4 here (torch's kernel also needs n % 16 == 0)."""
    return k % GROUP == 0 and (n % 16 == 0 or kernels.get() is not None)


# -- a linear of a format, from its stored parts --------------------------------------------------


def read_linear(get: Callable[[str], torch.Tensor], keys: Container[str], stems: Sequence[str], fmt: str,
                device: torch.device, *, readable: bool = False) -> QLinear:
    """The linear of the projections `stems` of a format's weight file (formats.py), fused
    along the output rows in order; `get(name)` reads one of the file's tensors, `keys` holds
    their names. A part without a bias gets zeros where another part has one."""
    biases = [get(f"{s}.bias") if f"{s}.bias" in keys else None for s in stems]
    bias = None
    if any(b is not None for b in biases):
        sizes = [_stored_rows(get, s, fmt) for s in stems]
        bias = torch.cat([b.float() if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)])
    return build_linear(fmt, [_stored_parts(get, s, fmt) for s in stems], bias, device, readable=readable)


def build_linear(fmt: str, parts: Sequence[tuple[torch.Tensor, ...]], bias: torch.Tensor | None,
                 device: torch.device, *, readable: bool = False) -> QLinear:
    """One linear in `fmt` (not f32) from the stored parts of one or more projections (f16:
    weight; int8: q, scale; int4: codes 0..15, scale, zero), fused along the output rows.

    On a GPU: dense float16 (the quantized kernels are the CPU's). On the CPU: the format's
    linear; int4 weights the int4 kernels cannot take run as int8 rows. `readable`: f16 as
    `HalfLinear`, whose weights can be read back (training)."""
    joined = list(parts[0]) if len(parts) == 1 else [torch.cat(col) for col in zip(*parts)]
    if bias is not None:
        bias = bias.float().to(device)
    if device.type != "cpu":
        return DenseLinear(dense_weights(fmt, joined).to(device), bias, torch.float16)
    if fmt == "f16":
        return HalfLinear(joined[0], bias) if readable else F16Linear(joined[0], bias)
    if fmt == "int8":
        return Int8Linear(joined[0], joined[1], bias)
    codes, scale, zero = joined
    if not int4_fits(*codes.shape):
        log.info("a %s linear does not fit int4 kernels; it runs as int8", tuple(codes.shape))
        return Int8Linear(*quantize_int8_rows(dense_weights(fmt, joined)), bias)
    return Int4Linear(codes, scale, zero, bias)


def _stored_parts(get: Callable[[str], torch.Tensor], stem: str, fmt: str) -> tuple[torch.Tensor, ...]:
    if fmt == "f16":
        return (get(f"{stem}.weight"),)
    if fmt == "int8":
        return get(f"{stem}.q"), get(f"{stem}.scale")
    return unpack_nibbles(get(f"{stem}.codes")), get(f"{stem}.scale"), get(f"{stem}.zero")


def _stored_rows(get: Callable[[str], torch.Tensor], stem: str, fmt: str) -> int:
    """Output rows of one stored linear (for the zero bias of a fused part that has none)."""
    rows_tensor = {"f16": "weight", "int8": "q", "int4": "codes"}[fmt]
    return int(get(f"{stem}.{rows_tensor}").shape[0])


# -- embedding and tied head -------------------------------------------------------------------


@dataclass
class Int8Embedding:
    """Token embedding as int8 rows and a float32 scale a row; doubles as the tied lm_head."""

    q: torch.Tensor  # (vocab, hidden) int8
    scale: torch.Tensor  # (vocab,) float32

    def __post_init__(self) -> None:
        self.q = aligned(self.q)
        self._scale_bf16 = aligned(self.scale.to(torch.bfloat16))
        self._mat: kernels.Int8Matrix | None = None
        k = kernels.get() if self.q.device.type == "cpu" else None
        if k is not None and self.q.shape[1] % GROUP == 0:
            # the kernel's layout holds the table: lookups read their rows from it
            self._mat = kernels.Int8Matrix(self.q, self.scale.float(), k)
            self.q = self._mat.q

    @property
    def invariant(self) -> bool:
        return self._mat is not None

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 6

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (positions,) -> (positions, hidden) float32."""
        rows = self._mat.rows(ids) if self._mat is not None else self.q[ids]
        return rows.float() * self.scale[ids][:, None]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, hidden) float32 -> (M, vocab) float32."""
        if self._mat is not None:
            return self._mat.matmul(x)
        if self.q.device.type != "cpu":  # no int8 CPU kernel there: a float16 matmul
            return F.linear(x.half(), self.q.half() * self.scale.half()[:, None]).float()
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self._scale_bf16).float()
