"""meshllm's own CPU kernels (``qmm.c``): 4-bit and 8-bit weights times 8-bit activations with
integer dot products, float-weight products, attention, RMSNorm and SiLU, all batch-invariant.

Every output element is computed by one fixed sequence of float operations, whatever the
number of rows, the tile it falls in, the thread count and the instruction set (portable C,
AVX2, NEON): a position gets the same bits alone, in a batch, in a chunk of a prompt or in a
rebuild, and on every CPU that runs these kernels. ``qmm.c`` states the definitions.

The library is compiled at first use with the system's C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``) into the cache (``$MESHLLM_CACHE_DIR/kernels``), for the best instruction set this
CPU has, and checked against the portable definitions on random data before it is used. Where
there is no compiler, or the build or the check fails, :func:`get` returns None and callers
keep torch's kernels (slower on most CPUs, and not batch-invariant).

``MESHLLM_KERNEL_ISA=auto|avx512vnni|avxvnni|avx2|neon|portable|off`` picks the instruction set
(``avx2`` on an AVX-512 machine simulates a laptop; ``off`` forces torch's kernels). Every one
of them gives the same bits; only the speed differs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GROUP = 32
"""Block size along K of the quantized formats and of the activations."""

_SOURCE = Path(__file__).with_name("qmm.c")
_ISA_FLAGS: dict[str, list[str]] = {
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512vnni", "-mavx512vl"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "neon-dotprod": ["-march=armv8.2-a+dotprod"],
    "neon": [],
    "portable": [],
}
ISAS = ("auto", "avx512vnni", "avxvnni", "avx2", "neon", "portable", "off")


@dataclass(frozen=True)
class KernelStatus:
    """What this process computes with: shown at start-up and in ``/v1/status``."""

    isa: str | None
    """The instruction set of the loaded kernels, or None when torch's kernels are used."""
    reason: str
    """Why: the kernels in use, or why they are not."""
    openmp: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"isa": self.isa, "reason": self.reason, "openmp": self.openmp}

    def describe(self) -> str:
        if self.isa is None:
            return f"torch kernels ({self.reason})"
        return f"meshllm kernels, {self.isa}{' + OpenMP' if self.openmp else ''}"


class Kernels:
    """The loaded library and typed entry points (pointers from tensors)."""

    def __init__(self, lib: ctypes.CDLL, isa: str) -> None:
        self.lib = lib
        self.isa = isa
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.mq_linear_q4.argtypes = [p, i64, i64, p, p, p, i64, p, i32, i32]
        lib.mq_linear_q8.argtypes = [p, i64, i64, p, p, i32, i64, p, i32, i32]
        lib.mq_linear_f.argtypes = [p, i64, i64, p, i32, i64, p, i32, i32]
        lib.mq_rmsnorm.argtypes = [p, i64, i64, p, f32, p, i32]
        lib.mq_silu_mul.argtypes = [p, i64, i64, p, i32]
        lib.mq_attention.argtypes = [p, i64, i64, i64, i64, p, p, p, p, i64, i64, i64, f32, p, p, i64, p, i32]
        for name in ("mq_linear_f", "mq_rmsnorm", "mq_silu_mul", "mq_attention"):
            getattr(lib, name).restype = None
        for name in ("mq_linear_q4", "mq_linear_q8"):  # 0, or -1 when its scratch memory was refused
            getattr(lib, name).restype = ctypes.c_int
        lib.mq_isa.restype = ctypes.c_char_p
        lib.mq_openmp.restype = ctypes.c_int
        self.ref = 0
        """1: the portable definitions even where SIMD paths exist (the self-check's reference)."""

    @property
    def openmp(self) -> bool:
        return bool(self.lib.mq_openmp())


_lock = threading.Lock()
_loaded: Kernels | None = None
_status: KernelStatus | None = None


def wanted_isa() -> str:
    """The instruction set to build for: ``MESHLLM_KERNEL_ISA`` or this CPU's best."""
    want = os.environ.get("MESHLLM_KERNEL_ISA", "auto").strip().lower() or "auto"
    if want not in ISAS:
        raise ValueError(f"MESHLLM_KERNEL_ISA={want!r}: choose one of {', '.join(ISAS)}")
    if want == "neon":
        return "neon-dotprod" if _has_dotprod() else "neon"
    return runnable_isas()[-1] if want == "auto" else want


def runnable_isas() -> list[str]:
    """Every instruction set of ours this CPU runs, the fastest last (the tests build each one
    and compare; VNNI has the integer dot product in one instruction)."""
    machine = platform.machine().lower()
    out = ["portable"]
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        if {"avx2", "fma", "f16c"} <= flags:
            out.append("avx2")
            if "avx_vnni" in flags:
                out.append("avxvnni")
            if {"avx512_vnni", "avx512vl"} <= flags:
                out.append("avx512vnni")
    elif machine in ("aarch64", "arm64"):
        out.append("neon")
        if _has_dotprod():
            out.append("neon-dotprod")
    return out


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability()
        return {"avx2", "fma", "f16c"} if cap in ("AVX2", "AVX512") else set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _has_dotprod() -> bool:
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return out == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return "asimddp" in _cpu_flags()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    from meshllm.model.cache import default_cache_dir

    return default_cache_dir() / "kernels"


def _build(isa: str) -> Path:
    """The compiled library for `isa`, built once into the cache (atomically: nodes that share
    the cache may build at the same time). Raises RuntimeError with the compiler's words."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source + cc.encode() + version.encode() + isa.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    target = out_dir / f"qmm-{isa}-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [cc, "-O3", "-fPIC", "-shared", "-ffp-contract=off", *_ISA_FLAGS[isa]]
    errors = []
    for extra in (["-fopenmp"], []):  # without OpenMP (macOS's clang): one thread, same numerics
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [*base, *extra, str(_SOURCE), "-o", tmp, "-lm"]
        log.info("building meshllm kernels for %s: %s", isa, " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    raise RuntimeError(f"the C compiler failed: {errors[0]}")


def get() -> Kernels | None:
    """The kernels for this CPU, built and checked on first use; None where they cannot be
    (see :func:`status` for why)."""
    global _loaded, _status
    if _status is not None:
        return _loaded
    with _lock:
        if _status is not None:
            return _loaded
        try:
            isa = wanted_isa()
        except ValueError as e:
            _status = KernelStatus(None, str(e))
            return None
        if isa == "off":
            _status = KernelStatus(None, "MESHLLM_KERNEL_ISA=off")
            return None
        try:
            path = _build(isa)
            k = Kernels(ctypes.CDLL(str(path)), isa)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _status = KernelStatus(None, f"cannot build meshllm kernels: {e}")
            log.warning("%s; using torch's kernels", _status.reason)
            return None
        problem = self_check(k)
        if problem:
            k.ref = 1
            log.warning("meshllm kernels (%s) differ from their definition (%s): using the portable path", isa,
                        problem)
            isa = f"portable (the {isa} path failed its check)"
            k.isa = isa
        _loaded = k
        _status = KernelStatus(isa, "built and checked", k.openmp)
        return k


def status() -> KernelStatus:
    get()
    assert _status is not None
    return _status


def _reset_for_tests() -> None:
    global _loaded, _status
    _loaded, _status = None, None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("meshllm kernels: no memory for a product's scratch")


# -- matrices ---------------------------------------------------------------------------------


def pack_q4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K / 2) bytes, per block of 32: byte j = value j | value j + 16 << 4."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // GROUP, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_q4_blocks(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    p = packed.reshape(n, half // 16, 16)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(n, half * 2)


def to_quads(t: torch.Tensor) -> torch.Tensor:
    """Per-row, per-block data (N, G, ...) -> the kernels' layout (ceil(N / 4), G, 4, ...): the four
    rows a tile reads side by side, block after block (one stream); zero rows pad the last quad."""
    pad = (-t.shape[0]) % 4
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    return t.reshape(t.shape[0] // 4, 4, *t.shape[1:]).transpose(1, 2).contiguous()


def from_quads(q: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of `to_quads`: (N, G, ...)."""
    return q.transpose(1, 2).reshape(-1, *q.shape[1:2], *q.shape[3:])[:rows]


class _Matrix:
    """Weights (out_features, in_features) that multiply float32 activations (M, in_features)."""

    k: Kernels
    out_features: int
    in_features: int

    def _bind(self, kernels: Kernels | None) -> None:
        k = kernels or get()
        if k is None:
            raise RuntimeError(status().reason)
        self.k = k

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in_features) -> (M, out_features) float32, every row with the same bits in any batch."""
        x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        if x.shape[0]:
            self._product(x, y)
        return y

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Int4Matrix(_Matrix):
    """4-bit weights in blocks of 32 along K: ``w[n, k] = scale[n, k // 32] * codes[n, k] + mn[n, k // 32]``,
    scale and mn kept as float16 (GGUF's Q4_0 and Q4_1 store exactly those)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, kernels: Kernels | None = None) -> None:
        self._bind(kernels)
        n, k = codes.shape
        if k % GROUP:
            raise ValueError(f"int4 needs K divisible by {GROUP}, got {k}")
        self.out_features, self.in_features = n, k
        groups = k // GROUP
        self.codes = to_quads(pack_q4_blocks(codes).view(n, groups, 16))
        self.scale = to_quads(scale.to(torch.float16).reshape(n, groups))
        spare = torch.zeros(n * groups + 8, dtype=torch.float16)  # 8 spare zeros after the last row (qmm.c)
        spare[: n * groups] = mn.to(torch.float16).reshape(-1)
        self.mn = spare[: n * groups].view(n, groups)
        self._mn_store = spare
        self.nbytes = self.codes.numel() + 2 * (self.scale.numel() + spare.numel())

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _check(self.k.lib.mq_linear_q4(_ptr(x), x.shape[0], self.in_features, _ptr(self.codes), _ptr(self.scale),
                                       _ptr(self.mn), self.out_features, _ptr(y), _threads(), self.k.ref))

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        c = unpack_q4_blocks(from_quads(self.codes, n).reshape(n, k // 2)).float().view(n, k // GROUP, GROUP)
        return (from_quads(self.scale, n).float()[..., None] * c + self.mn.float()[..., None]).view(n, k)


class Int8Matrix(_Matrix):
    """8-bit weights in blocks of 32 along K: ``w[n, k] = scale[n, k // 32] * q[n, k]``, q in -127..127."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernels: Kernels | None = None) -> None:
        self._bind(kernels)
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"int8 blocks need K divisible by {GROUP}, got {k}")
        self.out_features, self.in_features = n, k
        self.per_row = scale.dim() == 1  # one scale a row (the same for each block), or one a block
        q = q.to(torch.int8)
        if q.numel() and int(q.min()) < -127:  # -128 would overflow the kernel's sign trick
            q = q.clamp(-127, 127)
        self.q = to_quads(q.reshape(n, k // GROUP, GROUP))  # (ceil(N / 4), G, 4, 32)
        scale = scale.to(torch.float32)
        self.scale = scale.contiguous() if self.per_row else to_quads(scale.reshape(n, k // GROUP))
        self.nbytes = self.q.numel() + 4 * self.scale.numel()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The int8 codes of rows `ids`: (len(ids), K) (an embedding's lookup)."""
        return self.q[ids // 4, :, ids % 4, :].reshape(len(ids), self.in_features)

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _check(self.k.lib.mq_linear_q8(_ptr(x), x.shape[0], self.in_features, _ptr(self.q), _ptr(self.scale),
                                       int(self.per_row), self.out_features, _ptr(y), _threads(), self.k.ref))

    def dequantize(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        scale = self.scale[:, None] if self.per_row else from_quads(self.scale, n)
        return (from_quads(self.q, n).float() * scale[..., None]).view(n, k)


class FloatMatrix(_Matrix):
    """float32 or float16 weights (N, K), float32 activations, a fixed order per output."""

    def __init__(self, w: torch.Tensor, kernels: Kernels | None = None) -> None:
        self._bind(kernels)
        if w.dtype not in (torch.float32, torch.float16):
            w = w.float()
        self.w = w.contiguous()
        self.half = int(w.dtype == torch.float16)
        self.out_features, self.in_features = w.shape
        self.nbytes = self.w.numel() * self.w.element_size()

    def _product(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.k.lib.mq_linear_f(_ptr(x), x.shape[0], self.in_features, _ptr(self.w), self.half, self.out_features,
                               _ptr(y), _threads(), self.k.ref)


# -- row ops ----------------------------------------------------------------------------------


def rmsnorm(k: Kernels, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (M, H) contiguous float32 -> x / sqrt(mean(x^2) + eps) * weight."""
    m, h = x.shape
    y = torch.empty_like(x)
    k.lib.mq_rmsnorm(_ptr(x), m, h, _ptr(weight), eps, _ptr(y), _threads())
    return y


def silu_mul(k: Kernels, gu: torch.Tensor) -> torch.Tensor:
    """gu (M, 2N) contiguous -> silu(gu[:, :N]) * gu[:, N:]."""
    m, n2 = gu.shape
    y = torch.empty(m, n2 // 2, dtype=torch.float32)
    k.lib.mq_silu_mul(_ptr(gu), m, n2 // 2, _ptr(y), _threads())
    return y


def attention(k: Kernels, qkv: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, window: int | None,
              scale: float) -> torch.Tensor:
    """Rotate q and k of `qkv` (T, (nq + 2 nkv) D), write k and v into the caches (nkv, cap, D)
    at positions [start, start + T), and attend: (T, nq D). Causal, with an optional window."""
    t = qkv.shape[0]
    assert qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous() and k_cache.shape[1] >= start + t
    q_tmp = torch.empty(t, n_heads, head_dim, dtype=torch.float32)
    out = torch.empty(t, n_heads * head_dim, dtype=torch.float32)
    threads = _threads()
    stride = start + t + 8 + head_dim  # each thread's scores (a position's keys) and value sums
    scratch = torch.empty(threads, stride, dtype=torch.float32)
    k.lib.mq_attention(_ptr(qkv), t, n_heads, n_kv, head_dim, _ptr(cos), _ptr(sin), _ptr(k_cache), _ptr(v_cache),
                       k_cache.shape[1], start, window or 0, scale, _ptr(q_tmp), _ptr(scratch), stride, _ptr(out),
                       threads)
    return out


# -- the check ----------------------------------------------------------------------------------


def self_check(k: Kernels) -> str:
    """'' when the SIMD paths give the portable definitions' bits on random data; else what differs."""
    g = torch.Generator().manual_seed(1234)
    was = k.ref
    try:
        # (the last: past the AVX-512 tiles' 16-block chunk)
        for m, n, kk in ((1, 13, 96), (5, 7, 64), (9, 33, 288), (4, 8, 1056)):
            x = torch.randn(m, kk, generator=g) * 3
            codes = torch.randint(0, 16, (n, kk), dtype=torch.uint8, generator=g)
            scale = torch.rand(n, kk // GROUP, generator=g) * 0.1
            mn = -torch.rand(n, kk // GROUP, generator=g)
            q = torch.randint(-127, 128, (n, kk), dtype=torch.int8, generator=g)
            wf = torch.randn(n, kk + 3, generator=g)
            xf = torch.randn(m, kk + 3, generator=g)
            mats = {"int4": (Int4Matrix(codes, scale, mn, k), x), "int8": (Int8Matrix(q, scale, k), x),
                    "int8 rows": (Int8Matrix(q, scale[:, 0].contiguous(), k), x),
                    "f32": (FloatMatrix(wf, k), xf), "f16": (FloatMatrix(wf.half(), k), xf)}
            for name, (mat, inp) in mats.items():
                k.ref = 0
                fast = mat.matmul(inp)
                k.ref = 1
                ref = mat.matmul(inp)
                if not torch.equal(fast, ref):
                    return f"{name} at M={m}, N={n}, K={kk}"
        return ""
    finally:
        k.ref = was
