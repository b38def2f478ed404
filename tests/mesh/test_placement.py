"""Placement by measured links and a latency target, in a real mesh (docs/placement.md).

Three daemons of a tiny model whose budgets each hold 4 of its 6 layers (two nodes are
needed, any two can do); the third runs with ``--debug-link-delay-ms 300``, as a device on
very slow Wi-Fi. Under a target that a trip through it cannot meet (every hop to or from it
costs about 150 ms more, a trip through it 300 ms), the coordinator plans around it once the
links are measured; the answer is still exactly one node's.

Nothing here depends on how fast this machine is: a plan that misses the target loses to one
that misses it by less, and any plan through the slow node predicts at least DELAY_MS more
per trip than the plan of the two fast nodes predicts in all (before anyone asked, the slow
node counts as a possible entry: a third of DELAY_MS), so however slow a loaded machine makes
the fast nodes' hops and their measured compute (a few ms on an idle one), the order of the
plans stays the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.mesh.conftest import chat, token_ids, unique_mesh_name
from tests.tinymodel import PROMPTS, chat_ids, reference_greedy
from tests.waiting import wait_until
from tui.launcher import LocalMesh

DELAY_MS = 300
"""Below the heartbeat timeout (1 s), which it must be; far above anything load adds."""
TARGET_MS = 200
"""Above what the plan of the two fast nodes predicts (a few ms a trip, about DELAY_MS / 3
averaged with the slow node as a possible entry), below what any plan through the slow node
predicts (more than DELAY_MS)."""
TOKENS = 12


def budget_for_four_layers(model: Path) -> list[str]:
    from meshllm.model.cache import prepare
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve

    shape = model_shape(load_config(prepare(resolve(model))))
    return ["--mem-budget", str(shape.embed_head_bytes + 4 * shape.layer_bytes), "--fallback-model", "none"]


def test_under_a_latency_target_the_plan_routes_around_the_node_with_slow_links(tiny_llama: Path) -> None:
    mesh = LocalMesh(3, model=str(tiny_llama), threads=1,
                     extra_args=["--mesh-name", unique_mesh_name(), "--target-ms-per-token", str(TARGET_MS),
                                 *budget_for_four_layers(tiny_llama)],
                     per_node_args={2: ["--debug-link-delay-ms", str(DELAY_MS)]})
    mesh.start()
    try:
        mesh.wait_ready(180)
        ids = [mesh.status(i)["self_id"] for i in range(3)]

        def slow_link(index: int) -> dict[str, Any] | None:
            """What node ``index`` measured on its link to the slow node, once it did."""
            rows = {node["id"]: node for node in mesh.status(index)["nodes"]}
            return rows[ids[2]]["link"] if ids[2] in rows else None

        # the slow node's links show its delay, as its peers measure them (a delayed echo
        # cannot come back sooner)
        for i in (0, 1):
            link = wait_until(lambda i=i: slow_link(i), 60, f"node{i + 1} measured its link to node3")
            assert link["rtt_ms"] >= DELAY_MS

        def around_the_slow_node() -> dict[str, Any] | None:
            plan = mesh.agreed_plan()
            return plan if plan is not None and {s["node_id"] for s in plan["stages"]} == set(ids[:2]) else None

        wait_until(around_the_slow_node, 120, "an agreed plan on the two fast nodes only",
                   context=lambda: f"plan {mesh.agreed_plan()}\n{mesh.logs(0)[-3000:]}")
        # node1 learns the coordinator's target from its reports, which may come after the plan
        wait_until(lambda: (mesh.status(0)["latency"] or {}).get("target_ms_per_token") == TARGET_MS, 60,
                   "the coordinator's target in node1's status")

        prompt = list(PROMPTS[0])
        answer = chat(mesh.nodes[0].url, prompt, max_tokens=TOKENS)
        assert token_ids(answer) == reference_greedy(tiny_llama, chat_ids(tiny_llama, prompt), TOKENS)

        # what the answer measured shows beside the prediction, on the node asked
        latency = wait_until(lambda: (lat := mesh.status(0)["latency"])["measured_ms_per_token"] and lat, 60,
                             "the measured ms per token in status")
        assert latency["entry_ids"] == [ids[0]] and latency["predicted_ms_per_token"] is not None
    finally:
        mesh.stop()
