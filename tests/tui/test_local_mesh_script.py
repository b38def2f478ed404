"""`scripts/local_mesh.py` as a user runs it, on the tiny model: a node killed with kill -9
leaves the others serving, and the script says which node exited; with --restart the node
comes back (same ports) and serves again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mesh.conftest import chat, token_ids, unique_mesh_name
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_mesh.py"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12
START_S = 240.0
"""Bounds a failing test only: three daemons starting on a loaded 2-core machine."""


class LocalMeshScript:
    """The script in a subprocess; its output lines, read as they come."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line)

    def output(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def wait_for(self, pattern: str, what: str, timeout_s: float = START_S) -> re.Match[str]:
        """Until a line of the output matches ``pattern``; the match."""
        return wait_until(lambda: re.search(pattern, self.output(), re.MULTILINE), timeout_s, what,
                          interval_s=0.1, context=lambda: "script output:\n" + self.output())

    def nodes(self) -> dict[int, tuple[str, int]]:
        """Node number -> (API URL, pid), from the start lines (and restart lines: the latest)."""
        out: dict[int, tuple[str, int]] = {}
        for m in re.finditer(r"^node(\d+)(?:: | restarted: )(http://\S+)\s+pid (\d+)", self.output(), re.MULTILINE):
            out[int(m.group(1))] = (m.group(2), int(m.group(3)))
        return out

    def all_pids(self) -> set[int]:
        return {int(m.group(1)) for m in re.finditer(r"\bpid (\d+)", self.output())}

    def stop(self) -> None:
        """SIGTERM the script (it stops its nodes); then make sure no daemon of ours is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in self.all_pids():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def start_script(tiny_llama: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[LocalMeshScript] = []

    def start(*more: str) -> LocalMeshScript:
        script = LocalMeshScript("--nodes", "3", "--base-port", "0", "--threads", "1", "--model", str(tiny_llama),
                                 *more, "--", "--mesh-name", unique_mesh_name(),
                                 "--fallback-model", "none")  # the mesh's own answers, however long it re-plans
        started.append(script)
        script.wait_for(r"^mesh ready: 3 nodes", "the script says the mesh is ready")
        return script

    try:
        yield start
    finally:
        for script in started:
            script.stop()


def answer(url: str) -> list[int]:
    return token_ids(chat(url, MESSAGES, max_tokens=MAX_TOKENS))


def test_a_node_killed_with_kill_9_is_reported_and_the_other_two_go_on_serving(start_script) -> None:  # type: ignore[no-untyped-def]
    script = start_script()
    nodes = script.nodes()
    assert sorted(nodes) == [1, 2, 3]
    want = answer(nodes[1][0])

    victim_pid = nodes[2][1]
    os.kill(victim_pid, signal.SIGKILL)
    m = script.wait_for(rf"^node2 exited \(killed by SIGKILL, pid {victim_pid}\); log: (\S+)$",
                        "the script says node2 was killed")
    assert Path(m.group(1)).name == "node2.log"

    assert answer(nodes[1][0]) == want
    assert answer(nodes[3][0]) == want
    assert script.process.poll() is None, script.output()  # the script and the others still run
    assert _running(nodes[1][1]) and _running(nodes[3][1])

    script.stop()
    assert script.process.returncode == 0, script.output()
    wait_until(lambda: not any(_running(pid) for pid in script.all_pids()), 60, "every daemon stopped")
    assert "stopping the mesh" in script.output()


def test_with_restart_an_exited_node_comes_back_on_its_ports(start_script) -> None:  # type: ignore[no-untyped-def]
    script = start_script("--restart", "0.5")
    nodes = script.nodes()
    want = answer(nodes[1][0])

    url3, pid3 = nodes[3]
    os.kill(pid3, signal.SIGKILL)
    script.wait_for(rf"^node3 exited \(killed by SIGKILL, pid {pid3}\); log: \S+node3\.log; restarting it in 0\.5 s$",
                    "the script says node3 was killed and will restart")
    m = script.wait_for(r"^node3 restarted: (\S+)\s+pid (\d+)", "node3 restarted")
    assert m.group(1) == url3 and int(m.group(2)) != pid3
    script.wait_for(rf"^node3 is back: {re.escape(url3)}\s+pid {m.group(2)}$", "node3 back")
    script.wait_for(r"^mesh whole again: 3 nodes", "the mesh whole again")
    assert answer(url3) == want

    # a clean exit (SIGTERM: the node hands its layers over and leaves) is reported too
    url2, pid2 = nodes[2]
    os.kill(pid2, signal.SIGTERM)
    script.wait_for(rf"^node2 exited \(exit code 0, pid {pid2}\)", "the script says node2 left")
    script.wait_for(r"^node2 is back: ", "node2 back")
    assert answer(url2) == want
