"""`meshllm bench`: the local benchmark on a fake engine and clock, the mesh benchmark's
arithmetic and tables on hand-made status snapshots, and `--api` against a real 2-node mesh."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from tests.daemon.fake_engine import FakeEngine
from tui.bench.api import interleave
from tui.bench.local import bench_prompt_ids, format_bench, run_local_bench
from tui.bench.mesh import compare, format_comparison
from tui.bench.report import (BenchError, MeshMeasure, agreement, format_measure, hops_per_token, ratio,
                              stats_delta, summarize)

# -- --local ---------------------------------------------------------------------------------


def test_result_fields_from_a_fake_clock() -> None:
    ticks = itertools.count()
    engine = FakeEngine(max_positions=4096, endless=True)
    result = run_local_bench(engine, threads=3, load_s=1.25, prompt_tokens=100, decode_tokens=10,
                             clock=lambda: next(ticks) * 0.01)
    # one clock read at the start and one per token: 11 tokens, 10 intervals of 10 ms after the first
    assert result.prompt_tokens == 100 and result.decode_tokens == 10
    assert result.ttft_ms == pytest.approx(10.0)
    assert result.decode_tokens_per_s == pytest.approx(100.0)
    assert result.ms_per_layer == 1.5 and result.threads == 3
    assert result.to_json()["model_name"] == "fake-model"
    assert "100.00 tokens/s (10 tokens)" in format_bench(result)
    prompt, _params = engine.calls[-1]
    assert len(prompt) == 100 and _params.greedy and _params.max_tokens == 11


def test_prompt_is_exactly_the_asked_length() -> None:
    assert len(bench_prompt_ids(FakeEngine(), 777)) == 777


def test_prompt_that_does_not_fit_is_refused() -> None:
    with pytest.raises(BenchError, match="256 positions"):
        run_local_bench(FakeEngine(max_positions=256), threads=1, load_s=0.0, prompt_tokens=250)


# -- mesh: pure parts --------------------------------------------------------------------------


def test_agreement_counts_tokens_before_the_first_divergence() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]]
    same = agreement(reference, reference)
    assert same.all_identical and same.prefix_fraction == 1.0 and same.identical_answers == 3
    drift = agreement(reference, [[1, 2, 0, 4], [5, 6, 7, 8], [0, 9]])
    # 2 + 4 + 0 of 10 reference tokens before each answer first differs; token 4 after it does not count
    assert (drift.prefix_tokens, drift.reference_tokens, drift.prefix_fraction) == (6, 10, 0.6)
    assert drift.identical_answers == 1 and not drift.all_identical
    short = agreement([[1, 2, 3]], [[1, 2]])  # an answer that stopped early is not identical
    assert short.prefix_fraction == pytest.approx(2 / 3, abs=1e-4) and not short.all_identical
    with pytest.raises(ValueError):
        agreement(reference, reference[:2])


def test_ratio_is_none_when_a_side_is_unknown() -> None:
    assert ratio(9.5, 10.0) == 0.95
    assert ratio(None, 10.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_hops_per_token_count_transfers_between_different_nodes() -> None:
    assert hops_per_token("a", ["a"]) == 0  # a node alone
    assert hops_per_token("a", ["a", "b", "c"]) == 3  # a computes first: a->b->c->a
    assert hops_per_token("a", ["b", "c", "a"]) == 3  # a computes last: a->b->c->a(->a)
    assert hops_per_token("a", ["b", "c"]) == 3  # entry holds no layers: a->b->c->a


def stats(decode_steps: int, decode_ms_avg: float, hops: int, bytes_per_hop: float,
          prefill_steps: int = 0, prefill_ms: float = 0.0, prefill_bytes: int = 0) -> dict[str, Any]:
    return {"decode_steps": decode_steps, "decode_compute_ms_avg": decode_ms_avg,
            "prefill_steps": prefill_steps, "prefill_positions": 0, "prefill_compute_ms": prefill_ms,
            "decode_hops_sent": hops, "decode_bytes_per_hop": bytes_per_hop,
            "prefill_bytes_sent": prefill_bytes}


def status(self_id: str, stages: list[tuple[str, int, int]], st: dict[str, Any]) -> dict[str, Any]:
    return {
        "self_id": self_id,
        "model": {"id": "abcdef0123456789", "name": "Tiny", "num_layers": 6},
        "codec": "f16",
        "plan": {"term": 1, "epoch": 1, "state": "active", "codec": "f16",
                 "stages": [{"node_id": n, "start_layer": s, "end_layer": e} for n, s, e in stages]},
        "nodes": [{"id": n, "name": f"node-{n}"} for n, _, _ in stages],
        "stats": st,
    }


def test_stats_delta_is_what_happened_between_two_snapshots() -> None:
    before = stats(10, 2.0, 10, 1000.0, prefill_steps=1, prefill_ms=50.0, prefill_bytes=9000)
    after = stats(30, 3.0, 30, 1200.0, prefill_steps=3, prefill_ms=170.0, prefill_bytes=27000)
    d = stats_delta(before, after)
    assert (d.decode_steps, d.decode_compute_ms) == (20, pytest.approx(70.0))  # 90 - 20 ms
    assert (d.decode_hops_sent, d.decode_bytes_sent) == (20, 26000)  # 36000 - 10000 bytes
    assert (d.prefill_steps, d.prefill_compute_ms, d.prefill_bytes_sent) == (2, 120.0, 18000)


def two_node_measure(ms_per_token_stage: tuple[float, float] = (4.0, 6.0)) -> MeshMeasure:
    stages = [("a", 0, 3), ("b", 3, 6)]
    zero = stats(0, 0.0, 0, 0.0)
    a_ms, b_ms = ms_per_token_stage
    decode = {"a": stats_delta(zero, stats(10, a_ms, 10, 1200.0)),
              "b": stats_delta(zero, stats(10, b_ms, 10, 1300.0))}
    prefill = {"a": stats_delta(zero, stats(0, 0.0, 0, 0.0, 3, 150.0, 90000)),  # 3 TTFT runs
               "b": stats_delta(zero, stats(0, 0.0, 0, 0.0, 3, 210.0, 0))}
    return summarize(
        api_url="http://127.0.0.1:1", entry_status=status("a", stages, zero),
        names={"a": "laptop", "b": "phone"}, decode=decode, prefill=prefill, prompt_tokens=512,
        ttft_runs_ms=[300.0, 200.0, 250.0], decode_tokens=40, decode_s=0.5, answers=[[1, 2, 3], [4, 5]],
    )


def test_summary_of_a_two_node_mesh() -> None:
    m = two_node_measure()
    assert (m.nodes, m.codec, m.hops_per_token) == (2, "f16", 2)
    assert m.ttft_ms == 250.0 and m.decode_tokens_per_s == 80.0 and m.ms_per_token == 12.5
    assert [(s.name, s.decode_compute_ms, s.prefill_compute_ms, s.decode_bytes_per_hop)
            for s in m.stages] == [("laptop", 4.0, 50.0, 1200.0), ("phone", 6.0, 70.0, 1300.0)]
    assert m.stage_compute_ms_per_token == 10.0
    assert m.non_compute_ms_per_token == 2.5 and m.per_hop_ms == 1.25
    assert m.decode_bytes_per_hop == 1250.0
    assert m.stages[0].prefill_bytes_per_prompt == 30000.0
    text = format_measure(m)
    assert "80.00 tokens/s (40 tokens), 12.50 ms per token" in text
    assert "1.25 ms per hop" in text and "bytes per decode hop  1,250" in text


def test_a_stage_whose_api_was_not_given_is_unknown() -> None:
    m = two_node_measure()
    zero = stats(0, 0.0, 0, 0.0)
    only_entry = summarize(
        api_url="http://127.0.0.1:1", entry_status=status("a", [("a", 0, 3), ("b", 3, 6)], zero),
        names={}, decode={"a": stats_delta(zero, stats(10, 4.0, 10, 1200.0))}, prefill={},
        prompt_tokens=512, ttft_runs_ms=[1.0], decode_tokens=40, decode_s=0.5, answers=[],
    )
    assert [s.measured for s in only_entry.stages] == [True, False]
    assert only_entry.stage_compute_ms_per_token is None and only_entry.per_hop_ms is None
    assert only_entry.decode_bytes_per_hop == m.stages[0].decode_bytes_per_hop


def test_comparison_ratios_agreement_and_table() -> None:
    zero = stats(0, 0.0, 0, 0.0)
    single = summarize(
        api_url="http://127.0.0.1:1", entry_status=status("s", [("s", 0, 6)], zero), names={"s": "solo"},
        decode={"s": stats_delta(zero, stats(10, 9.0, 0, 0.0))}, prefill={}, prompt_tokens=512,
        ttft_runs_ms=[200.0], decode_tokens=50, decode_s=0.5, answers=[[1, 2, 3], [4, 5]],
    )  # 100 tokens/s: 10 ms per token, 9 in compute, 1 elsewhere
    mesh = two_node_measure()  # 80 tokens/s, 2.5 ms per token outside compute, 2 hops
    c = compare(single, [mesh], nodes=2, cores=4, single_threads=4, node_threads=2)
    run = c.runs[0]
    assert (run.codec, run.decode_ratio, run.ttft_ratio, run.per_hop_ms_net) == ("f16", 0.8, 1.25, 0.75)
    assert run.agreement.all_identical and run.reference is single
    data = json.loads(json.dumps(c.to_json()))
    assert data["mode"] == "mesh" and data["nodes"] == 2 and data["single_threads"] == 4
    assert data["codecs"][0]["decode_ratio"] == 0.8
    assert data["codecs"][0]["measure"]["stages"][1]["name"] == "phone"
    assert data["codecs"][0]["reference"]["decode_tokens_per_s"] == 100.0
    lines = format_comparison(c).splitlines()
    assert lines[0].startswith("Tiny (6 layers): one node with 4 thread(s) vs a 2-node local mesh")

    def row(label: str) -> list[str]:
        return next(line for line in lines if line.startswith(label))[len(label):].split()

    assert row("decode tokens/s") == ["100.00", "80.00"]
    assert row("TTFT 512 ms") == ["200", "250"]
    assert row("bytes per decode hop") == ["-", "1,250"]
    assert row("per-hop ms (net)") == ["-", "0.75"]
    assert row("identical answers") == ["2/2", "2/2"]
    assert [line for line in lines if "mesh / single" in line][0].split()[-2:] == ["1.00", "0.80"]

    # against the single node measured in the same turns (here 50 tokens/s, TTFT 500 ms)
    slow = summarize(
        api_url="http://127.0.0.1:1", entry_status=status("s", [("s", 0, 6)], zero), names={"s": "solo"},
        decode={"s": stats_delta(zero, stats(10, 18.0, 0, 0.0))}, prefill={}, prompt_tokens=512,
        ttft_runs_ms=[500.0], decode_tokens=50, decode_s=1.0, answers=[],
    )
    paired = compare(single, [mesh], references=[slow], nodes=2, cores=4, single_threads=4, node_threads=2)
    assert (paired.runs[0].decode_ratio, paired.runs[0].ttft_ratio) == (1.6, 0.5)
    assert paired.runs[0].agreement.all_identical  # answers still come from `single`
    assert row_of(format_comparison(paired), "  single, same turns") == ["50.00"]


def row_of(text: str, label: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith(label))[len(label):].split()


async def test_interleave_takes_turns_so_drift_hits_both_alike() -> None:
    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        async def ttft_once(self) -> None:
            calls.append(f"{self.name}:ttft")

        async def decode_once(self, text: str, new_tokens: int) -> int:
            calls.append(f"{self.name}:decode{new_tokens}")
            return new_tokens

    await interleave([Recorder("a"), Recorder("b")], ttft_runs=2, decode_tokens=30, rounds=3)  # type: ignore[list-item]
    assert calls == ["a:ttft", "b:ttft", "b:ttft", "a:ttft",
                     "a:decode10", "b:decode10", "b:decode10", "a:decode10", "a:decode10", "b:decode10"]


# -- mesh: --api against a real 2-node mesh ------------------------------------------------------


def test_bench_api_measures_a_running_mesh(tiny_llama: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tui.launcher import LocalMesh

    (tmp_path / "mesh").mkdir()
    from meshllm.model.cache import prepare
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve

    # room for 4 of the 6 layers each, 2 of them the private ones ([0, 1) and [5, 6)): the
    # plan must use both nodes for [1, 5), however the start-up speed measurements of a busy
    # machine come out
    shape = model_shape(load_config(prepare(resolve(tiny_llama))))
    budget = shape.embed_head_bytes + 4 * shape.layer_bytes
    mesh = LocalMesh(2, model=str(tiny_llama), threads=1, work_dir=tmp_path / "mesh",
                     extra_args=["--mesh-name", f"test-{uuid.uuid4().hex[:8]}",
                                 "--cache-dir", str(tmp_path / "cache"),
                                 "--mem-budget", str(budget)])
    mesh.start()
    try:
        mesh.wait_ready(120)
        urls = [arg for node in mesh.nodes for arg in ("--api", node.url)]
        code = main(["bench", *urls, "--json", "--prompt-tokens", "32", "--decode-tokens", "8",
                     "--ttft-runs", "1", "--agreement-tokens", "8"])
    finally:
        mesh.stop()
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["mode"] == "api" and data["nodes"] == 2 and data["codec"] == "f32"
    assert data["prompt_tokens"] == 32 and data["num_layers"] == 6
    assert data["ttft_ms"] > 0 and data["decode_tokens"] == 8 and data["decode_tokens_per_s"] > 0
    assert data["hops_per_token"] == 2
    spans = [(s["start_layer"], s["end_layer"]) for s in data["stages"]]
    assert spans[0][0] == 1 and spans[-1][1] == 5 and len(spans) == 2
    assert all(s["measured"] and s["decode_compute_ms"] > 0 and s["prefill_compute_ms"] > 0
               for s in data["stages"])
    assert data["decode_bytes_per_hop"] > 64 * 4  # 64 f32 values per position, plus the message
    for key in ("ms_per_token", "stage_compute_ms_per_token", "non_compute_ms_per_token", "per_hop_ms"):
        assert data[key] is not None
    assert len(data["answers"]) == 5 and all(len(a) == 8 for a in data["answers"])
