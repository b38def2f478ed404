"""What a link's measurements say one hop costs: the figures, a pure estimator, the hop model.

Pure: no clock, no I/O. ``daemon/net/links.py`` measures (heartbeats, a probe when a link
comes up, bulk sends) and feeds a :class:`LinkMeter` per link with the milliseconds it saw;
the coordinator turns each pair's :class:`LinkStats` into the planner's hop costs with
:func:`hop_ms` / :func:`hop_table`.

The hop model, for a message of ``n`` bytes from one node to the next::

    hop_ms(n) = rtt_ms / 2                                   latency, one way
              + min(n, SMALL_BYTES) / small rate             the first bytes of a message
              + max(0, n - SMALL_BYTES) / large rate         bulk bytes beyond them
              + overhead_ms                                  (the caller's per-hop constant)

- ``rtt_ms``: the heartbeats' round trip (a ~70-byte message each way), the median of the
  last RTT_WINDOW heartbeats sent while nothing else was queued on the link (queueing behind
  bulk traffic is not latency, and a median ignores sporadic spikes of a busy process). A node whose sends are delayed by D (slow Wi-Fi, or
  ``--debug-link-delay-ms D``) shows D in the round trip measured at both ends, so each hop
  touching it costs D/2 more either way, and a ring through it pays D in all, as it would.
- The rates come from the differences of probe round trips at three sizes (TINY, SMALL and
  LARGE bytes, each echoed by a few bytes): latency and the echo cancel out, so a fixed
  delay changes no rate. ``small rate = (SMALL - TINY) / (t_small - t_tiny)``,
  ``large rate = (LARGE - SMALL) / (t_large - t_small)``. Bulk sends seen passively (a
  send that had to wait for the link to drain, or a multi-piece message arriving) update the
  large rate.
- MB/s here is 10**6 bytes per second (1,000 bytes per ms).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

TINY_PROBE_BYTES = 64
"""The smallest probe: about a heartbeat."""
SMALL_BYTES = 4096
"""The small probe, and where the hop model switches from the small rate to the large one:
one position's hidden state (2,304 bytes in f32 for a 576-wide model, 8 KB for 2048)."""
LARGE_PROBE_BYTES = 262_144
"""The large probe: one data-channel message, the size of a prefill's pieces."""

DEFAULT_RTT_MS = 2.0
"""Round trip assumed for a link without a measurement (one hop: 1 ms)."""
DEFAULT_MB_S = 5.0
"""Rate assumed without a measurement (pure-Python SCTP/DTLS moves 3-8 MB/s)."""
MAX_MB_S = 100_000.0
"""Rates are capped here: a probe difference at or below zero (noise) is this fast."""
SMOOTHING = 0.25
"""Weight of a new sample in every smoothed figure."""
RTT_WINDOW = 16
"""The planner's round trip is the median of this many recent idle heartbeats (about 3 s):
a busy process (the GIL, a start-up) adds sporadic spikes that an average would carry."""


@dataclass(frozen=True)
class LinkStats:
    """One link's figures as seen from one end (its sends and their echoes)."""

    rtt_ms: float | None
    """Heartbeat round trip on an idle link (median of the recent ones); None before the first."""
    small_mb_s: float | None
    """Rate of a message's first SMALL_BYTES (activation sized); None before a probe."""
    large_mb_s: float | None
    """Rate of bulk bytes beyond them (prefill sized); None before a probe or a bulk send."""
    samples: int = 0
    """Throughput samples behind the rates: probes plus passive bulk samples."""
    rtt_samples: int = 0
    """Heartbeat round trips behind ``rtt_ms``."""

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "small_mb_s", "large_mb_s"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.samples < 0 or self.rtt_samples < 0:
            raise ValueError("sample counts must be >= 0")

    @property
    def decode_hop_ms(self) -> float:
        """One activation-sized hop (SMALL_BYTES), for display."""
        return hop_ms(self, SMALL_BYTES)

    @property
    def prefill_hop_ms(self) -> float:
        """One prefill-sized hop (LARGE_PROBE_BYTES), for display."""
        return hop_ms(self, LARGE_PROBE_BYTES)


def transfer_ms(stats: LinkStats | None, nbytes: int, *, default_mb_s: float = DEFAULT_MB_S) -> float:
    """The size-dependent part of a hop: ``nbytes`` at the small rate, then the large one."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    small = stats.small_mb_s if stats is not None and stats.small_mb_s else default_mb_s
    large = stats.large_mb_s if stats is not None and stats.large_mb_s else default_mb_s
    if stats is not None and not stats.large_mb_s and stats.small_mb_s:
        large = small  # one measured rate beats the default
    head = min(nbytes, SMALL_BYTES)
    return head / (small * 1000.0) + (nbytes - head) / (large * 1000.0)


def hop_ms(
    stats: LinkStats | None,
    nbytes: int,
    *,
    default_rtt_ms: float = DEFAULT_RTT_MS,
    default_mb_s: float = DEFAULT_MB_S,
    overhead_ms: float = 0.0,
) -> float:
    """Predicted milliseconds for one message of ``nbytes`` over a link with ``stats``.

    Missing figures (no stats, no rtt, no rates) take the defaults. ``overhead_ms`` is added
    as is: the per-hop work outside the link (codec, hand-over to the worker), which the
    caller measures or calibrates.
    """
    if not (overhead_ms >= 0 and math.isfinite(overhead_ms)):
        raise ValueError(f"overhead_ms must be finite and >= 0, got {overhead_ms}")
    rtt = stats.rtt_ms if stats is not None and stats.rtt_ms is not None else default_rtt_ms
    return rtt / 2.0 + transfer_ms(stats, nbytes, default_mb_s=default_mb_s) + overhead_ms


def hop_table(
    stats: Mapping[tuple[str, str], LinkStats],
    nbytes: int,
    *,
    default_rtt_ms: float = DEFAULT_RTT_MS,
    default_mb_s: float = DEFAULT_MB_S,
    overhead_ms: float = 0.0,
) -> dict[tuple[str, str], float]:
    """``{(a, b): hop_ms}`` for the planner's ``hop_ms``/``prefill_hop_ms`` arguments.

    ``stats[(a, b)]`` is what node ``a`` measured on its link to ``b`` (its sends): the
    planner prefers ``(a, b)`` for a hop from a to b and falls back to ``(b, a)``.
    """
    return {
        pair: hop_ms(link, nbytes, default_rtt_ms=default_rtt_ms, default_mb_s=default_mb_s,
                     overhead_ms=overhead_ms)
        for pair, link in stats.items()
    }


def rate_mb_s(nbytes: int, ms: float) -> float:
    """``nbytes`` in ``ms`` as MB/s, capped at MAX_MB_S (a time at or below zero is noise)."""
    if ms <= 0:
        return MAX_MB_S
    return min(MAX_MB_S, nbytes / (ms * 1000.0))


def _smooth(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - SMOOTHING) * old + SMOOTHING * sample


class LinkMeter:
    """The running figures of one link, fed by the link layer with what it measured."""

    def __init__(self) -> None:
        self._rtt_all_ms: float | None = None
        self._rtt_idle: deque[float] = deque(maxlen=RTT_WINDOW)
        self._rtt_samples = 0
        self._small_mb_s: float | None = None
        self._large_mb_s: float | None = None
        self._samples = 0

    @property
    def rtt_ms(self) -> float | None:
        """Every heartbeat round trip, smoothed (queueing included): what status shows."""
        return self._rtt_all_ms

    def add_rtt(self, sample_ms: float, *, idle: bool = True) -> None:
        """A heartbeat round trip; ``idle``: nothing else was queued when it was sent."""
        if not (sample_ms >= 0 and math.isfinite(sample_ms)):
            return
        self._rtt_all_ms = _smooth(self._rtt_all_ms, sample_ms)
        if idle:
            self._rtt_idle.append(sample_ms)
        self._rtt_samples += 1

    def add_probe(self, tiny_ms: float, small_ms: float, large_ms: float | None = None) -> None:
        """Round trips of the TINY, SMALL and LARGE probes (each echoed by a few bytes; the
        least of a few tries each). A probe replaces the rates it measures: it is already a
        careful measurement, and one taken while the node was busy (starting, say) must not
        linger."""
        if not all(math.isfinite(ms) and ms >= 0 for ms in (tiny_ms, small_ms)):
            return
        self._small_mb_s = rate_mb_s(SMALL_BYTES - TINY_PROBE_BYTES, small_ms - tiny_ms)
        if large_ms is not None and math.isfinite(large_ms) and large_ms >= 0:
            self._large_mb_s = rate_mb_s(LARGE_PROBE_BYTES - SMALL_BYTES, large_ms - small_ms)
        self._samples += 1

    def add_bulk(self, nbytes: int, ms: float) -> None:
        """A passive bulk sample: ``nbytes`` moved over the link in ``ms`` (link-limited)."""
        if nbytes <= 0 or not (ms > 0 and math.isfinite(ms)):
            return
        self._large_mb_s = _smooth(self._large_mb_s, rate_mb_s(nbytes, ms))
        self._samples += 1

    def stats(self) -> LinkStats:
        rtt = statistics.median(self._rtt_idle) if self._rtt_idle else self._rtt_all_ms
        return LinkStats(rtt_ms=rtt, small_mb_s=self._small_mb_s, large_mb_s=self._large_mb_s,
                         samples=self._samples, rtt_samples=self._rtt_samples)

