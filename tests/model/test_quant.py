"""Weight formats, kernel by kernel: 4-bit GGUF blocks read exactly, and each quantized linear
computes what its dequantized weights would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from meshllm.model import quant
from meshllm.model.gguf_blocks import dequantize_int4, read_int4, unpermute_rows


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks_map_exactly_onto_int4_groups(kind: str) -> None:
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    blocks = quantize(w, GGMLQuantizationType[kind])
    codes, scale, zero = read_int4(kind, blocks, 48, 256)
    assert codes.min() >= 0 and codes.max() <= 15
    np.testing.assert_array_equal(dequantize_int4(codes, scale, zero), dequantize(blocks, GGMLQuantizationType[kind]))


def test_q4_k_blocks_map_exactly_onto_int4_groups() -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (16, 2, 144), dtype=np.uint8)  # 16 rows of 512: two super-blocks each
    raw[..., 0:2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    raw[..., 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
    blocks = raw.reshape(16, -1)
    codes, scale, zero = read_int4("Q4_K", blocks, 16, 512)
    np.testing.assert_array_equal(dequantize_int4(codes, scale, zero), dequantize(blocks, GGMLQuantizationType.Q4_K))


def test_unpermute_undoes_the_converters_rotary_row_order() -> None:
    heads, head_dim = 4, 8
    w = np.arange(heads * head_dim * 3).reshape(heads * head_dim, 3)
    # how GGUF converters order q/k rows: the two halves of each head interleaved
    permuted = w.reshape(heads, 2, head_dim // 2, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)


def test_nibbles_pack_and_unpack() -> None:
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    assert quant.pack_nibbles(codes).shape == (32, 32)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(codes)), codes)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("n", [96, 128])  # 96 rows: not a layout the prefill path reads back
@pytest.mark.parametrize("rows", [1, 7, quant.PREFILL_ROWS, 40])
def test_each_quantized_linear_computes_its_dequantized_weights(rows: int, n: int) -> None:
    torch.manual_seed(0)
    k = 128
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)

    codes, scale, zero = quant.quantize_int4_groups(w)
    w4 = ((codes.reshape(n, k // 32, 32).float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    assert _rel_err(w4, w) < 0.1  # 4 bits: a coarse but faithful copy
    got = quant.Int4Linear(codes, scale, zero, b)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert _rel_err(got, x @ w4.T + b) < 0.02  # bfloat16 activations, scales and zeros

    q, s = quant.quantize_int8_rows(w)
    assert _rel_err(quant.Int8Linear(q, s, b)(x), x @ (q.float() * s[:, None]).T + b) < 0.02

    assert _rel_err(quant.F16Linear(w, b)(x), x @ w.half().float().T + b) < 1e-3


def test_int4_weights_read_back_from_the_kernels_packing_exactly() -> None:
    torch.manual_seed(1)
    n, k = 192, 576
    codes, scale, zero = quant.quantize_int4_groups(torch.randn(n, k))
    linear = quant.Int4Linear(codes, scale, zero, None)
    if linear.invariant:  # meshllm's kernels: w = scale * q + mn, scale and mn as float16
        mn = (zero - 8 * scale).half().float()
        want = codes.reshape(n, k // 32, 32).float() * scale.half().float()[..., None] + mn[..., None]
    else:  # torch's kernel: bfloat16 scales and zeros
        want = (codes.reshape(n, k // 32, 32).float() - 8) * scale.bfloat16().float()[..., None]
        want = want + zero.bfloat16().float()[..., None]
    assert torch.equal(linear.dequantize(torch.float32), want.reshape(n, k))


def test_int8_embedding_looks_up_rows_and_computes_logits() -> None:
    torch.manual_seed(0)
    table = torch.randn(300, 64)
    emb = quant.Int8Embedding(*quant.quantize_int8_rows(table))
    ids = torch.tensor([0, 5, 299])
    assert _rel_err(emb.lookup(ids), table[ids]) < 0.01
    x = torch.randn(2, 64)
    assert _rel_err(emb.logits(x), x @ table.T) < 0.02


def test_int8_tables_at_an_odd_address_still_compute() -> None:
    """Tensors read from a file can start at any byte; the int8 kernel crashed on one at +24."""
    table = torch.randn(4096, 64)
    q, scale = quant.quantize_int8_rows(table)
    raw = torch.empty(q.numel() + 24, dtype=torch.int8)
    odd = raw[24:].view(q.shape)
    odd.copy_(q)
    assert odd.data_ptr() % 64 != 0
    x = torch.randn(10, 64)
    assert _rel_err(quant.Int8Embedding(odd, scale).logits(x), x @ table.T) < 0.02
    assert _rel_err(quant.Int8Linear(odd, scale, None)(x), x @ table.T) < 0.02


def test_unknown_format_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, f32, f16, int8, int4"):
        quant.check_format("int3")


def test_the_tensor_directory_of_a_gguf_matches_ggufs_own_reader(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGUFReader

    from meshllm.model.gguf_blocks import read_tensor_bytes, read_tensor_infos
    from meshllm.model.source import default_gguf_path

    path = default_gguf_path()
    infos = read_tensor_infos(path)
    reader = GGUFReader(str(path))
    assert set(infos) == {t.name for t in reader.tensors}
    for t in reader.tensors[::25]:
        info = infos[t.name]
        assert (info.type_name, info.offset, info.shape) == (t.tensor_type.name, t.data_offset, tuple(int(d) for d in t.shape))
        np.testing.assert_array_equal(read_tensor_bytes(path, info), np.asarray(t.data).reshape(-1).view(np.uint8))

    # a cut file is an error that names it, never a crash or a read past the end
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: 4 << 20])
    with pytest.raises(ValueError, match="cut.gguf"):
        read_tensor_infos(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ValueError):
        read_tensor_infos(junk)


def test_random_gguf_headers_are_errors_never_crashes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from meshllm.model.gguf_blocks import read_tensor_infos

    rng = np.random.default_rng(3)
    path = tmp_path / "random.gguf"
    for _ in range(200):
        body = rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        head = b"GGUF" + (3).to_bytes(4, "little") + int(rng.integers(0, 4)).to_bytes(8, "little")
        path.write_bytes(head + int(rng.integers(0, 4)).to_bytes(8, "little") + body)
        try:
            read_tensor_infos(path)
        except ValueError:
            pass
