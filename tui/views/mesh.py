"""The mesh view: facts, the nodes table, the layer map and the event log."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from tui.mesh_events import LogLine
from tui.mesh_status import LatencyInfo, MeshStatus, SessionsInfo, SpeculationInfo
from tui.widgets.event_log import EventLog
from tui.widgets.layer_map import LayerMap
from tui.widgets.nodes_table import NodesTable

PLAN_STYLES = {"active": "green", "pending": "yellow"}
ANOTHER_MESH_KEY = "another mesh key"
"""The daemon's reason for a node of another mesh key (daemon/net/discovery.py)."""


def format_facts(status: MeshStatus) -> Text:
    """One or two lines: model, codec, term and coordinator, plan state; nodes not joined."""
    model = status.model_name or "no model yet"
    if status.num_layers:
        model += f" ({status.num_layers} layers" + (f", {status.weights}" if status.weights else "") + ")"
    plan_state = status.plan.state if status.plan is not None else "none"
    facts = Text.assemble(
        (model, "bold"),
        ("  codec ", "dim"), status.codec,
        ("  term ", "dim"), str(status.term),
        ("  plan ", "dim"), (plan_state, PLAN_STYLES.get(plan_state, "bold red")),
        ("  sessions ", "dim"), format_sessions(status.sessions),
        ("  drafts ", "dim"), format_speculation(status.speculation),
    )
    if status.latency is not None:
        facts.append("\n")
        facts.append_text(format_latency(status.latency))
    fallback = status.fallback
    if fallback is not None and fallback.model is not None:
        facts.append("\nfallback ", style="dim")
        if fallback.serving:
            facts.append(f"{fallback.model} answering", style="bold yellow")
            facts.append(f": {fallback.mesh_trouble or 'the mesh cannot serve'}", style="yellow")
        else:
            facts.append(f"{fallback.model} ({fallback.state})")
    facts.append_text(format_invite(status))
    for other in status.incompatible:
        facts.append(f"\nnot joined: {other.name} {other.address} ({other.reason})", style="dim")
        if other.reason == ANOTHER_MESH_KEY:
            facts.append(" — to join it: `meshllm invite` there, `meshllm up --invite CODE` here", style="dim")
    return facts


def format_sessions(sessions: SessionsInfo) -> Text:
    """Answers running (of the most at once) and waiting (of the most that may wait)."""
    def of(most: int | None) -> str:
        return "" if most is None else f"/{most}"
    text = Text(f"{sessions.running}{of(sessions.max_sessions)} running")
    if sessions.queued or sessions.queue_max is not None:
        text.append(f", {sessions.queued}{of(sessions.queue_max)} waiting",
                    style="yellow" if sessions.queued else "")
    return text


def format_speculation(spec: SpeculationInfo) -> str:
    """Speculative decoding: the mode, and how well the last answers' drafts stood."""
    if spec.mode == "off" or spec.acceptance is None or spec.tokens_per_trip is None:
        return spec.mode
    return f"{spec.mode} {spec.acceptance:.0%} kept, {spec.tokens_per_trip:.1f}/trip"


def format_invite(status: MeshStatus) -> Text:
    """How another device joins: the invite code (one line at 100 columns: it is the key, and
    docs/tui.md says to give it only to one's own devices), or a warning for an open mesh;
    nothing while the key is not known yet."""
    if status.mesh_key_id == "open":
        return Text("\nopen mesh: anyone on this network can join (started with --open)", style="bold red")
    if status.invite is None:
        return Text()
    return Text.assemble(("\ninvite ", "dim"), ("meshllm up --invite ", "dim"), (status.invite, "bold"))


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def format_latency(latency: LatencyInfo) -> Text:
    """One line: ms per token predicted and measured, and the target met or missed (by how much)."""
    text = Text.assemble(("ms/token ", "dim"), ("predicted ", "dim"), _ms(latency.predicted_ms_per_token))
    if latency.entry_mean:
        text.append(" (average entry)", style="dim")
    text.append("  measured ", style="dim")
    text.append(_ms(latency.measured_ms_per_token))
    if latency.target_ms_per_token is not None:
        text.append("  target ", style="dim")
        text.append(f"{latency.target_ms_per_token:g}")
        misses = [(what, miss) for what, miss in (("predicted", latency.miss_ms_per_token),
                                                  ("measured", latency.measured_miss_ms_per_token)) if miss]
        if misses:
            text.append("  missed by " + ", ".join(f"{miss:.1f} ms ({what})" for what, miss in misses),
                        style="bold red")
        else:
            text.append("  met", style="green")
    if latency.target_ttft_ms is not None and latency.predicted_ttft_ms is not None:
        text.append("  first token ", style="dim")
        text.append(f"{latency.predicted_ttft_ms:.0f}/{latency.target_ttft_ms:g} ms",
                    style="bold red" if latency.miss_ttft_ms else "")
    return text


class MeshView(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("waiting for the daemon…", id="facts")
        yield NodesTable(id="nodes")
        yield LayerMap(id="layer-map")
        log = EventLog(id="event-log")
        log.border_title = "Events"
        yield log

    def show_status(self, status: MeshStatus) -> None:
        self.query_one("#facts", Static).update(format_facts(status))
        self.query_one(NodesTable).show(status)
        self.query_one(LayerMap).status = status

    def add_log(self, line: LogLine) -> None:
        self.query_one(EventLog).add(line)

    def set_stale(self, stale: bool) -> None:
        """Dim what is shown while the daemon cannot be reached: it is the last thing seen."""
        self.set_class(stale, "-stale")
