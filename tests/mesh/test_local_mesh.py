"""Real meshes: N `meshllm up --loopback` processes that find each other over mDNS, link
over WebRTC, elect a coordinator and answer exactly like one node: plain transformers
`generate` with f32 weights, one meshllm node in the same format otherwise."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshllm.model.sampling import SamplingParams
from tests.mesh.conftest import chat, token_ids, unique_mesh_name
from tests.tinymodel import PROMPTS, chat_ids, reference_greedy
from tests.waiting import wait_until
from tui.launcher import LocalMesh


@pytest.fixture(scope="module")
def default_mesh() -> Iterator[LocalMesh]:
    mesh = LocalMesh(3, extra_args=["--mesh-name", unique_mesh_name()])
    mesh.start()
    try:
        mesh.wait_ready(300)
        yield mesh
    finally:
        mesh.stop()


def test_three_nodes_form_one_mesh_with_one_coordinator(default_mesh: LocalMesh) -> None:
    statuses = [default_mesh.status(i) for i in range(3)]
    coordinators = {s["coordinator_id"] for s in statuses}
    assert len(coordinators) == 1
    ids = {s["self_id"] for s in statuses}
    assert coordinators <= ids
    plan = statuses[0]["plan"]
    assert plan["state"] == "active"
    stages = plan["stages"]
    # every entry node runs the first and the last layer of its own answers (--private-layers 1)
    assert statuses[0]["model"]["private_layers"] == 1
    assert stages[0]["start_layer"] == 1 and stages[-1]["end_layer"] == 29
    assert all(a["end_layer"] == b["start_layer"] for a, b in zip(stages, stages[1:]))
    assert {s["node_id"] for s in stages} <= ids  # the balancer may leave a slow node without layers
    for s in statuses:
        assert len(s["nodes"]) == 3
        assert {n["role"] for n in s["nodes"]} == {"coordinator", "member"}


def test_the_default_mesh_keeps_the_gguf_4_bit_and_says_so(default_mesh: LocalMesh) -> None:
    status = default_mesh.status(0)
    assert status["model"]["weights"] == "int4"
    holders = {s["node_id"] for s in status["plan"]["stages"]}
    assert all(node["weight_bytes"] > 0 for node in status["nodes"] if node["id"] in holders)
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--api", default_mesh.nodes[0].url],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "int4 weights" in out.stdout and "WEIGHTS" in out.stdout


def test_greedy_answers_at_every_node_match_one_node_in_the_same_format(
    default_mesh: LocalMesh, default_auto_engine  # type: ignore[no-untyped-def]
) -> None:
    engine = default_auto_engine
    urls = [n.url for n in default_mesh.nodes]
    for messages in PROMPTS[:6]:
        prompt = engine.chat_prompt(messages)
        want = [t.id for t in engine.generate(prompt, SamplingParams(max_tokens=32))]
        # the same question at all three nodes at once: three concurrent sessions
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda u: chat(u, list(messages)), urls))
        for url, answer in zip(urls, answers):
            assert token_ids(answer) == want, (url, messages)
            text = answer["choices"][0]["message"]["content"]
            assert text == engine.tokenizer.decode(want, skip_special_tokens=True)


def test_meshllm_ask_streams_the_same_answer(default_mesh: LocalMesh, default_auto_engine) -> None:  # type: ignore[no-untyped-def]
    engine = default_auto_engine
    messages = [{"role": "user", "content": "Name three colours."}]
    want = [t.id for t in engine.generate(engine.chat_prompt(messages), SamplingParams(max_tokens=32))]
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "ask", "--api", default_mesh.nodes[2].url, "--max-tokens", "32",
         "Name three colours."],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert out.stdout.strip() == engine.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_stage_stats_report_compute_and_bytes_per_hop(default_mesh: LocalMesh) -> None:
    # which nodes compute is the balancer's call: the mesh as a whole must account for the
    # answer, and each node's numbers must make sense for what it did
    before = sum(default_mesh.status(i)["stats"]["decode_steps"] for i in range(3))
    answer = chat(default_mesh.nodes[0].url, [{"role": "user", "content": "Tell me about the sea."}], 16)
    stats = [default_mesh.status(i)["stats"] for i in range(3)]
    tokens = answer["usage"]["completion_tokens"]
    assert sum(s["decode_steps"] for s in stats) - before >= tokens - 1  # every token after the first
    assert all(s["decode_compute_ms_avg"] > 0 for s in stats if s["decode_steps"])
    hop_bytes = [s["decode_bytes_per_hop"] for s in stats if s["decode_hops_sent"]]
    # f32: 576 floats (2,304 bytes; zstd sometimes saves a few percent) plus the message framing
    assert all(2000 < b < 2304 + 200 for b in hop_bytes)


@pytest.fixture(scope="module")
def qwen_mesh(tiny_qwen2: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(3, model=str(tiny_qwen2), extra_args=["--mesh-name", unique_mesh_name(), "--weights", "f32"])
    mesh.start()
    try:
        mesh.wait_ready(300)
        yield mesh
    finally:
        mesh.stop()


def test_a_second_architecture_qwen2_answers_exactly(qwen_mesh: LocalMesh, tiny_qwen2: Path) -> None:
    from transformers import AutoModelForCausalLM
    import torch

    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    urls = [n.url for n in qwen_mesh.nodes]
    for messages in PROMPTS[:6]:
        want = reference_greedy(tiny_qwen2, chat_ids(tiny_qwen2, messages), 32, model=ref)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda u: chat(u, list(messages)), urls))
        assert [token_ids(a) for a in answers] == [want] * 3, messages


def test_two_sessions_at_two_nodes_at_once(qwen_mesh: LocalMesh, tiny_qwen2: Path) -> None:
    a, b = PROMPTS[1], PROMPTS[4]
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(chat, qwen_mesh.nodes[0].url, list(a), 48)
        fb = pool.submit(chat, qwen_mesh.nodes[2].url, list(b), 48)
        got_a, got_b = token_ids(fa.result()), token_ids(fb.result())
    assert got_a == reference_greedy(tiny_qwen2, chat_ids(tiny_qwen2, a), 48)
    assert got_b == reference_greedy(tiny_qwen2, chat_ids(tiny_qwen2, b), 48)


def test_a_node_with_the_wrong_mesh_key_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    good.write_text("correct horse battery staple 0123456789")
    bad.write_text("wrong horse battery staple 9876543210")
    good.chmod(0o600)
    bad.chmod(0o600)
    name = unique_mesh_name()
    mesh = LocalMesh(3, model=str(tiny_llama), extra_args=["--mesh-name", name],
                     per_node_args={0: ["--mesh-key-file", str(good)], 1: ["--mesh-key-file", str(good)],
                                    2: ["--mesh-key-file", str(bad)]})
    mesh.start()
    try:
        plan = mesh.wait_ready(180, nodes=[0, 1])
        mesh.wait_ready(180, nodes=[2])  # the intruder is up too (a mesh of one)
        # it and the others find each other over mDNS: the key ids differ, so nobody links
        intruder = mesh.status(2)["self_id"]
        members = {mesh.status(i)["self_id"] for i in (0, 1)}
        # (mDNS also shows them other tests' daemons: look at these three only)
        wait_until(lambda: any(n["reason"] == "another mesh key" and n.get("id") == intruder
                               for i in (0, 1) for n in mesh.status(i)["incompatible"])
                   or any(n["reason"] == "another mesh key" and n.get("id") in members
                          for n in mesh.status(2)["incompatible"]), 120,
                   "a node lists another of these as of another mesh key")
        plan = mesh.status(0)["plan"]
        assert intruder not in {s["node_id"] for s in plan["stages"]}
        for i in (0, 1):
            st = mesh.status(i)
            assert intruder not in {n["id"] for n in st["nodes"]}
        # the intruder never got a plan of theirs
        assert mesh.status(2)["plan"] is None or {s["node_id"] for s in mesh.status(2)["plan"]["stages"]} == {intruder}
    finally:
        mesh.stop()
