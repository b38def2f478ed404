"""`meshllm bench --concurrency`: the arithmetic of concurrent answers (aggregate rate, percentiles,
ratios, TTFT under load) on hand-made arrival times, the streaming on a fake client, and the
command end to end on a tiny model (figures present, never a speed asserted)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from daemon.cli import main
from tui.bench.concurrency import (AnswerTiming, ConcurrencyReport, NodeInfo, aggregate_tokens_per_s,
                                   format_concurrency, level_result, node_info, parse_levels, percentile,
                                   round_figures, round_order, under_load, with_ratios)
from tui.bench.report import BenchError
from tui.bench.streams import long_prompt_under_load, stream_answer
from tui.client import ChatDelta, DaemonError


def answer(sent: float, *times: float, tokens: int | None = None, finish: str = "length") -> AnswerTiming:
    return AnswerTiming(sent, tuple(times), len(times) if tokens is None else tokens, finish)


# -- the arithmetic --------------------------------------------------------------------------------


def test_percentiles_interpolate_between_the_nearest_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_aggregate_rate_counts_tokens_after_each_first_over_the_whole_decode_phase() -> None:
    # a: first token at 1.0, 3 more by 1.3; b: first at 1.05, 2 more by 1.45
    a = answer(0.0, 1.0, 1.1, 1.2, 1.3)
    b = answer(0.0, 1.05, 1.25, 1.45)
    figures = round_figures([a, b])
    assert figures.decode_tokens == 5
    assert figures.decode_phase_s == pytest.approx(0.45)  # earliest first (1.0) to latest last (1.45)
    assert figures.tokens_per_s == pytest.approx(5 / 0.45)
    assert aggregate_tokens_per_s([a]) == pytest.approx(3 / 0.3)


def test_answers_served_one_after_another_gain_nothing() -> None:
    # the same two answers of 10 tokens at 100 tokens/s, the second after the first
    first = answer(0.0, *[1.0 + i * 0.01 for i in range(11)])
    second = answer(0.0, *[1.2 + i * 0.01 for i in range(11)])
    alone = aggregate_tokens_per_s([first])
    together = aggregate_tokens_per_s([first, second])
    assert alone == pytest.approx(100.0)
    assert together == pytest.approx(20 / 0.3)  # the second's prompt and first token count as wall time


def test_an_answer_with_no_token_adds_nothing() -> None:
    assert round_figures([answer(0.0)]).tokens_per_s is None
    assert aggregate_tokens_per_s([answer(0.0, 1.0, 1.1), answer(0.0)]) == pytest.approx(10.0)


def test_level_pools_gaps_and_ttfts_of_every_answer_and_round() -> None:
    round1 = [answer(0.0, 0.1, 0.2, 0.4), answer(0.0, 0.2, 0.3, 0.4)]   # gaps 100, 200; 100, 100 ms
    round2 = [answer(1.0, 1.3, 1.4, 1.5, tokens=3), answer(1.0, 1.1, tokens=2, finish="stop")]
    lv = level_result(2, [round1, round2], asked_tokens=3)
    assert lv.level == 2 and lv.answers == 4 and len(lv.rounds) == 2
    assert lv.gap_p50_ms == pytest.approx(100.0) and lv.gap_max_ms == pytest.approx(200.0)
    assert lv.ttft_p50_ms == pytest.approx(150.0)  # 100, 200, 300, 100 ms
    assert lv.short_answers == 1  # 2 of 3 tokens: it stopped early
    assert lv.decode_tokens == 2 + 2 + 2 + 1
    rates = [f.tokens_per_s for f in lv.rounds]
    assert rates[0] == pytest.approx(4 / 0.3) and rates[1] == pytest.approx(3 / 0.4)
    assert lv.aggregate_tokens_per_s == pytest.approx((4 / 0.3 + 3 / 0.4) / 2)


def test_ratio_is_against_level_one_of_the_same_run() -> None:
    one = level_result(1, [[answer(0.0, 1.0, 1.1, 1.2)]], 3)           # 2 tokens in 0.2 s: 10 tokens/s
    four = level_result(4, [[answer(0.0, 1.0, 1.05, 1.1)] * 4], 3)     # 4 * 2 tokens in 0.1 s: 80 tokens/s
    levels = with_ratios([one, four])
    assert levels[0].ratio_to_one == pytest.approx(1.0)
    assert levels[1].ratio_to_one == pytest.approx(8.0)
    assert with_ratios([four])[0].ratio_to_one is None


def test_levels_are_parsed_and_alternate_round_by_round() -> None:
    assert parse_levels("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("", "1,x", "0,2", "2,2"):
        with pytest.raises(BenchError):
            parse_levels(bad)
    assert round_order([1, 4], 0) == [1, 4] and round_order([1, 4], 1) == [4, 1] and round_order([1, 4], 2) == [1, 4]


def test_ttft_under_load_compares_the_longest_gap_meanwhile_with_the_normal_gap() -> None:
    # two answers decoding every 10 ms; the prompt is sent at 1.0 and its first token comes at 1.3;
    # meanwhile one answer waits 50 ms once
    steady = [0.5 + i * 0.01 for i in range(51)]                                    # 0.50 .. 1.00
    a = answer(0.4, *steady, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30, 1.35)
    b = answer(0.4, *[t + 0.005 for t in steady], 1.015, 1.025, 1.075, 1.085, 1.295, 1.4)
    probe = answer(1.0, 1.3, tokens=1)
    figures = under_load([a, b], probe)
    assert figures.ttft_ms == pytest.approx(300.0)
    assert figures.running == 2 and figures.running_at_first_token == 2
    assert figures.normal_gap_ms == pytest.approx(10.0)
    assert figures.longest_gap_ms == pytest.approx(210.0)  # b: 1.085 -> 1.295 overlaps [1.0, 1.3)
    assert figures.gap_ratio == pytest.approx(21.0)


def test_ttft_under_load_of_answers_that_ended_before_the_prompt() -> None:
    done = answer(0.0, 0.1, 0.2, 0.3)
    figures = under_load([done], answer(1.0, 1.2, tokens=1))
    assert figures.running == 0 and figures.running_at_first_token == 0
    assert figures.normal_gap_ms == pytest.approx(100.0) and figures.longest_gap_ms is None
    assert figures.gap_ratio is None


# -- the report ------------------------------------------------------------------------------------


def report() -> ConcurrencyReport:
    one = level_result(1, [[answer(0.0, 1.0, 1.1, 1.2)]], 3)
    four = level_result(4, [[answer(0.0, 1.0, 1.05, 1.1)] * 4], 3)
    status = {"model": {"name": "tiny", "num_layers": 6, "weights": "int4", "kernel": "meshllm kernels",
                        "batch_invariant": True}, "plan": {"state": "active", "stages": [{"node_id": "a"}]}}
    return ConcurrencyReport(target="one local node, 1 thread(s)", node=node_info(status), cpu_model="Some CPU",
                             decode_tokens=2, rounds=1, levels=with_ratios([one, four]))


def row_of(text: str, label: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith(label))[len(label):].split()


def test_table_shows_the_aggregate_rate_and_the_ratio_per_level() -> None:
    text = format_concurrency(report())
    assert row_of(text, "answers at once") == ["1", "4"]
    assert row_of(text, "aggregate decode tokens/s") == ["10.00", "80.00"]
    assert row_of(text, "  ratio to 1 answer") == ["1.00x", "8.00x"]
    assert row_of(text, "time between tokens p50 ms") == ["100.0", "50.0"]
    assert "CPU: Some CPU" in text and "int4 weights, kernel meshllm kernels (batch-invariant)" in text


def test_json_has_every_figure_of_every_level() -> None:
    data = json.loads(json.dumps(report().to_json()))
    assert data["mode"] == "concurrency" and data["cpu_model"] == "Some CPU"
    assert data["model"]["weights"] == "int4" and data["model"]["kernel"] == "meshllm kernels"
    assert [lv["level"] for lv in data["levels"]] == [1, 4]
    assert data["levels"][1]["aggregate_tokens_per_s"] == pytest.approx(80.0)
    assert data["levels"][1]["ratio_to_one"] == pytest.approx(8.0)
    assert data["levels"][1]["rounds"][0]["decode_phase_s"] == pytest.approx(0.1)


def test_node_info_of_a_status_without_a_model_is_unknown() -> None:
    assert node_info({}) == NodeInfo("?", 0, "?", "?", None, 0)


# -- streaming, on a fake client -------------------------------------------------------------------


class FakeClient:
    """Streams scripted answers; records, when each request comes, what had streamed by then."""

    def __init__(self, script: dict[str, list[ChatDelta]], error: DaemonError | None = None) -> None:
        self.script = script
        self.error = error
        self.streamed: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, int]]] = []

    async def chat(self, messages: Sequence[dict[str, str]], *, max_tokens: int,
                   temperature: float) -> AsyncIterator[ChatDelta]:
        text = messages[-1]["content"]
        self.requests.append((text, dict(self.streamed)))
        if self.error is not None:
            raise self.error
        for delta in self.script.get(text, self.script["*"])[:max_tokens + 2]:
            await asyncio.sleep(0)
            if delta.text:
                self.streamed[text] = self.streamed.get(text, 0) + 1
            yield delta


def tokens(n: int, finish: str = "length") -> list[ChatDelta]:
    return [ChatDelta(text=f"t{i}") for i in range(n)] + [ChatDelta(finish_reason=finish),
                                                          ChatDelta(completion_tokens=n + (finish == "stop"))]


async def test_a_streamed_answer_keeps_each_tokens_arrival() -> None:
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731
    cut = await stream_answer(FakeClient({"*": tokens(3)}), [{"role": "user", "content": "x"}], 3, clock)  # type: ignore[arg-type]
    assert cut.sent_s == 0.0 and cut.token_times_s == (1.0, 2.0, 3.0)  # "length": the finish adds no token
    assert cut.tokens == 3 and cut.finish_reason == "length"
    eos = await stream_answer(FakeClient({"*": tokens(2, "stop")}), [{"role": "user", "content": "x"}], 9, clock)  # type: ignore[arg-type]
    assert len(eos.token_times_s) == 3 and eos.tokens == 3  # the end-of-sequence token comes with the finish


async def test_a_node_that_turns_answers_away_names_max_sessions() -> None:
    client = FakeClient({"*": []}, error=DaemonError("too many sessions", status=429))
    with pytest.raises(BenchError, match="--max-sessions"):
        await stream_answer(client, [{"role": "user", "content": "x"}], 3, lambda: 0.0)  # type: ignore[arg-type]


async def test_the_long_prompt_goes_out_once_every_running_answer_streamed_its_lead() -> None:
    prompt = [{"role": "user", "content": "long prompt"}]
    client = FakeClient({"*": tokens(20), "long prompt": tokens(1)})
    ticks = itertools.count()
    figures, background, probe = await long_prompt_under_load(
        client, prompt, background=3, background_tokens=20, lead_tokens=5,  # type: ignore[arg-type]
        clock=lambda: float(next(ticks)))
    text, streamed_then = next(r for r in client.requests if r[0] == "long prompt")
    assert len(streamed_then) == 3 and all(count >= 5 for count in streamed_then.values())
    assert len(background) == 3 and all(a.tokens == 20 for a in background)
    assert probe.tokens == 1 and figures.ttft_ms is not None and figures.running == 3


# -- the command -----------------------------------------------------------------------------------


def test_bench_needs_something_to_measure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "--concurrency" in capsys.readouterr().err
    assert main(["bench", "--concurrency", "1,x"]) == 2
    assert main(["bench", "--concurrency", "1,2", "--mesh", "2"]) == 2


def test_bench_concurrency_on_a_local_node(tiny_llama: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--concurrency", "1,2", "--model", str(tiny_llama), "--cache-dir", str(tmp_path / "cache"),
                 "--threads", "1", "--decode-tokens", "4", "--rounds", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert row_of(out, "answers at once") == ["1", "2"]
    rates = row_of(out, "aggregate decode tokens/s")
    assert len(rates) == 2 and all(re.fullmatch(r"[\d,]+\.\d\d", r) for r in rates)
    assert row_of(out, "  ratio to 1 answer")[0] == "1.00x"
    assert re.fullmatch(r"[\d,]+\.\d\dx", row_of(out, "  ratio to 1 answer")[1])
    assert row_of(out, "decode tokens counted") == ["4", "8"]  # 1 x 4 and 2 x 4 tokens after the first
    for label in ("time between tokens p50 ms", "time between tokens p95 ms", "TTFT p50 ms"):
        assert all(cell != "-" for cell in row_of(out, label))
    assert "(6 layers), f32 weights, kernel " in out and "CPU: " in out
