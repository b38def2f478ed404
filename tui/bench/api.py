"""``meshllm bench --api URL [--api URL ...]``: measure a running mesh through its HTTP API.

The first URL is the entry node; every URL's ``/v1/status`` gives that node's stage stats.
``Target`` and ``interleave`` are also what ``--mesh`` (tui.bench.mesh) measures with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple
from typing import Any

from tui.bench.report import BenchError, MeshMeasure, StatsDelta, stats_delta, summarize
from tui.client import DaemonClient, DaemonError, DaemonUnavailable

DECODE_PROMPTS: tuple[str, ...] = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail, part by part, how a bicycle works.",
    "Describe step by step how to bake a loaf of bread at home, with every detail.",
    "Write a long letter to a friend about a trip through the mountains.",
)
"""Prompts whose answers run long; decode is timed over them until enough tokens came."""

AGREEMENT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about laptops.",
    "Explain what a KV cache is in one sentence.",
    "Give three tips for learning a new language.",
    "Tell me a fact about the moon.",
)

_PROMPT_WORDS = (
    "the quick brown fox jumps over the lazy dog and a mesh of laptops and phones runs one "
    "language model together while layers are split into spans"
).split()
_PROMPT_LEAD = "Read these words, then write a long story that uses all of them:"

REQUEST_TIMEOUT_S = 900.0


def filler_messages(words: int, last_word: str | None = None, *, lead: bool = True) -> list[dict[str, str]]:
    """A user message of ``words`` filler words (the last one replaced when given), after
    a line asking for a long story unless ``lead`` is False (for very short prompts)."""
    chosen = [_PROMPT_WORDS[i % len(_PROMPT_WORDS)] for i in range(words)]
    if last_word is not None and chosen:
        chosen[-1] = last_word
    return [{"role": "user", "content": " ".join([_PROMPT_LEAD, *chosen] if lead else chosen)}]


class ApiBench:
    """Talks to the nodes of a running mesh; ``urls[0]`` is the entry node.

    Use it as ``async with ApiBench(urls) as bench:``: the answers then share one connection
    pool. A node that stops answering an answer, or refuses one, is a BenchError; a status
    that does not come raises the client's DaemonUnavailable / DaemonError.
    """

    def __init__(self, urls: Sequence[str], clock: Callable[[], float] = time.perf_counter) -> None:
        self.urls = list(urls)
        self.clock = clock
        self.entry = DaemonClient(self.urls[0], connect_timeout_s=10.0, request_timeout_s=REQUEST_TIMEOUT_S)
        self._nodes = [DaemonClient(url, connect_timeout_s=10.0) for url in self.urls]

    async def __aenter__(self) -> ApiBench:
        await self.entry.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.entry.__aexit__(*exc_info)

    async def statuses(self) -> list[dict[str, Any]]:
        return [await node.status() for node in self._nodes]

    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """One greedy non-streamed answer (with ``usage`` and ``meshllm.token_ids``)."""
        try:
            return await self.entry.complete(messages, max_tokens=max_tokens, temperature=0)
        except (DaemonError, DaemonUnavailable) as error:
            raise _bench_error(error) from None

    async def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return int((await self.complete(messages, 1))["usage"]["prompt_tokens"])

    async def stream(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float | None, float, int]:
        """One greedy streamed answer: (sent at, first token at, last event at, tokens)."""
        sent = self.clock()
        first: float | None = None
        last = sent
        tokens = 0
        try:
            async for delta in self.entry.chat(messages, max_tokens=max_tokens, temperature=0):
                now = self.clock()
                if delta.completion_tokens is not None:
                    tokens = delta.completion_tokens
                if delta.text or delta.finish_reason:
                    if first is None:
                        first = now
                    last = now
        except (DaemonError, DaemonUnavailable) as error:
            raise _bench_error(error) from None
        return sent, first, last, tokens

    async def find_prompt(self, n_tokens: int, progress: Callable[[str], None]) -> list[dict[str, str]]:
        """Messages whose chat prompt is ``n_tokens`` tokens, found by asking the mesh (usage)."""
        lead, base_words = True, 0
        base = await self.prompt_tokens(filler_messages(0))
        if base > n_tokens:
            lead, base_words = False, 1
            base = await self.prompt_tokens(filler_messages(1, lead=False))
            if base > n_tokens:
                raise BenchError(f"the shortest chat prompt is {base} tokens; ask for at least that many")

        def messages(words: int, last_word: str | None = None) -> list[dict[str, str]]:
            return filler_messages(words, last_word, lead=lead)

        probe = base_words + 16
        rate = max((await self.prompt_tokens(messages(probe)) - base) / 16, 0.25)
        words = base_words + max(0, round((n_tokens - base) / rate))
        below, above = base_words, None  # most words known to fit, fewest known not to
        for _ in range(16):
            count = await self.prompt_tokens(messages(words))
            if count == n_tokens:
                return messages(words)
            if count < n_tokens:
                below = max(below, words)
            else:
                above = words if above is None else min(above, words)
            if above is not None and above - below <= 1:
                break
            step = max(1, round(abs(n_tokens - count) / rate))
            words = words + step if count < n_tokens else words - step
            words = max(below + 1, min(words, above - 1)) if above is not None else max(below + 1, words)
        for alternative in sorted(set(_PROMPT_WORDS), key=len)[:6]:  # the next word jumps over: try others
            candidate = messages(below + 1, alternative)
            if await self.prompt_tokens(candidate) == n_tokens:
                return candidate
        progress(f"no prompt of exactly {n_tokens} tokens; using the longest one below it")
        return messages(below)


def _bench_error(error: DaemonError | DaemonUnavailable) -> BenchError:
    if isinstance(error, DaemonUnavailable):
        return BenchError(f"the mesh stopped answering: {error}")
    if error.status is not None:
        return BenchError(f"the mesh refused a request: {error}")
    return BenchError(f"the mesh failed an answer: {error}")


def _names(statuses: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    names: dict[str, str] = {}
    for st in statuses:
        for node in st.get("nodes", []):
            names.setdefault(str(node["id"]), str(node.get("name") or node["id"]))
    return names


def _deltas(before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]) -> dict[str, StatsDelta]:
    return {str(a["self_id"]): stats_delta(b.get("stats") or {}, a.get("stats") or {})
            for b, a in zip(before, after)}


def _add(into: dict[str, StatsDelta], more: Mapping[str, StatsDelta]) -> None:
    for nid, d in more.items():
        old = into.get(nid)
        into[nid] = d if old is None else StatsDelta(*(x + y for x, y in zip(astuple(old), astuple(d))))


class Target:
    """One mesh (or single node) being measured: timings and stats deltas of every window."""

    def __init__(self, bench: ApiBench) -> None:
        self.bench = bench
        self.entry_status: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        self.prompt_messages: list[dict[str, str]] = []
        self.prompt_tokens = 0
        self.ttfts_ms: list[float] = []
        self.prefill: dict[str, StatsDelta] = {}
        self.decode: dict[str, StatsDelta] = {}
        self.decode_tokens = 0
        self.decode_s = 0.0
        self.answers: list[list[int]] = []

    async def prepare(self, prompt_tokens: int, prompt_messages: list[dict[str, str]] | None,
                      progress: Callable[[str], None]) -> None:
        """Check the mesh is ready, warm it up, and find (or check) the bench prompt."""
        urls = self.bench.urls
        statuses = await self.bench.statuses()
        entry = statuses[0]
        plan = entry.get("plan")
        if entry.get("model") is None or plan is None or plan.get("state") != "active":
            raise BenchError(f"the mesh at {urls[0]} has no active plan yet; try again when it is ready")
        for url, st in zip(urls[1:], statuses[1:]):
            if st.get("plan") != plan:
                raise BenchError(f"{url} does not share the entry node's active plan")
        if "stats" not in entry:
            raise BenchError(f"the daemon at {urls[0]} reports no stage stats (an older version?)")
        self.entry_status, self.names = entry, _names(statuses)
        progress("warming up")
        await self.bench.complete([{"role": "user", "content": AGREEMENT_PROMPTS[0]}], 4)
        if prompt_messages is None:
            progress(f"finding a prompt of {prompt_tokens} tokens")
            prompt_messages = await self.bench.find_prompt(prompt_tokens, progress)
        self.prompt_messages = prompt_messages
        self.prompt_tokens = await self.bench.prompt_tokens(prompt_messages)  # also warms prefill

    async def warm(self) -> None:
        """One short answer and one prefill of the bench prompt: a node that sat idle is slow
        on its first request (caches, thread pools)."""
        await self.bench.complete([{"role": "user", "content": AGREEMENT_PROMPTS[0]}], 4)
        await self.bench.prompt_tokens(self.prompt_messages)

    def fork(self) -> "Target":
        """The same mesh and prompt, no timings yet."""
        other = Target(self.bench)
        other.entry_status, other.names = self.entry_status, self.names
        other.prompt_messages, other.prompt_tokens = self.prompt_messages, self.prompt_tokens
        other.answers = self.answers
        return other

    def absorb(self, other: "Target") -> None:
        """Add another fork's timings and stats to this one's."""
        self.ttfts_ms += other.ttfts_ms
        _add(self.prefill, other.prefill)
        _add(self.decode, other.decode)
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s

    async def ttft_once(self) -> None:
        before = await self.bench.statuses()
        sent, first, _last, _n = await self.bench.stream(self.prompt_messages, 1)
        if first is None:
            raise BenchError("the mesh answered with no token")
        self.ttfts_ms.append((first - sent) * 1000)
        _add(self.prefill, _deltas(before, await self.bench.statuses()))

    async def decode_once(self, text: str, new_tokens: int) -> int:
        """One greedy answer of up to ``new_tokens`` + 1 tokens; returns the tokens timed."""
        before = await self.bench.statuses()
        _sent, first, last, n = await self.bench.stream([{"role": "user", "content": text}], new_tokens + 1)
        _add(self.decode, _deltas(before, await self.bench.statuses()))
        if first is None or n < 2:
            return 0
        self.decode_tokens += n - 1
        self.decode_s += last - first
        return n - 1

    async def collect_answers(self, prompts: Sequence[str], tokens: int) -> None:
        self.answers = []
        for text in prompts:
            data = await self.bench.complete([{"role": "user", "content": text}], tokens)
            ids = (data.get("meshllm") or {}).get("token_ids")
            if ids is None:
                raise BenchError("the daemon does not report token ids (meshllm.token_ids)")
            self.answers.append([int(i) for i in ids])

    def result(self) -> MeshMeasure:
        if not self.ttfts_ms:
            raise BenchError("nothing was measured")
        return summarize(
            api_url=self.bench.urls[0], entry_status=self.entry_status, names=self.names,
            decode=self.decode, prefill=self.prefill, prompt_tokens=self.prompt_tokens,
            ttft_runs_ms=self.ttfts_ms, decode_tokens=self.decode_tokens, decode_s=self.decode_s,
            answers=self.answers,
        )


async def measure_api(
    urls: Sequence[str],
    *,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    ttft_runs: int = 3,
    agreement_tokens: int = 32,
    progress: Callable[[str], None] = lambda message: None,
    clock: Callable[[], float] = time.perf_counter,
) -> MeshMeasure:
    """Measure the mesh behind ``urls`` (entry node first).

    Raises BenchError, or DaemonUnavailable / DaemonError (tui.client) for a URL whose
    status does not come.
    """
    async with ApiBench(urls, clock) as bench:
        target = Target(bench)
        await target.prepare(prompt_tokens, None, progress)
        progress(f"time to first token: {ttft_runs} run(s)")
        for _ in range(ttft_runs):
            await target.ttft_once()
        progress(f"decode: {decode_tokens} tokens")
        for text in DECODE_PROMPTS * 4:
            if target.decode_tokens >= decode_tokens:
                break
            await target.decode_once(text, decode_tokens - target.decode_tokens)
        progress(f"agreement answers: {len(AGREEMENT_PROMPTS)} x {agreement_tokens} tokens")
        await target.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
    return target.result()


async def interleave(targets: Sequence[Target], *, ttft_runs: int, decode_tokens: int,
                     rounds: int = 4, progress: Callable[[str], None] = lambda message: None) -> None:
    """Measure the targets in turns (ABAB, then BABA), so that a machine whose load drifts
    slows each of them alike: TTFT runs first, then ``rounds`` decode answers each."""
    progress(f"time to first token: {ttft_runs} run(s) each, in turns")
    for r in range(ttft_runs):
        for target in targets if r % 2 == 0 else list(reversed(targets)):
            await target.ttft_once()
    progress(f"decode: {decode_tokens} tokens each, in {rounds} turns")
    per_round = -(-decode_tokens // rounds)
    for r in range(rounds):
        text = DECODE_PROMPTS[r % len(DECODE_PROMPTS)]
        for target in targets if r % 2 == 0 else list(reversed(targets)):
            await target.decode_once(text, per_round)

