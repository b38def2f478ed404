"""A local mesh: N daemons on this machine, one process each, in loopback mode.

`scripts/local_mesh.py` is its command line; the mesh tests and benchmarks use it too.
Each node gets its own state dir, its own ports (API on `base_port + 2*i`, signaling on the
next port) and its share of the cores (`--threads`), so the nodes do not slow each other
down by fighting over threads. The nodes share one mesh key, made for the mesh and given to
each as `MESHLLM_MESH_KEY` (`shared_key=False`: each keeps its own, as strangers would).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui.client import DaemonClient, DaemonError, DaemonUnavailable, run_sync

log = logging.getLogger(__name__)

READY_PREFIX = "meshllm ready: "
MESH_KEY_VAR = "MESHLLM_MESH_KEY"


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports on 127.0.0.1")


@dataclass
class LocalNode:
    """One daemon of a local mesh: its ports, state dir, options, log and process."""

    index: int
    api_port: int
    state_dir: Path
    args: list[str]
    log_path: Path
    process: subprocess.Popen[str] | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id of the node's current (or last) process; None before it started."""
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process once it exited (negative: killed by that signal)."""
        return self.process.poll() if self.process is not None else None

    def exit_description(self) -> str:
        """How the last process ended: "exit code 0", "killed by SIGKILL", or "running"."""
        return describe_returncode(self.returncode)

    def launch(self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path) -> None:
        """Start the node's process (`cmd` plus its args); `ready` is set once it prints its
        ready line. Its stderr goes to its log file."""
        self.ready.clear()
        logf = self.log_path.open("a")
        self.process = subprocess.Popen(list(cmd) + self.args, stdout=subprocess.PIPE, stderr=logf, text=True,
                                        env=env, cwd=cwd)
        threading.Thread(target=self._watch_stdout, args=(self.process,), daemon=True).start()

    def _watch_stdout(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(READY_PREFIX):
                self.ready.set()

    def send_signal(self, signum: int) -> None:
        """Signal the process if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> None:
        """Until the process exits (subprocess.TimeoutExpired after `timeout_s`)."""
        if self.process is not None:
            self.process.wait(timeout_s)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM (a clean leave), SIGKILL after `timeout_s`."""
        self.send_signal(signal.SIGTERM)
        self.wait_or_kill(timeout_s)

    def wait_or_kill(self, timeout_s: float) -> None:
        """Until the process exits; SIGKILL after `timeout_s`."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("node%d did not stop in time; killing it", self.index + 1)
            self.process.kill()
            self.process.wait(5)


def describe_returncode(code: int | None) -> str:
    """A Popen return code in words: "exit code N", "killed by SIGNAME", "running" for None."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class LocalMesh:
    """Start, watch and stop N loopback daemons."""

    def __init__(
        self,
        nodes: int,
        *,
        model: str | None = None,
        base_port: int | None = None,
        codec: str | None = None,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        per_node_args: dict[int, Sequence[str]] | None = None,
        work_dir: Path | None = None,
        meshllm: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
        shared_key: bool = True,
    ) -> None:
        """``cwd``: the folder the daemons run in (default: this checkout), so that
        ``python -m daemon.cli`` there runs another checkout's daemons (a benchmark of an
        older commit from a ``git worktree``). ``shared_key``: every node gets the same new
        random mesh key as ``MESHLLM_MESH_KEY`` (one already in ``env`` or the environment is
        kept); False: none is given, so each node uses the key of its own state dir."""
        if nodes < 1:
            raise ValueError("need at least one node")
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="meshllm-local-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads or max(1, (os.cpu_count() or 1) // nodes)
        self._cmd = list(meshllm or [sys.executable, "-m", "daemon.cli"])
        self.env = {**os.environ, **(env or {})}
        if MESH_KEY_VAR not in (env or {}):
            if not shared_key:
                self.env.pop(MESH_KEY_VAR, None)
            elif not self.env.get(MESH_KEY_VAR, "").strip():
                self.env[MESH_KEY_VAR] = secrets.token_urlsafe(24)
        self.cwd = Path(cwd) if cwd is not None else Path(__file__).resolve().parent.parent
        self.nodes: list[LocalNode] = []
        for i in range(nodes):
            port = base_port + 2 * i if base_port else free_port_pair()
            args = ["up", "--no-tui", "--loopback", "--api-port", str(port),
                    "--mesh-port", str(port + 1), "--name", f"node{i + 1}",
                    "--threads", str(self.threads), "--log-level", "info"]
            if model:
                args += ["--model", model]
            if codec:
                args += ["--codec", codec]
            args += list(extra_args) + list((per_node_args or {}).get(i, ()))
            state = self.work_dir / f"node{i + 1}"
            args += ["--state-dir", str(state)]
            self.nodes.append(LocalNode(i, port, state, args, self.work_dir / f"node{i + 1}.log"))

    # -- processes -----------------------------------------------------------------------

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node.index)

    def start_node(self, index: int) -> LocalNode:
        node = self.nodes[index]
        node.launch(self._cmd, env=self.env, cwd=self.cwd)
        return node

    def signal_node(self, index: int, signum: int) -> None:
        self.nodes[index].send_signal(signum)

    def kill_node(self, index: int) -> None:
        """kill -9: the node vanishes without a word."""
        node = self.nodes[index]
        node.send_signal(signal.SIGKILL)
        node.wait(10)

    def stop_node(self, index: int, timeout_s: float = 15.0) -> str:
        """SIGTERM node ``index`` (a clean leave), SIGKILL after ``timeout_s``; how it ended."""
        node = self.nodes[index]
        if node.process is None:
            return "not started"
        if node.alive:
            node.stop(timeout_s)
        return node.exit_description()

    def wait_exit(self, index: int, timeout_s: float) -> str:
        """Until node ``index``'s process exits (TimeoutError after ``timeout_s``); how it ended."""
        node = self.nodes[index]
        try:
            node.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"node{index + 1} still runs after {timeout_s:g} s") from None
        return node.exit_description()

    def stop(self, timeout_s: float = 15.0) -> None:
        for node in self.nodes:
            node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            node.wait_or_kill(max(0.1, deadline - time.monotonic()))
        if self._own_dir and os.environ.get("MESHLLM_KEEP_LOGS") is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def logs(self, index: int) -> str:
        try:
            return self.nodes[index].log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- state ---------------------------------------------------------------------------

    def status(self, index: int, timeout_s: float = 2.0) -> dict[str, Any]:
        """The node's ``/v1/status``; DaemonUnavailable / DaemonError when it does not answer."""
        return run_sync(DaemonClient(self.nodes[index].url, connect_timeout_s=timeout_s,
                                     request_timeout_s=timeout_s).status())

    def wait_ready(self, timeout_s: float = 120.0, *, nodes: Sequence[int] | None = None) -> dict[str, Any]:
        """Until the given nodes (default: all) printed ready and agree on one active plan
        whose stages are all among them. Returns that plan."""
        indexes = list(nodes) if nodes is not None else [n.index for n in self.nodes]
        deadline = time.monotonic() + timeout_s
        for i in indexes:
            node = self.nodes[i]
            while not node.ready.wait(0.2):
                if not node.alive:
                    raise RuntimeError(f"node{i + 1} exited:\n{self.logs(i)[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node{i + 1} not ready:\n{self.logs(i)[-3000:]}")
        while True:
            plan = self._agreed_plan(indexes)
            if plan is not None:
                return plan
            if time.monotonic() > deadline:
                raise TimeoutError("the nodes do not agree on one active plan")
            time.sleep(0.2)

    def agreed_plan(self, nodes: Sequence[int] | None = None) -> dict[str, Any] | None:
        """The one active plan the given nodes (default: all) agree on, each seeing exactly
        them; None when they do not (yet), or one of them does not answer."""
        return self._agreed_plan(list(nodes) if nodes is not None else [n.index for n in self.nodes])

    def _agreed_plan(self, indexes: Sequence[int]) -> dict[str, Any] | None:
        plans, ids = [], set()
        for i in indexes:
            try:
                st = self.status(i)
            except (DaemonUnavailable, DaemonError):
                return None
            plans.append(st.get("plan"))
            ids.add(st["self_id"])
            if len(st.get("nodes", [])) != len(indexes):
                return None
        first = plans[0]
        if first is None or first.get("state") != "active":
            return None
        if any(p != first for p in plans):
            return None
        if not {s["node_id"] for s in first["stages"]} <= ids:
            return None
        return first
