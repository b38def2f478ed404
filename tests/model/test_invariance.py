"""One numerics for every shape: with meshllm's kernels a position's hidden state has the same
bits whether it is computed alone, in a chunk of a prompt, in a batch of sessions, with one
thread or two, and on any instruction set the kernels are built for.

The kernels are compiled at first use. On a device without a C compiler each test checks what
a user sees there instead: torch's kernels, a node that says it is not batch-invariant, and the
reason in its status."""

from __future__ import annotations

import pytest
import torch

from meshllm.model import kernels
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.source import resolve

QUANTIZED = ["f16", "int8", "int4"]


def _kernels() -> kernels.Kernels | None:
    """The kernels; None only where there is no C compiler (and then the status says so)."""
    k = kernels.get()
    if k is None:
        assert "no C compiler" in kernels.status().reason, kernels.status().reason
    return k


def _matrices(n: int, k: int, gen: torch.Generator) -> dict[str, object]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // 32, generator=gen) * 0.05
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    w = torch.randn(n, k, generator=gen)
    return {
        "int4": kernels.Int4Matrix(codes, scale, -8 * scale),
        "int8": kernels.Int8Matrix(q, scale),
        "int8 rows": kernels.Int8Matrix(q, scale[:, 0].contiguous()),
        "f16": kernels.FloatMatrix(w.half()),
        "f32": kernels.FloatMatrix(w),
    }


@pytest.mark.parametrize("n,k", [(37, 96), (130, 576)])
def test_a_row_of_a_product_has_the_same_bits_in_any_batch_and_thread_count(n: int, k: int) -> None:
    if _kernels() is None:
        with pytest.raises(RuntimeError, match="no C compiler"):
            kernels.Int4Matrix(torch.zeros(n, k, dtype=torch.uint8), torch.ones(n, k // 32), torch.zeros(n, k // 32))
        return
    gen = torch.Generator().manual_seed(n)
    row = torch.randn(1, k, generator=gen) * 4
    threads = torch.get_num_threads()
    try:
        for name, mat in _matrices(n, k, gen).items():
            torch.set_num_threads(1)
            alone = mat.matmul(row)[0]
            for m in (2, 3, 4, 5, 7, 8, 33, 512):
                batch = torch.randn(m, k, generator=gen)
                at = m // 2
                batch[at] = row[0]
                for t in (1, 2):
                    torch.set_num_threads(t)
                    got = mat.matmul(batch)[at]
                    assert torch.equal(got, alone), f"{name}: row {at} of {m} at {t} threads differs from alone"
    finally:
        torch.set_num_threads(threads)


def test_the_products_stay_close_to_their_float_weights() -> None:
    if _kernels() is None:
        return  # nothing of ours computes here (see the test above)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 576, generator=gen)
    for name, mat in _matrices(200, 576, gen).items():
        want = x @ mat.dequantize().T if hasattr(mat, "dequantize") else x @ mat.w.float().T
        err = float((mat.matmul(x) - want).norm() / want.norm())
        assert err < (1e-5 if name.startswith("f") else 0.02), (name, err)


@pytest.mark.parametrize("isa", kernels.runnable_isas()[1:] or ["portable"])
def test_every_instruction_set_gives_the_portable_definitions_bits(isa: str, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each library this CPU runs (AVX2, AVX-VNNI, AVX512-VNNI, NEON) and the portable C build
    agree bit for bit on every op, so a mesh of different CPUs answers like one node."""
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(tmp_path))
    import ctypes

    if _kernels() is None:
        with pytest.raises(RuntimeError, match="no C compiler"):
            kernels._build(isa)
        return

    portable = kernels.Kernels(ctypes.CDLL(str(kernels._build("portable"))), "portable")
    assert portable.lib.mq_isa() == b"portable"
    native = kernels.Kernels(ctypes.CDLL(str(kernels._build(isa))), isa)
    assert native.lib.mq_isa() == isa.encode()
    gen = torch.Generator().manual_seed(5)
    for m in (1, 6):
        x = torch.randn(m, 576, generator=gen) * 2
        for name, mat in _matrices(70, 576, gen).items():
            mat.k = native
            want = mat.matmul(x)
            mat.k = portable
            assert torch.equal(mat.matmul(x), want), f"{name} at M={m}"
    x = torch.randn(5, 100, generator=gen)
    w = torch.rand(100, generator=gen) + 0.5
    assert torch.equal(kernels.rmsnorm(portable, x, w, 1e-5), kernels.rmsnorm(native, x, w, 1e-5))
    gu = torch.randn(5, 2 * 100, generator=gen) * 6
    assert torch.equal(kernels.silu_mul(portable, gu), kernels.silu_mul(native, gu))
    for d, window in ((20, 7), (64, None), (128, 40)):  # odd sizes, and the paths of whole vectors
        nq, nkv, t, start = 4, 2, 6, 45
        qkv = torch.randn(t, (nq + 2 * nkv) * d, generator=gen)
        cos, sin = torch.rand(t, d, generator=gen), torch.rand(t, d, generator=gen)
        past = torch.randn(2, nkv, start, d, generator=gen)
        outs = []
        for lib in (portable, native):
            kc, vc = torch.zeros(nkv, 64, d), torch.zeros(nkv, 64, d)
            kc[:, :start], vc[:, :start] = past[0], past[1]
            outs.append((kernels.attention(lib, qkv, nq, nkv, d, cos, sin, kc, vc, start, window, 0.3), kc, vc))
        for a, b in zip(*outs):
            assert torch.equal(a, b), f"attention with head size {d}"


def _hidden(shard, session: str, embedded: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Every position's output of the span, the prompt fed in chunks of `chunk` positions."""
    outs = []
    for start in range(0, embedded.shape[1], chunk):
        outs.append(shard.forward(session, embedded[:, start:start + chunk], start))
    shard.drop(session)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("weights", QUANTIZED)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_each_position_has_the_same_bits_in_any_chunking_and_any_batch(arch: str, weights: str, request) -> None:  # type: ignore[no-untyped-def]
    built = _kernels() is not None
    prepared = prepare(resolve(request.getfixturevalue(f"tiny_{arch}")))
    shard = Engine(prepared, weights=weights).shards[0]
    if not built:  # torch's kernels: no claim of invariance (rebuilds keep the original steps)
        assert not shard.batch_invariant and shard.kernel == "torch"
        return
    assert shard.batch_invariant and shard.kernel.startswith("meshllm-")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 300, (60,), generator=gen).tolist()  # past Mistral's window of 24
    embedded = shard.embed(ids)
    whole = _hidden(shard, "whole", embedded, 60)
    for chunk in (1, 7, 32):
        assert torch.equal(_hidden(shard, f"c{chunk}", embedded, chunk), whole), f"chunks of {chunk}"

    # batches of 1-8 sessions of unequal lengths, each one at its own position
    lengths = [60, 5, 33, 17, 1, 48, 9, 26]
    prompts = [shard.embed(torch.randint(3, 300, (n,), generator=gen).tolist()) for n in lengths]
    alone = [_hidden(shard, f"alone{i}", p, 64) for i, p in enumerate(prompts)]
    for size in range(1, 9):
        names = [f"b{size}-{i}" for i in range(size)]
        # first a prompt step of a few positions each, then the rest of each prompt in one batched step
        head = [min(3, n - 1) if n > 1 else 1 for n in lengths[:size]]
        first = shard.forward_batch([(nm, p[:, :h], 0) for nm, p, h in zip(names, prompts, head)])
        rest_steps = [(nm, p[:, h:], h) for nm, p, h in zip(names, prompts, head) if p.shape[1] > h]
        rest = iter(shard.forward_batch(rest_steps))
        for i, (nm, p, h) in enumerate(zip(names, prompts, head)):
            got = torch.cat([first[i], next(rest)], dim=1) if p.shape[1] > h else first[i]
            assert torch.equal(got, alone[i]), f"session {i} in a batch of {size}"
            shard.drop(nm)


def test_without_the_kernels_a_node_says_it_is_not_invariant_and_still_answers(tiny_llama, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A device without a compiler (or MESHLLM_KERNEL_ISA=off) runs torch's kernels: the split
    mesh still answers like one node (original chunking), and nothing claims invariance."""
    from meshllm.model.sampling import SamplingParams
    from tests.tinymodel import PROMPTS

    monkeypatch.setenv("MESHLLM_KERNEL_ISA", "off")
    kernels._reset_for_tests()
    try:
        assert kernels.get() is None and kernels.status().isa is None
        prepared = prepare(resolve(tiny_llama))
        whole = Engine(prepared, weights="int4")
        split = Engine(prepared, [(0, 2), (2, 6)], weights="int4")
        assert not whole.shards[0].batch_invariant and whole.shards[0].kernel == "torch"
        params = SamplingParams(max_tokens=12)
        for messages in PROMPTS[:2]:
            a = [t.id for t in whole.generate(whole.chat_prompt(messages), params)]
            b = [t.id for t in split.generate(split.chat_prompt(messages), params)]
            assert a == b
    finally:
        monkeypatch.delenv("MESHLLM_KERNEL_ISA")
        kernels._reset_for_tests()


def test_without_a_compiler_the_kernels_say_why(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MESHLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    kernels._reset_for_tests()
    try:
        assert kernels.get() is None
        assert "no C compiler" in kernels.status().reason
        assert kernels.status().describe().startswith("torch kernels")
    finally:
        monkeypatch.undo()
        kernels._reset_for_tests()
