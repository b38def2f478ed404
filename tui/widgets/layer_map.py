"""A bar of all decoder layers, coloured by the node that holds each, with a legend."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from tui.mesh_events import format_span
from tui.mesh_status import PRIVATE, MeshStatus

NODE_COLOURS = ("#5fafff", "#ffaf5f", "#87d75f", "#ff5f87", "#af87ff", "#ffd75f", "#5fd7d7", "#d7875f")
UNASSIGNED_COLOUR = "#585858"
PRIVATE_COLOUR = "#a8a8a8"
"""The private layers: run by each entry node for its own answers (docs/security.md)."""
FULL_BLOCK = "█"
EMPTY_BLOCK = "░"


def node_colours(status: MeshStatus) -> dict[str, str]:
    """A colour per node: stages in plan order first, then the others; the palette cycles."""
    order: list[str] = []
    if status.plan is not None:
        order.extend(stage.node_id for stage in status.plan.stages)
    order.extend(node.node_id for node in status.nodes)
    colours: dict[str, str] = {}
    for node_id in order:
        if node_id not in colours:
            colours[node_id] = NODE_COLOURS[len(colours) % len(NODE_COLOURS)]
    return colours


def cell_owners(owners: Sequence[str | None], width: int) -> list[str | None]:
    """Which node each of ``width`` bar cells shows; cell i stands for layer ``i * n // width``."""
    n = len(owners)
    if n == 0 or width <= 0:
        return []
    return [owners[i * n // width] for i in range(width)]


def axis_line(status: MeshStatus, width: int) -> Text:
    """Layer numbers under the bar: 0, every stage's first layer, and the layer count."""
    n = status.num_layers or 0
    line = [" "] * width
    marks = sorted({0, n} | {stage.start_layer for stage in (status.plan.stages if status.plan else ())})
    for layer in marks:
        label = str(layer)
        at = width - len(label) if layer >= n else layer * width // n
        at = max(0, min(at, width - len(label)))
        if all(c == " " for c in line[max(0, at - 1): at + len(label) + 1]):
            line[at: at + len(label)] = list(label)
    return Text("".join(line), style="dim")


class LayerMap(Widget):
    """Shows ``status``: who holds which layer, under the plan (or the nodes' spans)."""

    DEFAULT_CSS = """
    LayerMap {
        height: auto;
    }
    """

    status: reactive[MeshStatus | None] = reactive(None, layout=True)

    @property
    def owners(self) -> tuple[str | None, ...]:
        """For each layer, the id of the node holding it (what the bar draws)."""
        return self.status.layer_owners() if self.status is not None else ()

    def render(self) -> Text:
        status = self.status
        width = self.content_size.width
        if status is None:
            return Text("waiting for the daemon…", style="dim")
        if not status.num_layers:
            return Text("no model loaded yet", style="dim")
        colours = node_colours(status)
        owners = self.owners
        bar = Text()
        for owner in cell_owners(owners, width):
            if owner is None:
                bar.append(EMPTY_BLOCK, style=UNASSIGNED_COLOUR)
            else:
                bar.append(FULL_BLOCK, style=PRIVATE_COLOUR if owner == PRIVATE
                           else colours.get(owner, UNASSIGNED_COLOUR))
        legend = Text()
        for node_id, start, end in _runs(owners):
            if legend:
                legend.append("  ")
            if node_id is None:
                legend.append(EMPTY_BLOCK, style=UNASSIGNED_COLOUR)
                legend.append(f" nobody {format_span((start, end))}", style="dim")
            elif node_id == PRIVATE:
                legend.append(FULL_BLOCK, style=PRIVATE_COLOUR)
                legend.append(f" each entry node {format_span((start, end))}", style="dim")
            else:
                legend.append(FULL_BLOCK, style=colours.get(node_id, UNASSIGNED_COLOUR))
                legend.append(f" {status.node_name(node_id)} {format_span((start, end))}")
        return Text("\n").join([bar, axis_line(status, width), legend])


def _runs(owners: Sequence[str | None]) -> list[tuple[str | None, int, int]]:
    """Consecutive layers with one owner, as (owner, start_layer, end_layer)."""
    runs: list[tuple[str | None, int, int]] = []
    for layer, owner in enumerate(owners):
        if runs and runs[-1][0] == owner:
            runs[-1] = (owner, runs[-1][1], layer + 1)
        else:
            runs.append((owner, layer, layer + 1))
    return runs
