"""Reading the screen and waiting for it, in Textual pilot tests."""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

WAIT_STEPS = 400


def screen_text(app: App[object]) -> str:
    """The characters on the terminal right now, one line per row (what a person would read)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system=None, record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_until(pilot: Pilot[object], condition: Callable[[], bool], what: str) -> None:
    """Let the app run until ``condition()`` holds; fail naming ``what`` if it never does."""
    for _ in range(WAIT_STEPS):
        if condition():
            return
        await pilot.pause(0.01)
    raise AssertionError(f"never happened: {what}\n--- screen ---\n{screen_text(pilot.app)}")
