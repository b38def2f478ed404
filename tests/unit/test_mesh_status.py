"""The status role (meshllm.mesh.status): the mesh's part of GET /v1/status (docs/api.md) as
every node shows it, on the simulator."""

from __future__ import annotations

from meshllm.mesh import MeshSettings
from tests.unit.meshsim import (
    EMBED_HEAD_BYTES, LAYER_BYTES, PROMPT, Net, placed, short_of_memory, slow_links, three_nodes,
)


def test_status_of_a_settled_mesh() -> None:
    net = three_nodes()
    core = net.nodes["b"].core
    view = core.status_view(lambda peer: 1.5)
    plan = core.book.active
    assert plan is not None
    assert view["term"] == core.election.term and view["coordinator_id"] == core.coordinator_id
    assert view["plan"] == {"term": plan.key[0], "epoch": plan.key[1], "state": "active", "codec": "f32",
                            "stages": [{"node_id": s.node_id, "start_layer": s.start_layer, "end_layer": s.end_layer}
                                       for s in plan.stages]}
    assert view["placement_error"] is None and view["codec"] == "f32"
    assert view["stats"]["decode_steps"] == 0  # type: ignore[index]
    nodes = view["nodes"]
    assert [n["id"] for n in nodes] == ["b", "a", "c"]  # type: ignore[index,union-attr]  # this node first
    for row in nodes:  # type: ignore[union-attr]
        nid = row["id"]  # type: ignore[index]
        start, end = plan.span_of(nid)  # type: ignore[arg-type]
        assert row["is_self"] == (nid == "b") and row["state"] == "ready"  # type: ignore[index]
        assert row["role"] == ("coordinator" if nid == core.coordinator_id else "member")  # type: ignore[index]
        assert row["span"] == [start, end]  # type: ignore[index]
        assert row["weight_bytes"] == (end - start) * LAYER_BYTES + EMBED_HEAD_BYTES  # type: ignore[index]
        assert row["rtt_ms"] == (None if nid == "b" else 1.5)  # type: ignore[index]
    # every node shows the same plan and election
    assert len({(str(n.core.status_view()["plan"]), n.core.status_view()["coordinator_id"])
                for n in net.nodes.values()}) == 1


def test_status_shows_a_pending_plan_and_the_stages_still_loading() -> None:
    settings = MeshSettings(election_timeout_s=0.2, plan_wait_s=10.0)
    net = Net()
    net.add("a", settings=settings)
    net.add("b", settings=settings).frozen = True  # hangs: never loads its layers
    net.connect_all()
    net.run_until(lambda: net.nodes["a"].core.book.pending is not None
                  and "b" in net.nodes["a"].core.book.pending.node_ids)
    view = net.nodes["a"].core.status_view()
    assert view["plan"]["state"] == "pending" and view["latency"] is None  # type: ignore[index]
    rows = {n["id"]: n for n in view["nodes"]}  # type: ignore[union-attr,index]
    assert rows["b"]["state"] == "loading" and rows["b"]["span"] is not None  # type: ignore[index]


def test_status_shows_why_the_mesh_cannot_hold_the_model() -> None:
    net = short_of_memory()
    for node in net.nodes.values():
        view = node.core.status_view()
        assert view["plan"] is None and "bytes" in view["placement_error"]  # type: ignore[operator]


def test_status_shows_the_links_the_prediction_and_what_the_entry_node_measured() -> None:
    net = placed(target_ms_per_token=15.0)
    net.ask("b", PROMPT, 60)
    net.run_measuring(2.0, slow_links("a"))
    view = net.nodes["b"].core.status_view()
    plan, nodes = view["latency"], {n["id"]: n for n in view["nodes"]}  # type: ignore[union-attr,index]
    assert nodes["b"]["link"] is None and nodes["c"]["link"]["rtt_ms"] == 1.0  # type: ignore[index]
    assert nodes["a"]["link"]["rtt_ms"] == 31.0 and nodes["a"]["link"]["small_mb_s"] == 20.0  # type: ignore[index]
    assert nodes["a"]["link"]["decode_hop_ms"] > nodes["c"]["link"]["decode_hop_ms"] + 10  # type: ignore[index]
    measured, predicted = plan["measured_ms_per_token"], plan["predicted_ms_per_token"]  # type: ignore[index]
    assert measured is not None and nodes["b"]["measured_ms_per_token"] == measured
    assert plan["entry_ids"] == ["b"] and plan["entry_mean"] is False  # type: ignore[index]
    # the sim's token: 6 ms of compute + two 1 ms hops; the model adds its per-hop overhead
    assert abs(measured - 8.0) < 0.5 and predicted == nodes["b"]["predicted_ms_per_token"]
    # the other nodes see what b measured through its reports
    assert net.nodes["c"].core.status_view()["latency"]["measured_ms_per_token"] == measured  # type: ignore[index]
