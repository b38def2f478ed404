"""The node's identity: a random id kept in its state dir, so it survives restarts.

The state dir is created 0700 and the id file written 0600 (daemon/private_files.py), like
everything else the daemon keeps there.
"""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

from daemon.private_files import loose_mode_warning, make_private_dir, write_private

log = logging.getLogger(__name__)

NODE_ID_FILE = "node_id"
_NODE_ID = re.compile(r"^n-[0-9a-f]{16}$")


def new_node_id() -> str:
    return f"n-{secrets.token_hex(8)}"


def load_or_create_node_id(state_dir: Path) -> str:
    """The id stored in ``state_dir``; a new one is made (and stored) when there is none.

    Raises OSError when the state dir cannot be created or written.
    """
    make_state_dir(state_dir)
    path = state_dir / NODE_ID_FILE
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if _NODE_ID.match(text):
            return text
        log.warning("ignoring a malformed node id in %s", path)
    node_id = new_node_id()
    write_private(path, (node_id + "\n").encode("utf-8"))
    return node_id


def make_state_dir(state_dir: Path) -> Path:
    """The state dir, created 0700 when it does not exist; an existing one that others can
    read is warned about, not changed. Raises OSError."""
    existed = state_dir.is_dir()
    make_private_dir(state_dir)
    if existed:
        warning = loose_mode_warning(state_dir)
        if warning is not None:
            log.warning("state dir %s", warning)
    return state_dir
