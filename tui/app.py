"""meshllm's terminal UI: the mesh (nodes, layer map, events) and a chat, over a daemon's API.

Entry points for the CLI: ``run_attached(api_url, on_quit)`` for ``meshllm up`` (the app quits,
then ``on_quit`` stops the node) and ``run_chat(api_url)`` for ``meshllm chat``.

The app follows the daemon's event stream (``GET /v1/events``) on one worker: every status
snapshot redraws the mesh view, and log events and changes between snapshots go to the event
log. When the daemon goes away a calm banner says so and the worker keeps trying, with backoff,
until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from tui.backoff import Backoff
from tui.client import DaemonClient, DaemonError, DaemonUnavailable, MeshClient
from tui.help import HelpScreen
from tui.mesh_events import EventFeed, LogLine
from tui.mesh_status import MeshStatus
from tui.settings import TuiSettings
from tui.views.chat import ChatView
from tui.views.mesh import MeshView
from tui.widgets.nodes_table import NodesTable

log = logging.getLogger(__name__)

View = Literal["mesh", "chat"]
CHAT_ACTIONS = frozenset({"stop_answer", "new_chat"})


class MeshApp(App[None]):
    """The whole UI. ``client`` is a ``DaemonClient`` in real use and a fake in tests."""

    CSS_PATH = "meshllm.tcss"
    TITLE = "meshllm"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("f2", "show_view('mesh')", "Mesh"),
        Binding("f3", "show_view('chat')", "Chat"),
        Binding("escape", "stop_answer", "Stop answer"),
        Binding("ctrl+s", "stop_answer", "Stop answer", show=False),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "quit", "Quit"),
    ]
    HELP_KEYS = (
        ("F1  ?", "this help (? only outside the chat input)"),
        ("F2", "the mesh: nodes, layer map, event log"),
        ("F3", "the chat"),
        ("Enter", "send the message in the chat input"),
        ("Esc  Ctrl+S", "stop the answer in progress (what came so far stays)"),
        ("Ctrl+N", "new chat: forget the conversation"),
        ("Tab", "move the focus"),
        ("Ctrl+Q", "quit"),
    )

    class DaemonEvent(Message):
        """One event of the daemon's event stream (a dict as docs/api.md gives it)."""

        def __init__(self, event: dict[str, Any]) -> None:
            super().__init__()
            self.event = event

    class DaemonLost(Message):
        """The event stream could not be opened or broke; the next try is in ``retry_in_s``."""

        def __init__(self, reason: str, retry_in_s: float, attempt: int) -> None:
            super().__init__()
            self.reason = reason
            self.retry_in_s = retry_in_s
            self.attempt = attempt

    connected: reactive[bool] = reactive(False)
    """The event stream is flowing."""
    banner_text: reactive[str] = reactive("")

    def __init__(
        self,
        client: MeshClient,
        *,
        settings: TuiSettings | None = None,
        initial_view: View = "mesh",
        notes: tuple[str, ...] | list[str] = (),
    ) -> None:
        super().__init__()
        self.client = client
        self.settings = settings or TuiSettings()
        self._initial_view: View = initial_view
        self._notes = tuple(notes)
        self._feed = EventFeed()
        self._ever_connected = False
        # kept here: queries look only at the screen on top, which may be the help screen
        self._banner = Static(id="banner")
        self._views = TabbedContent(initial=initial_view, id="views")
        self.mesh_view = MeshView(id="mesh-view")
        self.chat_view = ChatView(client, self.settings, id="chat-view")

    # -- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield self._banner
        with self._views:
            with TabPane("Mesh", id="mesh"):
                yield self.mesh_view
            with TabPane("Chat", id="chat"):
                yield self.chat_view
        yield Footer()

    @property
    def mesh_status(self) -> MeshStatus | None:
        """The last status snapshot the daemon sent."""
        return self._feed.status

    def on_mount(self) -> None:
        self.banner_text = f"Connecting to the daemon at {self.client.api_url}…"
        for note in self._notes:
            self._add_log_line(LogLine(ts=time.time(), kind="error", message=note))
        self._focus_view(self._initial_view)
        self.run_worker(self._follow_daemon(), name="events", group="events",
                        exclusive=True, exit_on_error=False)

    # -- following the daemon --------------------------------------------------------------

    async def _follow_daemon(self) -> None:
        """Read the event stream forever; reconnect with backoff when it ends or breaks."""
        initial_s = self.settings.reconnect_initial_s
        backoff = Backoff(initial_s=initial_s, max_s=max(initial_s, self.settings.reconnect_max_s))
        while True:
            try:
                async for event in self.client.events():
                    backoff.reset()
                    self.post_message(self.DaemonEvent(event))
                reason = "the daemon closed its event stream"
            except (DaemonUnavailable, DaemonError) as error:
                reason = str(error)
            delay_s = backoff.next_delay_s()
            self.post_message(self.DaemonLost(reason, delay_s, backoff.attempts))
            await asyncio.sleep(delay_s)

    def on_mesh_app_daemon_event(self, message: DaemonEvent) -> None:
        now = time.time()
        self.connected = True
        event = message.event
        if event.get("type") == "status":
            status, lines = self._feed.on_status(event.get("status"), now)
            for line in lines:
                self._add_log_line(line)
            if status is not None:
                self._show_status(status)
        elif event.get("type") == "log":
            line = self._feed.on_log(event, now)
            if line is not None:
                self._add_log_line(line)

    def on_mesh_app_daemon_lost(self, message: DaemonLost) -> None:
        if self.connected:
            self._add_log_line(LogLine(ts=time.time(), kind="error",
                              message=f"lost the daemon: {message.reason}"))
        self.connected = False
        url = self.client.api_url
        reason = message.reason.replace(f" at {url}", "")  # the banner names the URL once
        first = "Waiting for" if not self._ever_connected else "Lost"
        when = f"{message.retry_in_s:.0f} s" if message.retry_in_s >= 1 else "a moment"
        self.banner_text = (f"{first} the daemon at {url} ({reason}). "
                            f"Trying again in {when} (try {message.attempt})…")

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A bug in a worker: say so calmly instead of leaving a dead screen."""
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            log.error("worker %s failed", event.worker.name, exc_info=event.worker.error)
            self._add_log_line(LogLine(ts=time.time(), kind="error",
                              message=f"internal error in {event.worker.name}: {event.worker.error!r}"))
            if event.worker.name == "events":
                self.banner_text = "The connection to the daemon stopped after an internal error; restart the UI."
                self.connected = False

    def _show_status(self, status: MeshStatus) -> None:
        self.mesh_view.show_status(status)
        nodes = len(status.nodes)
        model = status.model_name or "no model yet"
        summary = f"{model} on {nodes} node{'s' if nodes != 1 else ''}"
        if status.fallback is not None and status.fallback.serving:
            summary += f" · fallback {status.fallback.model} answers (the mesh cannot serve)"
        self.chat_view.show_mesh_summary(summary)

    def _add_log_line(self, line: LogLine) -> None:
        self.mesh_view.add_log(line)

    def watch_connected(self, connected: bool) -> None:
        self._banner.display = not connected
        self.mesh_view.set_stale(not connected and self._ever_connected)
        if connected:
            if self._ever_connected:
                self._add_log_line(LogLine(ts=time.time(), kind="info", message="the daemon is back"))
            else:
                self._add_log_line(LogLine(ts=time.time(), kind="info",
                                  message=f"connected to the daemon at {self.client.api_url}"))
            self._ever_connected = True

    def watch_banner_text(self, text: str) -> None:
        self._banner.update(text)

    # -- keys --------------------------------------------------------------------------------

    @property
    def active_view(self) -> View:
        active = self._views.active
        return "chat" if active == "chat" else "mesh"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in CHAT_ACTIONS:
            if len(self.screen_stack) > 1:  # the help screen is open
                return False
            if self.active_view != "chat":
                return False
            if action == "stop_answer" and not self.chat_view.streaming:
                return False
        return True

    def action_show_view(self, view: str) -> None:
        self._views.active = view
        self._focus_view("chat" if view == "chat" else "mesh")

    @on(TabbedContent.TabActivated)
    def _view_changed(self, event: TabbedContent.TabActivated) -> None:
        self._focus_view(self.active_view)
        self.refresh_bindings()

    def _focus_view(self, view: View) -> None:
        if view == "chat":
            self.chat_view.focus_prompt()
        else:
            self.mesh_view.query_one(NodesTable).focus()

    def action_stop_answer(self) -> None:
        self.chat_view.stop()

    async def action_new_chat(self) -> None:
        await self.chat_view.new_chat()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.HELP_KEYS, self.client.api_url))


def _run(api_url: str, initial_view: View, on_quit: Callable[[], None] | None, api_key: str | None = None) -> None:
    settings, notes = TuiSettings.from_env(os.environ)
    app = MeshApp(DaemonClient(api_url, api_key=api_key), settings=settings, initial_view=initial_view, notes=notes)
    try:
        app.run()
    finally:
        if on_quit is not None:
            on_quit()


def run_attached(api_url: str, on_quit: Callable[[], None] | None = None, *, api_key: str | None = None) -> None:
    """Run the UI on the daemon at ``api_url`` until the user quits, then call ``on_quit``.

    For ``meshllm up``: the node runs on another thread; ``on_quit`` stops it cleanly.
    Opens on the mesh view. ``api_key``: the key the API needs (None: the one
    ``tui.api_key.find_api_key`` finds).
    """
    _run(api_url, "mesh", on_quit, api_key)


def run_chat(api_url: str, *, api_key: str | None = None) -> None:
    """Run the UI on a running daemon, opening on the chat (``meshllm chat [--api URL]``)."""
    _run(api_url, "chat", None, api_key)
