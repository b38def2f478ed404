"""``meshllm bench --concurrency 1,2,4,8``: the arithmetic and the tables of concurrent answers.

Everything here takes plain data (the arrival times of streamed answers, ``/v1/status``
snapshots) and is tested on its own; ``tui.bench.streams`` does the measuring.

Definitions (docs/benchmarks.md, "Concurrent answers"):

- An answer's *token times* are the arrival times, at the client, of its streamed chunks that
  carry text or the finish reason. The daemon streams one chunk per token, except where a token
  ends inside a multi-byte character (its text waits for the next token) and for the
  end-of-sequence token (it arrives with the finish chunk).
- *Decode tokens* of an answer: ``usage.completion_tokens - 1``, every generated token after
  its first one (the end-of-sequence token included, as in the single-answer bench).
- *Aggregate decode tokens/s* of one round at level N, N answers sent at once:
  the sum of the N answers' decode tokens, divided by the *decode phase*: from the earliest
  first token of the N answers to the latest last token. Prompt processing of an answer whose
  first token came later falls inside the phase (a real cost of serving them together); the
  first token of each answer does not count. The level's figure is the median over rounds.
- *Time between tokens*: the gaps between consecutive token times of one answer, after its
  first token; p50/p95/max over the gaps of every answer of the level (all rounds pooled).
- *TTFT*: from sending a request to its first token, per answer; p50/p95 pooled likewise.
- *Ratio*: a level's aggregate decode tokens/s divided by level 1's (same run).
- Percentiles interpolate linearly between the two nearest ranks (numpy's default).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from tui.bench.report import BenchError, grid, num

# == one answer ====================================================================================


@dataclass(frozen=True)
class AnswerTiming:
    """One streamed answer, as the client saw it (seconds on one monotonic clock)."""

    sent_s: float
    """When the request was sent."""
    token_times_s: tuple[float, ...]
    """Arrival of each chunk that carried text or the finish reason, in order."""
    tokens: int
    """``usage.completion_tokens``: every generated token, end-of-sequence included."""
    finish_reason: str | None = None
    """"length" (max_tokens reached) or "stop" (end of sequence or a stop string)."""

    @property
    def first_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def last_s(self) -> float | None:
        return self.token_times_s[-1] if self.token_times_s else None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_s is None else (self.first_s - self.sent_s) * 1000

    @property
    def decode_tokens(self) -> int:
        """Tokens after the first one (0 for an answer with no token)."""
        return max(0, self.tokens - 1) if self.token_times_s else 0

    def gaps_ms(self) -> list[float]:
        """Time between consecutive tokens, after the first one."""
        t = self.token_times_s
        return [(b - a) * 1000 for a, b in zip(t, t[1:])]

    def tokens_per_s(self) -> float | None:
        """This answer's own decode rate: decode tokens / (last token - first token)."""
        if self.first_s is None or self.last_s is None or self.last_s <= self.first_s or not self.decode_tokens:
            return None
        return self.decode_tokens / (self.last_s - self.first_s)


# == pure arithmetic ===============================================================================


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear between the two nearest ranks; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


@dataclass(frozen=True)
class RoundFigures:
    """One round of one level: N answers sent at once."""

    answers: int
    decode_tokens: int
    """Sum of the answers' tokens after their first one."""
    decode_phase_s: float | None
    """Earliest first token to latest last token."""
    tokens_per_s: float | None
    """decode_tokens / decode_phase_s."""


def round_figures(answers: Sequence[AnswerTiming]) -> RoundFigures:
    """The aggregate decode figures of answers that ran at the same time (see the module doc)."""
    started = [a for a in answers if a.first_s is not None]
    tokens = sum(a.decode_tokens for a in started)
    if not started:
        return RoundFigures(len(answers), 0, None, None)
    phase = max(a.last_s for a in started) - min(a.first_s for a in started)  # type: ignore[type-var,operator]
    rate = tokens / phase if phase > 0 and tokens else None
    return RoundFigures(len(answers), tokens, phase if phase > 0 else None, rate)


def aggregate_tokens_per_s(answers: Sequence[AnswerTiming]) -> float | None:
    """Aggregate decode tokens/s of answers that ran at the same time (None: nothing decoded)."""
    return round_figures(answers).tokens_per_s


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level, over every round of the run."""

    level: int
    """Answers sent at once."""
    rounds: tuple[RoundFigures, ...]
    aggregate_tokens_per_s: float | None
    """Median over the rounds of each round's aggregate decode tokens/s."""
    answer_tokens_per_s: float | None
    """Median over the answers of each answer's own decode rate."""
    gap_p50_ms: float | None
    gap_p95_ms: float | None
    gap_max_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    decode_tokens: int
    """Tokens counted for the aggregate, all rounds."""
    answers: int
    short_answers: int
    """Answers that stopped (end of sequence) before the asked number of tokens."""
    ratio_to_one: float | None = None
    """aggregate_tokens_per_s / level 1's (None without a level 1)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def level_result(level: int, rounds: Sequence[Sequence[AnswerTiming]], asked_tokens: int) -> LevelResult:
    """The figures of one level from its rounds; ``asked_tokens``: max_tokens of each answer."""
    answers = [a for r in rounds for a in r]
    gaps = [g for a in answers for g in a.gaps_ms()]
    ttfts = [t for a in answers if (t := a.ttft_ms) is not None]
    figures = tuple(round_figures(r) for r in rounds)
    return LevelResult(
        level=level,
        rounds=figures,
        aggregate_tokens_per_s=median(f.tokens_per_s for f in figures),
        answer_tokens_per_s=median(a.tokens_per_s() for a in answers),
        gap_p50_ms=percentile(gaps, 50),
        gap_p95_ms=percentile(gaps, 95),
        gap_max_ms=max(gaps) if gaps else None,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p95_ms=percentile(ttfts, 95),
        decode_tokens=sum(f.decode_tokens for f in figures),
        answers=len(answers),
        short_answers=sum(1 for a in answers if a.tokens < asked_tokens),
    )


def with_ratios(levels: Sequence[LevelResult]) -> tuple[LevelResult, ...]:
    """Each level with its aggregate decode tokens/s divided by level 1's."""
    one = next((lv.aggregate_tokens_per_s for lv in levels if lv.level == 1), None)
    return tuple(replace(lv, ratio_to_one=ratio(lv.aggregate_tokens_per_s, one)) for lv in levels)


def parse_levels(text: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8]: distinct positive integers, in the given order."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--concurrency must be a comma-separated list of integers, got {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise BenchError(f"--concurrency must list positive integers, got {text!r}")
    if len(set(levels)) != len(levels):
        raise BenchError(f"--concurrency lists a level twice: {text!r}")
    return levels


def round_order(levels: Sequence[int], round_index: int) -> list[int]:
    """The levels of round ``round_index`` (0-based): as given, then reversed, and so on, so a
    machine whose load drifts slows every level alike."""
    return list(levels) if round_index % 2 == 0 else list(reversed(levels))


# == TTFT under load ===============================================================================


@dataclass(frozen=True)
class UnderLoad:
    """A long prompt sent while other answers decode: what it cost them and it."""

    ttft_ms: float | None
    """The prompt's time to first token."""
    running: int
    """Background answers that had started and not finished when the prompt was sent."""
    running_at_first_token: int
    """Background answers still decoding when the prompt's first token came (fewer than
    ``running``: some ended meanwhile, so the gaps below cover only part of the prefill)."""
    normal_gap_ms: float | None
    """Median gap between tokens of the background answers before the prompt was sent."""
    longest_gap_ms: float | None
    """Longest gap of a background answer that overlaps [prompt sent, prompt's first token]."""
    gap_ratio: float | None
    """longest_gap_ms / normal_gap_ms."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def under_load(background: Sequence[AnswerTiming], probe: AnswerTiming) -> UnderLoad:
    """The figures of one loaded round: ``probe`` sent while ``background`` answers decode."""
    sent, first = probe.sent_s, probe.first_s
    running = sum(1 for a in background if a.first_s is not None and a.first_s <= sent < a.last_s)  # type: ignore[operator]
    before: list[float] = []
    during: list[float] = []
    for a in background:
        t = a.token_times_s
        for start, end in zip(t, t[1:]):
            if end <= sent:
                before.append((end - start) * 1000)
            elif first is not None and start < first:  # the gap overlaps [sent, first)
                during.append((end - start) * 1000)
    still = sum(1 for a in background if first is not None and a.first_s is not None
                and a.first_s <= sent and a.last_s > first)  # type: ignore[operator]
    normal = percentile(before, 50)
    longest = max(during) if during else None
    return UnderLoad(probe.ttft_ms, running, still, normal, longest, ratio(longest, normal))


# == the report ====================================================================================


@dataclass(frozen=True)
class NodeInfo:
    """What ``/v1/status`` of the entry node says about the model and the plan."""

    model_name: str
    num_layers: int
    weights: str
    kernel: str
    batch_invariant: bool | None
    stages: int


def node_info(status: Mapping[str, Any]) -> NodeInfo:
    model = status.get("model") or {}
    plan = status.get("plan") or {}
    invariant = model.get("batch_invariant")
    return NodeInfo(
        model_name=str(model.get("name") or "?"),
        num_layers=int(model.get("num_layers") or 0),
        weights=str(model.get("weights") or "?"),
        kernel=str(model.get("kernel") or "?"),
        batch_invariant=invariant if isinstance(invariant, bool) else None,
        stages=len(plan.get("stages") or []),
    )


@dataclass(frozen=True)
class ConcurrencyReport:
    """``meshllm bench --concurrency``: every level of one run."""

    target: str
    """"local node (T threads)" or the entry node's URL."""
    node: NodeInfo
    cpu_model: str
    decode_tokens: int
    """Tokens asked of each answer after its first one (max_tokens - 1)."""
    rounds: int
    levels: tuple[LevelResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "concurrency",
            "target": self.target,
            "cpu_model": self.cpu_model,
            "model": {"name": self.node.model_name, "num_layers": self.node.num_layers,
                      "weights": self.node.weights, "kernel": self.node.kernel,
                      "batch_invariant": self.node.batch_invariant},
            "stages": self.node.stages,
            "decode_tokens": self.decode_tokens,
            "rounds": self.rounds,
            "levels": [lv.to_json() for lv in self.levels],
        }


def format_concurrency(report: ConcurrencyReport) -> str:
    """The table of ``meshllm bench --concurrency``."""
    n = report.node
    rows: list[tuple[str, ...]] = [
        ("answers at once", *[str(lv.level) for lv in report.levels]),
        ("aggregate decode tokens/s", *[num(lv.aggregate_tokens_per_s, 2) for lv in report.levels]),
        ("  ratio to 1 answer", *[num(lv.ratio_to_one, 2, "x") for lv in report.levels]),
        ("per answer tokens/s", *[num(lv.answer_tokens_per_s, 2) for lv in report.levels]),
        ("time between tokens p50 ms", *[num(lv.gap_p50_ms, 1) for lv in report.levels]),
        ("time between tokens p95 ms", *[num(lv.gap_p95_ms, 1) for lv in report.levels]),
        ("time between tokens max ms", *[num(lv.gap_max_ms, 1) for lv in report.levels]),
        ("TTFT p50 ms", *[num(lv.ttft_p50_ms, 0) for lv in report.levels]),
        ("TTFT p95 ms", *[num(lv.ttft_p95_ms, 0) for lv in report.levels]),
        ("decode tokens counted", *[str(lv.decode_tokens) for lv in report.levels]),
        ("answers (short)", *[f"{lv.answers} ({lv.short_answers})" for lv in report.levels]),
    ]
    invariant = {True: "batch-invariant", False: "not batch-invariant", None: "batch invariance unknown"}
    head = [
        f"{n.model_name} ({n.num_layers} layers), {n.weights} weights, kernel {n.kernel} "
        f"({invariant[n.batch_invariant]}); {n.stages} stage(s); {report.target}",
        f"CPU: {report.cpu_model}",
        f"{report.decode_tokens} decode tokens asked per answer, greedy; {report.rounds} round(s), "
        "levels in alternating order",
    ]
    notes = ("aggregate decode tokens/s: all answers' tokens after their first / (latest last token - "
             "earliest first token), median over rounds;\nratio: against 1 answer in the same run; time between "
             "tokens and TTFT: per answer, pooled over the level's answers; short: answers that ended early")
    return "\n".join([*head, "", *grid(rows), "", notes])
