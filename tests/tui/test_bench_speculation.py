"""`meshllm bench --speculate`: the shipped prompt sets, the arithmetic of a speculation run
(decode rate, acceptance, tokens per trip, ratio and identity to off) on hand-made answers, the
measuring in turns on fake nodes, the command's usage errors, and the command end to end on a
tiny model (figures present, never a speed asserted)."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from tui.bench.concurrency import AnswerTiming, NodeInfo
from tui.bench.report import BenchError
from tui.bench.speculation import (PROMPT_SETS, Prompt, SpecAnswer, Speculation, SpeculationReport, acceptance,
                                   answer_from_events, decode_figures, format_speculation, identity, load_prompt_set,
                                   mode_results, order_of_turn, parse_modes, parse_prompt_set, parse_prompt_sets,
                                   prompt_set_path, tokens_per_trip)
from tui.bench.speculation_run import Config, measure_group, reports, up_args

# -- the prompt sets -------------------------------------------------------------------------------


def test_the_two_shipped_sets_parse_with_about_twenty_prompts_each() -> None:
    assert PROMPT_SETS == ("repetitive", "open")
    sets = {name: load_prompt_set(name) for name in PROMPT_SETS}
    for name, prompts in sets.items():
        assert 18 <= len(prompts) <= 25, name
        assert len({p.id for p in prompts}) == len(prompts)
        for p in prompts:
            assert p.chat()[-1]["role"] == "user" and p.chat()[-1]["content"].strip()
    every_id = [p.id for prompts in sets.values() for p in prompts]
    assert len(set(every_id)) == len(every_id)  # no id shared between the sets


def test_repetitive_prompts_carry_the_text_the_answer_copies() -> None:
    for p in load_prompt_set("repetitive"):
        instruction, _, given = p.chat()[-1]["content"].partition("\n\n")
        assert len(given) >= 150, p.id  # a paragraph or a snippet, after the instruction
        assert len(given.splitlines()) >= 1 and len(instruction) < len(given) + 200
    for p in load_prompt_set("open"):
        assert len(p.chat()[-1]["content"]) < 200, p.id  # a chat question, nothing to copy


def test_the_prompt_folder_states_a_free_licence() -> None:
    readme = prompt_set_path("open").parent / "README.md"
    text = readme.read_text()
    assert "CC0-1.0" in text and "repetitive.jsonl" in text and "open.jsonl" in text


def test_a_prompt_file_of_your_own(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n\n'
                    '{"id": "b", "messages": [{"role": "system", "content": "terse"}, '
                    '{"role": "user", "content": "yo"}]}\n')
    prompts = load_prompt_set(str(path))
    assert [p.id for p in prompts] == ["a", "b"]
    assert prompts[1].chat() == [{"role": "system", "content": "terse"}, {"role": "user", "content": "yo"}]


@pytest.mark.parametrize(("text", "says"), [
    ("not json\n", "line 1 is not JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "\"id\""),
    ('{"id": "a", "messages": []}\n', "non-empty list"),
    ('{"id": "a", "messages": [{"role": "user"}]}\n', "non-empty list"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n' * 2, "id 'a' twice"),
    ("\n", "no prompt"),
])
def test_a_broken_prompt_file_is_refused_with_where(text: str, says: str) -> None:
    with pytest.raises(BenchError, match=re.escape(says)):
        parse_prompt_set(text, "mine.jsonl")


def test_modes_and_sets_are_parsed() -> None:
    assert parse_modes("off,ngram,draft,auto") == ["off", "ngram", "draft", "auto"]
    assert parse_modes("ngram") == ["off", "ngram"]  # off: the reference, always measured
    assert parse_modes("auto, off") == ["auto", "off"]
    for bad in ("fast", "", "ngram,ngram"):
        with pytest.raises(BenchError):
            parse_modes(bad)
    assert parse_prompt_sets(None) == ["repetitive", "open"]
    assert parse_prompt_sets("open") == ["open"]
    with pytest.raises(BenchError):
        parse_prompt_sets("open,open")


def test_modes_take_turns_prompt_by_prompt_and_round_by_round() -> None:
    modes = ["off", "ngram", "auto"]
    assert order_of_turn(modes, 0, 0) == modes
    assert order_of_turn(modes, 0, 1) == ["auto", "ngram", "off"]
    assert order_of_turn(modes, 1, 0) == ["auto", "ngram", "off"]
    assert order_of_turn(modes, 1, 1) == modes


# -- one answer from its events ---------------------------------------------------------------------


def chunks(texts: Sequence[str], ids: Sequence[int], *, finish: str = "length",
           speculation: dict[str, int] | None = None, usage: bool = True) -> list[str]:
    """The events of one streamed answer, shaped as daemon/api/app.py sends them."""
    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extension: Any) -> str:
        return json.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            "meshllm": {**extension, "served_by": "mesh"}})

    final: dict[str, Any] = {"token_ids": list(ids)}
    if speculation is not None:
        final["speculation"] = speculation
    events = [chunk({"role": "assistant", "content": ""}), *[chunk({"content": t}) for t in texts],
              chunk({}, finish, **final)]
    if usage:
        events.append(json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": len(ids)}}))
    return [*events, "[DONE]"]


def timed(events: Sequence[str], start: float = 1.0) -> list[tuple[float, str]]:
    return [(start + i, e) for i, e in enumerate(events)]


def test_an_answer_keeps_its_token_times_ids_and_speculation() -> None:
    events = chunks(["a", "b", "c"], [5, 6, 7], speculation={"drafted": 6, "accepted": 3, "trips": 2})
    a = answer_from_events("p1", 0.0, timed(events))
    assert a.prompt_id == "p1" and a.token_ids == (5, 6, 7)
    assert a.timing.token_times_s == (2.0, 3.0, 4.0)  # the role chunk and the "length" finish add no token
    assert a.timing.tokens == 3 and a.timing.finish_reason == "length" and a.timing.ttft_ms == 2000.0
    assert a.speculation == Speculation(drafted=6, accepted=3, trips=2)


def test_an_answer_without_speculation_counts_zeros() -> None:
    a = answer_from_events("p", 0.0, timed(chunks(["a", "b"], [1, 2, 0], finish="stop", usage=False)))
    assert a.speculation == Speculation(0, 0, 0)
    assert len(a.timing.token_times_s) == 3 and a.timing.tokens == 3  # EOS comes with the finish chunk


def test_a_failed_or_silent_answer_is_a_bench_error() -> None:
    with pytest.raises(BenchError, match="failed an answer: boom"):
        answer_from_events("p", 0.0, [(1.0, json.dumps({"error": {"message": "boom"}}))])
    no_ids = [e for e in chunks(["a"], [1]) if "token_ids" not in e]
    with pytest.raises(BenchError, match="token ids"):
        answer_from_events("p", 0.0, timed(no_ids))
    by_fallback = [e.replace('"served_by": "mesh"', '"served_by": "fallback"') for e in chunks(["a"], [1])]
    with pytest.raises(BenchError, match="fallback model answered"):
        answer_from_events("p", 0.0, timed(by_fallback))


# -- the arithmetic ----------------------------------------------------------------------------------


def answer(prompt_id: str, times: Sequence[float], ids: Sequence[int] | None = None, *, sent: float = 0.0,
           spec: tuple[int, int, int] = (0, 0, 0), tokens: int | None = None) -> SpecAnswer:
    count = len(times) if tokens is None else tokens
    return SpecAnswer(prompt_id, AnswerTiming(sent, tuple(times), count, "length"),
                      tuple(ids if ids is not None else range(count)), Speculation(*spec))


def test_decode_rate_sums_tokens_after_the_first_over_the_summed_first_to_last_times() -> None:
    fast = answer("a", [1.0, 1.1, 1.2, 1.3, 1.4])  # 4 tokens in 0.4 s
    slow = answer("b", [5.0, 6.0])  # 1 token in 1 s
    figures = decode_figures([fast, slow])
    assert figures.decode_tokens == 5 and figures.decode_s == pytest.approx(1.4)
    assert figures.tokens_per_s == pytest.approx(5 / 1.4)  # not the mean of 10 and 1 tokens/s
    assert decode_figures([answer("c", [])]).tokens_per_s is None


def test_acceptance_and_tokens_per_trip() -> None:
    total = Speculation(10, 6, 4) + Speculation(2, 0, 1)
    assert total == Speculation(12, 6, 5)
    assert acceptance(total) == pytest.approx(0.5)
    assert tokens_per_trip(total) == pytest.approx((6 + 5) / 5)  # each trip: its accepted drafts + its own token
    assert acceptance(Speculation()) is None and tokens_per_trip(Speculation()) is None


def test_identity_counts_answers_equal_to_the_reference_token_for_token() -> None:
    reference = {"a": (1, 2, 3, 4), "b": (5, 6)}
    same = identity(reference, [answer("a", [0, 1, 2, 3], [1, 2, 3, 4]), answer("b", [0, 1], [5, 7]),
                                answer("x", [0], [9])])
    assert (same.identical, same.compared) == (1, 2)  # "x" has no reference: not compared
    assert same.prefix_fraction == pytest.approx((4 + 1) / 6, abs=1e-4)  # rounded to 4 places


def two_modes() -> dict[str, list[list[SpecAnswer]]]:
    """off and ngram over prompts a and b, two rounds; ngram's second round diverges on b."""
    def off(r: int) -> list[SpecAnswer]:
        return [answer("a", [1.0, 2.0, 3.0], [1, 2, 3], sent=0.5), answer("b", [1.0, 2.0], [4, 5], sent=0.9)]

    def ngram(r: int) -> list[SpecAnswer]:
        return [answer("a", [1.0, 1.25, 1.5], [1, 2, 3], sent=0.8, spec=(4, 2, 1)),
                answer("b", [1.0, 1.5 if r == 0 else 2.0], [4, 5] if r == 0 else [4, 6], sent=0.7, spec=(2, 0, 1))]

    return {"off": [off(0), off(1)], "ngram": [ngram(0), ngram(1)]}


def test_each_mode_against_off_same_set_same_run() -> None:
    off, ngram = mode_results("repetitive", two_modes(), asked_tokens=3)
    assert off.decode_tokens_per_s == pytest.approx(3 / 3)  # (2 + 1) tokens over (2 + 1) s, both rounds
    assert ngram.rounds[0].tokens_per_s == pytest.approx(3 / 1.0) and ngram.rounds[1].tokens_per_s == pytest.approx(2)
    assert ngram.decode_tokens_per_s == pytest.approx(2.5)  # median over the rounds
    assert off.ratio_to_off == pytest.approx(1.0) and ngram.ratio_to_off == pytest.approx(2.5)
    assert (off.identical_to_off, off.compared_to_off) == (4, 4)
    assert (ngram.identical_to_off, ngram.compared_to_off) == (3, 4)
    assert off.acceptance is None and off.tokens_per_trip is None and off.drafted == 0
    assert (ngram.drafted, ngram.accepted, ngram.trips) == (12, 4, 4)
    assert ngram.acceptance == pytest.approx(4 / 12) and ngram.tokens_per_trip == pytest.approx(2.0)
    assert off.ttft_p50_ms == pytest.approx(300.0) and ngram.ttft_p50_ms == pytest.approx(250.0)  # of 4 answers
    assert off.short_answers == 2 and ngram.answers == 4  # b asked 3 tokens, got 2


def test_without_off_there_is_no_ratio_nor_identity() -> None:
    (ngram,) = mode_results("open", {"ngram": two_modes()["ngram"]}, asked_tokens=3)
    assert ngram.ratio_to_off is None and ngram.compared_to_off == 0 and ngram.prefix_fraction_to_off is None


def report_of(results: Any, **fields: Any) -> SpeculationReport:
    node = NodeInfo("SmolLM2-135M", 30, "int4", "meshllm kernels (avx512)", True, 3)
    base = dict(target="3-node local mesh, 1 thread(s) per node", nodes=3, threads=1, node=node, cpu_model="EPYC",
                answer_tokens=3, rounds=2, link_delay_ms=None, draft_model=None, results=tuple(results))
    return SpeculationReport(**{**base, **fields})


def row_of(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label + "  "))
    return line[len(label):].split()


def test_the_table_shows_every_figure_per_mode() -> None:
    status = {"mode": "ngram", "acceptance": 0.33, "tokens_per_trip": 2.0, "draft_ms_per_token": 0.04}
    results = mode_results("repetitive", two_modes(), asked_tokens=3, statuses={"off": None, "ngram": status})
    out = format_speculation(report_of(results, link_delay_ms=10.0))
    assert "repetitive set (2 prompts):" in out and "--debug-link-delay-ms 10 on every node" in out
    assert row_of(out, "") == ["off", "ngram"]
    assert row_of(out, "decode tokens/s") == ["1.00", "2.50"]
    assert row_of(out, "  ratio to off") == ["1.00x", "2.50x"]
    assert row_of(out, "acceptance") == ["-", "0.33"]
    assert row_of(out, "tokens per trip") == ["-", "2.00"]
    assert row_of(out, "draft ms per token") == ["-", "0.04"]
    assert row_of(out, "identical to off") == ["4/4", "3/4"]
    assert row_of(out, "answers (short)") == ["4", "(2)", "4", "(2)"]


def test_json_has_every_figure_of_every_mode() -> None:
    data = report_of(mode_results("open", two_modes(), asked_tokens=3)).to_json()
    assert data["mode"] == "speculation" and data["threads_per_node"] == 1
    ngram = data["results"][1]
    assert ngram["mode"] == "ngram" and ngram["prompt_set"] == "open"
    assert ngram["ratio_to_off"] == pytest.approx(2.5) and ngram["identical_to_off"] == 3
    assert len(ngram["rounds"]) == 2 and ngram["rounds"][0]["decode_tokens"] == 3
    json.dumps(data)


def test_nodes_of_each_mode_get_its_flags() -> None:
    assert up_args("off") == ["--speculate", "off"]
    assert up_args("off", draft_model="builtin", link_delay_ms=10.0) == ["--speculate", "off",
                                                                        "--debug-link-delay-ms", "10"]
    assert up_args("draft", draft_model="builtin") == ["--speculate", "draft", "--draft-model", "builtin"]
    assert up_args("auto", draft_model="/m.gguf", link_delay_ms=2.5)[2:] == ["--draft-model", "/m.gguf",
                                                                             "--debug-link-delay-ms", "2.5"]
    assert Config("one node", 1, 2, ("off",)).target == "one local node, 2 thread(s)"
    assert Config("mesh3", 3, 1, ("off",)).target == "3-node local mesh, 1 thread(s) per node"


# -- measuring in turns, on fake nodes ----------------------------------------------------------------


class FakeResponse:
    def __init__(self, payload: bytes) -> None:
        self.content = self
        self._payload = payload

    async def iter_any(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self._payload), 7):  # events split across reads
            yield self._payload[i:i + 7]


class FakeNode:
    """Answers every prompt with its tokens; records who was asked what, in order."""

    def __init__(self, name: str, asked: list[tuple[str, str, int]], spec: dict[str, int] | None) -> None:
        self.name, self.asked, self.spec = name, asked, spec

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, path: str, body: dict[str, Any],
                      idle_timeout_s: float | None) -> AsyncIterator[FakeResponse]:
        assert (method, path, body["temperature"], body["stream"]) == ("POST", "/v1/chat/completions", 0, True)
        text = body["messages"][-1]["content"]
        self.asked.append((self.name, text, body["max_tokens"]))
        n = body["max_tokens"]
        events = chunks([f"t{i}" for i in range(n)], [len(text) + i for i in range(n)], speculation=self.spec)
        yield FakeResponse(b"".join(f"data: {e}\n\n".encode() for e in events))

    async def status(self) -> dict[str, Any]:
        return {"speculation": {"mode": self.name, "acceptance": None, "tokens_per_trip": None,
                                "draft_ms_per_token": 0.5}}


async def test_every_mode_answers_every_prompt_in_turns_and_reports_against_off() -> None:
    asked: list[tuple[str, str, int]] = []
    nodes = {("mesh3", "off"): FakeNode("off", asked, None),
             ("mesh3", "ngram"): FakeNode("ngram", asked, {"drafted": 3, "accepted": 2, "trips": 1})}
    sets = {"repetitive": (Prompt("r1", ({"role": "user", "content": "one"},)),
                           Prompt("r2", ({"role": "user", "content": "two!"},)))}
    ticks = itertools.count()
    measured = await measure_group(nodes, sets, rounds=2, answer_tokens=3,  # type: ignore[arg-type]
                                   clock=lambda: float(next(ticks)))
    assert asked[:2] == [("off", "one", 4), ("ngram", "one", 4)]  # warm-ups
    assert [(who, text) for who, text, n in asked[2:]] == [
        ("off", "one"), ("ngram", "one"), ("ngram", "two!"), ("off", "two!"),  # round 1
        ("ngram", "one"), ("off", "one"), ("off", "two!"), ("ngram", "two!"),  # round 2
    ]
    assert all(n == 3 for _, _, n in asked[2:])
    status = {"model": {"name": "tiny", "num_layers": 6, "weights": "f32", "kernel": "torch"},
              "plan": {"stages": [{}, {}, {}]}}
    (report,) = reports([Config("mesh3", 3, 1, ("off", "ngram"))], measured, {"mesh3": status}, rounds=2,
                        answer_tokens=3, cpu_model="EPYC")
    off, ngram = report.results
    assert (off.answers, ngram.answers) == (4, 4) and report.node.stages == 3
    assert (ngram.identical_to_off, ngram.compared_to_off) == (4, 4)
    assert ngram.acceptance == pytest.approx(2 / 3) and ngram.tokens_per_trip == pytest.approx(3.0)
    assert ngram.status is not None and ngram.draft_ms_per_token == 0.5
    assert ngram.decode_tokens == 2 * 2 * 2  # 2 rounds x 2 prompts x (3 - 1) tokens


# -- the matrix script's targets ---------------------------------------------------------------------


def load_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_speculation.py"
    spec = importlib.util.spec_from_file_location("bench_speculation_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_matrix_checks_each_target_of_the_issue() -> None:
    script = load_script()

    def config(name: str, figures: dict[tuple[str, str], tuple[float, float]]) -> dict[str, Any]:
        return {"config": name, "results": [
            {"mode": mode, "prompt_set": prompt_set, "decode_tokens_per_s": rate, "ratio_to_off": share,
             "acceptance": 0.7, "tokens_per_trip": 3.1, "status": {"draft_ms_per_token": 1.5}}
            for (mode, prompt_set), (rate, share) in figures.items()]}

    groups = {
        "loopback": [config("mesh3", {("off", "repetitive"): (10.0, 1.0), ("ngram", "repetitive"): (21.0, 2.1),
                                      ("auto", "repetitive"): (19.0, 1.9), ("auto", "open"): (9.0, 0.9)}),
                     config("single", {("off", "repetitive"): (15.0, 1.0), ("auto", "open"): (14.5, 0.97)})],
        "delay": {"error": "the local mesh did not form"},
        "draft": [config("mesh3-f32-draft", {("draft", "repetitive"): (6.0, 1.3)})],
    }
    rows = {r["figure"]: r for r in script.targets(groups, 3)}
    assert rows["3-node mesh, repetitive, ngram / off"]["met"] is True
    assert rows["3-node mesh + link delay, repetitive, ngram / off"]["value"] is None  # that group failed
    assert rows["mesh, open, auto / off"]["met"] is False and rows["one node, open, auto / off"]["met"] is True
    assert rows["3-node mesh ngram / one node off, repetitive"]["value"] == pytest.approx(21 / 15)
    assert rows["3-node mesh auto / one node off, repetitive"]["met"] is True
    assert rows["draft model (mesh3-f32-draft), repetitive, draft / off"]["value"] == pytest.approx(1.3)
    assert rows["  draft ms per token (entry), repetitive"]["value"] == 1.5
    table = script.format_targets(script.targets(groups, 3))
    assert "NO" in table and "yes" in table


def test_the_matrix_script_refuses_unknown_groups(capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    assert script.main(["--groups", "loopback,wifi"]) == 2
    assert "--groups" in capsys.readouterr().err
    assert script.main(["--nodes", "1"]) == 2


# -- the command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["bench", "--speculate", "fast"],
    ["bench", "--speculate", "ngram,ngram"],
    ["bench", "--speculate", "ngram", "--api", "http://127.0.0.1:1"],
    ["bench", "--speculate", "ngram", "--local"],
    ["bench", "--speculate", "ngram", "--concurrency", "1,2"],
    ["bench", "--speculate", "ngram", "--mesh", "1"],
    ["bench", "--speculate", "ngram", "--weights", "f32,int8"],
    ["bench", "--speculate", "ngram", "--prompt-set", "no-such-set"],
    ["bench", "--speculate", "ngram", "--prompts", "0"],
    ["bench", "--speculate", "ngram", "--answer-tokens", "0"],
    ["bench", "--speculate", "ngram", "--debug-link-delay-ms", "-1"],
    ["bench", "--local", "--prompt-set", "open"],
    ["bench", "--concurrency", "1", "--debug-link-delay-ms", "10"],
    ["bench", "--mesh", "2", "--draft-model", "builtin"],
])
def test_usage_errors_say_what_is_wrong(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() and "Traceback" not in err


def test_bench_speculate_on_local_nodes(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Needs `meshllm up --speculate` (issue 22): one tiny node per mode, both modes measured."""
    prompts = tmp_path / "tiny.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": text}]}) + "\n"
                               for i, text in enumerate(["Repeat: the quick brown fox, the quick brown fox.",
                                                         "hello world, how are you today?"])))
    code = main(["bench", "--speculate", "off,ngram", "--model", str(tiny_llama), "--cache-dir",
                 str(tmp_path / "cache"), "--threads", "1", "--prompt-set", str(prompts), "--answer-tokens", "8",
                 "--rounds", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tiny set (2 prompts):" in out and "(6 layers), f32 weights" in out
    assert row_of(out, "") == ["off", "ngram"]
    rates = row_of(out, "decode tokens/s")
    assert len(rates) == 2 and all(re.fullmatch(r"[\d,]+\.\d\d", r) for r in rates)
    assert row_of(out, "  ratio to off")[0] == "1.00x"
    assert row_of(out, "acceptance")[0] == "-"  # off drafts nothing
    assert row_of(out, "identical to off")[0] == "2/2"
    assert re.fullmatch(r"[0-2]/2", row_of(out, "identical to off")[1])
    assert all(cell != "-" for cell in row_of(out, "TTFT p50 ms"))
