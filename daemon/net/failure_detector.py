"""Failure detection: when a link's silence means its peer is lost (phi accrual).

A fixed timeout treats a busy peer (a start-up loading weights, a GIL-bound step, a slow
Wi-Fi hop) like a dead one. The phi accrual failure detector (Hayashibara, Defago, Yared,
Katayama, "The phi accrual failure detector", SRDS 2004) instead learns how regularly a
peer's heartbeats arrive and turns the current silence into a suspicion level::

    phi(t) = -log10(P(an interval longer than t))

with the intervals modelled as a normal distribution of the mean and standard deviation of
the last ``window`` observed intervals (the standard deviation at least ``min_std_s``). A
peer whose heartbeats come like clockwork is suspected soon after it falls silent; one whose
heartbeats come irregularly is given time in proportion to the jitter it showed.

:class:`PhiAccrualDetector` declares the peer lost when phi exceeds ``threshold``, bounded on
both sides by silence:

- never before ``floor_s`` of silence (the link manager's ``lost_after_s``, from
  ``--heartbeat-timeout``): no peer is lost sooner than with a fixed timeout of ``floor_s``;
- always after ``ceiling_s`` (10 s by default, and never below the floor): a dead peer is
  found within that however irregular it was.

Silence counts from the last thing heard from the peer (:meth:`heard`: any valid piece, as
the link manager reports it), while only heartbeats (:meth:`heartbeat`) are intervals.

Pure: no clock, no asyncio; every method takes the time as ``now_s`` (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import deque
from statistics import NormalDist

DEFAULT_THRESHOLD = 8.0
"""phi above which the peer is lost: the silence had a 1e-8 chance under the learnt model."""
DEFAULT_WINDOW = 500
"""Intervals remembered (100 s at 0.2 s): a pause seen in the last minute or so counts."""
DEFAULT_CEILING_S = 10.0
"""Longest silence tolerated from any peer, however irregular (unless the floor is higher)."""


class PhiAccrualDetector:
    """The phi accrual failure detector of one peer, with a floor and a ceiling on silence.

    Until heartbeats arrive it assumes intervals of ``expected_interval_s`` give or take a
    quarter (two seed samples, as Akka does), so a new link behaves like the fixed timeout.
    """

    def __init__(
        self,
        *,
        expected_interval_s: float,
        floor_s: float,
        now_s: float,
        ceiling_s: float = DEFAULT_CEILING_S,
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        min_std_s: float | None = None,
    ) -> None:
        """``min_std_s``: least standard deviation assumed (default: a quarter of the
        expected interval), so perfectly regular heartbeats do not make phi a step."""
        if not expected_interval_s > 0:
            raise ValueError("expected_interval_s must be positive")
        if not floor_s > 0 or not ceiling_s > 0:
            raise ValueError("floor_s and ceiling_s must be positive")
        if not threshold > 0:
            raise ValueError("threshold must be positive")
        if window < 2:
            raise ValueError("window must be at least 2")
        self.floor_s = floor_s
        self.ceiling_s = max(ceiling_s, floor_s)
        self.threshold = threshold
        self.min_std_s = expected_interval_s / 4 if min_std_s is None else min_std_s
        if not self.min_std_s > 0:
            raise ValueError("min_std_s must be positive")
        self._z = -NormalDist().inv_cdf(10.0 ** -threshold)
        """Standard deviations above the mean where phi reaches the threshold."""
        self._intervals: deque[float] = deque()
        self._window = window
        self._sum = 0.0
        self._sum_sq = 0.0
        spread = expected_interval_s / 4
        self._add(expected_interval_s - spread)
        self._add(expected_interval_s + spread)
        self._last_heard_s = now_s
        self._last_heartbeat_s: float | None = None

    # --- what arrives ---------------------------------------------------------------------

    def heartbeat(self, now_s: float) -> None:
        """A heartbeat arrived: its interval since the previous one is a sample."""
        if self._last_heartbeat_s is not None and now_s >= self._last_heartbeat_s:
            self._add(now_s - self._last_heartbeat_s)
        self._last_heartbeat_s = now_s
        self.heard(now_s)

    def heard(self, now_s: float) -> None:
        """Something else arrived from the peer: the silence starts again."""
        self._last_heard_s = max(self._last_heard_s, now_s)

    def _add(self, interval_s: float) -> None:
        if len(self._intervals) == self._window:
            old = self._intervals.popleft()
            self._sum -= old
            self._sum_sq -= old * old
        self._intervals.append(interval_s)
        self._sum += interval_s
        self._sum_sq += interval_s * interval_s

    # --- what it says ---------------------------------------------------------------------

    @property
    def samples(self) -> int:
        """Intervals behind the model (the two seeds included, until the window drops them)."""
        return len(self._intervals)

    @property
    def mean_s(self) -> float:
        return self._sum / len(self._intervals)

    @property
    def std_s(self) -> float:
        """Standard deviation of the intervals, at least ``min_std_s``."""
        n = len(self._intervals)
        variance = max(0.0, self._sum_sq / n - self.mean_s ** 2)
        return max(math.sqrt(variance), self.min_std_s)

    def silence_s(self, now_s: float) -> float:
        return now_s - self._last_heard_s

    def phi(self, now_s: float) -> float:
        """Suspicion level after the current silence (``inf`` past any doubt)."""
        y = (self.silence_s(now_s) - self.mean_s) / self.std_s
        tail = 0.5 * math.erfc(y / math.sqrt(2.0))
        return -math.log10(tail) if tail > 0.0 else math.inf

    def lost_after_s(self) -> float:
        """The silence after which :meth:`lost` holds, given the intervals seen so far."""
        return min(max(self.mean_s + self._z * self.std_s, self.floor_s), self.ceiling_s)

    def lost(self, now_s: float) -> bool:
        """Whether the peer is lost: silent for over ``floor_s`` and either phi over the
        threshold or silent for over ``ceiling_s``."""
        silence = self.silence_s(now_s)
        if silence <= self.floor_s:
            return False
        return silence > self.ceiling_s or self.phi(now_s) > self.threshold
