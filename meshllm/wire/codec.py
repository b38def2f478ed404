"""Messages <-> bytes: one version byte, then the CBOR array ``[tag, field1, field2, ...]``.

:func:`decode` is the one door for bytes from the network. It bounds the input size, checks
the version byte, checks the CBOR structure (:mod:`meshllm.wire.cborcheck`) before cbor2
builds anything, then checks every field. Whatever is wrong, it raises
:class:`~meshllm.errors.WireError` and nothing else.
"""

import cbor2

from meshllm.errors import WireError
from meshllm.wire.cborcheck import CborLimits, check_cbor
from meshllm.wire.messages import MESSAGE_TAGS, MESSAGE_TYPES, Message
from meshllm.wire.schema import struct_from_wire, struct_to_wire

PROTOCOL_VERSION = 3
"""The first byte of every encoded message. A node refuses messages of any other version."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default bound of :func:`decode` (and of a reassembled message): 64 MiB."""

_LIMITS = CborLimits()


def encode(msg: Message) -> bytes:
    """The bytes of ``msg``: ``PROTOCOL_VERSION`` then CBOR. Deterministic."""
    tag = MESSAGE_TAGS.get(type(msg))
    if tag is None:
        raise WireError(f"cannot encode {type(msg).__name__}: not a message type")
    body = [tag, *struct_to_wire(msg)]
    try:
        return bytes([PROTOCOL_VERSION]) + cbor2.dumps(body)
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in ``data``, or WireError: too big, empty, another protocol version,
    malformed or non-canonical CBOR, trailing bytes, an unknown type tag, missing, extra or
    wrong-typed fields, or values out of range."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"decode takes bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    if len(data) == 0:
        raise WireError("empty message")
    view = memoryview(data)
    if view[0] != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {view[0]} is not supported (this node speaks {PROTOCOL_VERSION})"
        )
    body = view[1:]
    check_cbor(body, _LIMITS)
    try:
        value = cbor2.loads(body, max_depth=_LIMITS.max_depth + 1, allow_indefinite=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise WireError(f"CBOR: {exc}") from exc
    if type(value) is not list or not value:
        raise WireError("a message is a non-empty CBOR array [tag, fields...]")
    tag = value[0]
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError(f"unknown message type tag {tag!r}")
    return struct_from_wire(cls, value[1:])  # type: ignore[return-value]
