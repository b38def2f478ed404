"""`meshllm tune`'s progress display: one line per round on a pipe, a live bar on a terminal.

Shows the round, this node's local training loss and how many peers take part, then the
result: the adapter, and the loss on this node's examples before and after.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

BAR_WIDTH = 24


def _loss(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"


class TuneProgress:
    def __init__(self, out: TextIO, *, as_json: TextIO | None = None) -> None:
        self._out = out
        self._json = as_json
        self._live = out.isatty()
        self._open_line = False

    def show(self, event: dict[str, Any]) -> None:
        if self._json is not None:
            self._json.write(json.dumps(event) + "\n")
            self._json.flush()
        kind = event.get("type")
        if kind == "progress":
            self._line(self.progress_line(event), final=event.get("state") == "round_done" or not self._live)
        elif kind == "base":
            self._line(f"{event.get('examples')} examples; loss on them before tuning {_loss(event.get('loss'))}",
                       final=True)
        elif kind == "done":
            self._line(self.done_line(event), final=True)
        elif kind == "error":
            self._line(f"error: {event.get('message')}", final=True)

    @staticmethod
    def progress_line(event: dict[str, Any]) -> str:
        rounds = int(event.get("rounds") or 0)
        done = int(event.get("round") or 0) - (0 if event.get("state") == "round_done" else 1)
        filled = BAR_WIDTH * max(0, min(done, rounds)) // rounds if rounds else 0
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        label = "mesh loss" if event.get("state") == "round_done" else "local loss"
        return (f"[{bar}] round {event.get('round')}/{rounds}  {event.get('state')}  "
                f"{label} {_loss(event.get('loss'))}  peers {event.get('peers')}  {event.get('message') or ''}").rstrip()

    @staticmethod
    def done_line(event: dict[str, Any]) -> str:
        where = event.get("adapter") or "(not saved: the node has no state dir)"
        return (f"done: {event.get('rounds')} rounds, {event.get('participants')} participants; "
                f"loss on this node's examples {_loss(event.get('base_loss'))} -> {_loss(event.get('loss'))}\n"
                f"adapter {event.get('digest')} at {where}; the mesh serves it now "
                f"(restart a node with `meshllm up --adapter last` to keep it)")

    def _line(self, text: str, *, final: bool) -> None:
        if self._live:
            self._out.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._open_line:
            self._out.write("\n")
            self._out.flush()
            self._open_line = False
