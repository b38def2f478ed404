"""Tensor codecs: f32 is exact, f16/bf16/int8 stay within their documented error bounds,
zstd is applied only where it pays, and bad payloads raise WireError without big allocations."""

import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.errors import WireError
from meshllm.wire import CODECS, Forward, TensorPayload, decode, decode_tensor, encode, encode_tensor
from tests.fixtures.wire_strategies import hidden_arrays

COMPRESS = st.sampled_from(["auto", True, False])


def _round_trip(arr: np.ndarray, codec: str, compress: object = "auto") -> np.ndarray:
    payload = encode_tensor(arr, codec, compress=compress)  # type: ignore[arg-type]
    out = decode_tensor(payload, expect_shape=arr.shape, expect_codec=codec)
    assert out.dtype == np.float32 and out.shape == arr.shape
    assert out.flags.writeable
    return out


@settings(max_examples=60, deadline=None)
@given(arr=hidden_arrays(), compress=COMPRESS)
def test_f32_is_exact(arr: np.ndarray, compress: object) -> None:
    np.testing.assert_array_equal(_round_trip(arr, "f32", compress), arr)


@settings(max_examples=60, deadline=None)
@given(arr=hidden_arrays(), compress=COMPRESS)
def test_f16_error_is_within_half_an_ulp(arr: np.ndarray, compress: object) -> None:
    out = _round_trip(arr, "f16", compress)
    bound = np.maximum(np.abs(arr) * 2.0**-11, 2.0**-25)
    assert (np.abs(out.astype(np.float64) - arr) <= bound).all()


@settings(max_examples=60, deadline=None)
@given(arr=hidden_arrays(), compress=COMPRESS)
def test_bf16_error_is_within_half_an_ulp(arr: np.ndarray, compress: object) -> None:
    out = _round_trip(arr, "bf16", compress)
    bound = np.abs(arr).astype(np.float64) * 2.0**-8 + 2.0**-134
    assert (np.abs(out.astype(np.float64) - arr) <= bound).all()


@settings(max_examples=60, deadline=None)
@given(arr=hidden_arrays(), compress=COMPRESS)
def test_int8_error_is_within_half_a_step_of_each_rows_scale(arr: np.ndarray, compress: object) -> None:
    out = _round_trip(arr, "int8", compress)
    row_max = np.abs(arr).max(axis=-1, keepdims=True).astype(np.float64)
    bound = row_max / 254 * (1 + 1e-4) + 1e-30  # float32 rounding; subnormal rows: ~0
    assert (np.abs(out.astype(np.float64) - arr) <= bound).all()


def test_bf16_rounds_to_nearest_even() -> None:
    one = np.float32(1.0)
    half_step = np.float32(2.0**-8)  # half of bf16's spacing at 1.0
    values = np.array(
        [
            one + half_step,  # tie between 1.0 (even) and 1 + 2**-7: goes to 1.0
            one + 3 * half_step,  # tie between 1 + 2**-7 (odd) and 1 + 2**-6: goes up
            one + half_step * np.float32(1.5),  # above the tie: goes up
            np.float32(-2.0),
        ],
        dtype=np.float32,
    )
    out = _round_trip(values, "bf16", False)
    np.testing.assert_array_equal(out, np.array([1.0, 1 + 2.0**-6, 1 + 2.0**-7, -2.0], np.float32))


def test_sizes_before_zstd() -> None:
    arr = np.linspace(-3, 3, 2 * 576, dtype=np.float32).reshape(2, 576)
    sizes = {codec: len(encode_tensor(arr, codec, compress=False).data) for codec in CODECS}
    assert sizes == {"f32": 4608, "f16": 2304, "bf16": 2304, "int8": 2 * 4 + 1152}


def test_int8_zero_rows_decode_to_zero() -> None:
    arr = np.zeros((3, 8), np.float32)
    arr[1] = np.arange(8)
    out = _round_trip(arr, "int8", False)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[1], np.arange(8), atol=7 / 254)


def test_auto_zstd_is_kept_only_when_it_saves_five_percent() -> None:
    noise = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    auto = encode_tensor(noise, "f16")
    assert not auto.zstd and len(auto.data) == 1152  # random mantissas: zstd saves < 5%
    forced = encode_tensor(noise, "f32", compress=True)
    assert forced.zstd
    np.testing.assert_array_equal(decode_tensor(forced), noise)
    zeros = np.zeros((8, 576), np.float32)
    packed = encode_tensor(zeros, "f16")
    assert packed.zstd and len(packed.data) < 0.95 * 8 * 576 * 2
    assert not encode_tensor(zeros, "f16", compress=False).zstd


@pytest.mark.parametrize(
    "arr, codec, words",
    [
        (np.ones((2, 3), np.float64), "f32", "float32 numpy array"),
        ([1.0, 2.0], "f32", "float32 numpy array"),
        (np.ones((2, 0), np.float32), "f32", "shape"),
        (np.array(1.0, np.float32), "f32", "shape"),
        (np.array([1.0, np.nan], np.float32), "f16", "NaN or inf"),
        (np.array([1.0, np.inf], np.float32), "f32", "NaN or inf"),
        (np.array([1.0, 70000.0], np.float32), "f16", "out of f16 range"),
        (np.array([3.4028235e38], np.float32), "bf16", "out of bf16 range"),
        (np.ones(3, np.float32), "fp8", "unknown tensor codec"),
    ],
)
def test_encode_refuses_what_it_cannot_carry(arr: object, codec: str, words: str) -> None:
    with pytest.raises(WireError, match=words):
        encode_tensor(arr, codec)  # type: ignore[arg-type]


def test_encode_refuses_bad_compress_argument() -> None:
    with pytest.raises(WireError, match="compress"):
        encode_tensor(np.ones(3, np.float32), "f32", compress="yes")  # type: ignore[arg-type]


def test_expected_shape_codec_and_size_are_enforced() -> None:
    payload = encode_tensor(np.ones((2, 576), np.float32), "f16")
    assert decode_tensor(payload, expect_shape=(None, 576)).shape == (2, 576)
    with pytest.raises(WireError, match=r"shape is \(2, 576\); expected \(None, 512\)"):
        decode_tensor(payload, expect_shape=(None, 512))
    with pytest.raises(WireError, match="expected"):
        decode_tensor(payload, expect_shape=(2, 576, 1))
    with pytest.raises(WireError, match="codec is 'f16'; expected 'f32'"):
        decode_tensor(payload, expect_codec="f32")
    with pytest.raises(WireError, match="limit 1000"):
        decode_tensor(payload, max_elements=1000)
    with pytest.raises(WireError, match="TensorPayload"):
        decode_tensor(b"raw")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: TensorPayload("f32", (2, 3), False, bytes(23)), "23 bytes, but a f32 tensor"),
        (lambda: TensorPayload("int8", (2, 3), False, bytes(6)), "takes 14"),
        (lambda: TensorPayload("f16", (), False, b""), "TensorPayload.shape"),
        (lambda: TensorPayload("f16", (0, 3), False, b""), "TensorPayload.shape"),
        (lambda: TensorPayload("f16", (1,) * 9, False, bytes(2)), "TensorPayload.shape"),
        (lambda: TensorPayload("f16", (2**20, 2**20), False, b""), "elements"),
        (lambda: TensorPayload("f64", (1,), False, bytes(8)), "TensorPayload.codec"),
        (lambda: TensorPayload("f32", (4,), True, b"not zstd"), "not a zstd frame"),
        (lambda: TensorPayload("f32", (4,), True, bytes(200)), "more than zstd can produce"),
    ],
)
def test_inconsistent_payloads_are_refused(build, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError, match=words):
        build()


def test_zstd_frame_declaring_another_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(12))  # content size 12, f32 (4,) needs 16
    with pytest.raises(WireError, match="declares 12 bytes of content"):
        TensorPayload("f32", (4,), True, frame)


def test_corrupt_zstd_data_raises_wire_error() -> None:
    good = encode_tensor(np.zeros((4, 64), np.float32), "f32", compress=True)
    data = bytearray(good.data)
    data[-3] ^= 0xFF
    bad = TensorPayload(good.codec, good.shape, True, bytes(data))
    with pytest.raises(WireError, match="zstd"):
        decode_tensor(bad)


def test_int8_payload_with_bad_scale_is_refused() -> None:
    payload = encode_tensor(np.ones((2, 4), np.float32), "int8", compress=False)
    data = np.frombuffer(payload.data[:8], "<f4").copy()
    data[1] = np.inf
    bad = TensorPayload("int8", (2, 4), False, data.tobytes() + payload.data[8:])
    with pytest.raises(WireError, match="row scale"):
        decode_tensor(bad)


def test_f32_payload_carrying_nan_is_refused() -> None:
    bad = TensorPayload("f32", (2,), False, np.array([1.0, np.nan], "<f4").tobytes())
    with pytest.raises(WireError, match="NaN or inf"):
        decode_tensor(bad)


def test_zstd_bomb_declaring_a_huge_tensor_allocates_nothing_big() -> None:
    """A few hundred bytes that claim a 1 GiB tensor: decode() and decode_tensor() refuse
    before zstd allocates the declared size."""
    shape = (2**14, 2**14)  # 2**28 elements, 1 GiB as f32
    # A zstd frame header declaring 2**30 bytes of content (frame header descriptor 0xC0: an
    # 8-byte content size follows the window descriptor 0x58), then one empty raw block.
    forged = (
        bytes.fromhex("28b52ffd c0 58") + (2**30).to_bytes(8, "little") + bytes.fromhex("010000")
    )
    assert zstandard.frame_content_size(forged) == 2**30
    msg_bytes = encode(Forward("s", 0, 0, 0, 0, TensorPayload("f32", shape, True, forged), ()))
    tracemalloc.start()
    try:
        msg = decode(msg_bytes)
        with pytest.raises(WireError, match="limit"):
            decode_tensor(msg.hidden)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
