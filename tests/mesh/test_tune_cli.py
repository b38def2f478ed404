"""`meshllm tune` as a user runs it: real daemons on loopback, each fed its own examples by
the CLI; when the job ends every node serves the adapter (the third one, which took no part,
because it runs with --accept-adapters), and a three-node mesh (no node can hold the model
alone) answers exactly like one node serving the same adapter in the same weight format."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from meshllm.model.adapter import load_adapter
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.sampling import SamplingParams
from meshllm.model.shape import load_config, model_shape
from meshllm.model.source import resolve
from meshllm.mesh.session import Token
from tests.mesh.conftest import chat, token_ids, unique_mesh_name
from tests.mesh.test_tune import chats
from tests.waiting import wait_until
from tui.launcher import LocalMesh

REPO = Path(__file__).resolve().parents[2]
TOKENS = 10


def tune(url: str, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "tune", "--data", str(data), "--api", url,
                           "--rounds", "2", "--steps-per-round", "5", "--rank", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_meshllm_tune_on_two_daemons_then_three_nodes_serve_the_adapter_exactly(
        tiny_llama: Path, tmp_path: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    shape = model_shape(load_config(prepared), "int8")
    budget = shape.embed_head_bytes + 2 * shape.layer_bytes  # 2 of 6 layers: the model needs all three
    mesh = LocalMesh(3, model=str(tiny_llama), threads=1, work_dir=tmp_path / "mesh",
                     extra_args=["--mesh-name", unique_mesh_name(), "--weights", "int8",
                                 "--mem-budget", str(budget), "--fallback-model", "none", "--accept-adapters",
                                 "--private-layers", "0"])  # every layer placed: the model needs all three
    data = {}
    for fact in ("a", "b"):
        data[fact] = tmp_path / f"{fact}.jsonl"
        data[fact].write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats(fact)))
    mesh.start()
    try:
        mesh.wait_ready(180)
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda i: tune(mesh.nodes[i].url, data["ab"[i]]), range(2)))
        for run in runs:
            assert run.returncode == 0, run.stderr
            assert "done: 2 rounds, 2 participants" in run.stderr
            before, after = run.stderr.split("loss on this node's examples ")[1].split()[0:3:2]
            assert float(after) < float(before)
        digests = {(node.state_dir / "adapters" / "last").read_text().strip() for node in mesh.nodes}
        assert len(digests) == 1  # every member saved the same adapter, the third one too
        digest = digests.pop()
        wait_until(lambda: all(mesh.status(i)["model"]["id"].endswith(digest) for i in range(3)), 60,
                   "every node serves the adapter")

        adapter = load_adapter(mesh.nodes[2].state_dir / "adapters" / digest, load_config(prepared))
        alone = Engine(prepared, weights="int8", adapter=adapter)
        stages = mesh.status(0)["plan"]["stages"]
        assert len(stages) == 3
        for fact in ("a", "b"):
            question = chats(fact)[0][:1]
            want = [t.id for t in alone.generate(alone.chat_prompt(question), SamplingParams(max_tokens=TOKENS))
                    if isinstance(t, Token)]
            for i in range(3):
                assert token_ids(chat(mesh.nodes[i].url, question, TOKENS)) == want
    finally:
        mesh.stop()
