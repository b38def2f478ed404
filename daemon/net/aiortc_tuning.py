"""aiortc tuning: every place this project reaches into aiortc's and aioice's internals.

Nothing outside this module touches a private name of aiortc or aioice (tests aside). Three
things live here:

- the small-message SCTP tuning below, written against aiortc TUNED_AIORTC_VERSION and
  installed only on exactly that version (``importlib.metadata.version("aiortc")``); on any
  other version aiortc's own code runs and one warning says so (``pyproject.toml`` pins the
  version, and ``tests/daemon/test_aiortc_tuning.py`` fails when the installed one differs);
- :func:`send_urgent`, which puts a heartbeat ahead of the pieces the link's other channels
  have queued (tuned version only; otherwise a plain ``send``);
- the loopback host-address override (:func:`loopback_ice`): aioice never gathers 127.0.0.1,
  so loopback mode swaps ``aioice.ice.get_host_addresses`` while a context variable is set.
  It is needed on every version (loopback mode cannot work without it), uses one public
  module-level function of aioice, and fails loudly where that function is missing.

The tuning, for small messages. A decode hop is one small message (~2.4 KB) each way. aiortc
1.16 spends most of a hop's time per datagram (DTLS, SCTP, aioice and a loop turn each), and
with its defaults a hop takes 6 datagrams: 3 DATA packets (a packet carries at most 1,160
bytes of user data, sized for the 1,280-byte minimum IPv6 MTU) and 3 SACKs (it acknowledges
every packet at once). Three patches, measured with scripts/bench_hop.py (docs/benchmarks.md,
"One hop, broken down"), make it 3 datagrams:

1. SCTP packets carry up to SCTP_USERDATA_BYTES (1,232) bytes of user data, so an f32 decode
   hop (2,304 bytes of tensor, ~2,400 as a Forward) is 2 DATA packets. A datagram is then at
   most 1,260 + 37 (DTLS) bytes: 1,325 bytes with IPv4 and UDP headers, 1,345 with IPv6,
   within any Ethernet, Wi-Fi or WireGuard MTU (the paths a LAN mesh uses); a path below
   that (some IPv6 tunnels) would drop them. A peer with stock aiortc takes them as they are
   (its DTLS reads records of up to 1,500 bytes, its SCTP any chunk size).
2. Delayed SACK (RFC 4960 section 6.2): acknowledge every second packet that carries DATA
   in a task of its own, which runs after the tasks the packet woke (so a stage's reply
   leaves before the SACK, 18% off a hop in a ring of 3 processes), a lone packet after
   SACK_DELAY_S, and at once whenever a TSN is missing or duplicated. aiortc's
   retransmission timer is at least 1 s, far above the delay.
3. :func:`send_piece` hands a piece to SCTP in the caller's task instead of aiortc creating a
   task per send that does it on a later loop turn; other sends (heartbeats, acks, Byes)
   share one such task per loop turn. This also makes a failing transport (ConnectionError)
   raise in the caller (``LinkManager.send`` turns it into LinkError), not in an orphan task.

Two more were measured and left out (each under 1.5% of a hop, not worth patching pyOpenSSL
and aioice internals): skipping the failing ``bio_read`` after every decrypted datagram
(1.7 us each) and aioice's attempt to parse every DTLS datagram as STUN (0.8 us each).

Nothing here touches encryption: every datagram is still DTLS. The patches are installed
once per process at the first link, when aiortc is first imported (:func:`rtc`).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiortc import RTCDataChannel

log = logging.getLogger(__name__)

TUNED_AIORTC_VERSION = "1.16.0"
"""The one aiortc version the patches were written against (and pyproject.toml pins)."""
SCTP_USERDATA_BYTES = 1232
"""Most user data in one SCTP DATA chunk (aiortc's default: 1,160)."""
SACK_DELAY_S = 0.02
"""Longest a received packet waits for its SACK (RFC 4960 allows 200 ms)."""
_tuned: bool | None = None


# --- installing ---------------------------------------------------------------------------


def rtc() -> ModuleType:
    """aiortc, imported at the first link (an offer made or answered), with the tuning
    installed. A node that never links never loads it, nor PyAV beneath it (~40 MB)."""
    import aiortc

    install_aiortc_tuning()
    return aiortc


def aiortc_tuned() -> bool:
    """Whether the tuning is installed in this process."""
    return bool(_tuned)


def installed_aiortc_version() -> str:
    return importlib.metadata.version("aiortc")


def install_aiortc_tuning() -> bool:
    """Install the tuning once, on TUNED_AIORTC_VERSION only; return whether it is in force.
    On another version nothing is patched and one warning is logged (once per process)."""
    global _tuned
    if _tuned is not None:
        return _tuned
    found = installed_aiortc_version()
    if found != TUNED_AIORTC_VERSION:
        log.warning("aiortc %s runs as it is: the small-message tuning in %s is for aiortc %s "
                    "only (hops take about 50%% longer)", found, __name__, TUNED_AIORTC_VERSION)
        _tuned = False
        return False
    _patch_sctp()
    _tuned = True
    return True


# --- sending ------------------------------------------------------------------------------


async def send_piece(dc: RTCDataChannel, piece: bytes) -> None:
    """``dc.send(piece)``; when tuned, also hands the piece to SCTP now (patch 3)."""
    if _send_flagged(dc, piece, "_meshllm_inline"):
        await dc.transport._data_channel_flush()


def send_urgent(dc: RTCDataChannel, piece: bytes) -> None:
    """``dc.send(piece)``, but (when tuned) ahead of what the link's other channels queued.

    All channels of a link share aiortc's one send queue, first in first out, so a heartbeat
    sent behind a large activation would wait for all of it (up to the high-water mark plus a
    piece). This one goes behind its own channel's queued pieces only (each channel's order
    holds; SCTP numbers a stream's messages when they leave this queue), and so waits at most
    for the piece SCTP is sending now. Nothing changes on the wire.
    """
    _send_flagged(dc, piece, "_meshllm_urgent")


def _send_flagged(dc: RTCDataChannel, piece: bytes, flag: str) -> bool:
    """``dc.send(piece)`` with the patched SCTP transport's `flag` set meanwhile; False (a plain
    send) when the tuning is not in force."""
    if not _tuned:
        dc.send(piece)
        return False
    sctp: Any = dc.transport
    setattr(sctp, flag, True)
    try:
        dc.send(piece)
    finally:
        setattr(sctp, flag, False)
    return True


def sctp_pending_bytes(dc: RTCDataChannel) -> int:
    """Bytes of the link's association that SCTP has taken but the peer not acknowledged
    (in flight or waiting for the congestion window); 0 where aiortc lacks these figures."""
    sctp: Any = dc.transport
    in_flight = getattr(sctp, "_flight_size", 0)
    outbound = sum(len(chunk.user_data) for chunk in getattr(sctp, "_outbound_queue", ()))
    return int(in_flight) + outbound


def _patch_sctp() -> None:
    from aiortc import rtcsctptransport as sctp_module
    from aiortc.rtcsctptransport import RTCSctpTransport

    sctp_module.USERDATA_MAX_LENGTH = SCTP_USERDATA_BYTES
    established = RTCSctpTransport.State.ESTABLISHED
    original_send_sack = RTCSctpTransport._send_sack
    original_data_channel_flush = RTCSctpTransport._data_channel_flush

    cls: Any = RTCSctpTransport
    cls._meshllm_unsacked = 0
    cls._meshllm_sack_timer = None
    cls._meshllm_sack_soon = False
    cls._meshllm_inline = False
    cls._meshllm_urgent = False
    cls._meshllm_flush_pending = False

    async def _send_sack(self: Any) -> None:
        self._meshllm_unsacked = 0
        if self._meshllm_sack_timer is not None:
            self._meshllm_sack_timer.cancel()
            self._meshllm_sack_timer = None
        await original_send_sack(self)

    async def _delayed_sack(self: Any) -> None:
        self._meshllm_sack_soon = False
        if not self._sack_needed or self._association_state != established:
            return
        try:
            await self._send_sack()
        except ConnectionError:  # DTLS closed meanwhile: nothing to acknowledge any more
            pass

    def _sack_timer_fired(self: Any) -> None:
        self._meshllm_sack_timer = None
        if self._sack_needed and self._association_state == established:
            asyncio.ensure_future(_delayed_sack(self))

    async def _handle_data(self: Any, data: bytes) -> None:
        # aiortc 1.16's _handle_data, with a delayed SACK at the end.
        try:
            _, _, verification_tag, chunks = sctp_module.parse_packet(data)
        except ValueError:
            return
        if any(isinstance(chunk, sctp_module.InitChunk) for chunk in chunks):
            assert len(chunks) == 1
            expected_tag = 0
        else:
            expected_tag = self._local_verification_tag
        if verification_tag != expected_tag:
            return
        for chunk in chunks:
            await self._receive_chunk(chunk)
        if not self._sack_needed:
            return
        self._meshllm_unsacked += 1
        if (self._sack_misordered or self._sack_duplicates
                or self._association_state != established):
            await self._send_sack()
        elif self._meshllm_unsacked >= 2:
            # After the tasks this packet woke (the message's consumer): its reply goes first.
            if not self._meshllm_sack_soon:
                self._meshllm_sack_soon = True
                asyncio.ensure_future(_delayed_sack(self))
        elif self._meshllm_sack_timer is None:
            self._meshllm_sack_timer = self._loop.call_later(SACK_DELAY_S, _sack_timer_fired, self)

    async def _flush_task(self: Any) -> None:
        self._meshllm_flush_pending = False
        await original_data_channel_flush(self)

    def _data_channel_send(self: Any, channel: RTCDataChannel, data: bytes | str) -> None:
        # aiortc 1.16's _data_channel_send; the flush runs in the caller (see send_piece), or
        # in one task for all the sends of a loop turn instead of one task per send; an urgent
        # piece goes ahead of the other channels' queued pieces (see send_urgent).
        if data == "":
            pp_id, user_data = sctp_module.WEBRTC_STRING_EMPTY, b"\x00"
        elif isinstance(data, str):
            pp_id, user_data = sctp_module.WEBRTC_STRING, data.encode("utf8")
        elif data == b"":
            pp_id, user_data = sctp_module.WEBRTC_BINARY_EMPTY, b"\x00"
        else:
            pp_id, user_data = sctp_module.WEBRTC_BINARY, data
        if self._remote_max_message_size and len(user_data) > self._remote_max_message_size:
            raise ValueError(
                f"Cannot send message of {len(user_data)} bytes, the remote party "
                f"only supports messages up to {self._remote_max_message_size} bytes"
            )
        channel._addBufferedAmount(len(user_data))
        queue = self._data_channel_queue
        if self._meshllm_urgent:
            position = len(queue)
            while position and queue[position - 1][0] is not channel:
                position -= 1
            queue.insert(position, (channel, pp_id, user_data))
        else:
            queue.append((channel, pp_id, user_data))
        if not self._meshllm_inline and not self._meshllm_flush_pending:
            self._meshllm_flush_pending = True
            asyncio.ensure_future(_flush_task(self))

    cls._send_sack = _send_sack
    cls._handle_data = _handle_data
    cls._data_channel_send = _data_channel_send


# --- the loopback host-address override ----------------------------------------------------

_LOOPBACK_HOST = "127.0.0.1"  # daemon.net.loopback.LOOPBACK_HOST (which imports this module)

_loopback_ice_on: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "meshllm_loopback_ice", default=False
)
_original_get_host_addresses: Callable[[bool, bool], list[str]] | None = None


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    """aioice's host address list, or just 127.0.0.1 inside :func:`loopback_ice`."""
    if _loopback_ice_on.get():
        return [_LOOPBACK_HOST] if use_ipv4 else []
    assert _original_get_host_addresses is not None
    return _original_get_host_addresses(use_ipv4, use_ipv6)


def _install_ice_hook() -> None:
    global _original_get_host_addresses
    if _original_get_host_addresses is not None:
        return
    import aioice.ice

    original = getattr(aioice.ice, "get_host_addresses", None)
    if original is None:
        raise RuntimeError(
            f"loopback mode needs aioice.ice.get_host_addresses, which aioice "
            f"{importlib.metadata.version('aioice')} lacks (see {__name__})")
    _original_get_host_addresses = original
    aioice.ice.get_host_addresses = _get_host_addresses


@contextmanager
def loopback_ice(enabled: bool = True) -> Iterator[None]:
    """Inside this block (and in tasks started from it) ICE gathers 127.0.0.1 only.

    Wrap ``RTCPeerConnection.setLocalDescription`` (where aiortc gathers) with it. With
    ``enabled=False`` it does nothing, so callers need no branch.
    """
    if not enabled:
        yield
        return
    _install_ice_hook()
    token = _loopback_ice_on.set(True)
    try:
        yield
    finally:
        _loopback_ice_on.reset(token)
