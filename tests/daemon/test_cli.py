"""The `meshllm` command as a user runs it: one-line errors, exit codes, help, tables.

(A corrupt model file is checked in test_end_to_end.py, which pays for loading torch anyway.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import main
from tui.status_table import format_status

REPO = Path(__file__).resolve().parents[2]
MESHLLM = str(REPO / ".venv" / "bin" / "meshllm")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLLM_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def failures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Run every failing command at once (each pays for its own start-up) and collect them."""
    tmp = tmp_path_factory.mktemp("cli")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy_port = taken.getsockname()[1]
    nobody = f"http://127.0.0.1:{closed_port()}"
    up = [MESHLLM, "up", "--no-tui", "--loopback", "--mesh-name", f"test-{uuid.uuid4().hex[:8]}",
          "--state-dir", str(tmp / "state"), "--cache-dir", str(tmp / "cache")]
    commands = {
        "port in use": ([*up, "--api-port", str(busy_port)], {}),
        "missing model": ([*up, "--api-port", "0", "--model", str(tmp / "nothing")], {}),
        "bad env": ([*up], {"MESHLLM_API_PORT": "eighty"}),
        "ask nobody": ([MESHLLM, "ask", "--api", nobody, "hello"], {}),
        "status nobody": ([MESHLLM, "status"], {"MESHLLM_API": nobody}),
        "down nobody": ([MESHLLM, "down", "--api", nobody], {}),
        "bench api": ([MESHLLM, "bench", "--api", nobody], {}),
        "no adapter yet": ([*up, "--api-port", "0", "--adapter", "last"], {}),
        "adapter not a folder": ([*up, "--api-port", "0", "--adapter", str(tmp / "nothing")], {}),
    }
    running = {
        name: subprocess.Popen(argv, env=clean_env(**env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp)
        for name, (argv, env) in commands.items()
    }
    results = {}
    try:
        for name, process in running.items():
            out, err = process.communicate(timeout=120)
            results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        results["busy_port"] = busy_port  # type: ignore[assignment]
        yield results
    finally:
        taken.close()
        for process in running.values():
            if process.poll() is None:
                process.kill()


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("port in use", 1, "address already in use"),
        ("missing model", 1, "model path does not exist"),
        ("bad env", 2, "MESHLLM_API_PORT"),
        ("ask nobody", 1, "connection refused"),
        ("status nobody", 1, "connection refused"),
        ("down nobody", 1, "connection refused"),
        ("bench api", 1, "connection refused"),
        ("no adapter yet", 1, "no tune job has finished on this node yet"),
        ("adapter not a folder", 2, "adapter must be none, last or an adapter folder"),
    ],
)
def test_failures_are_one_line_on_stderr(failures: dict[str, subprocess.CompletedProcess[str]],
                                         name: str, code: int, words: str) -> None:
    result = failures[name]
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshllm: ")
    assert words in lines[0].lower() or words in lines[0]


def test_port_in_use_names_the_port(failures: dict[str, subprocess.CompletedProcess[str]]) -> None:
    assert f"127.0.0.1:{failures['busy_port']}" in failures["port in use"].stderr


@pytest.mark.parametrize("command", [[], ["up"], ["ask"], ["status"], ["down"], ["bench"], ["chat"], ["tune"]])
def test_help_for_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: meshllm" in capsys.readouterr().out


def test_status_table() -> None:
    status = {
        "self_id": "n-1", "model": {"id": "abcdef0123456789", "name": "Tiny", "num_layers": 6, "weights": "int4"},
        "codec": "f32", "term": 2, "coordinator_id": "n-1",
        "plan": {"term": 2, "state": "active", "stages": [{"node_id": "n-1", "start_layer": 0, "end_layer": 6}]},
        "nodes": [{"id": "n-1", "name": "laptop", "is_self": True, "role": "coordinator",
                   "state": "ready", "mem_budget_bytes": 8_000_000_000, "ms_per_layer": 1.94,
                   "span": [0, 6], "weight_bytes": 2_500_000, "rtt_ms": None, "address": "127.0.0.1:8470"}],
        "incompatible": [{"name": "other", "address": "127.0.0.1:9000", "reason": "mesh name 'x' != 'default'"}],
        "sessions": {"running": 2, "queued": 3, "max": 2, "queue_max": 8},
    }
    text = format_status(status)
    assert "sessions: 2 running (at most 2 at once), 3 waiting (at most 8)" in text
    assert "Tiny (6 layers, int4 weights, id abcdef012345)" in text
    assert "term 2, active, 1 stage(s)" in text
    header, row = [line for line in text.splitlines() if "coordinator" in line or "ROLE" in line]
    assert header.split() == ["NODE", "ROLE", "STATE", "MEMORY", "WEIGHTS", "MS/LAYER", "SPAN", "RTT", "MB/S",
                              "PREDICTED", "MEASURED", "ADDRESS"]
    assert row.split() == ["laptop", "*", "coordinator", "ready", "8.0", "GB", "2.5", "MB", "1.94", "[0,", "6)", "-",
                           "-", "-", "-", "127.0.0.1:8470"]
    assert "other at 127.0.0.1:9000: mesh name 'x' != 'default'" in text
    assert "latency:" not in text  # no plan measured: no latency line


def test_status_table_shows_links_predictions_measurements_and_the_target_missed() -> None:
    node = {"role": "member", "state": "ready", "mem_budget_bytes": 10**8, "ms_per_layer": 0.7, "span": None,
            "weight_bytes": 28_600_000, "rtt_ms": 33.0, "address": None}
    status = {
        "self_id": "n-1", "model": None, "codec": "f32", "term": 2, "coordinator_id": "n-1", "plan": None,
        "nodes": [{**node, "id": "n-1", "name": "node1", "is_self": True, "role": "coordinator", "span": [0, 30], "rtt_ms": None,
                   "link": None, "predicted_ms_per_token": 35.14, "measured_ms_per_token": 41.0},
                  {**node, "id": "n-3", "name": "node3", "is_self": False,
                   "link": {"rtt_ms": 31.62, "small_mb_s": 12.3, "large_mb_s": 100000.0, "decode_hop_ms": 17.5},
                   "predicted_ms_per_token": 80.4, "measured_ms_per_token": None}],
        "latency": {"entry_ids": ["n-1"], "entry_mean": False, "predicted_ms_per_token": 35.14,
                    "predicted_ttft_ms": 846.8, "measured_ms_per_token": 41.0, "target_ms_per_token": 38.0,
                    "target_ttft_ms": None, "miss_ms_per_token": 0.0, "measured_miss_ms_per_token": 3.0,
                    "miss_ttft_ms": None},
    }
    text = format_status(status)
    assert ("latency:  35.1 ms/token predicted at the entry node, 41.0 measured; target 38 ms: prediction meets it, "
            "measurement misses it by 3.0 ms") in text
    assert "847 ms to the first token of a 256-token prompt, predicted" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("node")}
    assert rows["node1"][-5:] == ["-", "-", "35.1", "41.0", "-"]
    assert rows["node3"][-6:] == ["31.6", "ms", "12/>10k", "80.4", "-", "-"]
