"""The mesh key: a shared secret that decides who may join a mesh.

Every mesh has one unless it is started with ``--open``. Where it comes from, first match wins:

1. ``--mesh-key-file F``: the file's text with surrounding whitespace removed;
2. ``MESHLLM_MESH_KEY``: the variable's text, likewise;
3. ``--invite CODE`` (from ``meshllm invite`` on a device of the mesh): the key it carries,
   stored as ``<state dir>/mesh.key`` (mode 0600) for the next starts;
4. ``<state dir>/mesh.key``; the first ``meshllm up`` makes it (random, 128 bits, mode 0600).

A key is 16..4096 bytes. ``--open`` runs a mesh without a key, with a warning; it cannot be
combined with a key from 1-3, and neither can ``--invite`` with 1 or 2. Signaling proves
possession of the key with HMAC-SHA256 (see docs/networking.md); the key itself never
travels. Nodes advertise a key id that reveals nothing about it (daemon/invite.py).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from pathlib import Path

from daemon.invite import MAX_KEY_BYTES, MIN_KEY_BYTES, InviteError, key_id, new_mesh_key, parse_invite
from daemon.private_files import make_private_dir, write_private

log = logging.getLogger(__name__)

MESH_KEY_ENV = "MESHLLM_MESH_KEY"
MESH_KEY_FILE = "mesh.key"
"""The key's file in the state dir."""

NO_KEY_WARNING = ("no mesh key: anyone on this network can join this mesh (it was started with --open; "
                  "without it, meshllm keeps a key in its state dir)")

__all__ = ["MAX_KEY_BYTES", "MESH_KEY_ENV", "MESH_KEY_FILE", "MIN_KEY_BYTES", "NO_KEY_WARNING", "MeshKeyError",
           "load_mesh_key", "resolve_mesh_key", "stored_mesh_key"]


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


def resolve_mesh_key(key_file: Path | None, env: Mapping[str, str], state_dir: Path, *,
                     open_mesh: bool = False, invite: str | None = None) -> bytes | None:
    """The key this node's mesh uses (None: ``--open``), by the order in the module docstring.

    May write ``<state dir>/mesh.key`` (an invite's key, or a new one). Raises MeshKeyError
    with one line for the user (a bad key or code, a key that cannot be stored, options that
    contradict each other).
    """
    env_key = bool(env.get(MESH_KEY_ENV, "").strip())
    given = [name for name, present in (("--mesh-key-file", key_file is not None), (MESH_KEY_ENV, env_key),
                                         ("--invite", invite is not None)) if present]
    if open_mesh and given:
        raise MeshKeyError(f"--open runs a mesh without a key, but {given[0]} gives one: drop one of them")
    if invite is not None and len(given) > 1:
        raise MeshKeyError(f"--invite and {given[0]} both give a mesh key: use one of them")
    if open_mesh:
        return None  # the link layer warns (NO_KEY_WARNING) as it starts
    if key_file is not None or env_key:
        key = load_mesh_key(key_file, env)
        assert key is not None
        return key
    path = state_dir / MESH_KEY_FILE
    if invite is not None:
        try:
            key = parse_invite(invite)
        except InviteError as error:
            raise MeshKeyError(str(error)) from None
        old = stored_mesh_key(state_dir) if path.exists() else None
        if old != key:
            _store(path, key)
            if old is not None:
                log.warning("replaced the mesh key in %s (key id %s) by the invite's (key id %s)",
                            path, key_id(old), key_id(key))
        log.info("mesh key of the invite: key id %s, kept in %s", key_id(key), path)
        return key
    stored = stored_mesh_key(state_dir)
    if stored is not None:
        return stored
    key = new_mesh_key()
    _store(path, key)
    log.info("made a new mesh key (key id %s) in %s; `meshllm invite` prints the code another device "
             "joins with", key_id(key), path)
    return key


def stored_mesh_key(state_dir: Path) -> bytes | None:
    """The key kept in ``<state dir>/mesh.key``; None when there is none. Raises MeshKeyError
    for a file that cannot be read or holds no usable key."""
    path = state_dir / MESH_KEY_FILE
    if not path.exists() and not path.is_symlink():
        return None
    return _read_key_file(path)


def _store(path: Path, key: bytes) -> None:
    try:
        make_private_dir(path.parent)
        write_private(path, key + b"\n")
    except OSError as exc:
        raise MeshKeyError(f"cannot store the mesh key in {path}: {exc.strerror or exc}") from None


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
