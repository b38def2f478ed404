"""``meshllm bench --mesh N``: a single-node reference and an N-node local mesh per codec, all
on this machine, measured through their APIs in one run and compared."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tui.bench.api import AGREEMENT_PROMPTS, ApiBench, Target, interleave
from tui.bench.report import (STAGE_HEADER, Agreement, BenchError, MeshMeasure, agreement, grid, num,
                              ratio, stage_rows)

CODECS = ("f32", "f16", "bf16", "int8")


@dataclass(frozen=True)
class CodecRun:
    """One codec's mesh beside the single-node reference of the same run."""

    codec: str
    measure: MeshMeasure
    reference: MeshMeasure
    """The single node, measured in turns with this mesh."""
    decode_ratio: float | None
    """Decode tokens/s, mesh / single (target >= 0.95)."""
    ttft_ratio: float | None
    """TTFT of the bench prompt, mesh / single (target <= 1.3)."""
    per_hop_ms_net: float | None
    """(mesh non-compute ms - single non-compute ms) / hops: entry work cancels out."""
    agreement: Agreement

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "decode_ratio": self.decode_ratio,
            "ttft_ratio": self.ttft_ratio,
            "per_hop_ms_net": self.per_hop_ms_net,
            "agreement": asdict(self.agreement),
            "measure": self.measure.to_json(),
            "reference": {k: v for k, v in self.reference.to_json().items() if k != "answers"},
        }


@dataclass(frozen=True)
class Comparison:
    """``meshllm bench --mesh N``: a single node and an N-node mesh per codec, one run."""

    nodes: int
    cores: int
    single_threads: int
    node_threads: int
    single: MeshMeasure
    """The single node over every turn of the run (each codec's ``reference`` pooled)."""
    runs: tuple[CodecRun, ...]

    def to_json(self) -> dict[str, Any]:
        s = self.single
        return {
            "mode": "mesh",
            "model": {"name": s.model_name, "id": s.model_id, "num_layers": s.num_layers},
            "nodes": self.nodes,
            "cores": self.cores,
            "single_threads": self.single_threads,
            "node_threads": self.node_threads,
            "prompt_tokens": s.prompt_tokens,
            "single": s.to_json(),
            "codecs": [run.to_json() for run in self.runs],
        }


def compare(single: MeshMeasure, meshes: Sequence[MeshMeasure], *, nodes: int, cores: int,
            single_threads: int, node_threads: int,
            references: Sequence[MeshMeasure] | None = None) -> Comparison:
    """Ratios, net per-hop ms and token agreement of each mesh against the single node.

    ``references[i]``, when given, is the single node measured in turns with ``meshes[i]``:
    ratios and per-hop ms use it. Token agreement always uses ``single.answers``.
    """
    refs = list(references) if references is not None else [single] * len(meshes)
    if len(refs) != len(meshes):
        raise ValueError("one reference per mesh")
    runs = []
    for m, ref in zip(meshes, refs):
        net = None
        if m.non_compute_ms_per_token is not None and ref.non_compute_ms_per_token is not None and m.hops_per_token:
            net = round((m.non_compute_ms_per_token - ref.non_compute_ms_per_token) / m.hops_per_token, 3)
        runs.append(CodecRun(
            codec=m.codec,
            measure=m,
            reference=ref,
            decode_ratio=ratio(m.decode_tokens_per_s, ref.decode_tokens_per_s),
            ttft_ratio=ratio(m.ttft_ms, ref.ttft_ms),
            per_hop_ms_net=net,
            agreement=agreement(single.answers, m.answers),
        ))
    return Comparison(nodes, cores, single_threads, node_threads, single, tuple(runs))



def format_comparison(c: Comparison) -> str:
    """``meshllm bench --mesh N``: the single node beside each codec's mesh, then per stage."""
    s = c.single
    cols = [s] + [r.measure for r in c.runs]
    header = ("", "single") + tuple(f"mesh {r.codec}" for r in c.runs)
    agreements = [r.agreement for r in c.runs]
    rows: list[tuple[str, ...]] = [
        header,
        ("decode tokens/s", *[num(m.decode_tokens_per_s, 2) for m in cols]),
        ("  single, same turns", "", *[num(r.reference.decode_tokens_per_s, 2) for r in c.runs]),
        ("  mesh / single", "1.00", *[num(r.decode_ratio, 2) for r in c.runs]),
        (f"TTFT {s.prompt_tokens} ms", *[num(m.ttft_ms, 0) for m in cols]),
        ("  single, same turns", "", *[num(r.reference.ttft_ms, 0) for r in c.runs]),
        ("  mesh / single", "1.00", *[num(r.ttft_ratio, 2) for r in c.runs]),
        ("ms per token", *[num(m.ms_per_token, 2) for m in cols]),
        ("  stage compute", *[num(m.stage_compute_ms_per_token, 2) for m in cols]),
        ("  other", *[num(m.non_compute_ms_per_token, 2) for m in cols]),
        ("hops per token", *[str(m.hops_per_token) for m in cols]),
        ("per-hop ms (net)", "-", *[num(r.per_hop_ms_net, 2) for r in c.runs]),
        ("bytes per decode hop", *[num(m.decode_bytes_per_hop, 0) for m in cols]),
        ("token agreement", "1.00", *[num(a.prefix_fraction, 2) for a in agreements]),
        ("identical answers", f"{len(s.answers)}/{len(s.answers)}",
         *[f"{a.identical_answers}/{a.prompts}" for a in agreements]),
    ]
    title = (f"{s.model_name} ({s.num_layers} layers): one node with {c.single_threads} thread(s) vs "
             f"a {c.nodes}-node local mesh with {c.node_threads} thread(s) per node ({c.cores} cores)")
    per_stage = [STAGE_HEADER, *stage_rows("single", s)]
    for r in c.runs:
        per_stage += stage_rows(f"mesh {r.codec}", r.measure)
    notes = ("mesh / single: against the single node measured in turns with that mesh (same turns); "
             "per-hop ms (net): (mesh - single) non-compute ms per token / hops;\ntoken agreement: "
             "share of the single node's greedy tokens matched before each answer's first divergence")
    return "\n".join([title, "", *grid(rows), "", "per stage:", *grid(per_stage), "", notes])



def run_mesh_comparison(
    nodes: int,
    *,
    codecs: Sequence[str] = CODECS,
    cores: int | None = None,
    model: str | None = None,
    cache_dir: str | None = None,
    weights: str | None = None,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    ttft_runs: int = 3,
    agreement_tokens: int = 32,
    start_timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda message: None,
) -> Comparison:
    """A one-node reference (all cores) and, per codec, a ``nodes``-node local mesh (cores //
    nodes threads each, at least 1), all on this machine and measured through their APIs.

    The reference runs for the whole comparison; each codec's mesh runs while it is measured,
    in turns with the reference (see `interleave`), and is stopped before the next one starts.
    Only the node being asked computes at any time; the others wait idle.
    """
    if nodes < 2:
        raise BenchError("--mesh needs at least 2 nodes (the reference is the single node)")
    unknown = [c for c in codecs if c not in CODECS]
    if unknown or not codecs:
        raise BenchError(f"codecs must be among {', '.join(CODECS)}, not {', '.join(unknown) or 'none'}")
    cores = cores or os.cpu_count() or 1
    node_threads = max(1, cores // nodes)
    setup = _LocalSetup(model, cache_dir, f"bench-{uuid.uuid4().hex[:8]}", start_timeout_s, weights)
    single, references, meshes = asyncio.run(_compare(
        setup, nodes, codecs, cores, node_threads, prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens, ttft_runs=ttft_runs, agreement_tokens=agreement_tokens,
        progress=progress,
    ))
    return compare(single, meshes, references=references, nodes=nodes, cores=cores,
                   single_threads=cores, node_threads=node_threads)


@dataclass(frozen=True)
class _LocalSetup:
    model: str | None
    cache_dir: str | None
    mesh_name: str
    start_timeout_s: float
    weights: str | None = None

    async def start(self, count: int, threads: int, codec: str | None, label: str) -> Any:
        from tui.launcher import LocalMesh

        extra = ["--cache-dir", self.cache_dir] if self.cache_dir else []
        extra += ["--weights", self.weights] if self.weights else []
        mesh = LocalMesh(count, model=self.model, codec=codec, threads=threads,
                         extra_args=[*extra, "--mesh-name", f"{self.mesh_name}-{label}"])
        await asyncio.to_thread(mesh.start)
        try:
            await asyncio.to_thread(wait_for_stages, mesh, count, self.start_timeout_s)
        except BaseException:
            await asyncio.to_thread(mesh.stop)
            raise
        return mesh


async def _compare(setup: _LocalSetup, nodes: int, codecs: Sequence[str], cores: int, node_threads: int, *,
                   prompt_tokens: int, decode_tokens: int, ttft_runs: int, agreement_tokens: int,
                   progress: Callable[[str], None]) -> tuple[MeshMeasure, list[MeshMeasure], list[MeshMeasure]]:
    progress(f"single: starting 1 node, {cores} thread(s)")
    reference = await setup.start(1, cores, None, "single")
    try:
        async with ApiBench([reference.nodes[0].url]) as single_bench:
            single = Target(single_bench)
            await single.prepare(prompt_tokens, None, lambda m: progress(f"single: {m}"))
            progress(f"single: agreement answers: {len(AGREEMENT_PROMPTS)} x {agreement_tokens} tokens")
            await single.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
            pooled = single.fork()
            references, meshes = [], []
            for codec in codecs:
                label = f"mesh {codec}"
                progress(f"{label}: starting {nodes} nodes, {node_threads} thread(s) each")
                mesh = await setup.start(nodes, node_threads, codec, codec)
                try:
                    async with ApiBench([n.url for n in mesh.nodes]) as mesh_bench:
                        target = Target(mesh_bench)
                        await target.prepare(prompt_tokens, single.prompt_messages,
                                             lambda m, label=label: progress(f"{label}: {m}"))
                        paired = single.fork()
                        await paired.warm()
                        await interleave([paired, target], ttft_runs=ttft_runs, decode_tokens=decode_tokens,
                                         progress=lambda m, label=label: progress(f"{label} and single: {m}"))
                        progress(f"{label}: agreement answers")
                        await target.collect_answers(AGREEMENT_PROMPTS, agreement_tokens)
                finally:
                    await asyncio.to_thread(mesh.stop)
                pooled.absorb(paired)
                references.append(paired.result())
                meshes.append(target.result())
                progress(f"{label}: {num(meshes[-1].decode_tokens_per_s, 2)} tokens/s (single "
                         f"{num(references[-1].decode_tokens_per_s, 2)}), TTFT "
                         f"{num(meshes[-1].ttft_ms, 0)} ms (single {num(references[-1].ttft_ms, 0)})")
    finally:
        await asyncio.to_thread(reference.stop)
    return pooled.result(), references, meshes


def wait_for_stages(mesh: Any, count: int, timeout_s: float) -> None:
    """Until every node agrees on one active plan with ``count`` stages."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            plan = mesh.wait_ready(max(1.0, deadline - time.monotonic()))
        except (TimeoutError, RuntimeError) as error:
            raise BenchError(f"the local mesh did not form: {str(error)[:2000]}") from None
        if len(plan["stages"]) == count:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the local mesh planned {len(plan['stages'])} stage(s), not {count}")
        time.sleep(0.5)
