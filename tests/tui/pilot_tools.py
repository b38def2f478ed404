"""Reading the screen and waiting for it, in Textual pilot tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

from tests.waiting import async_wait_until

T = TypeVar("T")

APP_WAIT_S = 15.0
"""A bound for a failing test, not a timing assertion: a loaded machine is slow."""


def screen_text(app: App[object]) -> str:
    """The characters on the terminal right now, one line per row (what a person would read)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system=None, record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def app_wait_until(pilot: Pilot[object], condition: Callable[[], T], what: str,
                         timeout_s: float = APP_WAIT_S) -> T:
    """``tests.waiting.async_wait_until`` with the app running between tries (``pilot.pause``)
    and the screen in the failure message."""
    return await async_wait_until(condition, timeout_s, what, sleep=pilot.pause,
                                  context=lambda: "--- screen ---\n" + screen_text(pilot.app))
