"""The pure link model: probe round trips -> rates, rates and rtt -> one hop's milliseconds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.placement.linkstats import (
    DEFAULT_MB_S,
    DEFAULT_RTT_MS,
    LARGE_PROBE_BYTES,
    MAX_MB_S,
    SMALL_BYTES,
    TINY_PROBE_BYTES,
    LinkMeter,
    LinkStats,
    hop_ms,
    hop_table,
    rate_mb_s,
    transfer_ms,
)


def test_a_hop_is_half_the_round_trip_plus_the_bytes_at_their_rates() -> None:
    stats = LinkStats(rtt_ms=1.0, small_mb_s=4.096, large_mb_s=10.0)
    assert hop_ms(stats, 0) == pytest.approx(0.5)
    assert hop_ms(stats, SMALL_BYTES) == pytest.approx(0.5 + 1.0)  # 4,096 B at 4.096 MB/s
    assert hop_ms(stats, SMALL_BYTES + 100_000) == pytest.approx(0.5 + 1.0 + 10.0)
    assert hop_ms(stats, 2048, overhead_ms=1.5) == pytest.approx(0.5 + 0.5 + 1.5)
    assert stats.decode_hop_ms == pytest.approx(1.5)
    assert stats.prefill_hop_ms == pytest.approx(1.5 + (LARGE_PROBE_BYTES - SMALL_BYTES) / 10_000)


def test_missing_figures_take_the_defaults() -> None:
    assert hop_ms(None, 0) == DEFAULT_RTT_MS / 2
    assert hop_ms(None, 5000) == pytest.approx(DEFAULT_RTT_MS / 2 + 5000 / (DEFAULT_MB_S * 1000))
    assert hop_ms(None, 5000, default_rtt_ms=0.0, default_mb_s=1.0) == pytest.approx(5.0)
    only_rtt = LinkStats(rtt_ms=30.0, small_mb_s=None, large_mb_s=None)
    assert hop_ms(only_rtt, 0) == 15.0
    only_small = LinkStats(rtt_ms=None, small_mb_s=2.0, large_mb_s=None)
    assert transfer_ms(only_small, 10_000) == pytest.approx(5.0)  # one measured rate for both


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        LinkStats(rtt_ms=-1.0, small_mb_s=None, large_mb_s=None)
    with pytest.raises(ValueError):
        LinkStats(rtt_ms=1.0, small_mb_s=math.inf, large_mb_s=None)
    with pytest.raises(ValueError):
        hop_ms(None, -1)
    with pytest.raises(ValueError):
        hop_ms(None, 1, overhead_ms=math.nan)


def test_probe_differences_cancel_latency() -> None:
    # A link of 0.4 ms one way, 8 MB/s for the first bytes and 20 MB/s beyond them; echoes are
    # tiny. Round trip of a probe of n bytes: 2 * 0.4 + transfer(n).
    truth = LinkStats(rtt_ms=0.8, small_mb_s=8.0, large_mb_s=20.0)

    def round_trip(n: int, extra_delay_ms: float = 0.0) -> float:
        return 0.8 + transfer_ms(truth, n) + extra_delay_ms

    for delay in (0.0, 30.0):  # a fixed delay (slow Wi-Fi) changes no rate
        meter = LinkMeter()
        meter.add_probe(round_trip(TINY_PROBE_BYTES, delay), round_trip(SMALL_BYTES, delay),
                        round_trip(LARGE_PROBE_BYTES, delay))
        meter.add_rtt(round_trip(0, delay))
        got = meter.stats()
        assert got.small_mb_s == pytest.approx(8.0)
        assert got.large_mb_s == pytest.approx(20.0)
        assert got.rtt_ms == pytest.approx(0.8 + delay)
        assert (got.samples, got.rtt_samples) == (1, 1)
        assert hop_ms(got, 2304) == pytest.approx(hop_ms(truth, 2304) + delay / 2)


def test_noise_that_inverts_a_probe_difference_caps_the_rate() -> None:
    meter = LinkMeter()
    meter.add_probe(1.0, 0.9, 0.8)
    assert meter.stats().small_mb_s == MAX_MB_S and meter.stats().large_mb_s == MAX_MB_S
    assert rate_mb_s(1000, 0.0) == MAX_MB_S and rate_mb_s(1000, 1.0) == 1.0


def test_round_trips_under_load_do_not_count_as_latency() -> None:
    meter = LinkMeter()
    assert meter.stats() == LinkStats(None, None, None, 0, 0)
    meter.add_rtt(50.0, idle=False)  # queued behind a bulk send
    assert meter.stats().rtt_ms == 50.0  # better than nothing
    meter.add_rtt(1.0)
    assert meter.stats().rtt_ms == 1.0
    meter.add_rtt(60.0, idle=False)
    assert meter.stats().rtt_ms == 1.0
    assert meter.rtt_ms == pytest.approx(0.75 * (0.75 * 50 + 0.25 * 1.0) + 0.25 * 60)  # display: all
    assert meter.stats().rtt_samples == 3
    meter.add_rtt(math.nan)
    meter.add_rtt(-1.0)
    assert meter.stats().rtt_samples == 3


def test_a_probe_replaces_the_rates_and_bulk_samples_smooth_the_large_one() -> None:
    meter = LinkMeter()
    meter.add_probe(1.0, 11.0, 1000.0)  # a busy start
    small_ms = 1.0 + (SMALL_BYTES - TINY_PROBE_BYTES) / 8000
    meter.add_probe(1.0, small_ms, small_ms + (LARGE_PROBE_BYTES - SMALL_BYTES) / 20_000)
    assert meter.stats().small_mb_s == pytest.approx(8.0)
    assert meter.stats().large_mb_s == pytest.approx(20.0)
    meter.add_probe(1.0, 1.0 + (SMALL_BYTES - TINY_PROBE_BYTES) / 4000)  # small probes only
    assert meter.stats().small_mb_s == pytest.approx(4.0)
    assert meter.stats().large_mb_s == pytest.approx(20.0)
    meter.add_bulk(1_000_000, 100.0)  # 10 MB/s
    assert meter.stats().large_mb_s == pytest.approx(17.5)
    assert meter.stats().samples == 4


def test_bulk_samples_smooth_the_large_rate() -> None:
    meter = LinkMeter()
    meter.add_bulk(1_000_000, 100.0)  # 10 MB/s
    assert meter.stats().large_mb_s == pytest.approx(10.0)
    meter.add_bulk(1_000_000, 50.0)  # 20 MB/s
    assert meter.stats().large_mb_s == pytest.approx(12.5)
    meter.add_bulk(0, 10.0)
    meter.add_bulk(10, 0.0)
    assert meter.stats().samples == 2


def test_hop_table_keeps_each_direction() -> None:
    fast = LinkStats(rtt_ms=1.0, small_mb_s=10.0, large_mb_s=10.0)
    slow = LinkStats(rtt_ms=31.0, small_mb_s=10.0, large_mb_s=10.0)
    table = hop_table({("a", "b"): fast, ("b", "a"): slow}, 1000, overhead_ms=1.0)
    assert table == {("a", "b"): pytest.approx(1.6), ("b", "a"): pytest.approx(16.6)}


@given(
    rtt=st.floats(0, 100), small=st.floats(0.01, 1000), large=st.floats(0.01, 1000),
    a=st.integers(0, 10**7), b=st.integers(0, 10**7),
)
def test_a_hop_never_gets_cheaper_with_more_bytes(
    rtt: float, small: float, large: float, a: int, b: int,
) -> None:
    stats = LinkStats(rtt_ms=rtt, small_mb_s=small, large_mb_s=large)
    low, high = sorted((a, b))
    assert rtt / 2 <= hop_ms(stats, low) <= hop_ms(stats, high) * (1 + 1e-12)


def test_the_planners_round_trip_ignores_sporadic_spikes_and_follows_a_lasting_change() -> None:
    meter = LinkMeter()
    for sample in (1.0, 1.2, 0.9, 45.0, 1.1, 1.0, 60.0, 1.0):  # a busy process, now and then
        meter.add_rtt(sample)
    assert meter.stats().rtt_ms == pytest.approx(1.05)
    for _ in range(12):  # the peer moved to slow Wi-Fi: 30 ms more, for good
        meter.add_rtt(31.0)
    assert meter.stats().rtt_ms == 31.0
