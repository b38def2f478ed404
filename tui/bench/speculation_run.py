"""Speculative decoding measured through the HTTP API: the nodes of each ``--speculate`` mode
started on loopback, greedy streamed answers over the prompt sets, the modes in turns.

- ``stream_speculative_answer``: one greedy streamed answer, its token times, token ids and
  ``meshllm.speculation`` (``tui.bench.speculation.answer_from_events``);
- ``Config`` / ``up_args``: one configuration (one node or an N-node mesh, threads, weights,
  link delay, draft model) and the ``meshllm up`` flags of each of its modes;
- ``measure_group``: every prompt of every set on every (configuration, mode), ``rounds``
  times, in turns prompt by prompt (``order_of_turn``); the entry's ``/v1/status``
  ``speculation`` after each set;
- ``run_group``: start the nodes of the configurations (every mode at once, each mode a mesh of
  its own), measure, stop; one ``SpeculationReport`` per configuration. ``meshllm bench
  --speculate`` runs one configuration, scripts/bench_speculation.py several side by side.

Every answer reaches a daemon through ``tui.client``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tui.bench.concurrency import node_info
from tui.bench.report import BenchError, num
from tui.bench.speculation import (Prompt, SpecAnswer, SpeculationReport, answer_from_events, decode_figures,
                                   mode_results, order_of_turn, set_label)
from tui.bench.streams import close_clients, cpu_model_name, open_clients, ready_status, start_nodes, up_accepts
from tui.client import DaemonClient, DaemonError, DaemonUnavailable, read_sse

if TYPE_CHECKING:
    from tui.launcher import LocalMesh

Clock = Callable[[], float]
Progress = Callable[[str], None]
Key = tuple[str, str]
"""(configuration name, mode)."""


# == one answer ====================================================================================


async def stream_speculative_answer(client: DaemonClient, prompt: Prompt, max_tokens: int,
                                    clock: Clock) -> SpecAnswer:
    """One greedy streamed answer: the arrival time of each event, then the pure parse.

    ``DaemonClient.chat`` drops the ``meshllm.speculation`` object, so the events are read here
    with the client's own stream (its key, timeouts and errors) and ``read_sse``."""
    body = {"messages": prompt.chat(), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events: list[tuple[float, str]] = []
    sent = clock()
    try:
        async with client._stream("POST", "/v1/chat/completions", body, None) as response:
            async for data in read_sse(response):
                events.append((clock(), data))
                if data == "[DONE]":
                    break
    except DaemonError as error:
        if error.status is not None:
            raise BenchError(f"the node refused prompt {prompt.id!r}: {error}") from None
        raise BenchError(f"the mesh failed an answer to prompt {prompt.id!r}: {error}") from None
    except DaemonUnavailable as error:
        raise BenchError(f"the mesh stopped answering: {error}") from None
    if not events or events[-1][1] != "[DONE]":
        raise BenchError(f"the stream of prompt {prompt.id!r} ended before the answer did")
    return answer_from_events(prompt.id, sent, events)


# == configurations ================================================================================


@dataclass(frozen=True)
class Config:
    """Nodes started alike for every mode: one node, or a local mesh of ``nodes``."""

    name: str
    """Its label in progress lines and tables ("one node", "mesh3", ...)."""
    nodes: int
    threads: int
    """--threads of each node."""
    modes: tuple[str, ...]
    weights: str | None = None
    link_delay_ms: float | None = None
    """--debug-link-delay-ms of every node (None: not given)."""
    draft_model: str | None = None
    """--draft-model of the nodes of the draft and auto modes (None: not given)."""

    @property
    def target(self) -> str:
        if self.nodes == 1:
            return f"one local node, {self.threads} thread(s)"
        return f"{self.nodes}-node local mesh, {self.threads} thread(s) per node"


def up_args(mode: str, *, draft_model: str | None = None, link_delay_ms: float | None = None) -> list[str]:
    """The ``meshllm up`` flags of every node of one mode."""
    args = ["--speculate", mode]
    if draft_model is not None and mode in ("draft", "auto"):
        args += ["--draft-model", draft_model]
    if link_delay_ms is not None:
        args += ["--debug-link-delay-ms", f"{link_delay_ms:g}"]
    return args


def check_up_flags(configs: Sequence[Config]) -> None:
    """BenchError unless ``meshllm up`` of this checkout has every flag the configurations need."""
    needed = ["--speculate"]
    if any(c.draft_model is not None for c in configs):
        needed.append("--draft-model")
    if any(c.link_delay_ms is not None for c in configs):
        needed.append("--debug-link-delay-ms")
    missing = [flag for flag in needed if not up_accepts(flag)]
    if missing:
        raise BenchError(f"`meshllm up` of this checkout has no {', '.join(missing)} (speculative decoding, "
                         "issue 22)")


# == measuring =====================================================================================


@dataclass
class Measured:
    """What ``measure_group`` gathers: per prompt set, per (configuration, mode), the answers of
    each round; and the entry's status after each set."""

    answers: dict[str, dict[Key, list[list[SpecAnswer]]]]
    statuses: dict[str, dict[Key, dict[str, Any] | None]]


async def speculation_status(client: DaemonClient) -> dict[str, Any] | None:
    """The node's ``/v1/status`` ``speculation`` object (None where it has none)."""
    found = (await client.status()).get("speculation")
    return dict(found) if isinstance(found, Mapping) else None


async def measure_group(clients: Mapping[Key, DaemonClient], prompt_sets: Mapping[str, Sequence[Prompt]], *,
                        rounds: int, answer_tokens: int, progress: Progress = lambda message: None,
                        clock: Clock = time.perf_counter) -> Measured:
    """Every prompt of every set on every (configuration, mode), ``rounds`` times: for each
    prompt, each of them answers in turn (``order_of_turn``), so load drift hits all alike.
    Each first answers a short warm-up."""
    keys = list(clients)
    labels = {key: f"{key[0]} {key[1]}" if len({k[0] for k in keys}) > 1 else key[1] for key in keys}
    first = next(iter(prompt_sets.values()))[0]
    for key in keys:
        progress(f"{labels[key]}: warming up")
        await stream_speculative_answer(clients[key], first, 4, clock)
    measured = Measured({}, {})
    for name, prompts in prompt_sets.items():
        per_key: dict[Key, list[list[SpecAnswer]]] = {key: [] for key in keys}
        for r in range(rounds):
            this_round: dict[Key, list[SpecAnswer]] = {key: [] for key in keys}
            for i, prompt in enumerate(prompts):
                for key in order_of_turn(keys, r, i):
                    this_round[key].append(await stream_speculative_answer(clients[key], prompt, answer_tokens,
                                                                           clock))
            for key in keys:
                per_key[key].append(this_round[key])
                figures = decode_figures(this_round[key])
                drafted = sum(a.speculation.drafted for a in this_round[key])
                accepted = sum(a.speculation.accepted for a in this_round[key])
                accept = f", acceptance {accepted / drafted:.2f}" if drafted else ""
                progress(f"round {r + 1}/{rounds}, {set_label(name)} set: {labels[key]}: "
                         f"{num(figures.tokens_per_s, 2)} decode tokens/s{accept}")
        measured.answers[name] = per_key
        measured.statuses[name] = {key: await speculation_status(clients[key]) for key in keys}
    return measured


def reports(configs: Sequence[Config], measured: Measured, entry_statuses: Mapping[str, Mapping[str, Any]], *,
            rounds: int, answer_tokens: int, cpu_model: str) -> list[SpeculationReport]:
    """One report per configuration from a group's measures (pure)."""
    out = []
    for config in configs:
        results = []
        for name, per_key in measured.answers.items():
            mine = {mode: per_key[(config.name, mode)] for mode in config.modes}
            statuses = {mode: measured.statuses[name].get((config.name, mode)) for mode in config.modes}
            results += mode_results(set_label(name), mine, asked_tokens=answer_tokens, statuses=statuses)
        out.append(SpeculationReport(
            target=config.target, nodes=config.nodes, threads=config.threads,
            node=node_info(entry_statuses[config.name]), cpu_model=cpu_model, answer_tokens=answer_tokens,
            rounds=rounds, link_delay_ms=config.link_delay_ms, draft_model=config.draft_model,
            results=tuple(results)))
    return out


# == local nodes ===================================================================================


async def start_config(config: Config, *, model: str | None, cache_dir: str | None,
                       progress: Progress) -> dict[str, LocalMesh]:
    """The nodes of every mode of a configuration (each mode a mesh of its own)."""
    meshes: dict[str, LocalMesh] = {}
    try:
        for mode in config.modes:
            progress(f"{config.name} {mode}: starting {config.nodes} node(s), {config.threads} thread(s) each")
            meshes[mode] = await start_nodes(
                config.nodes, threads=config.threads, model=model, cache_dir=cache_dir, weights=config.weights,
                extra_args=up_args(mode, draft_model=config.draft_model, link_delay_ms=config.link_delay_ms),
                label=f"speculate-{mode}")
    except BaseException:
        await stop_all(meshes.values())
        raise
    return meshes


async def stop_all(meshes: Iterable[LocalMesh]) -> None:
    for mesh in list(meshes):
        await asyncio.to_thread(mesh.stop)


async def run_group_async(configs: Sequence[Config], prompt_sets: Mapping[str, Sequence[Prompt]], *, rounds: int,
                          answer_tokens: int, model: str | None = None, cache_dir: str | None = None,
                          progress: Progress = lambda message: None) -> list[SpeculationReport]:
    """Start every configuration's nodes, measure them side by side, stop them."""
    if len({c.name for c in configs}) != len(configs):
        raise BenchError("two configurations of one group share a name")
    check_up_flags(configs)
    started: list[LocalMesh] = []
    try:
        urls: dict[Key, str] = {}
        for config in configs:
            meshes = await start_config(config, model=model, cache_dir=cache_dir, progress=progress)
            started += meshes.values()
            urls.update({(config.name, mode): mesh.nodes[0].url for mode, mesh in meshes.items()})
        keys = list(urls)
        clients = dict(zip(keys, await open_clients([urls[k] for k in keys])))
        try:
            entry: dict[str, dict[str, Any]] = {}
            for key, client in clients.items():
                status = await ready_status(client, urls[key])
                entry.setdefault(key[0], status)
            measured = await measure_group(clients, prompt_sets, rounds=rounds, answer_tokens=answer_tokens,
                                           progress=progress)
        finally:
            await close_clients(list(clients.values()))
    finally:
        await stop_all(started)
    return reports(configs, measured, entry, rounds=rounds, answer_tokens=answer_tokens, cpu_model=cpu_model_name())


def run_speculation_bench(config: Config, prompt_sets: Mapping[str, Sequence[Prompt]], *, rounds: int,
                          answer_tokens: int, model: str | None = None, cache_dir: str | None = None,
                          progress: Progress = lambda message: None) -> SpeculationReport:
    """``meshllm bench --speculate``: one configuration, every mode, started, measured, stopped."""
    return asyncio.run(run_group_async([config], prompt_sets, rounds=rounds, answer_tokens=answer_tokens,
                                       model=model, cache_dir=cache_dir, progress=progress))[0]
