"""The mesh core itself (meshllm.mesh.core): its inputs reach the right role, what a peer may
send is checked first, nothing a peer sends breaks a node, and the mesh logic stays sans-IO
and split by role. Each role has its scenarios in its own file: test_mesh_transition.py,
test_mesh_coordinator.py, test_mesh_stage.py, test_mesh_entry.py and test_mesh_status.py."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm import wire
from meshllm.mesh import LoadSpan
from tests.fixtures.wire_strategies import mesh_messages, messages
from tests.unit.meshsim import HIDDEN, LAYERS, OTHER_PROMPT, PROMPT, reference, three_nodes

MESH = Path(__file__).resolve().parents[2] / "meshllm" / "mesh"
ROLES = ("transition", "coordinator", "stage", "entry", "status")


def test_the_mesh_logic_needs_no_torch() -> None:
    import subprocess  # other tests may have loaded torch here: check in a fresh interpreter

    code = "import sys, meshllm.mesh; assert 'torch' not in sys.modules and 'asyncio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_mesh_modules_are_small_and_each_names_its_concept() -> None:
    for path in sorted(MESH.glob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        assert len(source.splitlines()) <= 600, path.name
        assert ast.get_docstring(tree), f"{path.name} has no docstring"
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                methods = [b for b in node.body if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))]
                assert len(methods) <= 30, f"{path.name}: {node.name} has {len(methods)} methods"


def test_the_roles_reach_the_core_only_through_the_port() -> None:
    for role in ROLES:
        tree = ast.parse((MESH / f"{role}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "meshllm.mesh.core" not in imported, role


def test_messages_about_another_node_are_refused() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    assert coordinator is not None
    liar, other = [n for n in "abc" if n != coordinator]
    core = net.nodes[coordinator].core
    term, epoch = core.book.active.key  # type: ignore[union-attr]
    core.receive(liar, wire.NodeReport(other, term, 10**6, 1.0, 0, 0, "leaving"), net.now)
    core.receive(liar, wire.StageReady(term, epoch, other), net.now)
    core.receive(liar, wire.HandoverDone(term, epoch, other), net.now)
    core.receive(liar, wire.LinkReport(other, term, epoch, 0.0, 0.0, 0.0, 0.0, 0, True, 0.0, 0.0, ()), net.now)
    assert core.sends() == [] and core.jobs() == []
    assert other not in core.coordinator.leaving and other not in core.coordinator.measurements.reports


def test_plans_and_their_outcomes_come_only_from_the_coordinator_of_their_term() -> None:
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    follower, other = [n for n in "abc" if n != coordinator]
    core = net.nodes[follower].core
    term, epoch = core.book.active.key  # type: ignore[union-attr]
    core.receive(other, wire.PlanRefused(term, "no"), net.now)
    core.receive(other, wire.Plan(term, epoch + 1, (wire.Stage(other, 0, LAYERS),), "f32"), net.now)
    core.receive(coordinator, wire.PlanRefused(term - 1, "an old term"), net.now)  # type: ignore[arg-type]
    assert core.placement_error is None and not [j for j in core.jobs() if isinstance(j, LoadSpan)]
    assert core.book.active is not None and core.book.active.key == (term, epoch)


def test_messages_for_another_core_or_the_links_are_ignored() -> None:
    net = three_nodes()
    core = net.nodes["a"].core
    for msg in (wire.Heartbeat("b", 1, 1.0), wire.Bye("b", "leaving")):
        core.receive("b", msg, net.now)
    assert core.sends() == [] and core.jobs() == [] and core.events() == []


@settings(max_examples=150, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.sampled_from("abc"))
def test_no_message_from_a_peer_breaks_a_node(batch: list[wire.Message], sender_of: str) -> None:
    """Anything a peer may send (every message type, any valid field values) is handled or
    refused without an exception, and the mesh still answers exactly afterwards."""
    net = three_nodes()
    target = next(n for n in "abc" if n != sender_of)
    for msg in batch:
        net.nodes[target].core.receive(sender_of, msg, net.now)  # must not raise
    net._collect(target)
    net.run_for(2.0)
    net.settle()
    assert net.answer("a", PROMPT, 6).tokens == reference(PROMPT, 6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_no_message_from_a_member_in_its_role_breaks_a_node(data: st.DataObject) -> None:
    """As above, with what a member of this mesh could send (mostly about itself, with its
    node ids, the session of an answer in progress, the plan key in force, hidden states of
    the model's width), from members to members, so that the handlers behind the first checks
    run: none raises, nor do the timers and jobs after them. What the coordinator sends in its
    role steers the mesh by right; a batch from the other members leaves it answering exactly."""
    net = three_nodes()
    coordinator = net.nodes["a"].core.coordinator_id
    answer = net.ask("a", PROMPT, 12)
    net.run_until(lambda: len(answer.tokens) >= 3)
    plan = net.nodes["a"].core.book.active
    assert plan is not None
    sessions = list(net.nodes["a"].answers)

    def sent(sender: str) -> st.SearchStrategy:
        return st.tuples(st.just(sender), st.sampled_from([n for n in "abc" if n != sender]),
                         mesh_messages(sender, list("abc"), sessions, [plan.key], LAYERS, HIDDEN))

    batch = data.draw(st.lists(st.sampled_from("abc").flatmap(sent), min_size=1, max_size=8))
    for sender, target, msg in batch:
        net.nodes[target].core.receive(sender, msg, net.now)  # must not raise
        net._collect(target)
    net.run_for(6.0)  # what the handlers started: jobs, replies, timers (a coordinator's announcement too)
    if all(sender != coordinator for sender, _, _ in batch):
        net.settle()
        assert net.answer("b", OTHER_PROMPT, 6).tokens == reference(OTHER_PROMPT, 6)
