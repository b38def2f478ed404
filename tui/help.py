"""The help screen: every key, what it does, and where the UI gets its data."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


def keys_table(keys: Sequence[tuple[str, str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, description in keys:
        table.add_row(key, description)
    return table


class HelpScreen(ModalScreen[None]):
    """A box over the app listing ``keys`` as (key, what it does); any of Esc, F1, q closes it."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("f1", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
        Binding("question_mark", "dismiss", "Close", show=False),
    ]

    def __init__(self, keys: Sequence[tuple[str, str]], api_url: str) -> None:
        super().__init__()
        self._keys = list(keys)
        self._api_url = api_url

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box") as box:
            box.border_title = "meshllm · keys"
            box.border_subtitle = "Esc closes"
            yield Static(keys_table(self._keys), id="help-keys")
            yield Static(Text(
                f"Talking to the daemon at {self._api_url}. The mesh view follows its event "
                "stream; the chat sends the whole conversation each turn and streams the answer.",
                style="dim",
            ), id="help-about")
