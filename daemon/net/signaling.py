"""Signaling: the SDP offer/answer exchange that sets up a link, and its authentication.

The initiator POSTs a JSON :class:`SignalOffer` to the other node's ``/v1/mesh/signal``; the
answer comes back in the response body as a :class:`SignalAnswer`. With a mesh key, both
carry an HMAC-SHA256 that binds the sender's Hello and the DTLS certificate fingerprints of
its SDP to the key, so only key holders can link, and nobody in the middle of signaling can
swap certificates (DTLS then checks the certificate against the fingerprint). The offer names
the node it is for (``to``, covered by the MAC), and carries a fresh nonce and a timestamp,
so a captured offer can be used neither again nor at another node.

This module is pure: no sockets, no clock (``now_s`` comes in as an argument). The HTTP side
is in :mod:`daemon.net.signaling_http`. The body schema and the MAC layout are in docs/networking.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from meshllm.errors import WireError
from meshllm.wire import Hello, encode
from meshllm.wire.messages import MAX_ID_CHARS

SIGNAL_PATH = "/v1/mesh/signal"
MAX_BODY_BYTES = 64 * 1024
"""Largest request or response body accepted."""
MAX_SDP_CHARS = 32 * 1024
NONCE_BYTES = 16
MAC_BYTES = 32
FRESHNESS_S = 60.0
"""An offer whose timestamp is further than this from the receiver's clock is refused."""
MAX_REMEMBERED_NONCES = 4096
"""Offers accepted within one freshness window; more are refused as a flood."""

_OFFER_DOMAIN = b"meshllm/signal/offer/v2"
_ANSWER_DOMAIN = b"meshllm/signal/answer/v1"
_HELLO_FIELDS = tuple(f.name for f in dataclasses.fields(Hello))


class SignalingRefused(Exception):
    """A signaling message is refused; ``status`` is the HTTP status that says why.

    400: malformed; 403: authentication (missing/wrong key, stale, replayed);
    409: the peer may not link (incompatible, itself, already linked); 421: the offer is for
    another node (or names none; the refusal's body says which node this is); 429: flood;
    503: the node is shutting down.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class OfferAuth:
    """Proof that the initiator holds the mesh key."""

    nonce: bytes
    """Random, :data:`NONCE_BYTES` long, never reused."""
    timestamp_ms: int
    """Initiator's wall clock (Unix ms) when signed."""
    mac: bytes
    """HMAC-SHA256, see :func:`offer_mac`."""


@dataclass(frozen=True)
class SignalOffer:
    """The request body of ``POST /v1/mesh/signal``."""

    hello: Hello
    sdp: str
    auth: OfferAuth | None
    """None when the initiator has no mesh key."""
    to: str | None = None
    """The node id of the node the offer is for (the responder); None: not known yet (the
    responder refuses it with 421 and says who it is, and the initiator signs again)."""


@dataclass(frozen=True)
class SignalAnswer:
    """The response body of a successful ``POST /v1/mesh/signal``."""

    hello: Hello
    sdp: str
    mac: bytes | None
    """HMAC-SHA256, see :func:`answer_mac`; None when the responder has no mesh key."""


# --- DTLS fingerprints and MACs -------------------------------------------------------------


def dtls_fingerprints(sdp: str) -> tuple[str, ...]:
    """Every ``a=fingerprint`` of the SDP as ``"alg VALUE"`` (alg lower case, value upper),
    in SDP order. aiortc accepts a certificate that matches any one of them, so a MAC must
    cover them all. Raises SignalingRefused(400) when there is none."""
    found = []
    for line in sdp.splitlines():
        if line.startswith("a=fingerprint:"):
            parts = line[len("a=fingerprint:") :].split()
            if len(parts) != 2:
                raise SignalingRefused(400, f"malformed fingerprint line {line[:120]!r}")
            found.append(f"{parts[0].lower()} {parts[1].upper()}")
    if not found:
        raise SignalingRefused(400, "the SDP has no DTLS fingerprint")
    return tuple(found)


def _mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the parts, each prefixed with its 4-byte big-endian length."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(4, "big"))
        mac.update(part)
    return mac.digest()


def offer_mac(key: bytes, nonce: bytes, timestamp_ms: int, hello: Hello, sdp: str,
              to: str | None) -> bytes:
    """MAC of an offer: domain, nonce, timestamp, initiator id, responder id (empty when
    ``to`` is None), the initiator's Hello, its fingerprints."""
    return _mac(
        key,
        _OFFER_DOMAIN,
        nonce,
        str(timestamp_ms).encode(),
        hello.node_id.encode(),
        (to or "").encode(),
        encode(hello),
        "\n".join(dtls_fingerprints(sdp)).encode(),
    )


def answer_mac(key: bytes, request_nonce: bytes, hello: Hello, sdp: str) -> bytes:
    """MAC of an answer: domain, the offer's nonce, responder id, its Hello, its fingerprints."""
    return _mac(
        key,
        _ANSWER_DOMAIN,
        request_nonce,
        hello.node_id.encode(),
        encode(hello),
        "\n".join(dtls_fingerprints(sdp)).encode(),
    )


class ReplayGuard:
    """Remembers the nonces of accepted offers for one freshness window (sans-IO)."""

    def __init__(self, *, window_s: float = FRESHNESS_S, capacity: int = MAX_REMEMBERED_NONCES) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def check_fresh(self, nonce: bytes, timestamp_ms: int, now_s: float) -> None:
        """Raise SignalingRefused(403) for a stale or future timestamp or a nonce seen before."""
        skew_s = now_s - timestamp_ms / 1000.0
        if abs(skew_s) > self.window_s:
            raise SignalingRefused(
                403,
                f"stale signaling request: its timestamp is {skew_s:+.0f} s from this node's "
                f"clock (limit {self.window_s:.0f} s; are the clocks set?)",
            )
        self._expire(now_s)
        if nonce in self._seen:
            raise SignalingRefused(403, "replayed signaling request (nonce seen before)")

    def remember(self, nonce: bytes, now_s: float) -> None:
        """Record an accepted nonce; SignalingRefused(429) when too many are in the window."""
        self._expire(now_s)
        if len(self._seen) >= self.capacity:
            raise SignalingRefused(429, "too many signaling requests; try again later")
        self._seen[nonce] = now_s

    def _expire(self, now_s: float) -> None:
        # A nonce must be kept while an offer carrying it could still pass check_fresh:
        # up to window_s after its timestamp, which is at most window_s after now.
        while self._seen:
            nonce, seen_s = next(iter(self._seen.items()))
            if now_s - seen_s <= 2 * self.window_s:
                break
            del self._seen[nonce]


class Authenticator:
    """Signs and checks signaling messages with the mesh key (or refuses, without one)."""

    def __init__(self, key: bytes | None, *, replay_guard: ReplayGuard | None = None) -> None:
        self._key = key
        self._replay = replay_guard if replay_guard is not None else ReplayGuard()

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def sign_offer(self, hello: Hello, sdp: str, now_s: float, to: str | None = None) -> SignalOffer:
        """An offer for the node ``to`` (None: not known yet; see :class:`SignalOffer`)."""
        if self._key is None:
            return SignalOffer(hello, sdp, None, to)
        nonce = secrets.token_bytes(NONCE_BYTES)
        timestamp_ms = int(now_s * 1000)
        mac = offer_mac(self._key, nonce, timestamp_ms, hello, sdp, to)
        return SignalOffer(hello, sdp, OfferAuth(nonce, timestamp_ms, mac), to)

    def verify_offer(self, offer: SignalOffer, now_s: float, node_id: str) -> None:
        """Raise SignalingRefused unless the offer is for this node, ``node_id`` (421), and
        proves the same key, or neither has one (403); remembers its nonce so that it cannot
        be used again. A refused offer leaves no trace (its nonce stays unused)."""
        if offer.to != node_id:
            meant = "names no node" if offer.to is None else f"is for {offer.to}"
            raise SignalingRefused(421, f"the offer {meant}; this is {node_id}")
        if self._key is None:
            if offer.auth is not None:
                raise SignalingRefused(403, "the request carries a mesh key proof; this node has no mesh key")
            return
        auth = offer.auth
        if auth is None:
            raise SignalingRefused(403, "missing mesh key: this mesh requires one")
        self._replay.check_fresh(auth.nonce, auth.timestamp_ms, now_s)
        expected = offer_mac(self._key, auth.nonce, auth.timestamp_ms, offer.hello, offer.sdp, offer.to)
        if not hmac.compare_digest(expected, auth.mac):
            raise SignalingRefused(403, "wrong mesh key (the request's HMAC does not match)")
        self._replay.remember(auth.nonce, now_s)

    def sign_answer(self, offer: SignalOffer, hello: Hello, sdp: str) -> SignalAnswer:
        if self._key is None or offer.auth is None:
            return SignalAnswer(hello, sdp, None)
        return SignalAnswer(hello, sdp, answer_mac(self._key, offer.auth.nonce, hello, sdp))

    def verify_answer(self, answer: SignalAnswer, offer: SignalOffer) -> None:
        """Raise SignalingRefused(403) unless the answer proves the same key as ours."""
        if self._key is None:
            if answer.mac is not None:
                raise SignalingRefused(403, "the answer carries a mesh key proof; this node has no mesh key")
            return
        assert offer.auth is not None
        if answer.mac is None:
            raise SignalingRefused(403, "the answer carries no mesh key proof: the peer has no mesh key")
        expected = answer_mac(self._key, offer.auth.nonce, answer.hello, answer.sdp)
        if not hmac.compare_digest(expected, answer.mac):
            raise SignalingRefused(403, "wrong mesh key (the answer's HMAC does not match)")


# --- JSON bodies ----------------------------------------------------------------------------


def offer_to_json(offer: SignalOffer) -> dict[str, Any]:
    body: dict[str, Any] = {"hello": _hello_to_json(offer.hello), "to": offer.to, "sdp": offer.sdp,
                            "auth": None}
    if offer.auth is not None:
        body["auth"] = {
            "nonce": offer.auth.nonce.hex(),
            "timestamp_ms": offer.auth.timestamp_ms,
            "mac": offer.auth.mac.hex(),
        }
    return body


def answer_to_json(answer: SignalAnswer) -> dict[str, Any]:
    return {
        "hello": _hello_to_json(answer.hello),
        "sdp": answer.sdp,
        "mac": None if answer.mac is None else answer.mac.hex(),
    }


def offer_from_json(body: object) -> SignalOffer:
    """Validate a request body; SignalingRefused(400) naming the first bad field."""
    obj = _object(body, "body", {"hello", "to", "sdp", "auth"})
    if "to" not in obj:
        raise SignalingRefused(400, "missing field 'to' (the node id the offer is for, or null)")
    to = obj["to"]
    if to is not None and not _is_node_id(to):
        raise SignalingRefused(400, "to must be a node id (1 to 64 printable characters) or null")
    auth_obj = obj.get("auth")
    auth = None
    if auth_obj is not None:
        fields = _object(auth_obj, "auth", {"nonce", "timestamp_ms", "mac"})
        timestamp_ms = fields.get("timestamp_ms")
        if type(timestamp_ms) is not int or not 0 <= timestamp_ms < 2**53:
            raise SignalingRefused(400, "auth.timestamp_ms must be a non-negative integer")
        auth = OfferAuth(
            nonce=_hex(fields.get("nonce"), "auth.nonce", NONCE_BYTES),
            timestamp_ms=timestamp_ms,
            mac=_hex(fields.get("mac"), "auth.mac", MAC_BYTES),
        )
    return SignalOffer(_hello_from_json(obj.get("hello")), _sdp(obj.get("sdp")), auth, to)


def answer_from_json(body: object) -> SignalAnswer:
    """Validate a response body; SignalingRefused(400) naming the first bad field."""
    obj = _object(body, "body", {"hello", "sdp", "mac"})
    mac_obj = obj.get("mac")
    mac = None if mac_obj is None else _hex(mac_obj, "mac", MAC_BYTES)
    return SignalAnswer(_hello_from_json(obj.get("hello")), _sdp(obj.get("sdp")), mac)


def error_to_json(refused: SignalingRefused, node_id: str) -> dict[str, Any]:
    """An error body in the API's OpenAI-style shape, plus the refusing node's id."""
    return {
        "error": {
            "message": refused.reason,
            "type": "mesh_signal_error",
            "param": None,
            "code": refused.status,
        },
        "node_id": node_id,
    }


def error_node_id(body: object) -> str | None:
    """The refusing node's id in an error body, if it carries a well-formed one."""
    node_id = body.get("node_id") if isinstance(body, dict) else None
    return node_id if _is_node_id(node_id) else None


def error_reason(body: object) -> str | None:
    """The message of an error body, if it is one."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str):
            return message[:1024]
    return None


def _is_node_id(obj: object) -> bool:
    return isinstance(obj, str) and 1 <= len(obj) <= MAX_ID_CHARS and obj.isprintable()


def _hello_to_json(hello: Hello) -> dict[str, Any]:
    return {name: getattr(hello, name) for name in _HELLO_FIELDS}


def _hello_from_json(obj: object) -> Hello:
    fields = _object(obj, "hello", set(_HELLO_FIELDS))
    missing = [name for name in _HELLO_FIELDS if name not in fields]
    if missing:
        raise SignalingRefused(400, f"hello: missing field {missing[0]!r}")
    try:
        return Hello(**fields)
    except WireError as exc:
        raise SignalingRefused(400, f"hello: {exc}") from exc


def _object(obj: object, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SignalingRefused(400, f"{where} must be a JSON object")
    extra = sorted(str(key) for key in obj if key not in allowed)
    if extra:
        raise SignalingRefused(400, f"{where}: unknown field {extra[0][:64]!r}")
    return obj


def _sdp(obj: object) -> str:
    if not isinstance(obj, str) or not obj:
        raise SignalingRefused(400, "sdp must be a non-empty string")
    if len(obj) > MAX_SDP_CHARS:
        raise SignalingRefused(400, f"sdp is {len(obj)} characters; at most {MAX_SDP_CHARS}")
    if not obj.startswith("v=0"):
        raise SignalingRefused(400, "sdp must start with v=0")
    dtls_fingerprints(obj)
    return obj


def _hex(obj: object, where: str, size_bytes: int) -> bytes:
    if not isinstance(obj, str) or len(obj) != 2 * size_bytes:
        raise SignalingRefused(400, f"{where} must be {2 * size_bytes} hex digits")
    try:
        return bytes.fromhex(obj)
    except ValueError as exc:
        raise SignalingRefused(400, f"{where} must be {2 * size_bytes} hex digits") from exc
