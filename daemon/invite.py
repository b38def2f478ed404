"""Invite codes and key ids: how a mesh key travels to a new device, and how nodes tell keys apart.

An invite code is one word a user copies from ``meshllm invite`` to ``meshllm up --invite``::

    meshllm1 + base32(key + check)      (lower case, no padding)

``check`` is the first 4 bytes of SHA-256 over a fixed label and the key, so a mistyped or
cut code is refused with one clear line instead of joining nobody. Base32 has no ``-`` or
``_``, so a double click selects the whole code; upper case, spaces and dashes are ignored when
a code is read. The code *is* the key: whoever holds it can join the mesh.

A key id names a key without revealing it: the first 8 bytes, in hex, of
HMAC-SHA256(key, ``"meshllm key id"``). Nodes advertise it (mDNS), so that a node of another
mesh shows as incompatible ("another mesh key") instead of failing to link again and again.
An open mesh (``--open``, no key) has the id ``open``.

Neutral and pure: the config checks a code before anything starts, the link layer and the
``invite`` command use the same functions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

INVITE_PREFIX = "meshllm1"
OPEN_KEY_ID = "open"
KEY_ID_BYTES = 8
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
NEW_KEY_RANDOM_BYTES = 16
"""A new mesh key: 128 random bits, written as 26 base32 characters (the key is that text)."""

_CHECK_BYTES = 4
_CHECK_LABEL = b"meshllm invite v1\x00"
_KEY_ID_LABEL = b"meshllm key id"
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_MAX_CODE_CHARS = len(INVITE_PREFIX) + ((MAX_KEY_BYTES + _CHECK_BYTES) * 8 + 4) // 5
_MAX_INPUT_CHARS = 2 * _MAX_CODE_CHARS
_AGAIN = "copy it again from `meshllm invite` on a device of the mesh"


class InviteError(ValueError):
    """An invite code cannot be used; the message is one line for the user."""


def new_mesh_key() -> bytes:
    """A fresh random mesh key (text: lower-case base32, 26 characters)."""
    return _b32(secrets.token_bytes(NEW_KEY_RANDOM_BYTES)).encode("ascii")


def key_id(key: bytes | None) -> str:
    """The public name of ``key``: 16 hex characters that reveal nothing about it; ``open``
    for no key."""
    if key is None:
        return OPEN_KEY_ID
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_BYTES].hex()


def is_key_id(text: str) -> bool:
    """True for a well-formed key id (16 lower-case hex characters, or ``open``)."""
    return text == OPEN_KEY_ID or (
        len(text) == 2 * KEY_ID_BYTES and all(c in "0123456789abcdef" for c in text))


def invite_code(key: bytes) -> str:
    """The one-word code that carries ``key`` (see the module docstring)."""
    return INVITE_PREFIX + _b32(key + _check(key))


def parse_invite(code: str) -> bytes:
    """The mesh key an invite code carries. Raises InviteError with one line saying what is
    wrong (mistyped, cut short, not a code, a newer version)."""
    if len(code) > _MAX_INPUT_CHARS:
        raise InviteError(f"the invite code is too long ({len(code)} characters); {_AGAIN}")
    text = "".join(code.split()).replace("-", "").lower()
    if not text:
        raise InviteError("the invite code is empty; print one with `meshllm invite` on a device of the mesh")
    if not text.startswith(INVITE_PREFIX):
        if text.startswith("meshllm") and text[7:8].isdigit():
            raise InviteError(f"the invite code is of version {text[7]}, which this meshllm does not know "
                              "(update meshllm on this device)")
        raise InviteError(f"not an invite code: a code starts with {INVITE_PREFIX!r}; "
                          "print one with `meshllm invite` on a device of the mesh")
    body = text[len(INVITE_PREFIX):]
    wrong = sorted(set(body) - _ALPHABET)
    if wrong:
        raise InviteError(f"the invite code is mistyped: {wrong[0]!r} never appears in a code; {_AGAIN}")
    if len(body) > _MAX_CODE_CHARS:
        raise InviteError(f"the invite code is too long; {_AGAIN}")
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise InviteError(f"the invite code is mistyped: characters are missing or extra; {_AGAIN}") from None
    key, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    if len(key) < MIN_KEY_BYTES:
        raise InviteError(f"the invite code is cut short; {_AGAIN}")
    if not hmac.compare_digest(check, _check(key)):
        raise InviteError(f"the invite code is mistyped (its checksum does not match); {_AGAIN}")
    if key != key.strip() or len(key) > MAX_KEY_BYTES:
        raise InviteError("the invite code carries a key meshllm cannot use; make a new one with `meshllm invite`")
    return key


def _check(key: bytes) -> bytes:
    return hashlib.sha256(_CHECK_LABEL + key).digest()[:_CHECK_BYTES]


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()
