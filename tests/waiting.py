"""The one way tests wait for something: poll a predicate until it holds, or fail saying what.

    value = wait_until(lambda: mesh.status(0)["plan"], 30, "an active plan")
    await async_wait_until(lambda: len(b.ups) == 1, 5, "b sees the link up")

The timeout bounds a failing test; it is never a timing assertion, so make it generous (a
loaded machine is slow). On timeout the AssertionError names what was awaited, the last value
the predicate returned (or the exception it raised) and, when given, ``context()`` (a screen,
a log). Both return the predicate's last, truthy value. There is no helper to check that
something did *not* happen: wait for what a user would observe instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

_UNSET = object()


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.05,
               context: Callable[[], str] | None = None) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something truthy; return that.

    Exceptions the predicate raises count as "not yet" (a daemon still starting refuses
    connections); the last one is reported if time runs out.
    """
    deadline = time.monotonic() + timeout_s
    last: object = _UNSET
    while True:
        try:
            value = predicate()
        except Exception as error:  # noqa: BLE001 - "not yet"; reported on timeout
            last = error
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout_s, last, context))
        time.sleep(interval_s)


async def async_wait_until(predicate: Callable[[], T], timeout_s: float, what: str, *,
                           interval_s: float = 0.01, context: Callable[[], str] | None = None,
                           sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> T:
    """``wait_until`` for async tests: ``await sleep(interval_s)`` between tries, so the event
    loop (the server under test, a Textual app: pass ``sleep=pilot.pause``) runs meanwhile."""
    deadline = time.monotonic() + timeout_s
    last: object = _UNSET
    while True:
        try:
            value = predicate()
        except Exception as error:  # noqa: BLE001
            last = error
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(_message(what, timeout_s, last, context))
        await sleep(interval_s)


def _message(what: str, timeout_s: float, last: object, context: Callable[[], str] | None) -> str:
    if isinstance(last, Exception):
        seen = f"it last raised {type(last).__name__}: {last}"
    else:
        seen = f"it last returned {last!r:.2000}"
    text = f"never happened in {timeout_s:g} s: {what} ({seen})"
    if context is not None:
        try:
            text += "\n" + context()
        except Exception as error:  # noqa: BLE001 - the context is a courtesy
            text += f"\n(no context: {error})"
    return text
