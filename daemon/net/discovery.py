"""Discovery: find the other nodes on the local network with mDNS (python-zeroconf).

Each node advertises one ``_meshllm._tcp.local.`` service whose TXT record says who it is
(see :func:`txt_for`) and browses for the others. What it sees becomes events:
:class:`PeerSeen` when a node appears or its record changes, :class:`PeerGone` when it says
goodbye (or its record expires). The TXT record is public: it carries no secrets. Nor is
anything in mDNS authenticated, so these events only ever say where to dial: they never end
or redirect a link that is up (the mesh driver, with :class:`daemon.node.redial.PeerAddresses`).

Records from the network are checked and bounded (:func:`parse_peer`); a malformed one is
logged and ignored. Our own record is ignored.

The record also carries the node's mesh key id (``key``: 16 hex characters that reveal nothing
about the key, or ``open``; daemon/invite.py). A node of another key is reported with
``PeerSeen.key_mismatch`` set ("another mesh key"), so it shows as incompatible and is not
dialled (its signaling would refuse us anyway). A record without ``key`` (an older meshllm)
gets no verdict: the handshake decides.

Loopback mode advertises 127.0.0.1, uses the 127.0.0.1 interface only (IPv4), and makes the
wildcard mDNS socket accept datagrams from 127.0.0.1 only, so nothing is sent to or taken
from another address (see docs/networking.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from daemon.invite import OPEN_KEY_ID, is_key_id
from daemon.net.loopback import LOOPBACK_HOST, accept_only_from_loopback
from meshllm.errors import WireError
from meshllm.wire import Hello
from meshllm.wire.messages import MAX_ID_CHARS, MAX_NAME_CHARS

from daemon.tasks import TaskSet


log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshllm._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
MAX_TXT_KEYS = 32
MAX_TXT_VALUE_BYTES = 255
MAX_MODEL_ID_CHARS = 128
TXT_KEYS = ("pv", "id", "mesh", "port", "mem", "ms", "model", "coord")
"""protocol version, node id, mesh name, signaling port (``--mesh-port``; not the API's),
memory budget for weights in bytes, ms per layer per token, model id, can-coordinate flag
("1" or "0")."""
KEY_ID_TXT = "key"
"""Optional TXT key: the mesh key id (daemon/invite.py)."""
ANOTHER_MESH_KEY = "another mesh key"

_SHORT_ID_CHARS = 6
_MAX_LABEL_BYTES = 63
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")


@dataclass(frozen=True)
class PeerSeen:
    """A node appeared on the network, or changed its record (reported once per change)."""

    name: str
    """mDNS instance name (node name plus a short id)."""
    address: str
    """``HOST:PORT`` of its signaling server (``--mesh-port``), where link offers go."""
    node_id: str
    txt: dict[str, str]
    """Its checked TXT record (keys in :data:`TXT_KEYS`, and any others it carries)."""
    key_mismatch: str | None = None
    """Why its mesh key is not ours ("another mesh key ..."), from the key ids; None: the same
    key, or it does not say."""


@dataclass(frozen=True)
class PeerGone:
    """A node said goodbye (or its record expired)."""

    name: str
    node_id: str | None
    """None when the node was never seen with a valid record."""


DiscoveryEvent = PeerSeen | PeerGone


def instance_name(hello: Hello) -> str:
    """``<node name>-<last 6 chars of node id>``, made safe for one DNS label."""
    short = hello.node_id[-_SHORT_ID_CHARS:]
    base = _LABEL_UNSAFE.sub("-", hello.name).strip("-") or "node"
    base = base.encode("ascii")[: _MAX_LABEL_BYTES - len(short) - 1].decode("ascii")
    return f"{base}-{_LABEL_UNSAFE.sub('-', short)}"


def key_mismatch(ours: str, theirs: str | None) -> str | None:
    """Why a node advertising key id ``theirs`` is not of our mesh (key id ``ours``); None when
    the ids match or it advertises none."""
    if theirs is None or theirs == ours:
        return None
    if theirs == OPEN_KEY_ID:
        return f"{ANOTHER_MESH_KEY} (it runs an open mesh)"
    if ours == OPEN_KEY_ID:
        return f"{ANOTHER_MESH_KEY} (this node runs an open mesh)"
    return ANOTHER_MESH_KEY


def txt_for(hello: Hello, port: int, key_id: str = OPEN_KEY_ID) -> dict[str, str]:
    """The TXT record a node advertises (public: no secrets; the key id reveals nothing)."""
    return {
        KEY_ID_TXT: key_id,
        "pv": str(hello.protocol_version),
        "id": hello.node_id,
        "mesh": hello.mesh_name,
        "port": str(port),
        "mem": str(hello.mem_budget_bytes),
        "ms": repr(float(hello.ms_per_layer)),
        "model": hello.model_id,
        "coord": "1" if hello.can_coordinate else "0",
    }


class BadRecord(ValueError):
    """A TXT record or address from the network is malformed."""


def parse_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Decode and check a TXT record; BadRecord names the first problem."""
    if len(properties) > MAX_TXT_KEYS:
        raise BadRecord(f"{len(properties)} TXT keys; at most {MAX_TXT_KEYS}")
    txt: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        if not isinstance(raw_key, bytes) or len(raw_key) > 32:
            raise BadRecord("a TXT key is too long")
        if raw_value is None:
            continue
        if len(raw_value) > MAX_TXT_VALUE_BYTES:
            raise BadRecord(f"TXT value of {raw_key!r} is too long")
        try:
            txt[raw_key.decode("ascii")] = raw_value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(f"TXT entry {raw_key!r} is not text") from exc
    missing = [key for key in TXT_KEYS if key not in txt]
    if missing:
        raise BadRecord(f"TXT record lacks {missing[0]!r}")
    node_id = txt["id"]
    if not 1 <= len(node_id) <= MAX_ID_CHARS or not node_id.isprintable():
        raise BadRecord(f"bad node id {node_id[:80]!r}")
    if not 1 <= len(txt["mesh"]) <= MAX_NAME_CHARS or not txt["mesh"].isprintable():
        raise BadRecord("bad mesh name")
    if len(txt["model"]) > MAX_MODEL_ID_CHARS or not txt["model"].isprintable():
        raise BadRecord("bad model id")
    _int(txt, "pv", 0, 255)
    _int(txt, "port", 1, 65535)
    _int(txt, "mem", 0, 2**63 - 1)
    try:
        ms = float(txt["ms"])
    except ValueError as exc:
        raise BadRecord(f"ms is not a number: {txt['ms'][:40]!r}") from exc
    if not 0.0 <= ms <= 1e9:
        raise BadRecord(f"ms out of range: {ms}")
    if txt["coord"] not in ("0", "1"):
        raise BadRecord("coord must be 0 or 1")
    if KEY_ID_TXT in txt and not is_key_id(txt[KEY_ID_TXT]):
        raise BadRecord(f"bad key id {txt[KEY_ID_TXT][:40]!r}")
    return txt


def _int(txt: Mapping[str, str], key: str, low: int, high: int) -> int:
    text = txt[key]
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise BadRecord(f"{key} is not a non-negative integer: {text[:40]!r}")
    value = int(text)
    if not low <= value <= high:
        raise BadRecord(f"{key} out of range: {value}")
    return value


def hello_from_txt(txt: Mapping[str, str], name: str) -> Hello:
    """The Hello a checked TXT record describes (the node name is the instance name)."""
    try:
        return Hello(
            node_id=txt["id"],
            name=name[:MAX_NAME_CHARS],
            protocol_version=int(txt["pv"]),
            mesh_name=txt["mesh"],
            model_id=txt["model"],
            api_port=int(txt["port"]),
            mem_budget_bytes=int(txt["mem"]),
            ms_per_layer=float(txt["ms"]),
            can_coordinate=txt["coord"] == "1",
        )
    except (KeyError, ValueError, WireError) as exc:
        raise BadRecord(str(exc)) from exc


class Discovery:
    """Advertise this node and report the others. ``await start()``; ``await close()``."""

    def __init__(self, hello: Hello, *, host: str, port: int, loopback: bool,
                 on_event: Callable[[DiscoveryEvent], None], key_id: str = OPEN_KEY_ID) -> None:
        """``host``: the address peers should use for this node's signaling server (``0.0.0.0``
        or ``""``: every IPv4 address of this machine but loopback); ``port``: its port; ``key_id``:
        this node's mesh key id (daemon/invite.py)."""
        self._hello = hello
        self._key_id = key_id
        self._port = port
        self._loopback = loopback
        self._addresses = [LOOPBACK_HOST] if loopback else _advertised_addresses(host)
        self._on_event = on_event
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._seen: dict[str, PeerSeen] = {}
        """Full instance name -> what was last reported for it."""
        self._tasks = TaskSet('discovery')
        self._broadcast: asyncio.Future[Any] | None = None
        """zeroconf's announcements of our record (repeated a few times after a change)."""

    async def start(self) -> None:
        if self._loopback:
            self._zc = AsyncZeroconf(interfaces=[LOOPBACK_HOST], ip_version=IPVersion.V4Only)
            await self._zc.zeroconf.async_wait_for_start()
            self._restrict_to_loopback(self._zc.zeroconf)
        else:
            self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._info = self._service_info(self._hello)
        # Names are unique by construction (they end in the node id), so no probing.
        self._track_broadcast(
            await self._zc.async_register_service(self._info, cooperating_responders=True)
        )
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        log.info("advertising %s at %s:%d", self._info.name, ",".join(self._addresses), self._port)

    async def update(self, hello: Hello) -> None:
        """Re-advertise with a new TXT record (e.g. the measured speed)."""
        self._hello = hello
        if self._zc is None or self._info is None:
            return
        new_info = self._service_info(hello)
        if new_info.name != self._info.name:
            await self._zc.async_unregister_service(self._info)
            broadcast = await self._zc.async_register_service(new_info, cooperating_responders=True)
        else:
            broadcast = await self._zc.async_update_service(new_info)
        self._info = new_info
        self._track_broadcast(broadcast)

    async def close(self) -> None:
        """Say goodbye (unregister) and stop browsing."""
        tasks = self._tasks.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._broadcast is not None and not self._broadcast.done():
            self._broadcast.cancel()
        if self._zc is not None:
            if self._info is not None:
                await (await self._zc.async_unregister_service(self._info))  # goodbyes sent
            await self._zc.async_close()
            self._zc = None

    def _service_info(self, hello: Hello) -> AsyncServiceInfo:
        name = instance_name(hello)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address) for address in self._addresses],
            port=self._port,
            properties=txt_for(hello, self._port, self._key_id),
            server=f"{name}.local.",
        )

    def _track_broadcast(self, broadcast: Awaitable[Any]) -> None:
        if self._broadcast is not None and not self._broadcast.done():
            self._broadcast.cancel()
        self._broadcast = asyncio.ensure_future(broadcast)

    def _restrict_to_loopback(self, zc: Zeroconf) -> None:
        """The wildcard mDNS socket zeroconf binds would also take LAN packets (and zeroconf
        answers some by unicast): filter it to 127.0.0.1 sources."""
        for reader in zc.engine.readers:
            if reader.sock_name[0] != LOOPBACK_HOST:
                accept_only_from_loopback(reader.sock)

    def _on_service_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                                 state_change: ServiceStateChange) -> None:
        if self._info is not None and name == self._info.name:
            return
        if state_change is ServiceStateChange.Removed:
            last = self._seen.pop(name, None)
            self._notify(PeerGone(name=_short(name), node_id=last.node_id if last else None))
            return
        self._tasks.spawn(self._resolve(name), f"resolve {name}")

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.info("no answer resolving %s", name)
            return
        try:
            event = self._peer_from_info(name, info)
        except BadRecord as exc:
            log.warning("ignoring the malformed mDNS record of %s: %s", name[:200], exc)
            return
        if event is None or self._seen.get(name) == event:
            return  # nothing new (zeroconf may report a record more than once)
        self._seen[name] = event
        self._notify(event)

    def _peer_from_info(self, name: str, info: AsyncServiceInfo) -> PeerSeen | None:
        txt = parse_txt(info.properties)
        if txt["id"] == self._hello.node_id:
            return None
        if info.port is None or not 1 <= info.port <= 65535:
            raise BadRecord("no port")
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if self._loopback:
            addresses = [a for a in addresses if a == LOOPBACK_HOST]
        else:
            addresses = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
        if not addresses:
            log.debug("ignoring %s: no usable address", name)
            return None
        return PeerSeen(name=_short(name), address=f"{addresses[0]}:{info.port}",
                        node_id=txt["id"], txt=txt, key_mismatch=key_mismatch(self._key_id, txt.get(KEY_ID_TXT)))

    def _notify(self, event: DiscoveryEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("discovery callback failed on %s", event)


def _short(name: str) -> str:
    """The instance part of a full service name."""
    suffix = "." + SERVICE_TYPE
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _advertised_addresses(host: str) -> list[str]:
    if host not in ("", "0.0.0.0"):
        ipaddress.IPv4Address(host)  # ValueError for anything but an IPv4 literal
        return [host]
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found or [LOOPBACK_HOST]
