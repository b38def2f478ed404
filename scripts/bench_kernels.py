#!/usr/bin/env python3
"""Time candidate kernels for y = x @ W.T with 4-bit weights, on meshllm's model shapes.

    python scripts/bench_kernels.py [--shapes small|tinyllama|all] [--m 1,4,16,512] [--threads 1,2]
                                    [--repeats 5] [--candidates a,b,b_prompt,c,d,e] [--isa native|avx2]
                                    [--json OUT]

The weights: random 4-bit codes q (N, K) in 0..15, groups of 32 along K, a float32 scale s and
min m per group: w[n, k] = s[n, k/32] * q[n, k] + m[n, k/32]. The mins are m = -8 s (the symmetric
Q4_0 case, w = s (q - 8)) so that every candidate computes the same matrix: candidates c and d have
no per-group min of their own (see "what each candidate is" below).

Shapes (K x N): SmolLM2-135M (the default model): 576x960 (fused q,k,v), 576x1536 (gate or up),
576x3072 (fused gate+up), 1536x576 (down), 576x49152 (lm_head, M <= 16 only: a prompt needs the
logits of its last position only); TinyLlama-1.1B: 2048x2560 (fused q,k,v), 2048x2048 (o),
2048x11264 (fused gate+up), 5632x2048 (down).

Candidates (--candidates; a letter each):
  a         torch float32 F.linear (MKL sgemm), weights dequantized once to float32.
  b         torch int4: aten._weight_int4pack_mm_for_cpu on aten._convert_weight_to_int4pack_for_cpu
            weights, bfloat16 activations, as meshllm's Int4Linear does for fewer than 32 rows; timed
            at every M (x.to(bfloat16) and .float() included).
  b_prompt  meshllm's prompt path for 32 rows and more: unpack the nibbles, dequantize to the prefill
            dtype (bfloat16 where the CPU has AVX512-BF16/AMX and torch runs AVX-512, else float32)
            and F.linear, each call. Only at M >= 32; its invariance is checked against b at M = 1
            (together they are meshllm's int4 today).
  c         torch aten._dyn_quant_matmul_4bit on aten._dyn_quant_pack_4bit_weight (int8 activations
            quantized per row; KleidiAI on ARM builds of torch; symmetric weights only, no min).
  d         onnxruntime MatMulNBits (com.microsoft; bits=4, block_size=32, accuracy_level=4: int8
            activations), a one-node graph built with the onnx helper, default zero point (8), session
            with intra_op_num_threads = threads (spinning off); timed around session.run() with a
            numpy input, output wrapped back into torch.
  d_fzp     as d with float zero points (what an exact per-group min would need), to see whether they
            keep the int8 path. Not in the default list.
  d_fp32    as d with accuracy_level=0 (float32 compute). Not in the default list.
  e         meshllm's own kernel: meshllm.model.kernels.Int4Matrix(codes, scale, min).matmul(x);
            skipped, with a note, when that module is missing or its status() has no ISA.
  e8        meshllm.model.kernels.Int8Matrix(q, scale) (int8 weights, a scale per 32): other weights
            (random int8), so its error is measured against its own matrix. Not in the default list.

For each (shape, M, threads) the candidates take turns, the order rotated each repeat; a sample is
the mean of enough back-to-back calls to fill ~25 ms; the tables show the median of the repeats,
with +-x% = half the interquartile range / median of the samples (the noise; min and max are in the
JSON), and the effective GB/s
of weight bytes (the bytes the candidate keeps for the matrix, read once a call; small matrices sit
in the caches, so they can beat DRAM bandwidth). A call estimated to take longer than --max-call-s
(from the medians at the smaller M, see estimate()) is skipped.

Invariance (bitwise): row 0 of X is the same vector at every M, the other rows random. "batch" says
whether row 0's output at M = 4, 16, 512 has the bits it had at M = 1 (at each thread count), and
"threads" whether each output has the same bits at 1 and at 2 threads. "err" is the largest
|y - y_exact| / max |y_exact| over 4 rows against a float64 product with the weights the candidate
holds (bfloat16 scales for b and b_prompt).

--isa avx2 simulates an AVX2-only CPU on an AVX-512 one: the script runs itself again with
ATEN_CPU_CAPABILITY=avx2 (torch's ATen kernels), ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN), MKL_ENABLE_INSTRUCTIONS=
AVX2 (MKL) and MESHLLM_KERNEL_ISA=avx2 (meshllm's kernels). onnxruntime's MLAS picks its kernels
from cpuid and has no switch to cap them, so its figures under --isa avx2 are still the AVX-512 ones.

Install cost and platforms (static facts; the script also measures the RSS an import adds):

| candidate | platforms covered | install cost |
|---|---|---|
| a torch f32 | every CPU torch runs on (MKL on x86, OpenBLAS/Accelerate elsewhere) | none: torch is a dependency |
| b torch int4pack | every CPU torch runs on; vectorized for AVX2 and AVX-512 (ATen), a generic at::vec path elsewhere | none |
| c torch dyn_quant 4-bit | KleidiAI (NEON dotprod/i8mm) in torch's aarch64 builds; elsewhere a scalar reference loop | none |
| d onnxruntime MatMulNBits | 1.32.0 wheels for Linux x86_64/aarch64, macOS arm64, Windows x64/arm64 (none for Intel macOS, 32-bit ARM or Android through pip); MLAS int8 kernels for AVX2, AVX-VNNI, AVX-512(-VNNI), NEON | wheel 27.8 MB (Linux x86_64; 23.2 aarch64, 22.5 macOS arm64, 16.7 win x64), 78 MB installed, plus flatbuffers and protobuf; ~22 MB RSS on import; onnx (8.9 MB wheel, 31 MB) only to build the graph |
| e meshllm kernels | what kernels.status() reports: AVX2, AVX-512, NEON, portable C; the torch path where there is no compiler | a C compiler at first use (built then, cached) |
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
GROUP = 32
PREFILL_ROWS = 32  # meshllm's int4 takes the dequantize + GEMM path from this many rows on

SHAPES: dict[str, list[tuple[str, int, int, int]]] = {  # (name, K, N, largest M measured)
    "small": [
        ("smol qkv", 576, 960, 1 << 30),
        ("smol gate|up", 576, 1536, 1 << 30),
        ("smol gate+up", 576, 3072, 1 << 30),
        ("smol down", 1536, 576, 1 << 30),
        ("smol lm_head", 576, 49152, 16),
    ],
    "tinyllama": [
        ("tl qkv", 2048, 2560, 1 << 30),
        ("tl o", 2048, 2048, 1 << 30),
        ("tl gate+up", 2048, 11264, 1 << 30),
        ("tl down", 5632, 2048, 1 << 30),
    ],
    "tiny": [  # for a quick smoke test of this script
        ("tiny", 64, 32, 1 << 30),
        ("tiny 2", 128, 48, 1 << 30),
    ],
}
DEFAULT_CANDIDATES = "a,b,b_prompt,c,d,e"
ALL_CANDIDATES = ("a", "b", "b_prompt", "c", "d", "d_fzp", "d_fp32", "e", "e8")
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MESHLLM_KERNEL_ISA": "avx2",
}
STATIC_FACTS = {
    "a": ("every CPU torch runs on", "none (torch is a dependency)"),
    "b": ("every CPU torch runs on; AVX2/AVX-512 vectorized, generic elsewhere", "none"),
    "b_prompt": ("every CPU torch runs on", "none"),
    "c": ("KleidiAI in aarch64 torch builds; scalar reference loop elsewhere", "none"),
    "d": ("onnxruntime 1.32.0 wheels: Linux x86_64/aarch64, macOS arm64, Windows x64/arm64 (no Intel macOS, "
          "no 32-bit ARM); MLAS AVX2/AVX-VNNI/AVX-512/NEON",
          "onnxruntime 1.32.0 wheel 27.8 MB (Linux x86_64), 78 MB installed (+flatbuffers, protobuf); "
          "onnx 8.9 MB/31 MB to build the graph"),
    "e": ("per kernels.status(): AVX2, AVX-512, NEON, portable C", "C compiler at first use"),
}
STATIC_FACTS["d_fzp"] = STATIC_FACTS["d_fp32"] = STATIC_FACTS["d"]
STATIC_FACTS["e8"] = STATIC_FACTS["e"]


def status_dict(st: Any) -> dict[str, Any]:
    """kernels.status() as a dict, whether it returns a dict or an object with .isa and .reason."""
    if isinstance(st, dict):
        return st
    if hasattr(st, "as_dict"):
        return dict(st.as_dict())
    return {"isa": getattr(st, "isa", None), "reason": getattr(st, "reason", repr(st))}


def log(msg: str) -> None:
    print(f"bench_kernels: {msg}", file=sys.stderr, flush=True)


# == candidates ==================================================================================


@dataclass
class Candidate:
    name: str
    label: str
    call: Callable[[Any], Any]          # torch float32 (M, K) -> torch (M, N)
    nbytes: int                         # bytes kept for the weight matrix
    min_m: int = 1
    path: str = ""                      # which kernel actually ran, where it can be told
    reference: Any = None               # float64 (N, K) weights it computes with, when not the shared ones
    set_threads: Callable[[int], None] | None = None
    notes: list[str] = field(default_factory=list)


def make_weights(k: int, n: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.005).float()
    mn = (-8.0 * scale).contiguous()
    return codes, scale, mn


def dense(codes, scale, mn, dtype):
    n, k = codes.shape
    w = codes.to(dtype).view(n, k // GROUP, GROUP) * scale.to(dtype)[..., None] + mn.to(dtype)[..., None]
    return w.view(n, k)


def prefill_dtype():
    """meshllm's prompt dtype, as an AVX2 laptop would pick it under the simulation: bfloat16 only
    where torch runs AVX-512 and the CPU has AVX512-BF16 or AMX."""
    import torch
    cpu = torch.cpu
    hw = getattr(cpu, "_is_amx_tile_supported", lambda: False)() or \
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    sim_avx2 = torch.backends.cpu.get_cpu_capability() != "AVX512"
    return torch.float32 if sim_avx2 or not hw else torch.bfloat16


def cand_a(codes, scale, mn, threads):
    import torch.nn.functional as F
    w = dense(codes, scale, mn, __import__("torch").float32).contiguous()
    return Candidate("a", "torch f32", lambda x: F.linear(x, w), w.numel() * 4, path="F.linear float32")


def cand_b(codes, scale, mn, threads):
    import torch
    n, k = codes.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    zero = mn + 8.0 * scale  # meshllm's convention: w = (q - 8) * scale + zero
    scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    # what it computes with: bfloat16 scales and zeros
    ref = dense(codes, scale.bfloat16().double(), (zero.bfloat16().double() - 8 * scale.bfloat16().double()),
                torch.float64)

    def call(x):
        return op(x.to(torch.bfloat16), packed, GROUP, scale_zero).float()
    return Candidate("b", "torch int4pack", call, packed.numel() * packed.element_size() + scale_zero.numel() * 2,
                     path=f"int4pack_mm_for_cpu ({torch.backends.cpu.get_cpu_capability()})", reference=ref)


def cand_b_prompt(codes, scale, mn, threads):
    import torch
    import torch.nn.functional as F
    n, k = codes.shape
    nib = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # (N, K/2)
    zero = mn + 8.0 * scale
    s16 = scale.to(torch.bfloat16).contiguous()
    z16 = zero.to(torch.bfloat16).contiguous()
    dtype = prefill_dtype()
    ref = dense(codes, s16.double(), z16.double() - 8 * s16.double(), torch.float64)

    def call(x):
        q = torch.empty(n, k, dtype=dtype)
        q[:, 0::2] = nib & 15
        q[:, 1::2] = nib >> 4
        s = s16.to(dtype).unsqueeze(-1)
        w = q.view(n, k // GROUP, GROUP).mul_(s).add_(z16.to(dtype).unsqueeze(-1) - 8 * s).view(n, k)
        return F.linear(x.to(dtype), w).float()
    return Candidate("b_prompt", "meshllm int4 prompt path", call, nib.numel() + s16.numel() * 4,
                     min_m=PREFILL_ROWS, path=f"unpack + dequantize to {str(dtype).replace('torch.', '')} + F.linear",
                     reference=ref)


def cand_c(codes, scale, mn, threads):
    import torch
    n, k = codes.shape
    nib = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().view(n, k // GROUP, GROUP // 2)
    arm = platform.machine().lower() in ("arm64", "aarch64")
    scales = scale.to(torch.bfloat16) if arm else scale  # KleidiAI's groupwise kernel wants bf16 scales
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(nib, scales, None, GROUP, k, n)
    ref_size = n * k // 2 + n * (k // GROUP)
    reference_path = packed.dtype == torch.float32 and packed.numel() == ref_size
    op = torch.ops.aten._dyn_quant_matmul_4bit
    cand = Candidate("c", "torch dyn_quant_4bit", lambda x: op(x, packed, GROUP, k, n),
                     packed.numel() * packed.element_size(),
                     path="reference C++ loop (no KleidiAI): int8 per-row activations, packed bytes stored as float32"
                     if reference_path else "KleidiAI",
                     reference=dense(codes, scales.double(), -8 * scales.double(), torch.float64))
    return cand


def _ort_model(codes, scale, accuracy_level: int, float_zp: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    n, k = codes.shape
    blocks = k // GROUP
    nib = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().numpy().reshape(n, blocks, GROUP // 2)
    inits = [numpy_helper.from_array(np.ascontiguousarray(nib), "B"),
             numpy_helper.from_array(np.ascontiguousarray(scale.numpy().reshape(n * blocks)), "scales")]
    inputs = ["x", "B", "scales"]
    if float_zp:
        inits.append(numpy_helper.from_array(np.full(n * blocks, 8.0, dtype=np.float32), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=GROUP, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmulnbits",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                     helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def cand_d(codes, scale, mn, threads, name="d", accuracy_level=4, float_zp=False):
    import onnxruntime as ort
    import torch
    n, k = codes.shape
    blob = _ort_model(codes, scale, accuracy_level, float_zp)
    sessions: dict[int, Any] = {}
    for t in threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[t] = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    current = {"sess": sessions[threads[0]]}

    def set_threads(t: int) -> None:
        current["sess"] = sessions[t]

    def call(x):
        return torch.from_numpy(current["sess"].run(None, {"x": x.numpy()})[0])
    label = {"d": "ort MatMulNBits int8", "d_fzp": "ort MatMulNBits int8 float-zp",
             "d_fp32": "ort MatMulNBits fp32"}[name]
    nbytes = n * k // 2 + n * (k // GROUP) * 4 * (2 if float_zp else 1)
    return Candidate(name, label, call, nbytes, set_threads=set_threads,
                     path=f"onnxruntime {ort.__version__} accuracy_level={accuracy_level}"
                     + (" float zero points" if float_zp else ""))


def cand_e(codes, scale, mn, threads):
    from meshllm.model import kernels  # type: ignore[attr-defined]
    m = kernels.Int4Matrix(codes.contiguous(), scale.contiguous(), mn.contiguous())
    st = status_dict(kernels.status())
    nbytes = getattr(m, "nbytes", None) or codes.numel() // 2 + scale.numel() * 8
    return Candidate("e", "meshllm kernels int4", m.matmul, int(nbytes), path=f"isa={st.get('isa')}")


def cand_e8(codes, scale, mn, threads):
    import torch
    from meshllm.model import kernels  # type: ignore[attr-defined]
    n, k = codes.shape
    g = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, k // GROUP, generator=g) * 0.001 + 0.0005).float()
    m = kernels.Int8Matrix(q, s8)
    st = status_dict(kernels.status())
    ref = (q.double().view(n, k // GROUP, GROUP) * s8.double()[..., None]).view(n, k)
    nbytes = getattr(m, "nbytes", None) or q.numel() + s8.numel() * 4
    return Candidate("e8", "meshllm kernels int8", m.matmul, int(nbytes), path=f"isa={st.get('isa')}",
                     reference=ref)


BUILDERS: dict[str, Callable[..., Candidate]] = {
    "a": cand_a, "b": cand_b, "b_prompt": cand_b_prompt, "c": cand_c, "d": cand_d,
    "d_fzp": lambda *a: cand_d(*a, name="d_fzp", float_zp=True),
    "d_fp32": lambda *a: cand_d(*a, name="d_fp32", accuracy_level=0),
    "e": cand_e, "e8": cand_e8,
}


def availability(names: list[str]) -> dict[str, str]:
    """For each candidate that cannot run here: why (printed, and kept in the JSON)."""
    out: dict[str, str] = {}
    if any(n.startswith("d") for n in names):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            for n in names:
                if n.startswith("d"):
                    out[n] = f"onnxruntime/onnx not installed ({e}); pip install -e '.[bench]'"
    if any(n.startswith("e") for n in names):
        why = None
        try:
            from meshllm.model import kernels  # type: ignore[attr-defined]
            st = status_dict(kernels.status())
            if not st.get("isa"):
                why = f"meshllm.model.kernels unavailable: {st.get('reason')}"
        except ImportError as e:
            why = f"meshllm.model.kernels missing ({e})"
        except Exception as e:  # a half-written module must not stop the other candidates
            why = f"meshllm.model.kernels failed: {type(e).__name__}: {e}"
        if why:
            for n in names:
                if n.startswith("e"):
                    out[n] = why
    return out


# == measuring ===================================================================================


def digest(t) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def set_all_threads(cands: list[Candidate], t: int) -> None:
    import torch
    torch.set_num_threads(t)
    for c in cands:
        if c.set_threads:
            c.set_threads(t)


def estimate(hist: list[tuple[int, float]], m: int) -> float:
    """Seconds a call at M = m is expected to take, from the medians at smaller M: scaled by
    (m / M_last) ** p, p from the last two points (clamped to 0.6..1; 0.75 with one point)."""
    if not hist:
        return 0.0
    (m1, t1) = hist[-1]
    p = 0.75
    if len(hist) > 1:
        (m0, t0) = hist[-2]
        if m1 > m0 and t0 > 0 and t1 > 0:
            p = min(1.0, max(0.6, math.log(t1 / t0) / math.log(m1 / m0)))
    return t1 * (m / m1) ** p


def sample(call, x, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        call(x)
    return (time.perf_counter() - t0) / inner


def run_shape(name: str, k: int, n: int, max_m: int, names: list[str], args, results: list[dict],
              invariance: list[dict], skipped: dict[str, str]) -> None:
    import torch
    codes, scale, mn = make_weights(k, n, seed=k * 100003 + n)
    shared_ref = dense(codes, scale.double(), mn.double(), torch.float64)
    cands: list[Candidate] = []
    for c in names:
        if c in skipped:
            continue
        try:
            cands.append(BUILDERS[c](codes, scale, mn, args.threads))
        except Exception as e:  # keep going with the others; say why
            msg = f"{type(e).__name__}: {e}"
            log(f"{name}: candidate {c} failed to build: {msg[:300]}")
            results.append({"shape": name, "K": k, "N": n, "candidate": c, "error": msg[:500]})
    g = torch.Generator().manual_seed(1)
    ms = [m for m in args.m if m <= max_m]
    xs = {m: torch.randn(m, k, generator=g) for m in ms}
    x0 = torch.randn(1, k, generator=g)
    for m in ms:
        xs[m][0] = x0[0]
    row0: dict[tuple[str, int, int], str] = {}   # (cand, threads, M) -> digest of row 0
    full: dict[tuple[str, int, int], str] = {}   # (cand, threads, M) -> digest of the whole output
    errs: dict[str, float] = {}
    history: dict[tuple[str, int], list[tuple[int, float]]] = {}  # (cand, threads) -> [(M, s a call)]
    for t in args.threads:
        set_all_threads(cands, t)
        for m in ms:
            x = xs[m]
            active: list[Candidate] = []
            inner: dict[str, int] = {}
            for c in cands:
                if m < c.min_m:
                    continue
                est = estimate(history.get((c.name, t), []), m)
                if est > args.max_call_s:
                    results.append({"shape": name, "K": k, "N": n, "M": m, "threads": t, "candidate": c.name,
                                    "skipped": f"estimated {est:.1f} s a call > --max-call-s {args.max_call_s}"})
                    continue
                try:
                    c.call(x)  # warm-up (first-call costs: packing, allocations)
                    t0 = time.perf_counter()
                    y = c.call(x)
                    once = time.perf_counter() - t0
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    log(f"{name} M={m} t={t}: {c.name} failed: {msg[:200]}")
                    results.append({"shape": name, "K": k, "N": n, "M": m, "threads": t, "candidate": c.name,
                                    "error": msg[:500]})
                    continue
                y = y.float()
                if tuple(y.shape) != (m, n):
                    results.append({"shape": name, "K": k, "N": n, "M": m, "threads": t, "candidate": c.name,
                                    "error": f"output shape {tuple(y.shape)}"})
                    continue
                row0[(c.name, t, m)] = digest(y[0])
                full[(c.name, t, m)] = digest(y)
                if c.name not in errs:  # on the first 4 rows of the first M it runs at
                    ref = (c.reference if c.reference is not None else shared_ref)
                    exact = x[:4].double() @ ref.T
                    errs[c.name] = float((y[:4].double() - exact).abs().max() / exact.abs().max())
                inner[c.name] = max(1, min(2000, math.ceil(args.sample_s / max(once, 1e-6))))
                active.append(c)
            times: dict[str, list[float]] = {c.name: [] for c in active}
            for r in range(args.repeats):
                order = active[r % len(active):] + active[:r % len(active)] if active else []
                for c in order:
                    times[c.name].append(sample(c.call, x, inner[c.name]))
            for c in active:
                ts = times[c.name]
                med = statistics.median(ts)
                history.setdefault((c.name, t), []).append((m, med))
                q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (med, med, med)
                results.append({
                    "shape": name, "K": k, "N": n, "M": m, "threads": t, "candidate": c.name,
                    "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                    "noise_pct": (q3 - q1) / med * 50.0, "samples_ms": [v * 1e3 for v in ts],
                    "calls_per_sample": inner[c.name], "weight_bytes": c.nbytes,
                    "gb_per_s": c.nbytes / med / 1e9, "path": c.path,
                })
            log(f"{name:14s} M={m:<4d} t={t}: " + "  ".join(
                f"{c.name} {statistics.median(times[c.name]) * 1e3:.3f}ms" for c in active))
    for c in cands:
        entry: dict[str, Any] = {"shape": name, "K": k, "N": n, "candidate": c.name, "path": c.path,
                                 "weight_bytes": c.nbytes, "rel_err": errs.get(c.name)}
        batch: dict[str, Any] = {}
        for t in args.threads:
            base_name = "b" if c.name == "b_prompt" else c.name  # meshllm's int4: b below 32 rows
            base = row0.get((base_name, t, 1))
            diffs = [m for m in ms if m > 1 and (c.name, t, m) in row0 and base is not None
                     and row0[(c.name, t, m)] != base]
            checked = [m for m in ms if m > 1 and (c.name, t, m) in row0 and base is not None]
            batch[str(t)] = {"checked_m": checked, "differs_at_m": diffs,
                             "invariant": (not diffs) if checked else None}
        entry["batch_invariant"] = batch
        if len(args.threads) > 1:
            t1, t2 = args.threads[0], args.threads[1]
            checked = [m for m in ms if (c.name, t1, m) in full and (c.name, t2, m) in full]
            diffs = [m for m in checked if full[(c.name, t1, m)] != full[(c.name, t2, m)]]
            entry["thread_invariant"] = {"threads": [t1, t2], "checked_m": checked, "differs_at_m": diffs,
                                         "invariant": (not diffs) if checked else None}
        invariance.append(entry)
    del cands


# == report ======================================================================================


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    if "skipped" in r:
        return "skip"
    if "error" in r:
        return "error"
    return f"{r['median_ms']:.3f} ({r['gb_per_s']:.1f}) ±{r['noise_pct']:.0f}%"


def yn(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def markdown(report: dict[str, Any]) -> str:
    res, names = report["results"], report["candidates_run"]
    labels = report["labels"]
    out = [f"## Kernel timings: {report['cpu']}; {report['isa_note']}", "",
           "median ms a call (GB/s of weight bytes) ±half the interquartile range of the repeats; "
           f"{report['repeats']} repeats, candidates alternating", ""]
    head = ["shape (KxN)", "M", "thr"] + [f"{c} {labels.get(c, '')}" for c in names]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    keys = []
    for r in res:
        if "M" in r:
            key = (r["shape"], r["K"], r["N"], r["M"], r["threads"])
            if key not in keys:
                keys.append(key)
    shape_order = list(dict.fromkeys(kk[0] for kk in keys))
    keys.sort(key=lambda kk: (shape_order.index(kk[0]), kk[4], kk[3]))
    for key in keys:
        shape, k, n, m, t = key
        row = [f"{shape} {k}x{n}", str(m), str(t)]
        for c in names:
            r = next((r for r in res if r.get("candidate") == c and (r["shape"], r["K"], r["N"], r.get("M"),
                                                                      r.get("threads")) == key), None)
            row.append(cell(r))
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Invariance (bitwise) and error", "",
            "batch: row 0 at M>1 equals M=1 (per thread count); threads: outputs equal at "
            f"{'/'.join(map(str, report['threads'][:2]))} threads; err: max |y - exact| / max |exact| over 4 rows, "
            "exact = float64 product with the weights the candidate holds", ""]
    inv_head = ["shape", "candidate", "path"] + [f"batch t={t}" for t in report["threads"]] + ["threads", "err"]
    out.append("| " + " | ".join(inv_head) + " |")
    out.append("|" + "---|" * len(inv_head))
    for e in report["invariance"]:
        row = [f"{e['shape']} {e['K']}x{e['N']}", e["candidate"], e["path"]]
        for t in report["threads"]:
            b = e["batch_invariant"].get(str(t), {})
            v = yn(b.get("invariant"))
            if b.get("differs_at_m"):
                v += f" (differs at M={','.join(map(str, b['differs_at_m']))})"
            row.append(v)
        ti = e.get("thread_invariant") or {}
        v = yn(ti.get("invariant"))
        if ti.get("differs_at_m"):
            v += f" (differs at M={','.join(map(str, ti['differs_at_m']))})"
        row += [v, "-" if e["rel_err"] is None else f"{e['rel_err']:.1e}"]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "## Noise", ""]
    for c in names:
        noise = [r["noise_pct"] for r in res if r.get("candidate") == c and "noise_pct" in r]
        if noise:
            out.append(f"- {c}: ±half-IQR/median: median {statistics.median(noise):.1f}%, max {max(noise):.1f}% "
                       f"over {len(noise)} cells")
    out += ["", "## Platforms and install cost", "", "| candidate | platforms covered | install cost |", "|---|---|---|"]
    for c in names:
        plat, cost = STATIC_FACTS.get(c, ("", ""))
        extra = report["import_rss_mb"].get(c)
        if extra is not None:
            cost += f"; import adds {extra:.0f} MB RSS after torch"
        out.append(f"| {c} {labels.get(c, '')} | {plat} | {cost} |")
    if report["skipped_candidates"]:
        out += ["", "## Skipped", ""]
        out += [f"- {c}: {why}" for c, why in report["skipped_candidates"].items()]
    errors = [r for r in res if "error" in r]
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- {r['shape']} M={r.get('M', '-')} t={r.get('threads', '-')} {r['candidate']}: {r['error'][:200]}"
                for r in errors]
    return "\n".join(out)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                              if ln.startswith("flags")), "")
                have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")
                        if f" {f}" in flags]
                return f"{name} ({os.cpu_count()} CPUs; {', '.join(have)})"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def import_rss(module: str) -> float | None:
    """MB of peak RSS that importing ``module`` adds to a process that has imported torch."""
    rss = "int(open('/proc/self/statm').read().split()[1]) * __import__('os').sysconf('SC_PAGE_SIZE')"
    code = (f"import torch; a = {rss}; import {module}; b = {rss}; print((b - a) / 2**20)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def parse_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"bench_kernels: {what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"bench_kernels: {what} must list positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_kernels.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=("small", "tinyllama", "all", "tiny"), default="all",
                   help="small: SmolLM2-135M; tinyllama: TinyLlama-1.1B; all: both (default); tiny: a smoke test")
    p.add_argument("--m", default="1,4,16,512", help="rows of x, comma-separated (1,4,16,512)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (1,2)")
    p.add_argument("--repeats", type=int, default=5, help="samples per cell, candidates alternating (5)")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help=f"comma-separated from {','.join(ALL_CANDIDATES)} ({DEFAULT_CANDIDATES})")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: simulate an AVX2-only CPU (" + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
                   + "; onnxruntime cannot be capped)")
    p.add_argument("--sample-s", type=float, default=0.025, help="seconds of back-to-back calls a sample (0.025)")
    p.add_argument("--max-call-s", type=float, default=2.0,
                   help="skip a cell whose call is estimated (from the previous M) to take longer (2.0)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write everything measured to OUT")
    p.add_argument("--no-import-rss", action="store_true", help="skip measuring the RSS each import adds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        # the variables must be there before torch loads: run again with them
        env = {**os.environ, **AVX2_ENV}
        cmd = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    args.m = sorted(set(parse_list(args.m, "--m")))
    args.threads = parse_list(args.threads, "--threads")
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    bad = [c for c in names if c not in ALL_CANDIDATES]
    if bad or args.repeats < 1:
        raise SystemExit(f"bench_kernels: unknown candidate(s) {bad}; choose from {','.join(ALL_CANDIDATES)}"
                         if bad else "bench_kernels: --repeats must be at least 1")
    sys.path.insert(0, str(REPO))
    import torch
    started = time.monotonic()
    skipped = availability(names)
    for c, why in skipped.items():
        print(f"note: candidate {c} skipped: {why}", flush=True)
    shapes = SHAPES["small"] + SHAPES["tinyllama"] if args.shapes == "all" else SHAPES[args.shapes]
    isa_note = (f"torch capability {torch.backends.cpu.get_cpu_capability()}"
                + (" (AVX2 simulated: " + " ".join(f"{k}={os.environ.get(k)}" for k in AVX2_ENV)
                   + "; onnxruntime not capped)" if args.isa == "avx2" else " (native)"))
    try:
        from meshllm.model import kernels  # type: ignore[attr-defined]
        kstatus = status_dict(kernels.status())
    except Exception as e:
        kstatus = {"isa": None, "reason": f"{type(e).__name__}: {e}"}
    log(f"{cpu_name()}; {isa_note}; torch {torch.__version__}; meshllm kernels {kstatus}")
    results: list[dict] = []
    invariance: list[dict] = []
    for name, k, n, max_m in shapes:
        run_shape(name, k, n, max_m, names, args, results, invariance, skipped)
    labels = {"a": "torch f32", "b": "torch int4pack bf16", "b_prompt": "meshllm int4 prompt (deq+GEMM)",
              "c": "torch dyn_quant_4bit", "d": "ort MatMulNBits acc4", "d_fzp": "ort MatMulNBits acc4 float-zp",
              "d_fp32": "ort MatMulNBits acc0", "e": "meshllm kernels int4", "e8": "meshllm kernels int8"}
    rss: dict[str, float | None] = {}
    if not args.no_import_rss:
        if any(c.startswith("d") for c in names) and not any(c in skipped for c in names if c.startswith("d")):
            rss["d"] = import_rss("onnxruntime")
        if "e" in names and "e" not in skipped:
            rss["e"] = import_rss("meshllm.model.kernels")
    report = {
        "cpu": cpu_name(), "machine": platform.machine(), "isa": args.isa, "isa_note": isa_note,
        "env": {k: os.environ.get(k) for k in AVX2_ENV}, "torch": torch.__version__,
        "torch_capability": torch.backends.cpu.get_cpu_capability(), "prefill_dtype": str(prefill_dtype()),
        "meshllm_kernels_status": kstatus, "repeats": args.repeats, "m": args.m, "threads": args.threads,
        "candidates_requested": names, "candidates_run": [c for c in names if c not in skipped],
        "skipped_candidates": skipped, "labels": labels, "import_rss_mb": {k: v for k, v in rss.items()},
        "results": results, "invariance": invariance, "elapsed_s": round(time.monotonic() - started, 1),
    }
    try:
        import onnxruntime
        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    print(markdown(report), flush=True)
    print(f"\n(elapsed {report['elapsed_s']} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
