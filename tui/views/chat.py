"""The chat view: a multi-turn conversation whose answers stream in, with tokens/s.

Each turn sends the whole conversation (the daemon applies the model's chat template). The
answer streams on a worker; the worker posts ``AnswerProgress`` messages that carry the whole
text so far and replace each other in the queue, so a fast stream never makes the screen fall
behind. Stopping cancels the worker, which closes the HTTP stream (the daemon then cancels the
session); the partial answer stays, and stays in the conversation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, Static
from textual.worker import Worker, WorkerState

from tui.client import DaemonError, DaemonUnavailable, MeshClient
from tui.settings import TuiSettings
from tui.throughput import TokenRate
from tui.widgets.chat_log import ChatEntry, ChatLog

log = logging.getLogger(__name__)

Outcome = Literal["finished", "stopped", "failed", "unreachable"]
HINT = "Enter sends · Esc stops an answer · Ctrl+N starts a new chat · F1 help"
REPLANNING = "⟳ re-planning… the mesh is moving layers; the answer will carry on"


def fallback_note(model: str | None) -> str:
    return (f"⚠ answered by the fallback model {model or '?'} on this device: "
            "the mesh cannot serve right now")


def _rate_text(tokens: int, per_s: float | None) -> str:
    rate = f"{per_s:.1f} tok/s" if per_s is not None else "— tok/s"
    return f"{tokens} token{'s' if tokens != 1 else ''} · {rate}"


class ChatView(Vertical):
    """The conversation, the re-planning indicator, a status line and the prompt input."""

    class AnswerProgress(Message):
        """The answer so far. A newer one for the same answer replaces it in the queue."""

        def __init__(self, answer_id: int, text: str, tokens: int, tokens_per_s: float | None,
                     replanning: bool, fallback_model: str | None = None) -> None:
            super().__init__()
            self.answer_id = answer_id
            self.text = text
            self.tokens = tokens
            self.tokens_per_s = tokens_per_s
            self.replanning = replanning
            self.fallback_model = fallback_model
            """Set when the daemon's local fallback model answers (not the mesh)."""

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, ChatView.AnswerProgress) and message.answer_id == self.answer_id

    class AnswerEnded(Message):
        """The answer is over: finished, stopped by the user, refused, or cut off."""

        def __init__(self, answer_id: int, text: str, tokens: int, tokens_per_s: float | None,
                     outcome: Outcome, detail: str = "", fallback_model: str | None = None) -> None:
            super().__init__()
            self.answer_id = answer_id
            self.text = text
            self.tokens = tokens
            self.tokens_per_s = tokens_per_s
            self.outcome: Outcome = outcome
            self.detail = detail
            """The finish reason ("stop", "length") or what went wrong."""
            self.fallback_model = fallback_model
            """Set when the daemon's local fallback model answered (not the mesh)."""

    streaming: reactive[bool] = reactive(False)
    """An answer is on its way."""
    replanning: reactive[bool] = reactive(False)
    """The stream says the mesh is re-planning; tokens will flow again after."""
    mesh_summary: reactive[str] = reactive("")
    """Model and node count, shown in the status line."""
    answer_stats: reactive[str] = reactive("")

    def __init__(self, client: MeshClient, settings: TuiSettings, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._client = client
        self._settings = settings
        self.messages: list[dict[str, str]] = []
        """The conversation so far, as sent to the daemon."""
        self._answer_id = 0
        self._answer_entry: ChatEntry | None = None
        self._fallback_marked: ChatEntry | None = None
        """The answer entry already marked as the fallback's."""
        self._worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield ChatLog(id="chat-log")
        yield Static(HINT, id="chat-hint")
        yield Static(REPLANNING, id="replanning")
        yield Static(id="chat-status")
        yield Input(placeholder="Message the model…  (Enter sends)", id="prompt")

    # -- what the keys do ------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.streaming:
            self.notify("An answer is still coming: press Esc to stop it first.", timeout=3)
            return
        event.input.clear()
        self.messages.append({"role": "user", "content": text})
        chat_log = self.query_one(ChatLog)
        chat_log.add("user", text)
        self._answer_entry = chat_log.add("assistant", "…")
        self._answer_id += 1
        self.streaming = True
        self.answer_stats = "waiting for the first token…"
        self._worker = self.run_worker(
            self._stream_answer(self._answer_id, list(self.messages)),
            name="chat", group="chat", exclusive=True, exit_on_error=False,
        )

    def stop(self) -> None:
        """Stop the answer in progress; what came so far stays."""
        if self._worker is not None and self.streaming:
            self._worker.cancel()

    async def new_chat(self) -> None:
        """Forget the conversation and clear the screen; an answer in progress is stopped."""
        if self._worker is not None:
            self._worker.cancel()
        self._answer_id += 1  # messages of the old answer still queued are now ignored
        self._answer_entry = None
        self.messages.clear()
        self.streaming = False
        self.replanning = False
        self.answer_stats = "new chat"
        await self.query_one(ChatLog).clear_entries()
        self.query_one("#prompt", Input).clear()
        self.query_one("#chat-hint").display = True
        self.focus_prompt()

    def focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    # -- the stream --------------------------------------------------------------------------

    async def _stream_answer(self, answer_id: int, messages: list[dict[str, str]]) -> None:
        rate = TokenRate()
        text = ""
        replanning = False
        finish_reason = ""
        outcome: Outcome = "finished"
        fallback: str | None = None
        try:
            async for delta in self._client.chat(
                messages,
                max_tokens=self._settings.chat_max_tokens,
                temperature=self._settings.chat_temperature,
            ):
                if delta.served_by == "fallback":
                    fallback = delta.model or "?"
                if delta.state is not None:
                    replanning = delta.state == "replanning"
                if delta.text:
                    text += delta.text
                    rate.add(1, time.monotonic())
                    replanning = False
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                if delta.completion_tokens is not None:
                    rate.settle(delta.completion_tokens, time.monotonic())
                self.post_message(self.AnswerProgress(answer_id, text, rate.tokens, rate.per_s(), replanning,
                                                      fallback))
        except asyncio.CancelledError:
            self.post_message(self.AnswerEnded(answer_id, text, rate.tokens, rate.per_s(), "stopped",
                                               fallback_model=fallback))
            raise
        except DaemonUnavailable as error:
            outcome, finish_reason = "unreachable", str(error)
        except DaemonError as error:
            outcome, finish_reason = "failed", str(error)
        self.post_message(self.AnswerEnded(answer_id, text, rate.tokens, rate.per_s(), outcome, finish_reason,
                                           fallback_model=fallback))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A bug while streaming: end the answer as failed rather than stream forever."""
        if event.worker is self._worker and event.state == WorkerState.ERROR:
            log.error("the chat worker failed", exc_info=event.worker.error)
            self.post_message(self.AnswerEnded(self._answer_id, "", 0, None, "failed",
                                               f"internal error: {event.worker.error!r}"))

    def on_chat_view_answer_progress(self, message: AnswerProgress) -> None:
        if message.answer_id != self._answer_id or self._answer_entry is None:
            return
        self._answer_entry.set_text(message.text or "…")
        self.replanning = message.replanning
        self._mark_fallback(self._answer_entry, message.fallback_model)
        source = f" (fallback {message.fallback_model})" if message.fallback_model else ""
        self.answer_stats = f"streaming{source} · {_rate_text(message.tokens, message.tokens_per_s)}"

    def _mark_fallback(self, entry: ChatEntry | None, model: str | None) -> None:
        """An answer from the daemon's fallback model: its own colour and a note above it."""
        if entry is None or model is None or self._fallback_marked is entry:
            return
        self._fallback_marked = entry
        entry.add_class("fallback")
        self.query_one(ChatLog).add("note", fallback_note(model), before=entry)

    def on_chat_view_answer_ended(self, message: AnswerEnded) -> None:
        if message.answer_id != self._answer_id:
            return
        entry, self._answer_entry = self._answer_entry, None
        self.streaming = False
        self.replanning = False
        stats = _rate_text(message.tokens, message.tokens_per_s)
        if message.fallback_model:
            stats += f" · fallback {message.fallback_model}"
        chat_log = self.query_one(ChatLog)
        if message.outcome in ("finished", "stopped") and entry is not None and entry.is_attached:
            self._mark_fallback(entry, message.fallback_model)
        if message.outcome in ("finished", "stopped"):
            if entry is not None:
                entry.set_text(message.text)
            if message.text:
                self.messages.append({"role": "assistant", "content": message.text})
            if message.outcome == "stopped":
                chat_log.add("note", f"stopped after {stats}")
                self.answer_stats = f"stopped · {stats}"
            elif message.detail == "length":
                chat_log.add("note", f"cut off at the {self._settings.chat_max_tokens}-token limit")
                self.answer_stats = f"done (token limit) · {stats}"
            else:
                self.answer_stats = f"done · {stats}"
            return
        # refused or cut off: the turn is taken back so the next one does not repeat it
        question = self.messages.pop()["content"] if self.messages and self.messages[-1]["role"] == "user" else ""
        if entry is not None:
            if message.text:
                entry.set_text(message.text)
            else:
                entry.remove()
        if message.outcome == "unreachable":
            chat_log.add("error", f"The daemon is not reachable, so no answer came: {message.detail}")
            self.answer_stats = "no daemon"
        else:
            chat_log.add("error", f"The daemon could not answer: {message.detail}")
            self.answer_stats = "failed"
        prompt = self.query_one("#prompt", Input)
        if question and not prompt.value:
            prompt.value = question  # ready to send again
            prompt.cursor_position = len(question)

    # -- what shows ----------------------------------------------------------------------

    def watch_streaming(self, streaming: bool) -> None:
        if streaming:
            self.query_one("#chat-hint").display = False
        self.app.refresh_bindings()

    def watch_replanning(self, replanning: bool) -> None:
        self.query_one("#replanning").display = replanning

    def show_mesh_summary(self, summary: str) -> None:
        """The mesh in one line (model, nodes, who answers), under the chat."""
        self.mesh_summary = summary

    def watch_mesh_summary(self) -> None:
        self._show_status_line()

    def watch_answer_stats(self) -> None:
        self._show_status_line()

    def _show_status_line(self) -> None:
        line = Text(self.mesh_summary or "not connected", style="dim")
        if self.answer_stats:
            line.append("  │  ", style="dim")
            line.append(self.answer_stats)
        self.query_one("#chat-status", Static).update(line)

    @property
    def is_replanning_shown(self) -> bool:
        return bool(self.query_one("#replanning").display)
