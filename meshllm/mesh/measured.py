"""What the mesh measured, and the planner's inputs made from it (docs/placement.md). Pure.

- :class:`TokenClock`: the times between two tokens of the answers entered on this node,
  on the core's clock (the ``now`` of its inputs), per plan;
- :class:`Measurements`: every member's latest :class:`~meshllm.wire.LinkReport` (this node's
  own included), and from them the hop tables, capacities and entry nodes the planner takes.

The hop model is :mod:`meshllm.placement.linkstats`': a decode hop carries one position's hidden state
(in the plan's codec) plus the message around it; a prefill hop PREFILL_POSITIONS of them.
Each hop also pays HOP_OVERHEAD_MS of work outside the link (encode, decode, hand-over to the
worker thread, the event loops), calibrated on the 3-node loopback mesh of docs/placement.md.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshllm import wire
from meshllm.placement.linkstats import LinkStats, hop_ms, hop_table
from meshllm.placement.planner import PREFILL_POSITIONS, NodeCapacity, Plan, predict_plan
from meshllm.wire.tensor import raw_size_bytes

HOP_OVERHEAD_MS = 1.5
"""Per hop, besides the link: codec, message handling and the hand-over to the worker."""
MESSAGE_BYTES = 70
"""A Forward's bytes besides the tensor (ids, route, CBOR)."""
TOKEN_WINDOW = 32
"""Measured ms per token is the median of this many recent times between two tokens."""
MIN_TOKEN_GAPS = 3
"""...and is not given from fewer."""
ENTRY_RECENT_S = 600.0
"""A node that entered an answer this recently counts as an entry node for the planner."""
HOP_CHANGE_FACTOR = 1.5
HOP_CHANGE_MS = 2.0
"""A hop whose cost moved by this factor and this many ms since the last plan is news to the
coordinator (it re-plans, at most once per ``BalanceSettings.min_interval_s``)."""
ENTRY_WORK_WINDOW = 16
"""A node's entry work per token (embed, head, sample) is the median of this many recent tokens."""


def hidden_bytes(codec: str, hidden_size: int, positions: int) -> int:
    """One message of ``positions`` hidden states in ``codec``, as it crosses a link."""
    return raw_size_bytes(codec, (positions, hidden_size)) + MESSAGE_BYTES


class TokenClock:
    """Times between two tokens of the answers entered here, under the plan in force."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._gaps: deque[float] = deque(maxlen=TOKEN_WINDOW)
        self.count = 0
        """Gaps measured under the current plan (all of them, not only the window)."""
        self.entered_at: float | None = None

    def opened(self, now: float) -> None:
        self.entered_at = now

    def token(self, session_id: str, now: float) -> None:
        last = self._last.get(session_id)
        if last is not None and now >= last:
            self._gaps.append(now - last)
            self.count += 1
        self._last[session_id] = now

    def pause(self, session_id: str) -> None:
        """The answer paused (a re-plan) or ended: its next token starts a new gap."""
        self._last.pop(session_id, None)

    def new_plan(self) -> None:
        self._gaps.clear()
        self._last.clear()
        self.count = 0

    @property
    def ms_per_token(self) -> float | None:
        if len(self._gaps) < MIN_TOKEN_GAPS:
            return None
        return statistics.median(self._gaps) * 1000.0

    def is_entry(self, now: float) -> bool:
        return self.entered_at is not None and now - self.entered_at <= ENTRY_RECENT_S


def figures_of(peer_id: str, stats: LinkStats) -> wire.LinkFigures | None:
    """A link's figures for the wire (None before its first round trip)."""
    if stats.rtt_ms is None:
        return None
    return wire.LinkFigures(peer_id, min(stats.rtt_ms, wire.messages.MAX_REPORT_MS),
                            min(stats.small_mb_s or 0.0, wire.messages.MAX_RATE_MB_S),
                            min(stats.large_mb_s or 0.0, wire.messages.MAX_RATE_MB_S))


MIN_RATE_MB_S = 0.001
"""Reported rates count as at least this (1 KB/s), so that every hop cost stays finite."""


def stats_of(figures: wire.LinkFigures) -> LinkStats:
    """A peer's reported figures as the planner's LinkStats (0: not measured)."""
    return LinkStats(rtt_ms=figures.rtt_ms,
                     small_mb_s=max(figures.small_mb_s, MIN_RATE_MB_S) if figures.small_mb_s else None,
                     large_mb_s=max(figures.large_mb_s, MIN_RATE_MB_S) if figures.large_mb_s else None)


@dataclass(frozen=True)
class Planning:
    """What the planner is given besides the nodes (see :func:`meshllm.placement.planner.plan_layers`)."""

    hop_ms: Mapping[tuple[str, str], float] | None = None
    default_hop_ms: float = 1.0
    prefill_hop_ms: Mapping[tuple[str, str], float] | None = None
    default_prefill_hop_ms: float | None = None
    entry_ids: tuple[str, ...] | None = None
    entry_mean: bool = False
    """``entry_ids`` are every member, possible entries (nobody typed yet): their average counts."""
    target_ms_per_token: float | None = None
    target_ttft_ms: float | None = None

    @property
    def entries_in_use(self) -> tuple[str, ...]:
        """The entry nodes that typed lately (none: every member counts on average)."""
        return () if self.entry_mean or self.entry_ids is None else self.entry_ids

    @property
    def measured(self) -> bool:
        return bool(self.hop_ms)

    @property
    def has_targets(self) -> bool:
        return self.target_ms_per_token is not None or self.target_ttft_ms is not None

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``plan_layers``: none at all with no measurement and no
        target (so that such a mesh plans exactly as before measurements existed)."""
        out: dict[str, object] = {}
        if self.measured:
            out.update(hop_ms=self.hop_ms, default_hop_ms=self.default_hop_ms,
                       prefill_hop_ms=self.prefill_hop_ms, default_prefill_hop_ms=self.default_prefill_hop_ms)
        if self.has_targets:
            out.update(entry_ids=self.entry_ids, entry_mean=self.entry_mean,
                       target_ms_per_token=self.target_ms_per_token, target_ttft_ms=self.target_ttft_ms)
        return out

    def predict(self, stages: Sequence[wire.Stage], nodes: Sequence[NodeCapacity],
                entry_ids: Iterable[str] | None = None) -> tuple[float, float] | None:
        """``(ms per token, ms to first token)`` of ``stages`` with these figures (the worst
        of ``entry_ids``; default: this planning's entries, else the ring), or None when a
        stage's node or an entry is not among ``nodes``."""
        ids = {node.node_id for node in nodes}
        mean = self.entry_mean and entry_ids is None
        entries = tuple(entry_ids) if entry_ids is not None else self.entry_ids
        if mean and entries is not None:
            entries = tuple(e for e in entries if e in ids)
        if not stages or any(s.node_id not in ids for s in stages) or (
                entries is not None and (not entries or any(e not in ids for e in entries))):
            return None
        return predict_plan(stages, nodes, hop_ms=self.hop_ms, default_hop_ms=self.default_hop_ms,
                            prefill_hop_ms=self.prefill_hop_ms,
                            default_prefill_hop_ms=self.default_prefill_hop_ms, entry_ids=entries,
                            entry_mean=mean)


class Measurements:
    """Every member's latest LinkReport; this node's own is rebuilt at each measurement."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.reports: dict[str, wire.LinkReport] = {}
        self.own_links: dict[str, LinkStats] = {}
        """This node's own figures (fresher and finer than what it reports)."""

    def forget(self, node_id: str) -> None:
        self.reports.pop(node_id, None)
        self.own_links.pop(node_id, None)

    def link_stats(self, members: Iterable[str]) -> dict[tuple[str, str], LinkStats]:
        """``{(a, b): what a measured on its link to b}`` among ``members``."""
        present = set(members)
        out: dict[tuple[str, str], LinkStats] = {}
        for node_id, report in self.reports.items():
            if node_id == self.node_id or node_id not in present:
                continue
            for figures in report.links:
                if figures.peer_id in present:
                    out[(node_id, figures.peer_id)] = stats_of(figures)
        if self.node_id in present:
            for peer, stats in self.own_links.items():
                if peer in present and stats.rtt_ms is not None:
                    out[(self.node_id, peer)] = stats
        return out

    def entries(self, members: Iterable[str]) -> tuple[str, ...]:
        """Members that entered answers lately (sorted)."""
        return tuple(sorted(n for n in members if n in self.reports and self.reports[n].entry))

    def capacity(self, node: NodeCapacity) -> NodeCapacity:
        """``node`` with the entry costs it reported."""
        report = self.reports.get(node.node_id)
        if report is None:
            return node
        return NodeCapacity(node.node_id, node.mem_budget_bytes, node.ms_per_layer, head_ms=report.head_ms,
                            prefill_ms_per_layer=report.prefill_ms_per_layer or node.prefill_ms_per_layer)

    def measured_speed(self, node: NodeCapacity, key: tuple[int, int]) -> NodeCapacity:
        """``node`` with the decode speed it measured under the plan ``key``, if it did."""
        report = self.reports.get(node.node_id)
        if report is None or (report.term, report.epoch) != key or report.ms_per_layer <= 0:
            return node
        return NodeCapacity(node.node_id, node.mem_budget_bytes, report.ms_per_layer, head_ms=node.head_ms,
                            prefill_ms_per_layer=node.prefill_ms_per_layer)

    def ms_per_token(self, node_id: str, key: tuple[int, int]) -> float | None:
        report = self.reports.get(node_id)
        if report is None or (report.term, report.epoch) != key or report.ms_per_token <= 0:
            return None
        return report.ms_per_token

    def targets(self, coordinator_id: str | None) -> tuple[float | None, float | None] | None:
        """The coordinator's targets as it reported them (None: no report from it yet)."""
        report = self.reports.get(coordinator_id) if coordinator_id is not None else None
        if report is None:
            return None
        return (report.target_ms_per_token or None, report.target_ttft_ms or None)


def planning(stats: Mapping[tuple[str, str], LinkStats], *, codec: str, hidden_size: int,
             members: Sequence[str], entry_ids: Sequence[str] = (), target_ms_per_token: float | None = None,
             target_ttft_ms: float | None = None) -> Planning:
    """The planner's hop tables from measured links (nothing measured: the planner's own
    defaults), the entry nodes and the targets. The entries are the members that entered
    answers lately, the worst of them counting; before anyone did, every member is a possible
    entry and their average counts. (Without a target the planner is not given entries: the
    objective alone decides, as it always did; see ``Planning.kwargs``.)"""
    entries = tuple(entry_ids) or tuple(members) or None
    mean = not entry_ids
    if not stats:
        return Planning(entry_ids=entries, entry_mean=mean, target_ms_per_token=target_ms_per_token,
                        target_ttft_ms=target_ttft_ms)
    decode_bytes = hidden_bytes(codec, hidden_size, 1)
    prefill_bytes = hidden_bytes(codec, hidden_size, PREFILL_POSITIONS)
    return Planning(
        hop_ms=hop_table(stats, decode_bytes, overhead_ms=HOP_OVERHEAD_MS),
        default_hop_ms=hop_ms(None, decode_bytes, overhead_ms=HOP_OVERHEAD_MS),
        prefill_hop_ms=hop_table(stats, prefill_bytes, overhead_ms=HOP_OVERHEAD_MS),
        default_prefill_hop_ms=hop_ms(None, prefill_bytes, overhead_ms=HOP_OVERHEAD_MS),
        entry_ids=entries, entry_mean=mean, target_ms_per_token=target_ms_per_token,
        target_ttft_ms=target_ttft_ms,
    )


def hops_moved(before: Mapping[tuple[str, str], float] | None,
               now: Mapping[tuple[str, str], float] | None) -> list[tuple[str, str]]:
    """The pairs measured now that were not before, or whose hop moved by HOP_CHANGE_FACTOR
    and HOP_CHANGE_MS since."""
    before = before or {}
    moved = []
    for pair, ms in (now or {}).items():
        old = before.get(pair)
        if old is None:
            moved.append(pair)
        elif abs(ms - old) >= HOP_CHANGE_MS and max(ms, old) >= HOP_CHANGE_FACTOR * max(min(ms, old), 1e-9):
            moved.append(pair)
    return moved


def miss_ms(value: float | None, target: float | None) -> float | None:
    """How far ``value`` is above ``target`` (0 when it meets it); None without both."""
    if value is None or target is None:
        return None
    return max(0.0, value - target)


def plan_summary(plan: Plan) -> str:
    """The predictions a plan was made with, for the event log."""
    parts = []
    if plan.predicted_ms_per_token is not None:
        parts.append(f"predicted {plan.predicted_ms_per_token:.1f} ms/token")
    if plan.predicted_ttft_ms is not None:
        parts.append(f"first token {plan.predicted_ttft_ms:.0f} ms")
    if plan.target_ms_per_token is not None or plan.target_ttft_ms is not None:
        parts.append("meets the targets" if plan.meets_targets else
                     "misses the targets by " + ", ".join(
                         f"{miss:.1f} ms{what}" for miss, what in ((plan.miss_ms_per_token, "/token"),
                                                                   (plan.miss_ttft_ms, " to first token"))
                         if miss > 0))
    return "; ".join(parts)
