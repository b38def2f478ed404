"""One link's heartbeats (daemon/net/heartbeats.py), without a network: what is sent, what
is measured, when the peer is lost."""

from __future__ import annotations

import pytest

from daemon.net.failure_detector import DEFAULT_CEILING_S
from daemon.net.heartbeats import LinkHeartbeat
from meshllm.placement.linkstats import LinkMeter
from meshllm.wire import Heartbeat, HeartbeatAck, Message

ME = f"n-{1:016x}"
PEER = f"n-{2:016x}"


def heartbeats(now_s: float = 0.0) -> tuple[LinkHeartbeat, list[Message], LinkMeter]:
    sent: list[Message] = []
    meter = LinkMeter()
    return LinkHeartbeat(ME, sent.append, meter, interval_s=0.2, lost_after_s=1.0,
                         now_s=now_s), sent, meter


def test_a_heartbeat_carries_term_zero_and_the_time_it_left() -> None:
    beats, sent, _ = heartbeats()

    beats.beat(12.5, busy=False)

    assert sent == [Heartbeat(node_id=ME, term=0, sent_at_s=12.5)]


def test_the_peers_heartbeat_is_echoed_and_learnt() -> None:
    beats, sent, _ = heartbeats()
    samples = beats.detector.samples

    beats.on_heartbeat(Heartbeat(node_id=PEER, term=0, sent_at_s=3.0), 0.1)
    beats.on_heartbeat(Heartbeat(node_id=PEER, term=0, sent_at_s=3.2), 0.3)

    assert sent == [HeartbeatAck(node_id=ME, echo_sent_at_s=3.0),
                    HeartbeatAck(node_id=ME, echo_sent_at_s=3.2)]
    assert beats.detector.samples == samples + 1
    assert beats.detector.silence_s(0.3) == 0.0


def test_a_heartbeat_sent_while_busy_measures_queueing_not_latency() -> None:
    beats, _, meter = heartbeats()
    beats.beat(1.0, busy=False)
    beats.beat(2.0, busy=True)

    beats.on_ack(HeartbeatAck(node_id=PEER, echo_sent_at_s=1.0), 1.005)
    beats.on_ack(HeartbeatAck(node_id=PEER, echo_sent_at_s=2.0), 2.3)
    beats.on_ack(HeartbeatAck(node_id=PEER, echo_sent_at_s=5.0), 1.0)  # from the future: ignored

    stats = meter.stats()
    assert stats.rtt_ms == pytest.approx(5.0) and stats.rtt_samples == 2
    assert meter.rtt_ms is not None and meter.rtt_ms > 5.0  # the smoothed figure keeps both


def test_a_silent_peer_is_lost_after_the_timeout_and_not_before() -> None:
    beats, _, _ = heartbeats()
    for i in range(20):
        beats.on_heartbeat(Heartbeat(node_id=PEER, term=0, sent_at_s=0.0), i * 0.2)
    last = 19 * 0.2

    assert not beats.lost(last + 0.99)
    assert beats.lost(last + 1.01)


def test_anything_heard_keeps_the_peer() -> None:
    beats, _, _ = heartbeats()
    beats.heard(5.0)
    assert not beats.lost(5.9)
    beats.restart(10.0)
    assert not beats.lost(10.9) and beats.lost(11.1)


def test_after_a_stall_of_this_node_only_the_ceiling_counts() -> None:
    beats, _, _ = heartbeats()

    assert not beats.lost(3.0, stalled=True)
    assert beats.lost(3.0)
    assert beats.lost(DEFAULT_CEILING_S + 0.1, stalled=True)
    assert "lost after 1.00 s" in beats.describe(3.0)
