"""The conversation: one entry per message, the newest at the bottom."""

from __future__ import annotations

from typing import Literal

from textual.containers import VerticalScroll
from textual.widgets import Static

EntryRole = Literal["user", "assistant", "note", "error"]


class ChatEntry(Static):
    """One message (user or assistant) or a note from the UI (stopped, failed)."""

    def __init__(self, role: EntryRole, text: str = "") -> None:
        super().__init__(text, markup=False, classes=role)
        self.role: EntryRole = role
        self.text = text

    def set_text(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self.update(text)


class ChatLog(VerticalScroll, can_focus=False):
    """Stays scrolled to the newest text while an answer streams, unless the user scrolls up."""

    def on_mount(self) -> None:
        self.anchor()

    @property
    def entries(self) -> list[ChatEntry]:
        return list(self.query_children(ChatEntry))

    def add(self, role: EntryRole, text: str = "", *, before: ChatEntry | None = None) -> ChatEntry:
        """A new entry at the bottom, or just above `before`."""
        entry = ChatEntry(role, text)
        if before is not None:
            self.mount(entry, before=before)
        else:
            self.mount(entry)
        return entry

    async def clear_entries(self) -> None:
        await self.query_children(ChatEntry).remove()
