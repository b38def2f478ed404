"""One answer as it crosses from the node to the HTTP API: the stream the API reads.

The node (daemon/node) produces answers, the API (daemon/api) writes them out; this module is
what both sides agree on, so neither imports the other:

- `AnswerStream`: what the API iterates (tokens, mesh state changes between them, and first,
  when it `announces`, a `Serving`) and closes to cancel the answer;
- `Serving`: the first item of an answer that announces who answers it;
- `WorkerStopped`: how an answer ends when the node stops under it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


class WorkerStopped(RuntimeError):
    """The node's worker was stopped before (or while) the work of an answer ran."""


@dataclass(frozen=True)
class Serving:
    """The first item of an answer: who answers it, under which model name."""

    by: Literal["mesh", "fallback"]
    model: str


class AnswerStream(Protocol):
    """An answer under way: ``async for`` its items; ``close()`` asks it to stop (safe twice).

    Items are ``meshllm.mesh.session.Token``s and, between tokens, ``StateChange``s; when
    `announces`, a `Serving` comes first."""

    @property
    def announces(self) -> bool:
        """The first item says who serves the answer (a `Serving`)."""
        ...

    @property
    def cancelled(self) -> bool: ...

    def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[object]: ...
