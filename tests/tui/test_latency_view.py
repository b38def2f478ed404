"""The TUI's view of placement by measured links and a latency target: the mesh facts say the
predicted and measured ms per token against the target, the nodes table the links and each
node's figures as an entry node (docs/placement.md)."""

from __future__ import annotations

from tui.demo import node, status
from tui.mesh_status import MeshStatus
from tui.views.mesh import format_facts
from tui.widgets.nodes_table import node_cells

LATENCY = {"entry_ids": ["n-laptop"], "entry_mean": False, "predicted_ms_per_token": 35.14,
           "predicted_ttft_ms": 846.8, "measured_ms_per_token": 41.0, "target_ms_per_token": 38.0,
           "target_ttft_ms": None, "miss_ms_per_token": 0.0, "measured_miss_ms_per_token": 3.0,
           "miss_ttft_ms": None}


def snapshot(latency: dict[str, object] | None = LATENCY) -> dict[str, object]:
    laptop = {**node("n-laptop", "laptop", (0, 30), is_self=True, coordinator=True),
              "predicted_ms_per_token": 35.14, "measured_ms_per_token": 41.0}
    phone = {**node("n-phone", "phone", None, rtt_ms=33.0), "predicted_ms_per_token": 80.4,
             "link": {"rtt_ms": 31.6, "small_mb_s": 12.3, "large_mb_s": 100000.0, "decode_hop_ms": 17.5,
                      "prefill_hop_ms": 90.0}}
    return {**status([laptop, phone]), "latency": latency}


def test_the_facts_say_prediction_measurement_and_the_target_missed() -> None:
    parsed = MeshStatus.from_json(snapshot())
    assert parsed.latency is not None and parsed.latency.missed
    facts = format_facts(parsed).plain
    assert "ms/token predicted 35.1  measured 41.0  target 38  missed by 3.0 ms (measured)" in facts
    met = {**LATENCY, "measured_ms_per_token": 36.0, "measured_miss_ms_per_token": 0.0}
    assert "target 38  met" in format_facts(MeshStatus.from_json(snapshot(met))).plain
    assert "ms/token" not in format_facts(MeshStatus.from_json(snapshot(None))).plain


def test_the_table_shows_each_link_and_each_node_as_an_entry() -> None:
    parsed = MeshStatus.from_json(snapshot())
    laptop, phone = (parsed.node(n) for n in ("n-laptop", "n-phone"))
    assert laptop is not None and phone is not None
    cells = [str(cell) for cell in node_cells(laptop, "")]
    assert cells[-3:] == ["—", "—", "41.0 / 35.1"]
    cells = [str(cell) for cell in node_cells(phone, "")]
    assert cells[-3:] == ["31.6 ms", "12/>10k", "— / 80.4"]
