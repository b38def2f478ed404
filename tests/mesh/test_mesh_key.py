"""Keyed by default, as a new user meets it (issue 20, acceptance 1), on loopback: two devices
started with `meshllm up` and nothing else do not form one mesh; with `meshllm invite` on the
first and `meshllm up --invite CODE` on the second, they do."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.mesh.conftest import unique_mesh_name
from tests.waiting import wait_until
from tui.launcher import LocalMesh

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def reasons(mesh: LocalMesh, index: int, about: int | None = None) -> list[str]:
    """Why node `index` lists nodes as incompatible; with `about`, only node `about` (other
    tests' daemons on this machine are listed too: mDNS sees them all)."""
    other = None if about is None else mesh.status(about)["self_id"]
    return [n["reason"] for n in mesh.status(index)["incompatible"] if other is None or n.get("id") == other]


def invite(state_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "invite", "--state-dir", str(state_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MESHLLM_")})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def test_two_devices_join_only_with_an_invite(tiny_llama: Path, tmp_path: Path) -> None:
    mesh = LocalMesh(2, model=str(tiny_llama), threads=1, work_dir=tmp_path / "mesh", shared_key=False,
                     extra_args=["--mesh-name", unique_mesh_name()])
    first, second = mesh.nodes
    mesh.start()
    try:
        mesh.wait_ready(180, nodes=[0])
        mesh.wait_ready(180, nodes=[1])
        # each made a key of its own, privately, and sees the other as of another mesh
        for node in mesh.nodes:
            assert mode(node.state_dir) == 0o700 and mode(node.state_dir / "mesh.key") == 0o600
        wait_until(lambda: "another mesh key" in reasons(mesh, 0, about=1) + reasons(mesh, 1, about=0),
                   120, "a node lists the other as of another mesh key")
        assert len(mesh.status(0)["nodes"]) == 1 and len(mesh.status(1)["nodes"]) == 1
        assert mesh.status(0)["mesh_key_id"] != mesh.status(1)["mesh_key_id"]

        code = invite(first.state_dir)
        assert mesh.status(0)["invite"] == code  # what the TUI's mesh view shows
        mesh.stop_node(1)
        second.args += ["--invite", code]
        mesh.start_node(1)
        mesh.wait_ready(180)  # one mesh: both see both, under one plan
        ids = {mesh.status(0)["self_id"], mesh.status(1)["self_id"]}
        assert {n["id"] for n in mesh.status(0)["nodes"]} == ids == {n["id"] for n in mesh.status(1)["nodes"]}
        assert mesh.status(1)["mesh_key_id"] == mesh.status(0)["mesh_key_id"]
        assert (second.state_dir / "mesh.key").read_bytes() == (first.state_dir / "mesh.key").read_bytes()
        assert mode(second.state_dir / "mesh.key") == 0o600
        wait_until(lambda: reasons(mesh, 0, about=1) == [], 60, "the first node no longer lists the second")
    finally:
        mesh.stop()


def test_an_open_node_and_a_keyed_node_do_not_join(tiny_llama: Path, tmp_path: Path) -> None:
    mesh = LocalMesh(2, model=str(tiny_llama), threads=1, work_dir=tmp_path / "mesh", shared_key=False,
                     extra_args=["--mesh-name", unique_mesh_name()], per_node_args={1: ["--open"]})
    mesh.start()
    try:
        mesh.wait_ready(180, nodes=[0])
        mesh.wait_ready(180, nodes=[1])
        assert mesh.status(1)["mesh_key_id"] == "open" and mesh.status(1)["invite"] is None
        wait_until(lambda: {"another mesh key (it runs an open mesh)",
                            "another mesh key (this node runs an open mesh)"} & {*reasons(mesh, 0, about=1),
                                                                                 *reasons(mesh, 1, about=0)},
                   120, "a node lists the other as of another mesh key")
        assert "no mesh key: anyone on this network can join" in mesh.logs(1)
        assert not (mesh.nodes[1].state_dir / "mesh.key").exists()
    finally:
        mesh.stop()
