"""The phi accrual failure detector (daemon/net/failure_detector.py): pure, times passed in."""

from __future__ import annotations

import math
import random

import pytest

from daemon.net.failure_detector import DEFAULT_CEILING_S, PhiAccrualDetector


def fed(intervals: list[float], *, floor_s: float = 1.0, expected_s: float = 0.2,
        **options: float) -> tuple[PhiAccrualDetector, float]:
    """A detector fed heartbeats at these intervals from t=0; returns it and the last time."""
    detector = PhiAccrualDetector(expected_interval_s=expected_s, floor_s=floor_s, now_s=0.0,
                                  **options)  # type: ignore[arg-type]
    t = 0.0
    detector.heartbeat(t)
    for interval in intervals:
        t += interval
        detector.heartbeat(t)
    return detector, t


def test_steady_heartbeats_behave_like_the_fixed_timeout() -> None:
    detector, t = fed([0.2] * 50)

    assert detector.lost_after_s() == 1.0
    assert not detector.lost(t + 0.999)
    assert detector.lost(t + 1.001)


def test_a_new_link_behaves_like_the_fixed_timeout() -> None:
    detector = PhiAccrualDetector(expected_interval_s=0.2, floor_s=1.0, now_s=5.0)

    assert detector.samples == 2  # the two seeds around the expected interval
    assert detector.mean_s == pytest.approx(0.2)
    assert not detector.lost(5.99) and detector.lost(6.01)


def test_never_lost_before_the_floor_however_suspicious() -> None:
    detector, t = fed([0.2] * 50, threshold=0.01, min_std_s=1e-6)

    assert detector.phi(t + 0.9) > 100
    assert not detector.lost(t + 0.999)
    assert detector.lost(t + 1.001)


def test_irregular_heartbeats_buy_time_in_proportion_to_their_jitter() -> None:
    # A busy peer: pauses of up to 0.9 s between bursts of heartbeats.
    detector, t = fed([0.1, 0.1, 0.9] * 20)

    learnt = detector.lost_after_s()
    assert 1.5 < learnt < DEFAULT_CEILING_S
    assert not detector.lost(t + 1.4)  # a fixed 1 s timeout would have dropped it
    assert detector.lost(t + learnt + 0.01)


def test_a_dead_peer_is_found_by_the_ceiling_however_irregular() -> None:
    detector, t = fed([0.05, 8.0] * 10)

    assert detector.lost_after_s() == DEFAULT_CEILING_S
    assert not detector.lost(t + 9.9)
    assert detector.lost(t + 10.01)


def test_the_ceiling_never_undercuts_the_floor() -> None:
    detector, t = fed([0.2] * 10, floor_s=30.0, ceiling_s=10.0)

    assert detector.ceiling_s == 30.0
    assert not detector.lost(t + 29.0)
    assert detector.lost(t + 30.01)


def test_anything_heard_restarts_the_silence_without_being_an_interval() -> None:
    detector, t = fed([0.2] * 10)
    samples = detector.samples

    detector.heard(t + 0.9)

    assert detector.samples == samples
    assert detector.silence_s(t + 1.5) == pytest.approx(0.6)
    assert not detector.lost(t + 1.5)
    detector.heard(t + 0.5)  # an older time never moves the silence back
    assert detector.silence_s(t + 1.5) == pytest.approx(0.6)


def test_old_intervals_leave_the_window() -> None:
    detector, t = fed([0.1, 0.1, 0.9] * 20 + [0.2] * 100, window=100)

    assert detector.samples == 100
    assert detector.mean_s == pytest.approx(0.2)
    assert detector.lost_after_s() == 1.0


def test_phi_grows_with_silence_and_is_one_in_two_at_the_mean() -> None:
    detector, t = fed([0.15, 0.25] * 20)

    assert detector.phi(t + detector.mean_s) == pytest.approx(-math.log10(0.5), abs=1e-9)
    values = [detector.phi(t + s / 10) for s in range(1, 40)]
    assert values == sorted(values)
    assert detector.phi(t + 1000.0) == math.inf


def test_a_heartbeat_out_of_order_is_not_an_interval() -> None:
    detector, t = fed([0.2] * 5)
    samples = detector.samples

    detector.heartbeat(t - 0.1)

    assert detector.samples == samples


@pytest.mark.parametrize("seed", range(5))
def test_lost_agrees_with_lost_after(seed: int) -> None:
    rng = random.Random(seed)
    detector, t = fed([rng.choice((0.05, 0.2, 0.6)) * rng.uniform(0.5, 2.0) for _ in range(60)])

    deadline = detector.lost_after_s()
    assert not detector.lost(t + deadline - 1e-3)
    assert detector.lost(t + deadline + 1e-3)


@pytest.mark.parametrize(
    "options",
    [
        dict(expected_interval_s=0.0, floor_s=1.0),
        dict(expected_interval_s=0.2, floor_s=0.0),
        dict(expected_interval_s=0.2, floor_s=1.0, ceiling_s=-1.0),
        dict(expected_interval_s=0.2, floor_s=1.0, threshold=0.0),
        dict(expected_interval_s=0.2, floor_s=1.0, window=1),
        dict(expected_interval_s=0.2, floor_s=1.0, min_std_s=0.0),
    ],
)
def test_bad_parameters_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PhiAccrualDetector(now_s=0.0, **options)  # type: ignore[arg-type]
