"""The local benchmark's arithmetic and report, on the fake engine with a fake clock."""

from __future__ import annotations

import itertools

import pytest

from daemon.bench import BenchError, bench_prompt_ids, format_bench, run_local_bench
from tests.daemon.fake_engine import FakeEngine


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
