"""What every ``meshllm`` command shares: exit codes, the one-line failure, the daemon's
API URL by default, and logging.

Every failure a user can cause ends with one line on stderr and a non-zero exit code, never a
traceback (`fail`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from daemon.node.config import DEFAULT_API_URL

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"meshllm: {message}", file=sys.stderr, flush=True)
    return code


def default_api() -> str:
    """``$MESHLLM_API``, or the default API URL."""
    return os.environ.get("MESHLLM_API", "").strip() or DEFAULT_API_URL


def setup_logging(level: str, log_file: Path | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":
        logging.getLogger("daemon.access").setLevel(logging.WARNING)
