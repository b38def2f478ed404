"""Status snapshots read into the mesh model, and the log lines read off their changes."""

from __future__ import annotations

import copy

import pytest

from tui.demo import node, status
from tui.mesh_events import EventFeed, diff_status, parse_log
from tui.mesh_status import MeshStatus, StatusFormatError

NOW = 1_700_000_000.0


def two_nodes(term: int = 1) -> dict:
    return status([
        node("n-laptop", "laptop", (0, 12), is_self=True, coordinator=True),
        node("n-desktop", "desktop", (12, 30)),
    ], term=term)


def three_nodes(term: int = 2) -> dict:
    return status([
        node("n-laptop", "laptop", (0, 10), is_self=True, coordinator=True),
        node("n-desktop", "desktop", (10, 24)),
        node("n-phone", "phone", (24, 30)),
    ], term=term)


def test_a_snapshot_reads_as_docs_api_md_describes_it() -> None:
    mesh = MeshStatus.from_json(two_nodes())
    assert mesh.model_name == "SmolLM2-135M-Instruct" and mesh.num_layers == 30
    assert mesh.codec == "f16" and mesh.term == 1
    laptop, desktop = mesh.nodes
    assert laptop.is_self and laptop.is_coordinator and laptop.span == (0, 12) and laptop.rtt_ms is None
    assert not desktop.is_self and not desktop.is_coordinator and desktop.rtt_ms == 0.8
    assert desktop.mem_budget_bytes == 8 * 2**30
    assert mesh.plan is not None and [s.node_id for s in mesh.plan.stages] == ["n-laptop", "n-desktop"]


def test_layer_owners_follow_the_half_open_spans() -> None:
    owners = MeshStatus.from_json(two_nodes()).layer_owners()
    assert len(owners) == 30
    assert owners[:12] == ("n-laptop",) * 12 and owners[12:] == ("n-desktop",) * 18


def test_layers_without_a_node_have_no_owner() -> None:
    snapshot = status([node("n-laptop", "laptop", (0, 20), is_self=True, coordinator=True)])
    owners = MeshStatus.from_json(snapshot).layer_owners()
    assert owners[19] == "n-laptop" and owners[20:] == (None,) * 10


def test_the_single_node_daemon_snapshot_reads() -> None:
    """The shape daemon/api/status.py publishes today, before the model is loaded and after."""
    loading = {"self_id": "n-1", "model": None, "codec": "f32", "term": 0, "coordinator_id": "n-1",
               "plan": None, "nodes": [{"id": "n-1", "name": "box", "is_self": True, "role": "coordinator",
                                        "state": "loading", "mem_budget_bytes": 10**9, "ms_per_layer": None,
                                        "span": None, "rtt_ms": None, "address": "127.0.0.1:8470"}],
               "incompatible": [], "sessions": {"running": 0, "queued": 0, "max": 1, "queue_max": 4}}
    mesh = MeshStatus.from_json(loading)
    assert mesh.num_layers is None and mesh.layer_owners() == () and mesh.nodes[0].state == "loading"
    assert (mesh.sessions.running, mesh.sessions.queued, mesh.sessions.max_sessions) == (0, 0, 1)


@pytest.mark.parametrize("breakage", [
    lambda s: s.pop("self_id"),
    lambda s: s.update(nodes="laptop"),
    lambda s: s["nodes"][0].update(span=[1]),
    lambda s: s["nodes"][0].update(mem_budget_bytes="lots"),
    lambda s: s["plan"]["stages"][0].pop("end_layer"),
])
def test_a_malformed_snapshot_is_refused_with_a_reason(breakage) -> None:  # type: ignore[no-untyped-def]
    snapshot = two_nodes()
    breakage(snapshot)
    with pytest.raises(StatusFormatError):
        MeshStatus.from_json(snapshot)


def test_the_first_snapshot_says_nothing() -> None:
    assert diff_status(None, MeshStatus.from_json(two_nodes()), NOW) == []


def test_a_join_and_a_replan() -> None:
    lines = diff_status(MeshStatus.from_json(two_nodes()), MeshStatus.from_json(three_nodes(term=1)), NOW)
    kinds = {line.kind: line.message for line in lines}
    assert "phone joined" in kinds["join"]
    assert "desktop [10, 24)" in kinds["replan"] and "phone [24, 30)" in kinds["replan"]
    assert "election" not in kinds
    assert all(line.derived and line.ts == NOW for line in lines)


def test_a_leave_and_an_election() -> None:
    before = MeshStatus.from_json(three_nodes(term=2))
    after = MeshStatus.from_json(status([
        node("n-desktop", "desktop", (0, 20), coordinator=True),
        node("n-phone", "phone", (20, 30)),
    ], term=3))
    lines = diff_status(before, after, NOW)
    kinds = {line.kind: line.message for line in lines}
    assert kinds["leave"] == "laptop left"
    assert kinds["election"] == "term 3: desktop is the coordinator"
    assert "term 3" in kinds["replan"]


def test_a_lost_node_and_a_plan_becoming_active() -> None:
    pending = three_nodes()
    pending["plan"]["state"] = "pending"
    active = copy.deepcopy(pending)
    active["plan"]["state"] = "active"
    active["nodes"][2]["state"] = "lost"
    lines = diff_status(MeshStatus.from_json(pending), MeshStatus.from_json(active), NOW)
    assert [(line.kind, line.message) for line in lines] == [
        ("leave", "phone was lost"), ("replan", "plan of term 2 is active"),
    ]


def test_daemon_log_events_read_as_lines() -> None:
    line = parse_log({"type": "log", "ts": 12.5, "kind": "election", "message": "desktop won"}, now=NOW)
    assert (line.ts, line.kind, line.message, line.derived) == (12.5, "election", "desktop won", False)
    odd = parse_log({"type": "log", "kind": "gossip", "message": 7}, now=NOW)
    assert (odd.ts, odd.kind, odd.message) == (NOW, "info", "7")


def test_once_the_daemon_reports_a_kind_derived_lines_of_that_kind_stop() -> None:
    feed = EventFeed()
    feed.on_status(two_nodes(), NOW)
    _, lines = feed.on_status(three_nodes(term=1), NOW)
    assert {line.kind for line in lines} == {"join", "replan"}

    feed.on_log({"type": "log", "ts": NOW, "kind": "join", "message": "phone joined"}, NOW)
    _, lines = feed.on_status(two_nodes(), NOW)  # phone leaves: leave and replan still derived
    assert {line.kind for line in lines} == {"leave", "replan"}
    _, lines = feed.on_status(three_nodes(term=1), NOW)  # joins are now the daemon's to report
    assert {line.kind for line in lines} == {"replan"}


def test_a_malformed_snapshot_becomes_an_error_line_and_keeps_the_last_status() -> None:
    feed = EventFeed()
    good, _ = feed.on_status(two_nodes(), NOW)
    bad, lines = feed.on_status({"nodes": 3}, NOW)
    assert bad is None and feed.status == good
    assert [line.kind for line in lines] == ["error"] and "malformed" in lines[0].message


def test_log_lines_replayed_after_a_reconnect_are_shown_once() -> None:
    feed = EventFeed()
    event = {"type": "log", "ts": 5.0, "kind": "info", "message": "model ready"}
    assert feed.on_log(event, NOW) is not None
    assert feed.on_log(dict(event), NOW) is None
    assert feed.on_log({**event, "ts": 6.0}, NOW) is not None  # the same words later: a new line


def test_the_private_layers_belong_to_each_entry_node_in_the_layer_map() -> None:
    from tui.mesh_status import PRIVATE
    from tui.widgets.layer_map import LayerMap

    snapshot = status([
        node("n-laptop", "laptop", (1, 12), is_self=True, coordinator=True),
        node("n-desktop", "desktop", (12, 29)),
    ])
    snapshot["model"]["private_layers"] = 1
    mesh = MeshStatus.from_json(snapshot)
    owners = mesh.layer_owners()
    assert owners[0] == owners[29] == PRIVATE
    assert owners[1:12] == ("n-laptop",) * 11 and owners[12:29] == ("n-desktop",) * 17
    layer_map = LayerMap()
    layer_map.status = mesh
    assert "each entry node [0, 1)" in layer_map.render().plain and "nobody" not in layer_map.render().plain
