"""`meshllm up` on a tiny random model, as a real process: answers are exactly the greedy
tokens of plain transformers `generate`, through `meshllm ask` and through the HTTP API."""

from __future__ import annotations

import json
import selectors
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.test_cli import MESHLLM, clean_env
from tests.tinymodel import PROMPTS, chat_ids, reference_greedy
from tui.client import DaemonClient, iterate_sync, run_sync

MAX_NEW_TOKENS = 24
START_TIMEOUT_S = 180.0


@dataclass
class Daemon:
    url: str
    process: subprocess.Popen[str]
    model_dir: Path
    corrupt: subprocess.Popen[str]
    bench: subprocess.Popen[str]


def read_ready_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            return process.stdout.readline()
        if process.poll() is not None:
            break
    raise AssertionError(f"no ready line; exit code {process.poll()}")


@pytest.fixture(scope="module")
def daemon(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("e2e")
    corrupt_file = tmp / "corrupt.gguf"
    corrupt_file.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    # loopback and a mesh name of its own: never on a real interface, never in another test's mesh
    common = [MESHLLM, "up", "--no-tui", "--api-port", "0", "--threads", "1", "--loopback",
              "--mesh-name", f"test-{uuid.uuid4().hex[:8]}",
              "--state-dir", str(tmp / "state"), "--cache-dir", str(tmp / "cache")]
    # the corrupt model starts alongside, so both pay for their imports at the same time
    corrupt = subprocess.Popen([*common, "--model", str(corrupt_file)], env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bench = subprocess.Popen(
        [MESHLLM, "bench", "--local", "--model", str(tiny_llama), "--threads", "1", "--json",
         "--prompt-tokens", "64", "--decode-tokens", "8", "--cache-dir", str(tmp / "cache")],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen([*common, "--model", str(tiny_llama)], env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_ready_line(process, START_TIMEOUT_S)
        assert line.startswith("meshllm ready: http://127.0.0.1:")
        assert line.endswith(f"(model {tiny_llama.name}, 6 layers, f32 weights on transformers "
                             "(torch float32, the exact reference))\n")
        url = line.split()[2]
        yield Daemon(url, process, tiny_llama, corrupt, bench)
    finally:
        for p in (process, corrupt, bench):
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)


@pytest.fixture(scope="module")
def reference(daemon: Daemon) -> tuple[Any, Any]:
    """Plain transformers on the same folder: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(daemon.model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(daemon.model_dir)


def expected(daemon: Daemon, reference: tuple[Any, Any],
             messages: list[dict[str, str]]) -> tuple[list[int], str]:
    model, tokenizer = reference
    prompt = chat_ids(daemon.model_dir, messages)
    ids = reference_greedy(daemon.model_dir, prompt, MAX_NEW_TOKENS, model=model)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # A random tiny model often stops in the middle of a multi-byte character. The engine's
    # streaming detokenizer never shows an incomplete character, so the answer ends before it
    # where a one-shot decode would show replacement characters.
    return ids, text.rstrip("\ufffd")


def test_ask_prints_the_reference_greedy_answer(daemon: Daemon, reference: tuple[Any, Any]) -> None:
    for messages in (PROMPTS[0], PROMPTS[1]):
        _, text = expected(daemon, reference, messages)
        result = subprocess.run(
            [MESHLLM, "ask", "--api", daemon.url, "--max-tokens", str(MAX_NEW_TOKENS),
             messages[-1]["content"]],
            env=clean_env(), capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == (text if text.endswith("\n") else text + "\n")


def test_http_answers_are_the_reference_tokens(daemon: Daemon, reference: tuple[Any, Any]) -> None:
    messages = PROMPTS[2]
    ids, text = expected(daemon, reference, messages)
    client = DaemonClient(daemon.url, request_timeout_s=120)
    answer = run_sync(client.complete(messages, max_tokens=MAX_NEW_TOKENS, temperature=0))
    assert answer["choices"][0]["message"]["content"] == text
    assert answer["usage"]["completion_tokens"] == len(ids)
    assert answer["usage"]["prompt_tokens"] == len(chat_ids(daemon.model_dir, messages))
    finish = "length" if len(ids) == MAX_NEW_TOKENS else "stop"
    assert answer["choices"][0]["finish_reason"] == finish

    deltas = list(iterate_sync(client.chat(messages, max_tokens=MAX_NEW_TOKENS, temperature=0)))
    assert "".join(d.text for d in deltas) == text
    assert [d.finish_reason for d in deltas if d.finish_reason] == [finish]
    assert [d.token_ids for d in deltas if d.token_ids] == [tuple(ids)]
    assert [d.completion_tokens for d in deltas if d.completion_tokens] == [len(ids)]


def test_status_command_shows_the_node(daemon: Daemon) -> None:
    result = subprocess.run([MESHLLM, "status", "--api", daemon.url, "--json"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["model"]["num_layers"] == 6
    assert status["model"]["private_layers"] == 1  # the default: layers [0, 1) and [5, 6) stay on the entry node
    assert status["nodes"][0]["state"] == "ready" and status["nodes"][0]["span"] == [1, 5]
    assert status["nodes"][0]["ms_per_layer"] > 0


def test_corrupt_model_fails_with_one_line(daemon: Daemon) -> None:
    out, err = daemon.corrupt.communicate(timeout=120)
    assert daemon.corrupt.returncode == 1
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("meshllm: ") and "corrupt.gguf" in err


def test_bench_local_reports_json(daemon: Daemon) -> None:
    out, err = daemon.bench.communicate(timeout=120)
    assert daemon.bench.returncode == 0, err
    result = json.loads(out)
    assert result["mode"] == "local" and result["num_layers"] == 6 and result["threads"] == 1
    assert result["prompt_tokens"] == 64
    assert result["ttft_ms"] > 0 and result["ms_per_layer"] > 0
    assert 0 <= result["decode_tokens"] <= 8


def test_down_stops_the_daemon(daemon: Daemon) -> None:
    result = subprocess.run([MESHLLM, "down", "--api", daemon.url], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out, err = daemon.process.communicate(timeout=60)
    assert daemon.process.returncode == 0, err
    assert out == ""  # the ready line was the only stdout line, read earlier
    assert "Traceback" not in err
