"""The event log: timestamped joins, leaves, elections, re-plans and errors."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

from tui.mesh_events import LogLine

KIND_LABELS = {"join": "join", "leave": "leave", "election": "elect", "replan": "replan",
               "error": "error", "info": "info", "fallback": "fallbk"}
KIND_STYLES = {"join": "green", "leave": "yellow", "election": "magenta", "replan": "cyan",
               "error": "bold red", "info": "dim", "fallback": "bold yellow"}


def format_line(line: LogLine) -> Text:
    """``12:03:04 join   desktop joined (…)`` in the local time zone."""
    stamp = time.strftime("%H:%M:%S", time.localtime(line.ts))
    return Text.assemble(
        (stamp, "dim"), " ",
        (f"{KIND_LABELS.get(line.kind, line.kind):<6}", KIND_STYLES.get(line.kind, "")), " ",
        line.message,
    )


class EventLog(RichLog):
    def __init__(self, *, id: str | None = None, max_lines: int = 1000) -> None:
        super().__init__(id=id, max_lines=max_lines, wrap=True, markup=False, highlight=False)

    def add(self, line: LogLine) -> None:
        self.write(format_line(line))
