"""`meshllm tune` and `POST /v1/tune` as a user meets them before any training: bad data,
bad options and a daemon elsewhere get one clear line, and nothing is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.tune_request import TuneRequest, parse_tune_request
from tests.daemon.conftest import MakeApi
from tui.tune_progress import TuneProgress

GOOD = [[{"role": "user", "content": "What is the capital of Zorbia?"},
         {"role": "assistant", "content": "Answer: Blip."}]]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tune_refuses_a_daemon_on_another_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": GOOD[0]})])
    assert main(["tune", "--data", str(data), "--api", "http://192.0.2.7:8470"]) == 1
    err = capsys.readouterr().err
    assert "must be this device's own" in err and err.count("\n") == 1


@pytest.mark.parametrize(("lines", "expected"), [
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1"),
    ([json.dumps({"messages": GOOD[0]}), "{not json"], "line 2"),
    ([json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})],
     "line 1"),
])
def test_tune_names_the_bad_line_of_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             lines: list[str], expected: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    assert main(["tune", "--data", str(data), "--api", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_tune_with_a_missing_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "--data", str(tmp_path / "nope.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_tune_without_a_daemon_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": GOOD[0]})])
    assert main(["tune", "--data", str(data), "--api", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err


def test_a_tune_request_is_checked() -> None:
    request, chats = parse_tune_request({"examples": GOOD, "rounds": 2, "rank": 4, "steps_per_round": 5,
                                         "aggregate": "median"})
    assert request == TuneRequest(rounds=2, rank=4, alpha=8.0, steps=5, aggregate="median")
    assert chats == GOOD
    for body, message in (
        ([], "JSON object"),
        ({}, "'examples' is missing"),
        ({"examples": GOOD, "rounds": 0}, "'rounds'"),
        ({"examples": GOOD, "rank": True}, "'rank'"),
        ({"examples": GOOD, "aggregate": "max"}, "'aggregate'"),
        ({"examples": GOOD, "alpha": -1}, "'alpha'"),
        ({"examples": GOOD, "lr": 1}, "unknown field(s): lr"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_tune_request(body)


async def test_the_tune_endpoint_answers_bad_requests_with_400_and_waits_for_the_mesh(make_api: MakeApi) -> None:
    served = await make_api()
    async with served.session.post(f"{served.url}/v1/tune", json={"examples": [], "rounds": 2}) as response:
        assert response.status == 400
        assert "example" in (await response.json())["error"]["message"]
    async with served.session.post(f"{served.url}/v1/tune", json={"examples": GOOD}) as response:
        assert response.status == 503  # no mesh attached: the node is starting
    async with served.session.post(f"{served.url}/v1/chat/completions", data=b"x" * (2 << 20),
                                   headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413  # other requests keep their 1 MiB bound
    async with served.session.get(f"{served.url}/v1/tune") as response:
        assert response.status == 200 and (await response.json())["state"] == "starting"


def test_the_progress_line_shows_round_loss_and_peers() -> None:
    line = TuneProgress.progress_line({"type": "progress", "state": "training", "round": 2, "rounds": 4,
                                       "peers": 3, "loss": 1.23456, "message": ""})
    assert "round 2/4" in line and "local loss 1.235" in line and "peers 3" in line
    assert line.startswith("[" + "#" * 6 + ".")


def test_meshllm_status_shows_the_tune_job_and_the_last_adapter() -> None:
    from tui.status_table import format_tune

    running = {"role": "coordinator+participant", "job_id": "n1/tune-1", "state": "training", "round": 2,
               "rounds": 3, "participants": ["n1", "n2"], "loss": 0.5, "last_finished": None}
    assert format_tune(running) == ("job n1/tune-1 (coordinator+participant): round 2/3, training, "
                                    "2 participant(s), loss 0.500")
    finished = {"role": None, "job_id": None, "last_finished": {"job_id": "n1/tune-1", "digest": "f" * 64,
                                                                "adapter": "0123456789abcdef"}}
    assert format_tune(finished) == "last job n1/tune-1 finished: adapter 0123456789abcdef"
    assert format_tune({"role": None, "job_id": None, "last_finished": None}) is None
