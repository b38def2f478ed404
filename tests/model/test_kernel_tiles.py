"""The quantized products on the model's own shapes: a decode step of several answers (2 to 9
rows) gives each row the bits that row gets alone, and the tiles that compute them (rows in
groups of up to four, columns in quads, blocks in chunks, the two or one columns left at the
end) give the portable definitions' bits.

The default model's linears are K=576 -> N=960, 576 and 3072, and K=1536 -> N=576; its head
is K=576 -> N=49152 (here a slice of it with an odd width, so the last quad is short)."""

from __future__ import annotations

import pytest
import torch

from meshllm.model import kernels

SHAPES = [(576, 1536), (1536, 576), (576, 2051)]  # (K, N)


def _matrix(fmt: str, k: int, n: int, gen: torch.Generator) -> kernels.Int4Matrix | kernels.Int8Matrix:
    scale = torch.rand(n, k // 32, generator=gen) * 0.05 + 1e-3
    if fmt == "int4":
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        return kernels.Int4Matrix(codes, scale, -8 * scale)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return kernels.Int8Matrix(q, scale if fmt == "int8" else scale[:, 0].contiguous())


def _rows(k: int, gen: torch.Generator) -> torch.Tensor:
    """Nine activation rows as a decoder makes them: different scales, one with an outlier,
    one all zeros (a block with amax 0)."""
    x = torch.randn(9, k, generator=gen) * torch.logspace(-2, 1, 9)[:, None]
    x[3, 17] = 200.0
    x[6] = 0.0
    return x


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "int8", "int8 rows"])
def test_each_row_of_a_batch_of_one_to_nine_has_its_bits_alone(fmt: str, k: int, n: int) -> None:
    if kernels.get() is None:
        pytest.skip(kernels.status().reason)  # no C compiler: test_invariance checks what runs instead
    gen = torch.Generator().manual_seed(k + n)
    mat = _matrix(fmt, k, n, gen)
    x = _rows(k, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([mat.matmul(x[i : i + 1]) for i in range(9)])
        for m in range(2, 10):
            for start in (0, 9 - m):  # the rows fall in different places of the tiles
                got = mat.matmul(x[start : start + m])
                for i in range(m):
                    assert torch.equal(got[i], alone[start + i]), f"{fmt}: row {i} of {m} (from {start}) differs"
        torch.set_num_threads(2)
        assert torch.equal(mat.matmul(x), alone), f"{fmt}: nine rows on two threads differ"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("fmt", ["int4", "int8", "int8 rows"])
def test_the_tiles_give_the_portable_definitions_bits(fmt: str, k: int, n: int) -> None:
    k_ = kernels.get()
    if k_ is None:
        pytest.skip(kernels.status().reason)
    gen = torch.Generator().manual_seed(3 * k + n)
    mat = _matrix(fmt, k, n, gen)
    x = _rows(k, gen)
    for m in (1, 2, 3, 4, 5, 9):
        was = k_.ref
        try:
            k_.ref = 1
            want = mat.matmul(x[:m])
        finally:
            k_.ref = was
        assert torch.equal(mat.matmul(x[:m]), want), f"{fmt} at M={m} differs from the portable definitions"
