"""The API key a client sends (docs/api.md, "Access"): ``Authorization: Bearer KEY``.

A daemon whose API listens beyond loopback needs it; one on loopback ignores it. Where it
comes from, first found wins:

1. the file ``--api-key-file`` names (the ``meshllm`` commands), or ``$MESHLLM_API_KEY_FILE``;
2. for a daemon on this device only (an API URL on 127.0.0.1, ::1 or localhost), ``api.key``
   in its state dir: ``$MESHLLM_STATE_DIR``, else ``$XDG_STATE_HOME/meshllm``, else
   ``~/.local/state/meshllm``, when that file exists. This device's key is never sent to
   another device's daemon.

tui/ imports nothing of daemon/ (tests/unit/test_layers.py): the state dir's default is
spelled out here as daemon.node.config.default_state_dir has it (a test checks they agree).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

API_KEY_FILE_NAME = "api.key"
MAX_KEY_BYTES = 4096


class ApiKeyFileError(ValueError):
    """The key file cannot be read or holds no key; the message says which and why."""


def default_key_path(env: Mapping[str, str]) -> Path:
    """``api.key`` in the state dir a daemon started with the same environment uses."""
    state_dir = env.get("MESHLLM_STATE_DIR", "").strip()
    if state_dir:
        return Path(state_dir).expanduser() / API_KEY_FILE_NAME
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshllm" / API_KEY_FILE_NAME


def read_key_file(path: Path) -> str:
    """The key in ``path``: one word of visible ASCII. Raises ApiKeyFileError."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_KEY_BYTES + 1)
    except OSError as error:
        raise ApiKeyFileError(f"cannot read the API key file {path}: {error.strerror or error}") from None
    text = raw.decode("ascii", "replace").strip()
    if not text or len(raw) > MAX_KEY_BYTES or not all("!" <= c <= "~" for c in text):
        raise ApiKeyFileError(f"the API key file {path} does not hold a key (one word of visible ASCII)")
    return text


def is_local_url(api_url: str) -> bool:
    """True when ``api_url`` names a daemon on this device."""
    try:
        host = urlsplit(api_url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_api_key(api_url: str, env: Mapping[str, str] | None = None,
                 key_file: Path | None = None) -> str | None:
    """The key to send to the daemon at ``api_url`` (None: none). ``key_file`` (an option)
    wins over ``$MESHLLM_API_KEY_FILE``; either must be readable. Raises ApiKeyFileError."""
    env = os.environ if env is None else env
    named = key_file or (Path(env["MESHLLM_API_KEY_FILE"].strip()).expanduser()
                         if env.get("MESHLLM_API_KEY_FILE", "").strip() else None)
    if named is not None:
        return read_key_file(named)
    if not is_local_url(api_url):
        return None
    path = default_key_path(env)
    if not path.is_file():
        return None
    return read_key_file(path)
