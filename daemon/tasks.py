"""A set of background tasks that one object owns: none is fire-and-forget.

Each task is kept until it ends; a task that fails is logged with its name; `cancel()` ends
them all (at shutdown). Used by the link manager, discovery and the mesh logic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._tasks))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task %r failed", self._owner, task.get_name(), exc_info=task.exception())

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every task; returns them, to await if the caller wants to."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks
