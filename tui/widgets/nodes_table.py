"""The mesh table: one row per node, with its role, state, memory, speed, span, the link to it
(round trip, rates) and the ms per token with it as the entry node (measured / predicted)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from tui.mesh_events import format_span
from tui.mesh_status import MeshStatus, NodeInfo
from tui.widgets.layer_map import node_colours

COLUMNS = (
    ("node", "Node"),
    ("you", "You"),
    ("role", "Role"),
    ("state", "State"),
    ("memory", "Memory"),
    ("weights", "Weights"),
    ("speed", "ms/layer"),
    ("span", "Span"),
    ("rtt", "RTT"),
    ("rates", "MB/s"),
    ("token", "ms/token"),
)
STATE_STYLES = {"ready": "green", "loading": "yellow", "starting": "yellow", "lost": "bold red"}
SELF_MARK = "●"
NOTHING = "—"


def format_bytes(size_bytes: int | None) -> str:
    """Binary units, three digits: 512 MiB, 7.45 GiB, 15.6 GiB."""
    if size_bytes is None:
        return NOTHING
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_ms(value_ms: float | None, *, unit: str = "") -> str:
    if value_ms is None:
        return NOTHING
    text = f"{value_ms:.2f}" if value_ms < 10 else f"{value_ms:.1f}" if value_ms < 100 else f"{value_ms:.0f}"
    return f"{text}{unit}"


def format_rates(node: NodeInfo) -> str:
    """The link's rates: activation-sized / bulk, MB/s."""
    link = node.link
    if link is None:
        return NOTHING

    def one(value: float | None) -> str:
        return "?" if value is None else ">10k" if value >= 10_000 else f"{value:.0f}"
    return f"{one(link.small_mb_s)}/{one(link.large_mb_s)}"


def format_token(node: NodeInfo) -> Text | str:
    """Measured / predicted ms per token with this node as the entry (measured only once it
    answered); red when the measurement is 20% or more off the prediction."""
    measured, predicted = node.measured_ms_per_token, node.predicted_ms_per_token
    if predicted is None:
        return NOTHING
    if measured is None:
        return Text(f"— / {format_ms(predicted)}", style="dim")
    off = abs(measured - predicted) >= 0.2 * predicted
    return Text(f"{format_ms(measured)} / {format_ms(predicted)}", style="red" if off else "")


def node_cells(node: NodeInfo, colour: str) -> tuple[Text | str, ...]:
    return (
        Text(node.name, style=f"bold {colour}"),
        SELF_MARK if node.is_self else "",
        Text("coord", style="bold") if node.is_coordinator else "member",
        Text(node.state, style=STATE_STYLES.get(node.state, "")),
        format_bytes(node.mem_budget_bytes),
        format_bytes(node.weight_bytes),
        format_ms(node.ms_per_layer),
        format_span(node.span),
        NOTHING if node.is_self else format_ms(node.link.rtt_ms if node.link else node.rtt_ms, unit=" ms"),
        format_rates(node),
        format_token(node),
    )


class NodesTable(DataTable[Text | str]):
    """Rows keyed by node id; ``show(status)`` replaces them and keeps the cursor's node."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, show_cursor=False)

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def show(self, status: MeshStatus) -> None:
        colours = node_colours(status)
        self.clear()
        for node in status.nodes:
            self.add_row(*node_cells(node, colours.get(node.node_id, "")), key=node.node_id)
