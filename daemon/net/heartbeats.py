"""Heartbeats: one link's liveness and round trip.

Every heartbeat interval the link manager has each link send ``Heartbeat(node_id, term,
sent_at_s)`` on ``control``, ahead of what the activation channel has queued
(``Outbox.send_now(urgent=True)``); the peer answers at once, the same way, with
``HeartbeatAck(node_id, echo_sent_at_s)``. ``term`` is reserved: always 0 (nothing in this
node tracks a term for heartbeats; the field stays so the wire format does not change).

- Round trip: each ack gives a sample on the sender's monotonic clock. The sample of a
  heartbeat sent while the link was busy (a probe in flight, or more than LOADED_BYTES
  queued or in flight) is queueing, not latency, and is left out of the planner's figure
  (``rtt_ms()`` keeps it).
- Liveness: a :class:`daemon.net.failure_detector.PhiAccrualDetector` per link, fed every
  heartbeat that arrives and told of every other valid piece. The link is lost when phi
  passes its threshold, never after less silence than ``lost_after_s`` (the configured
  heartbeat timeout) and always after DEFAULT_CEILING_S (10 s) or ``lost_after_s`` if longer.
  A judgment made just after this node's own event loop stalled (the heartbeat tick came
  more than an interval late) waits one tick, unless the silence passed the ceiling: the
  peer's pieces may still be waiting in this node's sockets.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from daemon.net.failure_detector import PhiAccrualDetector
from meshllm.placement.linkstats import LinkMeter
from meshllm.wire import Heartbeat, HeartbeatAck, Message

LOADED_BYTES = 16 * 1024
"""A heartbeat sent while more than this is queued or in flight measures queueing."""
HEARTBEAT_TERM = 0
"""What every Heartbeat carries in ``term``: reserved, always 0."""


class LinkHeartbeat:
    """The heartbeats of one link: what it sends, what it answers, and whether its peer is
    still there. ``send(msg)`` queues a message on the link's control channel, urgently."""

    def __init__(self, node_id: str, send: Callable[[Message], None], meter: LinkMeter, *,
                 interval_s: float, lost_after_s: float, now_s: float) -> None:
        self._node_id = node_id
        self._send = send
        self._meter = meter
        self._lost_after_s = lost_after_s
        self.detector = PhiAccrualDetector(expected_interval_s=interval_s, floor_s=lost_after_s,
                                           now_s=now_s)
        self._loaded: deque[float] = deque(maxlen=64)
        """``sent_at_s`` of recent heartbeats sent while the link was busy."""

    def restart(self, now_s: float) -> None:
        """The link just came up: its silence starts now."""
        self.detector.heard(now_s)

    def heard(self, now_s: float) -> None:
        """A valid piece arrived from the peer (not a heartbeat)."""
        self.detector.heard(now_s)

    def beat(self, now_s: float, *, busy: bool) -> None:
        """Send one heartbeat; ``busy``: the link is loaded, so its echo measures queueing."""
        if busy:
            self._loaded.append(now_s)
        self._send(Heartbeat(node_id=self._node_id, term=HEARTBEAT_TERM, sent_at_s=now_s))

    def on_heartbeat(self, msg: Heartbeat, now_s: float) -> None:
        """The peer's heartbeat: echo it at once, and learn its timing."""
        self._send(HeartbeatAck(node_id=self._node_id, echo_sent_at_s=msg.sent_at_s))
        self.detector.heartbeat(now_s)

    def on_ack(self, msg: HeartbeatAck, now_s: float) -> None:
        """The echo of one of ours: a round-trip sample."""
        sample_ms = (now_s - msg.echo_sent_at_s) * 1000.0
        if 0.0 <= sample_ms <= self._lost_after_s * 1000.0:
            self._meter.add_rtt(sample_ms, idle=msg.echo_sent_at_s not in self._loaded)

    def lost(self, now_s: float, *, stalled: bool = False) -> bool:
        """Whether the peer is lost. ``stalled``: this node's loop just ran late, so only a
        silence past the ceiling counts for now."""
        if stalled:
            return self.detector.silence_s(now_s) > self.detector.ceiling_s
        return self.detector.lost(now_s)

    def describe(self, now_s: float) -> str:
        """The detector's view, for the log line of a lost link."""
        d = self.detector
        return (f"silent {d.silence_s(now_s):.2f} s, heartbeats every {d.mean_s:.3f} "
                f"± {d.std_s:.3f} s ({d.samples} intervals), phi {d.phi(now_s):.1f}, "
                f"lost after {d.lost_after_s():.2f} s")
