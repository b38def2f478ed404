"""The node's identity: a random id kept in its state dir, so it survives restarts."""

from __future__ import annotations

import logging
import re
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

NODE_ID_FILE = "node_id"
_NODE_ID = re.compile(r"^n-[0-9a-f]{16}$")


def new_node_id() -> str:
    return f"n-{secrets.token_hex(8)}"


def load_or_create_node_id(state_dir: Path) -> str:
    """The id stored in ``state_dir``; a new one is made (and stored) when there is none.

    Raises OSError when the state dir cannot be created or written.
    """
    path = state_dir / NODE_ID_FILE
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if _NODE_ID.match(text):
            return text
        log.warning("ignoring a malformed node id in %s", path)
    state_dir.mkdir(parents=True, exist_ok=True)
    node_id = new_node_id()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n", encoding="utf-8")
    tmp.replace(path)
    return node_id
