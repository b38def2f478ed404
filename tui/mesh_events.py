"""The event log's lines: the daemon's own log events, plus lines read off status changes.

A daemon may not say "desktop joined" or "re-plan" itself; the UI still shows it by comparing
consecutive status snapshots (``diff_status``, pure). ``EventFeed`` merges both sources: once
the daemon has sent a line of some kind (join, leave, election, replan) it is trusted for that
kind, and lines of that kind derived from snapshots are no longer shown, so nothing is said
twice after the first time.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tui.mesh_status import MeshStatus, NodeInfo, StatusFormatError

log = logging.getLogger(__name__)

LogKind = Literal["join", "leave", "election", "replan", "error", "info", "fallback"]
LOG_KINDS: tuple[LogKind, ...] = ("join", "leave", "election", "replan", "error", "info", "fallback")
DERIVABLE_KINDS: frozenset[str] = frozenset({"join", "leave", "election", "replan"})
SEEN_LOGS_KEPT = 500


@dataclass(frozen=True)
class LogLine:
    """One line of the event log."""

    ts: float
    """When it happened, in seconds since the epoch."""
    kind: LogKind
    message: str
    derived: bool = False
    """Read off two status snapshots rather than sent by the daemon."""


def parse_log(event: Mapping[str, Any], *, now: float) -> LogLine:
    """A ``{"type": "log", ...}`` event as a line; unknown kinds read as "info"."""
    kind = event.get("kind")
    ts = event.get("ts")
    message = event.get("message")
    return LogLine(
        ts=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else now,
        kind=kind if kind in LOG_KINDS else "info",
        message=str(message) if message is not None else "",
    )


def format_span(span: tuple[int, int] | None) -> str:
    return "—" if span is None else f"[{span[0]}, {span[1]})"


def _plan_summary(status: MeshStatus) -> str:
    assert status.plan is not None
    parts = [f"{status.node_name(stage.node_id)} {format_span((stage.start_layer, stage.end_layer))}"
             for stage in status.plan.stages]
    return ", ".join(parts) if parts else "no stages"


def diff_status(old: MeshStatus | None, new: MeshStatus, now: float) -> list[LogLine]:
    """Lines for what changed from ``old`` to ``new``: joins, leaves, elections, re-plans.

    Nothing for the first snapshot (``old`` is None): the mesh as it is is in the table.
    """
    if old is None:
        return []
    lines: list[LogLine] = []

    def add(kind: LogKind, message: str) -> None:
        lines.append(LogLine(ts=now, kind=kind, message=message, derived=True))

    old_nodes = {node.node_id: node for node in old.nodes}
    new_nodes = {node.node_id: node for node in new.nodes}
    for node_id, node in new_nodes.items():
        before = old_nodes.get(node_id)
        if before is None:
            add("join", f"{node.name} joined ({_describe(node)})")
        elif node.state != before.state:
            if node.state == "lost":
                add("leave", f"{node.name} was lost")
            elif before.state == "lost":
                add("join", f"{node.name} is back ({node.state})")
            else:
                add("info", f"{node.name}: {before.state} → {node.state}")
    for node_id, node in old_nodes.items():
        if node_id not in new_nodes and node.state != "lost":
            add("leave", f"{node.name} left")
    if new.coordinator_id != old.coordinator_id or new.term != old.term:
        add("election", f"term {new.term}: {new.node_name(new.coordinator_id)} is the coordinator")
    if new.plan is not None and (old.plan is None or new.plan.stages != old.plan.stages
                                 or new.plan.term != old.plan.term):
        add("replan", f"new plan (term {new.plan.term}, {new.plan.state}): {_plan_summary(new)}")
    elif new.plan is not None and old.plan is not None and new.plan.state != old.plan.state:
        add("replan", f"plan of term {new.plan.term} is {new.plan.state}")
    elif new.plan is None and old.plan is not None:
        add("replan", "no plan for now (nodes starting, or not enough memory in the mesh)")
    return lines


def _describe(node: NodeInfo) -> str:
    parts = [node.address] if node.address else []
    if node.mem_budget_bytes is not None:
        parts.append(f"{node.mem_budget_bytes / 2**30:.1f} GiB")
    return ", ".join(parts) or node.state


class EventFeed:
    """Turns the events of ``GET /v1/events`` into status snapshots and log lines."""

    def __init__(self) -> None:
        self.status: MeshStatus | None = None
        """The last snapshot read; kept across reconnects so changes while away are shown."""
        self._daemon_kinds: set[str] = set()
        self._seen: set[tuple[float, str, str]] = set()
        self._seen_order: deque[tuple[float, str, str]] = deque()

    def on_status(self, data: object, now: float) -> tuple[MeshStatus | None, list[LogLine]]:
        """Read a snapshot: the new status (None when it is malformed) and the lines it implies."""
        try:
            status = MeshStatus.from_json(data)
        except StatusFormatError as error:
            log.warning("malformed status snapshot: %s", error)
            return None, [LogLine(ts=now, kind="error", message=f"the daemon sent a malformed status: {error}")]
        lines = [line for line in diff_status(self.status, status, now)
                 if line.kind not in self._daemon_kinds]
        self.status = status
        return status, lines

    def on_log(self, event: Mapping[str, Any], now: float) -> LogLine | None:
        """The line for a daemon log event; None when it was shown already.

        A daemon replays its recent log to every new subscriber, so after a reconnect the
        lines already shown come again.
        """
        line = parse_log(event, now=now)
        if line.kind in DERIVABLE_KINDS:
            self._daemon_kinds.add(line.kind)
        key = (line.ts, line.kind, line.message)
        if key in self._seen:
            return None
        self._seen.add(key)
        self._seen_order.append(key)
        if len(self._seen_order) > SEEN_LOGS_KEPT:
            self._seen.discard(self._seen_order.popleft())
        return line
