"""Files only this user may read: the state dir (0700) and what the daemon keeps in it (0600).

The mesh key, the API key, the node id and tune adapters are written with :func:`write_private`:
atomically (a temporary file beside the target, then a rename), and with mode 0600 from the
moment the file exists, whatever the umask. :func:`make_private_dir` creates a folder 0700.
A folder that already exists keeps its mode (``--state-dir /tmp`` must not lock others out of
/tmp); :func:`loose_mode_warning` says when it is readable by others.

Neutral: every layer of the daemon may use it (daemon/api for the API key, daemon/net for the
mesh key, daemon/node for the node id and adapters).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and its missing parents) with mode 0700; an existing folder is left as
    it is. Returns ``path``. Raises OSError."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path  # made by another process meanwhile: its mode is its own
    os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is cut by the umask; 0700 needs nothing back
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (the parent folder must exist).

    A reader sees the old content or the new one, never a part; the file is never readable by
    others, not even while it is written. Raises OSError.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # O_CREAT's mode is cut by the umask too
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def loose_mode_warning(path: Path) -> str | None:
    """A one-line warning when ``path`` (a file or folder) can be read or written by other
    users; None when it is private or cannot be looked at."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    fix = "700" if stat.S_ISDIR(mode) else "600"
    return f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}; chmod {fix} {path})"
