"""Aggregating adapter updates, and refusing bad ones, as pure numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest

from meshllm import wire
from meshllm.tune.aggregate import AGGREGATES, Bounds, Update, aggregate, check_update, trimmed_count

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {A: (2, 3), B: (3, 2)}


def update(node: str, value: float, examples: int = 1) -> Update:
    return Update(node, examples, {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()})


def test_the_aggregates_are_the_wire_choices() -> None:
    assert AGGREGATES == wire.tune_messages.TUNE_AGGREGATES
    from meshllm.tune.rounds import TUNE_MESSAGES

    assert set(TUNE_MESSAGES) == {cls for cls in wire.MESSAGE_TAGS if cls.__name__.startswith("Tune")} | {wire.Hello}


def test_mean_is_fedavg_weighted_by_examples() -> None:
    out = aggregate([update("a", 1.0, 10), update("b", 4.0, 30)], "mean", clip=None)
    assert set(out) == {A, B}
    for name in out:
        assert out[name].dtype == np.float32 and out[name].shape == SHAPES[name]
        np.testing.assert_allclose(out[name], (1.0 * 10 + 4.0 * 30) / 40, rtol=1e-6)


def test_the_default_mean_is_fedavg_while_every_update_is_within_three_times_the_median() -> None:
    updates = [update("a", 1.0, 10), update("b", 2.9, 30), update("c", -0.5, 20)]
    default = aggregate(updates, "mean")
    plain = aggregate(updates, "mean", clip=None)
    for name in SHAPES:
        assert default[name].tobytes() == plain[name].tobytes()
        np.testing.assert_allclose(default[name], (1.0 * 10 + 2.9 * 30 - 0.5 * 20) / 60, rtol=1e-6)


def test_mean_is_per_coordinate() -> None:
    a = Update("a", 1, {A: np.array([[1, 2, 3], [4, 5, 6]], np.float32), B: np.zeros((3, 2), np.float32)})
    b = Update("b", 3, {A: np.array([[5, 6, 7], [0, 1, 2]], np.float32), B: np.ones((3, 2), np.float32)})
    out = aggregate([b, a], "mean")
    np.testing.assert_allclose(out[A], (np.array([[1, 2, 3], [4, 5, 6]]) + 3 * np.array([[5, 6, 7], [0, 1, 2]])) / 4)
    np.testing.assert_allclose(out[B], 0.75)


def test_median_outvotes_one_huge_update() -> None:
    updates = [update("a", 0.1, 1), update("b", 0.2, 1), update("evil", 1e6, 1_000_000)]
    out = aggregate(updates, "median")
    for name in out:
        np.testing.assert_allclose(out[name], 0.2, rtol=1e-6)
    assert np.abs(aggregate(updates, "mean", clip=None)[A]).max() > 1e5  # the plain mean is dragged away


def test_median_of_an_even_count_is_the_middle_mean_unweighted() -> None:
    out = aggregate([update("a", 1.0, 1), update("b", 2.0, 100), update("c", 4.0, 1), update("d", 100.0, 1)], "median")
    np.testing.assert_allclose(out[A], 3.0)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    values = [0.0, 1.0, 2.0, 3.0, 1000.0]
    updates = [update(f"n{i}", v, 1) for i, v in enumerate(values)]
    out = aggregate(updates, "trimmed", trim=0.2)  # floor(0.2 * 5) = 1 each end: mean of 1, 2, 3
    np.testing.assert_allclose(out[A], 2.0)
    # per coordinate: the extremes need not come from one node
    a = Update("a", 1, {A: np.array([[9, 0, 0], [0, 0, 0]], np.float32), B: np.zeros((3, 2), np.float32)})
    b = Update("b", 1, {A: np.array([[1, 9, 0], [0, 0, 0]], np.float32), B: np.zeros((3, 2), np.float32)})
    c = Update("c", 1, {A: np.array([[2, 1, 0], [0, 0, 0]], np.float32), B: np.zeros((3, 2), np.float32)})
    out = aggregate([a, b, c], "trimmed", trim=0.34)  # floor(1.02) = 1: the middle value of three
    np.testing.assert_allclose(out[A][0], [2, 1, 0])


def test_trimmed_with_fewer_than_three_is_the_unweighted_mean() -> None:
    out = aggregate([update("a", 1.0, 1), update("b", 3.0, 99)], "trimmed", trim=0.49)
    np.testing.assert_allclose(out[A], 2.0)
    assert [trimmed_count(n, 0.2) for n in (1, 2, 3, 4, 5, 10)] == [0, 0, 0, 0, 1, 2]
    assert trimmed_count(3, 0.49) == 1 and trimmed_count(4, 0.49) == 1  # one value always stays


def test_aggregate_does_not_depend_on_the_order_of_updates() -> None:
    rng = np.random.default_rng(3)
    updates = [Update(f"n{i}", int(rng.integers(1, 50)),
                      {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()})
               for i in range(6)]
    for method in AGGREGATES:
        first = aggregate(updates, method)
        again = aggregate(list(reversed(updates)), method)
        for name in SHAPES:
            assert first[name].tobytes() == again[name].tobytes()


@pytest.mark.parametrize("args, words", [
    (([], "mean"), "no updates"),
    (([update("a", 1.0)], "sum"), "unknown aggregate 'sum'"),
    (([update("a", 1.0)], "trimmed", 0.5), "trim 0.5"),
    (([update("a", 1.0), Update("b", 1, {A: np.zeros((2, 3), np.float32)})], "mean"), "different tensors"),
])
def test_aggregate_refuses_what_it_cannot_combine(args: tuple, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=words):
        aggregate(*args)


def test_a_good_update_passes() -> None:
    assert check_update(update("a", 0.5, 10), SHAPES, Bounds(max_norm=1000.0)) is None


@pytest.mark.parametrize("tensors, examples, words", [
    ({A: np.zeros((2, 3), np.float32)}, 1, f"missing tensor {B}"),
    ({}, 1, f"missing tensor {A} \\(and 1 more\\)"),
    ({A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32), "extra": np.zeros(1, np.float32)}, 1,
     "unexpected tensor extra"),
    ({A: np.zeros((3, 2), np.float32), B: np.zeros((3, 2), np.float32)}, 1,
     rf"{A}: shape \(3, 2\), expected \(2, 3\)"),
    ({A: np.zeros((2, 3), np.float64), B: np.zeros((3, 2), np.float32)}, 1, f"{A}: dtype float64, expected float32"),
    ({A: np.full((2, 3), np.nan, np.float32), B: np.zeros((3, 2), np.float32)}, 1, f"{A}: non-finite values"),
    ({A: np.zeros((2, 3), np.float32), B: np.full((3, 2), np.inf, np.float32)}, 1, f"{B}: non-finite values"),
    ({A: np.zeros((2, 3), np.float32), B: [[0.0] * 2] * 3}, 1, f"{B}: list, not an array"),
    ({A: np.full((2, 3), 5e5, np.float32), B: np.zeros((3, 2), np.float32)}, 1, r"norm 1.22e\+06 > 1000"),
    ({A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32)}, 0, r"examples 0 is outside \[1, 10000\]"),
    ({A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32)}, 10_001, "examples 10001 is outside"),
    ({A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32)}, 2.5, "examples is float"),
    ({A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32)}, True, "examples is bool"),
])
def test_every_kind_of_bad_update_is_refused_with_its_reason(tensors: dict, examples: int, words: str) -> None:  # type: ignore[type-arg]
    reason = check_update(Update("x", examples, tensors), SHAPES, Bounds(max_norm=1000.0))
    assert reason is not None and re.search(words, reason), reason


def test_the_norm_bound_covers_all_tensors_together() -> None:
    # each tensor alone has norm 6 (< 10); together sqrt(36 + 36) = 8.49 (< 10), then 12.7 (> 10)
    ok = Update("a", 1, {A: np.full((2, 3), 6 / np.sqrt(6), np.float32), B: np.full((3, 2), 6 / np.sqrt(6), np.float32)})
    assert check_update(ok, SHAPES, Bounds(max_norm=10)) is None
    big = Update("a", 1, {A: np.full((2, 3), 9 / np.sqrt(6), np.float32), B: np.full((3, 2), 9 / np.sqrt(6), np.float32)})
    assert check_update(big, SHAPES, Bounds(max_norm=10)) == "norm 12.7 > 10"
