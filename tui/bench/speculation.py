"""``meshllm bench --speculate off,ngram[,draft][,auto]``: the prompt sets, the arithmetic and the
tables of speculative decoding (issue 22).

Everything here takes plain data (the shipped JSONL prompt sets, the arrival times and the
``meshllm`` objects of streamed answers, ``/v1/status`` snapshots) and is tested on its own;
``tui.bench.speculation_run`` starts the nodes and does the measuring.

Definitions (docs/benchmarks.md, "Speculative decoding (issue 22)"):

- A *mode* is the ``--speculate`` value every node of a configuration was started with; each
  mode runs on nodes of its own, the modes in turns prompt by prompt.
- An answer's *token times* are the arrival times, at the client, of its streamed chunks that
  carry text or the finish reason (as in ``tui.bench.concurrency``).
- *Decode tokens/s* of one round of one mode over a prompt set: the sum over the set's prompts
  of ``usage.completion_tokens - 1`` (every token after the first), divided by the sum over the
  prompts of (last token time - first token time). The mode's figure is the median over rounds.
  Speculation changes nothing before the first token, so prompt processing is left out.
- *TTFT*: from sending a request to its first token; the median over every answer of the mode.
- *Acceptance*: drafted tokens accepted / tokens drafted, summed over every answer (the
  ``meshllm.speculation`` object of each answer's final chunk).
- *Tokens per trip*: (accepted + trips) / trips: each verify trip through the mesh yields the
  drafts it accepts plus the one token it computes itself.
- *Ratio to off*: a mode's decode tokens/s divided by ``off``'s, same configuration, same run.
- *Identical to off*: answers whose greedy token ids equal those of the ``off`` answer to the
  same prompt (the ``off`` answer of the first round); ``off``'s own count says whether it
  repeats itself round after round.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from tui.bench.concurrency import AnswerTiming, NodeInfo, median
from tui.bench.report import BenchError, agreement, grid, num

MODES = ("off", "ngram", "draft", "auto")
"""``--speculate`` values of ``meshllm up``; ``off`` is the reference of every ratio."""
PROMPT_SETS = ("repetitive", "open")
"""The sets a run takes by default."""
SHIPPED_SETS = (*PROMPT_SETS, "mixed")
"""Every set in tui/bench/prompts (``mixed``: 20 more, for the identity rate over 60 prompts)."""
"""The shipped prompt sets (tui/bench/prompts/, CC0-1.0)."""
ANSWER_TOKENS = 128
"""max_tokens of every answer (the issue's 128-token answers)."""

T = TypeVar("T")


# == prompt sets ===================================================================================


@dataclass(frozen=True)
class Prompt:
    """One conversation of a prompt set."""

    id: str
    messages: tuple[Mapping[str, str], ...]

    def chat(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages]


def parse_prompt_set(text: str, source: str) -> tuple[Prompt, ...]:
    """The prompts of a JSONL text: one ``{"id": ..., "messages": [{"role", "content"}, ...]}``
    per line (blank lines skipped). ``source`` names the file in errors."""
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as error:
            raise BenchError(f"{where} is not JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise BenchError(f"{where}: each line needs an \"id\" string and \"messages\"")
        messages = row.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise BenchError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        prompts.append(Prompt(row["id"], tuple({"role": m["role"], "content": m["content"]} for m in messages)))
    if not prompts:
        raise BenchError(f"{source} has no prompt")
    ids = [p.id for p in prompts]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise BenchError(f"{source} has the id {twice[0]!r} twice")
    return tuple(prompts)


def prompt_set_path(name: str) -> Path:
    """The file of a shipped set (``repetitive``, ``open``), or ``name`` itself as a path."""
    if name in SHIPPED_SETS:
        return Path(str(resources.files("tui.bench").joinpath("prompts", f"{name}.jsonl")))
    return Path(name)


def load_prompt_set(name: str) -> tuple[Prompt, ...]:
    """A shipped set by name, or a JSONL file of your own by path."""
    path = prompt_set_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        known = ", ".join(SHIPPED_SETS)
        raise BenchError(f"no prompt set {name!r} ({known}, or a JSONL file): {error.strerror or error}") from None
    return parse_prompt_set(text, str(path) if name not in SHIPPED_SETS else f"the {name} set")


def set_label(name: str) -> str:
    """What a table calls a set: its name, or a file's stem."""
    return name if name in SHIPPED_SETS else Path(name).stem


def parse_modes(text: str) -> list[str]:
    """``"ngram,auto"`` -> ["off", "ngram", "auto"]: distinct known modes in the given order,
    ``off`` first when not listed (every ratio and identity is against it)."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise BenchError(f"--speculate takes a comma-separated list of {', '.join(MODES)}, got {text!r}")
    if len(set(modes)) != len(modes):
        raise BenchError(f"--speculate lists a mode twice: {text!r}")
    return modes if "off" in modes else ["off", *modes]


def parse_prompt_sets(text: str | None) -> list[str]:
    """``--prompt-set``: comma-separated set names or JSONL paths; None: every shipped set."""
    if text is None:
        return list(PROMPT_SETS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BenchError(f"--prompt-set takes {', '.join(PROMPT_SETS)} or a JSONL file, got {text!r}")
    if len(set(names)) != len(names):
        raise BenchError(f"--prompt-set lists a set twice: {text!r}")
    return names


def order_of_turn(labels: Sequence[T], round_index: int, prompt_index: int) -> list[T]:
    """Who answers a prompt first in a round: as given, then reversed, prompt by prompt and
    round by round, so a machine whose load drifts slows every mode alike."""
    return list(labels) if (round_index + prompt_index) % 2 == 0 else list(reversed(labels))


# == one answer ====================================================================================


@dataclass(frozen=True)
class Speculation:
    """An answer's ``meshllm.speculation`` (zeros: it drafted nothing, or speculation is off)."""

    drafted: int = 0
    """Tokens drafted."""
    accepted: int = 0
    """Drafted tokens the verification accepted."""
    trips: int = 0
    """Verify trips through the mesh."""

    @staticmethod
    def from_json(data: Any) -> Speculation:
        if not isinstance(data, Mapping):
            return Speculation()
        try:
            return Speculation(int(data.get("drafted") or 0), int(data.get("accepted") or 0),
                               int(data.get("trips") or 0))
        except (TypeError, ValueError):
            raise BenchError(f"the daemon's meshllm.speculation is not three counts: {data!r}") from None

    def __add__(self, other: Speculation) -> Speculation:
        return Speculation(self.drafted + other.drafted, self.accepted + other.accepted, self.trips + other.trips)


@dataclass(frozen=True)
class SpecAnswer:
    """One greedy streamed answer to one prompt, as the client saw it."""

    prompt_id: str
    timing: AnswerTiming
    token_ids: tuple[int, ...]
    """``meshllm.token_ids`` of the final chunk (EOS included)."""
    speculation: Speculation


def answer_from_events(prompt_id: str, sent_s: float, events: Sequence[tuple[float, str]]) -> SpecAnswer:
    """An answer from the ``data`` of its server-sent events and their arrival times.

    A chunk with text is a token's arrival; the finish chunk is one only when it ends the answer
    on an end-of-sequence token or a stop string (after "length" it follows the last text at
    once), or the answer had no text. The final chunk carries ``meshllm.token_ids`` and, with
    speculation, ``meshllm.speculation``; the usage chunk ``completion_tokens``. An answer of
    the node's fallback model (``served_by`` "fallback") is a BenchError: the mesh did not serve.
    """
    times: list[float] = []
    tokens: int | None = None
    finish: str | None = None
    ids: tuple[int, ...] | None = None
    drafting = Speculation()
    for at, data in events:
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise BenchError(f"the daemon sent a chunk that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise BenchError(f"the daemon sent a chunk that is not an object: {data[:200]!r}")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise BenchError(f"the mesh failed an answer: {message}")
        extension = chunk.get("meshllm") if isinstance(chunk.get("meshllm"), dict) else {}
        if extension.get("served_by") == "fallback":
            raise BenchError("the node's fallback model answered (the mesh could not serve): nothing to measure")
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            arrived = bool(delta.get("content"))
            if choice.get("finish_reason"):
                finish = str(choice["finish_reason"])
                arrived = arrived or finish != "length" or not times
            if arrived:
                times.append(at)
        if isinstance(extension.get("token_ids"), list):
            ids = tuple(int(i) for i in extension["token_ids"])
        if "speculation" in extension:
            drafting = Speculation.from_json(extension["speculation"])
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"]
    if ids is None:
        raise BenchError("the daemon does not report the answer's token ids (meshllm.token_ids)")
    count = tokens if tokens is not None else len(ids)
    return SpecAnswer(prompt_id, AnswerTiming(sent_s, tuple(times), count, finish), ids, drafting)


# == the arithmetic ================================================================================


@dataclass(frozen=True)
class DecodeFigures:
    """One round of one mode over a prompt set."""

    decode_tokens: int
    """Sum over the answers of their tokens after the first."""
    decode_s: float
    """Sum over the answers of (last token time - first token time)."""
    tokens_per_s: float | None
    """decode_tokens / decode_s (None: nothing decoded)."""


def decode_figures(answers: Sequence[SpecAnswer]) -> DecodeFigures:
    """The decode rate of answers sent one after another (see the module doc)."""
    tokens = 0
    seconds = 0.0
    for a in answers:
        t = a.timing
        if t.first_s is None or t.last_s is None:
            continue
        tokens += t.decode_tokens
        seconds += t.last_s - t.first_s
    return DecodeFigures(tokens, seconds, tokens / seconds if tokens and seconds > 0 else None)


def acceptance(total: Speculation) -> float | None:
    """Accepted / drafted (None: nothing drafted)."""
    return total.accepted / total.drafted if total.drafted else None


def tokens_per_trip(total: Speculation) -> float | None:
    """(accepted + trips) / trips (None: no verify trip)."""
    return (total.accepted + total.trips) / total.trips if total.trips else None


@dataclass(frozen=True)
class Identity:
    """Answers against the ``off`` answers to the same prompts, token for token."""

    identical: int
    """Answers whose token ids equal the reference's."""
    compared: int
    """Answers that had a reference to compare with."""
    prefix_fraction: float | None
    """Share of the reference's tokens matched before each answer's first divergence."""


def identity(reference: Mapping[str, Sequence[int]], answers: Sequence[SpecAnswer]) -> Identity:
    """Every answer whose prompt has a reference, against that reference."""
    matched = [a for a in answers if a.prompt_id in reference]
    if not matched:
        return Identity(0, 0, None)
    agree = agreement([list(reference[a.prompt_id]) for a in matched], [list(a.token_ids) for a in matched])
    return Identity(agree.identical_answers, agree.prompts, agree.prefix_fraction)


def reference_answers(rounds: Sequence[Sequence[SpecAnswer]]) -> dict[str, tuple[int, ...]]:
    """The token ids of each prompt's first answer (the first round's)."""
    out: dict[str, tuple[int, ...]] = {}
    for answers in rounds:
        for a in answers:
            out.setdefault(a.prompt_id, a.token_ids)
    return out


@dataclass(frozen=True)
class ModeResult:
    """One mode of one configuration over one prompt set, every round of the run."""

    mode: str
    prompt_set: str
    prompts: int
    rounds: tuple[DecodeFigures, ...]
    decode_tokens_per_s: float | None
    """Median over the rounds of each round's decode tokens/s."""
    ttft_p50_ms: float | None
    """Median TTFT over every answer."""
    decode_tokens: int
    """Tokens counted for the decode rate, all rounds."""
    answers: int
    short_answers: int
    """Answers that ended (end of sequence, a stop) before max_tokens."""
    drafted: int
    accepted: int
    trips: int
    acceptance: float | None
    tokens_per_trip: float | None
    identical_to_off: int
    compared_to_off: int
    prefix_fraction_to_off: float | None
    status: Mapping[str, Any] | None = None
    """The entry node's ``/v1/status`` ``speculation`` object after the set (its own view of
    the recent answers: mode, acceptance, tokens_per_trip, draft_ms_per_token)."""
    ratio_to_off: float | None = None
    """decode_tokens_per_s / off's (same configuration, same run)."""

    @property
    def draft_ms_per_token(self) -> float | None:
        value = (self.status or {}).get("draft_ms_per_token")
        return float(value) if isinstance(value, (int, float)) else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = dict(self.status) if self.status is not None else None
        return data


def mode_result(mode: str, prompt_set: str, rounds: Sequence[Sequence[SpecAnswer]], *, asked_tokens: int,
                reference: Mapping[str, Sequence[int]] | None, status: Mapping[str, Any] | None = None) -> ModeResult:
    """The figures of one mode from its answers, round by round (``reference``: the ``off``
    answers' token ids by prompt id; None when ``off`` was not measured)."""
    answers = [a for r in rounds for a in r]
    figures = tuple(decode_figures(r) for r in rounds)
    total = sum((a.speculation for a in answers), Speculation())
    same = identity(reference or {}, answers)
    return ModeResult(
        mode=mode,
        prompt_set=prompt_set,
        prompts=len({a.prompt_id for a in answers}),
        rounds=figures,
        decode_tokens_per_s=median(f.tokens_per_s for f in figures),
        ttft_p50_ms=median(a.timing.ttft_ms for a in answers),
        decode_tokens=sum(f.decode_tokens for f in figures),
        answers=len(answers),
        short_answers=sum(1 for a in answers if a.timing.tokens < asked_tokens),
        drafted=total.drafted,
        accepted=total.accepted,
        trips=total.trips,
        acceptance=acceptance(total),
        tokens_per_trip=tokens_per_trip(total),
        identical_to_off=same.identical,
        compared_to_off=same.compared,
        prefix_fraction_to_off=same.prefix_fraction,
        status=status,
    )


def mode_results(prompt_set: str, measured: Mapping[str, Sequence[Sequence[SpecAnswer]]], *, asked_tokens: int,
                 statuses: Mapping[str, Mapping[str, Any] | None] | None = None) -> tuple[ModeResult, ...]:
    """Every mode of one configuration over one set, with its ratio and identity to ``off``."""
    off = measured.get("off")
    reference = reference_answers(off) if off is not None else None
    results = [mode_result(mode, prompt_set, rounds, asked_tokens=asked_tokens, reference=reference,
                           status=(statuses or {}).get(mode)) for mode, rounds in measured.items()]
    return with_off_ratios(results)


def with_off_ratios(results: Sequence[ModeResult]) -> tuple[ModeResult, ...]:
    """Each result with its decode tokens/s divided by ``off``'s of the same prompt set."""
    off = {r.prompt_set: r.decode_tokens_per_s for r in results if r.mode == "off"}
    return tuple(replace(r, ratio_to_off=ratio(r.decode_tokens_per_s, off.get(r.prompt_set))) for r in results)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# == the report ====================================================================================


@dataclass(frozen=True)
class SpeculationReport:
    """``meshllm bench --speculate``: one configuration (one node, or an N-node local mesh),
    every mode over every prompt set."""

    target: str
    """"one local node, T thread(s)" or "N-node local mesh, T thread(s) per node"."""
    nodes: int
    threads: int
    """Threads of each node."""
    node: NodeInfo
    cpu_model: str
    answer_tokens: int
    """max_tokens of every answer."""
    rounds: int
    link_delay_ms: float | None
    """--debug-link-delay-ms of every node (None: not given)."""
    draft_model: str | None
    """--draft-model of the draft and auto nodes (None: their default)."""
    results: tuple[ModeResult, ...]

    @property
    def modes(self) -> list[str]:
        return list(dict.fromkeys(r.mode for r in self.results))

    @property
    def prompt_sets(self) -> list[str]:
        return list(dict.fromkeys(r.prompt_set for r in self.results))

    def result(self, mode: str, prompt_set: str) -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode and r.prompt_set == prompt_set), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "speculation",
            "target": self.target,
            "nodes": self.nodes,
            "threads_per_node": self.threads,
            "cpu_model": self.cpu_model,
            "model": asdict(self.node),
            "answer_tokens": self.answer_tokens,
            "rounds": self.rounds,
            "link_delay_ms": self.link_delay_ms,
            "draft_model": self.draft_model,
            "results": [r.to_json() for r in self.results],
        }


def _identity_cell(r: ModeResult) -> str:
    return f"{r.identical_to_off}/{r.compared_to_off}" if r.compared_to_off else "-"


def set_rows(results: Sequence[ModeResult]) -> list[tuple[str, ...]]:
    """The table of one prompt set: one column per mode."""
    return [
        ("", *[r.mode for r in results]),
        ("decode tokens/s", *[num(r.decode_tokens_per_s, 2) for r in results]),
        ("  ratio to off", *[num(r.ratio_to_off, 2, "x") for r in results]),
        ("TTFT p50 ms", *[num(r.ttft_p50_ms, 0) for r in results]),
        ("acceptance", *[num(r.acceptance, 2) for r in results]),
        ("tokens per trip", *[num(r.tokens_per_trip, 2) for r in results]),
        ("draft ms per token", *[num(r.draft_ms_per_token, 2) for r in results]),
        ("identical to off", *[_identity_cell(r) for r in results]),
        ("decode tokens counted", *[str(r.decode_tokens) for r in results]),
        ("answers (short)", *[f"{r.answers} ({r.short_answers})" for r in results]),
    ]


def format_speculation(report: SpeculationReport) -> str:
    """The tables of ``meshllm bench --speculate``: one per prompt set."""
    n = report.node
    extras = []
    if report.link_delay_ms is not None:
        extras.append(f"--debug-link-delay-ms {report.link_delay_ms:g} on every node")
    if report.draft_model is not None:
        extras.append(f"--draft-model {report.draft_model}")
    head = [
        f"{n.model_name} ({n.num_layers} layers), {n.weights} weights, kernel {n.kernel}; "
        f"{n.stages} stage(s); {report.target}" + (f"; {', '.join(extras)}" if extras else ""),
        f"CPU: {report.cpu_model}",
        f"greedy answers of up to {report.answer_tokens} tokens; {report.rounds} round(s), the modes in "
        "turns prompt by prompt",
    ]
    body: list[str] = []
    for name in report.prompt_sets:
        results = [r for r in report.results if r.prompt_set == name]
        body += ["", f"{name} set ({results[0].prompts} prompts):", *grid(set_rows(results))]
    notes = ("decode tokens/s: completion tokens after the first / (last token - first token), summed over the "
             "set's prompts, median over rounds;\nratio to off: against off in the same run; acceptance: accepted / "
             "drafted tokens; tokens per trip: (accepted + trips) / trips;\ndraft ms per token: the entry node's "
             "/v1/status; identical to off: answers whose token ids equal off's first answer to the prompt;\n"
             "short: answers that ended before max_tokens")
    return "\n".join([*head, *body, "", notes])
