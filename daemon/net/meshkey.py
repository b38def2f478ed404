"""The mesh key: a shared secret that decides who may join a mesh.

It comes from a file (``--mesh-key-file F``) or from the environment (``MESHLLM_MESH_KEY``);
the file wins when both are given. The key is the file's (or variable's) text with surrounding
whitespace removed, as UTF-8 bytes; make one with ``head -c 32 /dev/urandom | base64 > F``.
Signaling proves possession of the key with HMAC-SHA256 (see docs/networking.md); the key
itself never travels.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MESH_KEY_ENV = "MESHLLM_MESH_KEY"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096

NO_KEY_WARNING = "no mesh key: anyone on this network can join this mesh (use --mesh-key-file)"


class MeshKeyError(ValueError):
    """The mesh key cannot be used; the message says why and where it came from."""


def load_mesh_key(key_file: Path | None, env: Mapping[str, str]) -> bytes | None:
    """The mesh key from ``key_file``, else from ``MESHLLM_MESH_KEY`` in ``env``; None if neither.

    Raises MeshKeyError for an unreadable, empty, too short or too long key.
    """
    if key_file is not None:
        return _read_key_file(key_file)
    text = env.get(MESH_KEY_ENV, "")
    if not text.strip():
        return None
    return _check_key(text.strip().encode("utf-8"), f"${MESH_KEY_ENV}")


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise MeshKeyError(f"mesh key file {path} is not a regular file")
        if info.st_size > 2 * MAX_KEY_BYTES:
            raise MeshKeyError(
                f"mesh key file {path} is {info.st_size} bytes; a key is at most {MAX_KEY_BYTES}"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise MeshKeyError(f"cannot read mesh key file {path}: {exc.strerror or exc}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("mesh key file %s is readable by other users (chmod 600 %s)", path, path)
    return _check_key(raw.strip(), f"mesh key file {path}")


def _check_key(key: bytes, where: str) -> bytes:
    if not key:
        raise MeshKeyError(f"{where} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise MeshKeyError(
            f"{where} holds {len(key)} bytes; a mesh key needs at least {MIN_KEY_BYTES} "
            "(make one with: head -c 32 /dev/urandom | base64)"
        )
    if len(key) > MAX_KEY_BYTES:
        raise MeshKeyError(f"{where} holds {len(key)} bytes; a mesh key is at most {MAX_KEY_BYTES}")
    return key
