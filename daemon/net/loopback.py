"""Loopback mode: a whole mesh on one machine, over 127.0.0.1 only.

aioice never gathers loopback addresses (``aioice.ice.get_host_addresses`` skips 127.0.0.1),
so without help two nodes on one machine would connect over the LAN interface. In loopback
mode:

- ICE gathers exactly one host candidate, 127.0.0.1 (:func:`loopback_ice` swaps the host
  address list for code run inside it, and only there: the hook reads a context variable, so
  other connections in the same process gather as usual; it lives with the other patches of
  aiortc/aioice internals in :mod:`daemon.net.aiortc_tuning` and is re-exported here);
- remote candidates other than 127.0.0.1 are removed from the peer's SDP before aiortc sees
  it (:func:`usable_candidates`), so ICE never sends a check anywhere else; candidates named
  by an mDNS host name are always removed, so aioice never starts mDNS resolution;
- zeroconf uses 127.0.0.1 only, and its wildcard mDNS socket takes packets from 127.0.0.1 only
  (:func:`accept_only_from_loopback`).

Multicast on ``lo`` needs no system change on Linux even though ``lo`` lacks the MULTICAST
flag (see docs/networking.md). Nothing here changes system settings.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import struct

from daemon.net.aiortc_tuning import loopback_ice

log = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"

__all__ = ["LOOPBACK_HOST", "accept_only_from_loopback", "is_loopback_host", "loopback_ice",
           "usable_candidates"]


def is_loopback_host(host: str) -> bool:
    """True for an IP literal in 127.0.0.0/8 or ::1, and for ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def usable_candidates(sdp: str, *, loopback: bool) -> tuple[str, int]:
    """The SDP with unusable ``a=candidate`` lines removed, and how many candidates remain.

    Removed always: candidates whose address is not an IP literal (mDNS ``.local`` names:
    resolving them would make aioice multicast on the LAN). Removed in loopback mode: every
    candidate whose address is not 127.0.0.1.
    """
    kept: list[str] = []
    remaining = 0
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            address = parts[4] if len(parts) > 4 else ""
            if not _usable_address(address, loopback):
                log.debug("dropping remote ICE candidate %r", line)
                continue
            remaining += 1
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", remaining


def _usable_address(address: str, loopback: bool) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return str(ip) == LOOPBACK_HOST if loopback else True


# --- a socket that takes datagrams from 127.0.0.1 only ------------------------------------

_SO_ATTACH_FILTER = 26
_IP_MULTICAST_ALL = 49
_SKF_NET_OFF = -0x100000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def accept_only_from_loopback(sock: socket.socket) -> bool:
    """Make an IPv4 UDP socket drop every datagram whose source is not 127.0.0.1 (Linux).

    Also stops it receiving multicast groups it did not join on its own interfaces
    (``IP_MULTICAST_ALL`` off). Returns False where the platform has no socket filters; the
    caller then relies on the other loopback-mode measures.
    """
    program = (_SockFilter * 4)(
        # A = source address of the IP header
        _SockFilter(_BPF_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 12) & 0xFFFFFFFF),
        # if A == 127.0.0.1 accept, else drop
        _SockFilter(_BPF_JEQ_K, 0, 1, struct.unpack("!I", socket.inet_aton(LOOPBACK_HOST))[0]),
        _SockFilter(_BPF_RET_K, 0, 0, 0xFFFFFFFF),
        _SockFilter(_BPF_RET_K, 0, 0, 0),
    )
    fprog = _SockFprog(len(program), program)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))
    except OSError as exc:
        log.warning("cannot restrict socket %s to 127.0.0.1 sources: %s", sock, exc)
        return False
    return True
