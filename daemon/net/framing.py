"""Framing: one link's messages as data-channel pieces, with reassembly and backpressure.

Each link has two reliable, ordered data channels that carry whole messages
(:mod:`meshllm.wire`), ``control`` and ``activation`` (:data:`CHANNEL_IDS`), plus the probe
channel that carries raw bytes (:mod:`daemon.net.probes`). A message travels in pieces
(:func:`meshllm.wire.split_frames`: one piece for any message under 256 KiB); every piece
from the network goes through the channel's Reassembler and ``decode`` (:meth:`Channel.feed`),
and a link whose peer sends too many malformed pieces in a window is ended
(:class:`BadFrameWindow`).

What a peer can make this node hold is bounded per channel: one message of at most
``max_message_bytes`` (4 MiB and a little, or the largest message the node's model sends:
:func:`link_message_bytes`), and at most that much in messages still in progress (of which
there are at most MAX_PARTIAL_MESSAGES). A piece beyond a bound is refused as a bad frame,
never buffered. On the sending side ``send`` waits at the high-water mark, and a link whose
peer lets what ``send_now``/``send_probe`` queue (its heartbeats' acks, its probes' echoes)
grow past the high-water mark plus URGENT_BACKLOG_BYTES is closed: the peer is not reading.

Sending (:class:`Outbox`): ``send`` waits while a channel has more than the high-water mark
queued (backpressure); ``send_now`` queues a small message at once, ignoring it (heartbeats,
acks, Byes), and an urgent one ahead of the other channels' queued pieces
(:func:`daemon.net.aiortc_tuning.send_urgent`). With a debug link delay every piece goes
through the link's :class:`daemon.net.delay.DelayQueue` first.

A ``send`` that waits for the link to drain saw the bytes that left the channel's buffer
while it waited, at the rate SCTP's acknowledgements allow: one bulk-rate sample for the
link's meter. aiortc tells a sender nothing else about when its bytes arrived (a message's
SCTP acknowledgement can be delayed by up to 20 ms), so a message that never waits (anything
under the high-water mark) yields no sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from daemon.net.aiortc_tuning import rtc, sctp_pending_bytes, send_piece, send_urgent
from daemon.net.delay import DelayQueue
from daemon.net.link_events import LinkError
from meshllm.errors import WireError
from meshllm.placement.linkstats import LinkMeter
from meshllm.wire import DEFAULT_MAX_MESSAGE_BYTES as WIRE_MAX_MESSAGE_BYTES
from meshllm.wire import Message, Reassembler, decode, encode, split_frames
from meshllm.wire.tune_messages import MAX_TUNE_PART_BYTES

if TYPE_CHECKING:
    from aiortc import RTCDataChannel

log = logging.getLogger(__name__)

CHANNEL_IDS: dict[str, int] = {"control": 0, "activation": 1}
"""The data channels of every link (negotiated out of band, so both ends create them)."""
DEFAULT_SEND_HIGH_WATER_BYTES = 512 * 1024
"""send() waits while a channel has more than this queued (backpressure). Both channels
share one SCTP association, so this also bounds how long a control message can wait behind
activations: about high-water / throughput (0.1 s at 5 MB/s); heartbeats go ahead of them."""
MIN_BULK_SAMPLE_BYTES = 64 * 1024
"""A backpressure wait that drained less than this yields no rate sample."""
ENVELOPE_BYTES = 64 * 1024
"""Room for what a message carries besides its tensors (ids, routes, tensor headers)."""
DEFAULT_MAX_MESSAGE_BYTES = MAX_TUNE_PART_BYTES + ENVELOPE_BYTES
"""The largest message a link takes from a peer unless told more (:func:`link_message_bytes`):
a part of a tune job's adapter, 4 MiB and its envelope, which any model may send."""
MAX_PARTIAL_MESSAGES = 2
"""Messages in progress per channel. A sender finishes one message before the next on a
channel (only single-piece ones slip between); the second is for one it gave up half sent."""
URGENT_BACKLOG_BYTES = 2**20
"""What ``send_now``/``send_probe`` may queue on a channel beyond the high-water mark."""
DEFAULT_BAD_FRAME_LIMIT = 5
DEFAULT_BAD_FRAME_WINDOW_S = 10.0
_MESSAGE_ID_MASK = 0xFFFFFFFF


def link_message_bytes(hidden_size: int, max_positions: int, kv_heads: int, head_dim: int) -> int:
    """The largest message a mesh of this model sends legitimately, as float32 (the widest
    codec), plus its envelope; at least DEFAULT_MAX_MESSAGE_BYTES, at most the wire's limit:

    - a whole prompt's hidden states (``Forward``, ``Result``, a ``Rebuild`` part):
      ``max_positions * hidden_size``;
    - one layer's cache (``CacheHandover``): ``2 * kv_heads * max_positions * head_dim``;
    - a tune part: MAX_TUNE_PART_BYTES, or one adapter tensor alone, ``rank * width``, with
      rank at most 256 (the tune API's bound) and a projection at most 4 times the hidden size.
    """
    f32 = 4
    largest = max(max_positions * hidden_size * f32,
                  2 * kv_heads * max_positions * head_dim * f32,
                  256 * 4 * hidden_size * f32)
    return min(WIRE_MAX_MESSAGE_BYTES, max(DEFAULT_MAX_MESSAGE_BYTES, largest + ENVELOPE_BYTES))


class Channel:
    """One data channel of a link, with its reassembly and send state."""

    def __init__(self, name: str, dc: RTCDataChannel, low_water_bytes: int,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.name = name
        self.dc = dc
        self.max_message_bytes = max_message_bytes
        self.reassembler = Reassembler(max_message_bytes=max_message_bytes,
                                       max_partial_messages=MAX_PARTIAL_MESSAGES,
                                       max_buffered_bytes=max_message_bytes)
        self.send_lock = asyncio.Lock()
        self.drained = asyncio.Event()
        """Set when the queued bytes fall to the low-water mark (or the link ends)."""
        self._next_message_id = 0
        self.delayed_bytes = 0
        """Bytes waiting in the link's delay queue for this channel (debug link delay)."""
        self.pushed_bytes = 0
        """Bytes the delay queue has handed to ``dc`` so far."""
        dc.bufferedAmountLowThreshold = low_water_bytes

    def take_message_id(self) -> int:
        message_id = self._next_message_id
        self._next_message_id = (message_id + 1) & _MESSAGE_ID_MASK
        return message_id

    def queued(self) -> int:
        """Bytes waiting to leave: in aiortc's buffer or the debug delay queue."""
        return self.dc.bufferedAmount + self.delayed_bytes

    def feed(self, data: bytes | str, now_s: float) -> Message | None:
        """Take one piece from the network: the message it completes, or None (more pieces
        to come). Raises WireError for a malformed piece (a text one included)."""
        if not isinstance(data, bytes):
            raise WireError("a text message (only binary pieces are allowed)")
        whole = self.reassembler.feed(data, now_s)
        return None if whole is None else decode(whole, max_bytes=self.max_message_bytes)


class BadFrameWindow:
    """Malformed pieces from one peer in a sliding window; too many end its link."""

    def __init__(self, limit: int = DEFAULT_BAD_FRAME_LIMIT,
                 window_s: float = DEFAULT_BAD_FRAME_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._seen_s: deque[float] = deque()

    def add(self, now_s: float) -> int:
        """Count one at ``now_s``; return how many fall in the window."""
        self._seen_s.append(now_s)
        while self._seen_s and now_s - self._seen_s[0] > self.window_s:
            self._seen_s.popleft()
        return len(self._seen_s)

    def too_many(self) -> bool:
        return len(self._seen_s) >= self.limit


class Outbox:
    """The sending side of one link: its channels, backpressure and the debug delay.

    ``fail(reason)`` ends the link (an aiortc failure while sending); :meth:`close` is called
    when the link ends, for whatever reason, and wakes every waiting sender.
    """

    def __init__(self, channels: dict[str, Channel], probe: Channel, *, meter: LinkMeter,
                 high_water_bytes: int, delay_s: float,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
                 fail: Callable[[str], None]) -> None:
        self.channels = channels
        self.probe = probe
        """The probe channel (raw bytes; not in ``channels``, which carry messages)."""
        self._meter = meter
        self._high_water_bytes = high_water_bytes
        self._fail = fail
        self.delayed: DelayQueue | None = (
            DelayQueue(delay_s, spawn=spawn, fail=fail) if delay_s > 0 else None)
        self.closed_reason: str | None = None

    def set_peer(self, peer_id: str) -> None:
        if self.delayed is not None:
            self.delayed.peer_id = peer_id

    async def send(self, peer_id: str, channel: str, data: bytes) -> None:
        """Send one encoded message; see ``LinkManager.send`` for what it raises."""
        ch = self.channels[channel]
        async with ch.send_lock:
            for piece in split_frames(data, ch.take_message_id()):
                if self.closed_reason is None and ch.queued() > self._high_water_bytes:
                    await self._wait_drained(ch)
                if self.closed_reason is not None:
                    raise LinkError(f"link to {peer_id} lost: {self.closed_reason}", peer_id)
                if self.delayed is not None:
                    self.delayed.put(ch, piece)
                    continue
                try:
                    await send_piece(ch.dc, piece)
                except rtc().InvalidStateError:
                    self._fail("channel closed")
                    raise LinkError(f"link to {peer_id} lost: channel closed", peer_id) from None
                except Exception as exc:  # aiortc/aioice/OpenSSL: ConnectionError, OSError, ...
                    self._fail("send failed")
                    raise LinkError(f"link to {peer_id} lost: send failed: {exc!r}",
                                    peer_id) from exc

    async def _wait_drained(self, ch: Channel) -> None:
        """Wait until the channel's queue is below the high-water mark again. Without a debug
        delay, the bytes that left the buffer meanwhile went at the rate SCTP's
        acknowledgements allowed: a bulk-rate sample."""
        start_s = time.monotonic()
        buffered, pushed = ch.dc.bufferedAmount, ch.pushed_bytes
        while self.closed_reason is None and ch.queued() > self._high_water_bytes:
            ch.drained.clear()
            await ch.drained.wait()
        left = buffered + (ch.pushed_bytes - pushed) - ch.dc.bufferedAmount
        if self.closed_reason is None and self.delayed is None and left >= MIN_BULK_SAMPLE_BYTES:
            self._meter.add_bulk(left, (time.monotonic() - start_s) * 1000.0)

    def _backlogged(self, ch: Channel) -> bool:
        """Whether ``ch`` holds more than a sender that waits at the high-water mark could
        queue, plus URGENT_BACKLOG_BYTES: the peer is not reading. The link is then closed."""
        queued = ch.queued()
        if queued <= self._high_water_bytes + URGENT_BACKLOG_BYTES:
            return False
        log.warning("closing a link: %d bytes queued on %s; the peer is not reading", queued, ch.name)
        self._fail("peer not reading")
        return True

    def send_now(self, channel: str, msg: Message, *, urgent: bool = False) -> None:
        """Queue a small message at once, ignoring backpressure (heartbeats, acks, Byes);
        ``urgent``: ahead of the pieces the other channels queued. Closes the link instead
        when its peer let too much pile up (see :meth:`_backlogged`)."""
        ch = self.channels[channel]
        if self.closed_reason is not None or self._backlogged(ch):
            return
        try:
            for piece in split_frames(encode(msg), ch.take_message_id()):
                if self.delayed is not None:
                    self.delayed.put(ch, piece, urgent=urgent)
                elif urgent:
                    send_urgent(ch.dc, piece)
                else:
                    ch.dc.send(piece)
        except rtc().InvalidStateError:
            self._fail("channel closed")

    def send_probe(self, data: bytes) -> None:
        """Queue raw bytes on the probe channel (or close the link, as ``send_now``)."""
        if self.closed_reason is not None or self._backlogged(self.probe):
            return
        if self.delayed is not None:
            self.delayed.put(self.probe, data)
            return
        try:
            self.probe.dc.send(data)
        except rtc().InvalidStateError:
            self._fail("channel closed")

    def busy_bytes(self) -> int:
        """Bytes queued on the link or sent and not acknowledged yet."""
        queued = sum(ch.queued() for ch in (*self.channels.values(), self.probe))
        return queued + sctp_pending_bytes(self.probe.dc)

    def flushing(self) -> bool:
        """Whether control messages (a Bye) are still on their way out."""
        return bool(self.delayed) or self.channels["control"].dc.bufferedAmount > 0

    def expire(self, now_s: float) -> None:
        """Drop stale partial messages."""
        for ch in self.channels.values():
            ch.reassembler.expire(now_s)

    def close(self, reason: str) -> None:
        """The link ended: senders wake (and raise), delayed pieces are dropped."""
        self.closed_reason = reason
        for ch in self.channels.values():
            ch.drained.set()
        if self.delayed is not None:
            self.delayed.close()
