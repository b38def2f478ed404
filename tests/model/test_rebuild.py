"""Recovery on the real model: stages keep their KV caches across re-plans and rebuild only
the layers they gained, from the output logs, in the original chunking, and the answer is
token for token the undisturbed one (f32: transformers `generate`; int8: one meshllm node).

The runtimes here are driven by hand, as the mesh core would drive them on a chain of nodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.mesh.jobs import Compute, ImportCache, RebuildPart
from meshllm.mesh.rebuild import parts
from meshllm.model.cache import prepare
from meshllm.model import kernels
from meshllm.model.lean import LeanShard
from meshllm.model.runtime import Runtime
from meshllm.model.source import resolve
from tests.tinymodel import chat_ids, reference_greedy, PROMPTS

SID = "entry/0"


@pytest.fixture(autouse=True)
def _inference_mode():  # type: ignore[no-untyped-def]
    with torch.inference_mode():  # as on a node's worker thread
        yield


def runtime(model: Path, span: tuple[int, int], weights: str) -> Runtime:
    rt = Runtime.load(prepare(resolve(model)), weights=weights)
    rt.load_span(*span)
    return rt


class Chain:
    """Runtimes in chain order, driven step by step like the mesh drives its stages."""

    def __init__(self, stages: list[Runtime]) -> None:
        self.stages = stages
        self.steps: list[tuple[int, ...]] = []
        self.tokens: list[int] = []
        self._jobs = 0

    def _job_id(self) -> int:
        self._jobs += 1
        return self._jobs

    @property
    def position(self) -> int:
        return sum(len(s) for s in self.steps)

    def step(self, feed: tuple[int, ...]) -> None:
        start = self.position
        x = None
        for i, rt in enumerate(self.stages):
            job = Compute(self._job_id(), SID, start, len(feed), token_ids=feed if i == 0 else None, hidden=x)
            x = rt.compute(job).hidden
        logits = self.stages[-1].shard.head(torch.from_numpy(x).unsqueeze(0))
        self.steps.append(feed)
        self.tokens.append(int(torch.argmax(logits)))

    def generate(self, prompt: tuple[int, ...], total: int) -> list[int]:
        if not self.steps:
            self.step(prompt)
        while len(self.tokens) < total:
            self.step((self.tokens[-1],))
        return self.tokens

    def rebuild(self, whole: bool = False, invariant: bool = False) -> list:  # type: ignore[type-arg]
        """Rebuild every stage's caches for the positions run so far, in the parts an entry
        node plans (large ones with `invariant` numerics); each stage's report."""
        history = tuple(t for s in self.steps for t in s)
        prefill = len(self.steps[0])
        reports = [None] * len(self.stages)
        for start, end in parts(len(history), prefill, invariant):
            x = None
            for i, rt in enumerate(self.stages):
                job = RebuildPart(self._job_id(), SID, 2 if whole else 1, len(history), prefill, start,
                                  end - start, token_ids=history[start:end] if i == 0 else None, hidden=x,
                                  whole=whole)
                result = rt.rebuild_part(job)
                assert result.rebuild_error is None, result.rebuild_error
                x, reports[i] = result.hidden, result.rebuild
        return reports


@pytest.mark.parametrize("arch, weights", [("llama", "f32"), ("llama", "int8"), ("qwen2", "f32"),
                                           ("mistral", "f32"), ("mistral", "int4")])
def test_a_lost_middle_stage_is_rebuilt_by_its_neighbours_exactly(request: pytest.FixtureRequest, arch: str,
                                                                   weights: str) -> None:
    tiny_llama = request.getfixturevalue(f"tiny_{arch}")
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[1]))
    if weights == "f32":
        expected = reference_greedy(tiny_llama, prompt, 40)
    else:  # any other format: against one meshllm node with the same weights
        expected = Chain([runtime(tiny_llama, (0, 6), weights)]).generate(prompt, 40)
    a, b, c = (runtime(tiny_llama, span, weights) for span in ((0, 2), (2, 4), (4, 6)))
    chain = Chain([a, b, c])
    chain.generate(prompt, 25)
    position = chain.position
    del b  # the middle stage is lost: its layers go to its neighbours
    a.load_span(0, 3)
    c.load_span(3, 6)
    # each kept the caches of the layers it held, and nothing else
    assert a.shard.layer_lengths(SID) == [position, position, 0]
    assert c.shard.layer_lengths(SID) == [0, position, position]
    chain.stages = [a, c]
    first, last = chain.rebuild()
    assert (first.kept, first.from_log, first.from_upstream) == ((0, 2), (2, 3), None)
    assert (last.kept, last.from_upstream, last.from_log) == ((4, 6), (3, 4), None)
    # the original chunking (the prompt's step, then one position at a time), unless the
    # kernels are batch-invariant: then one pass per part
    steps = len(parts(position, len(prompt))) if a.batch_invariant else position - len(prompt) + 1
    assert first.passes == last.passes == steps
    assert chain.generate(prompt, 40) == expected


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_an_invariant_shard_rebuilds_lost_layers_in_one_pass_with_the_same_bits(request: pytest.FixtureRequest,
                                                                              arch: str) -> None:
    """int4 kernels that give a position the same bits alone or in a chunk (issue 18): the
    entry node plans the rebuild as one part, the stages that took over a lost middle stage's
    layers recompute them for every position in one pass, the caches they make are bitwise
    those of the undisturbed run, and so is the rest of the answer."""
    # (on a device without a C compiler the kernels are torch's, not invariant: the same
    # rebuild then repeats the original steps, and must give the same bits all the same)
    invariant = kernels.get() is not None
    tiny = request.getfixturevalue(f"tiny_{arch}")
    prompt = tuple(chat_ids(tiny, PROMPTS[1]))
    expected = Chain([runtime(tiny, (0, 6), "int4")]).generate(prompt, 40)
    a, b, c = (runtime(tiny, span, "int4") for span in ((0, 2), (2, 4), (4, 6)))
    assert all(isinstance(rt.shard, LeanShard) for rt in (a, b, c))
    assert all(rt.batch_invariant == invariant for rt in (a, b, c))
    chain = Chain([a, b, c])
    chain.generate(prompt, 25)
    position = chain.position
    undisturbed = {layer: (k, v) for _sid, layer, k, v in b.shard.export_layers(2, 4)}
    del b
    a.load_span(0, 3)
    c.load_span(3, 6)
    assert a.batch_invariant == c.batch_invariant == invariant
    chain.stages = [a, c]
    if invariant:
        assert parts(position, len(prompt), invariant=True) == [(0, position)]
    first, last = chain.rebuild(invariant=invariant)
    assert (first.from_log, last.from_upstream) == ((2, 3), (3, 4))
    if invariant:
        assert first.passes == last.passes == 1
    else:  # the prompt's step, then one pass a position
        assert first.passes == last.passes == 1 + position - len(prompt)
    rebuilt = {layer: (k, v) for rt, lo, hi in ((a, 2, 3), (c, 3, 4))
               for _sid, layer, k, v in rt.shard.export_layers(lo, hi)}
    assert sorted(rebuilt) == [2, 3]
    for layer, (k, v) in rebuilt.items():
        assert np.array_equal(k, undisturbed[layer][0]) and np.array_equal(v, undisturbed[layer][1]), layer
    assert chain.generate(prompt, 40) == expected


def test_an_unchanged_stage_keeps_its_caches_and_recomputes_nothing(tiny_llama: Path) -> None:
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[0]))
    expected = reference_greedy(tiny_llama, prompt, 30)
    a, b = runtime(tiny_llama, (0, 3), "f32"), runtime(tiny_llama, (3, 6), "f32")
    chain = Chain([a, b])
    chain.generate(prompt, 12)
    b.load_span(3, 6)  # a re-plan that leaves this stage as it was
    first, last = chain.rebuild()
    for report in (first, last):
        assert report.rebuilt_layers == 0
    assert chain.generate(prompt, 30) == expected


def test_a_stage_taking_layers_from_a_lost_first_stage_gets_them_from_the_embedding(tiny_llama: Path) -> None:
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[2]))
    expected = reference_greedy(tiny_llama, prompt, 30)
    a, b = runtime(tiny_llama, (0, 3), "f32"), runtime(tiny_llama, (3, 6), "f32")
    chain = Chain([a, b])
    chain.generate(prompt, 17)
    b.load_span(0, 6)  # the first stage is lost; the entry node (here: the chain) embeds
    chain.stages = [b]
    (report,) = chain.rebuild()
    assert (report.kept, report.from_upstream, report.from_log) == ((3, 6), (0, 3), None)
    assert chain.generate(prompt, 30) == expected


def test_a_stage_whose_log_is_gone_says_so_instead_of_guessing(tiny_llama: Path) -> None:
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[1]))
    a, b = runtime(tiny_llama, (0, 3), "int8"), runtime(tiny_llama, (3, 6), "int8")
    chain = Chain([a, b])
    chain.generate(prompt, 8)
    a.logs.drop(SID)  # over the memory cap, say
    a.load_span(0, 6)
    history = tuple(t for s in chain.steps for t in s)
    first_part = parts(len(history), len(chain.steps[0]))[0]
    result = a.rebuild_part(RebuildPart(99, SID, 1, len(history), len(chain.steps[0]), first_part[0],
                                        first_part[1] - first_part[0], token_ids=history[:first_part[1]]))
    assert result.rebuild_error is not None and "no output log at layer 3" in result.rebuild_error
    assert result.hidden is None
    # a whole rebuild: the stage recomputes its span from the embedding, and the answer goes on
    expected = Chain([runtime(tiny_llama, (0, 6), "int8")]).generate(prompt, 20)
    chain.stages = [a]
    (report,) = chain.rebuild(whole=True)
    assert report.kept is None and report.from_upstream == (0, 6)
    assert chain.generate(prompt, 20) == expected


def test_logs_stay_under_their_memory_cap(tiny_llama: Path) -> None:
    a = runtime(tiny_llama, (0, 3), "f32")
    hidden = a.hidden_size
    a.logs.cap_bytes = 40 * hidden * 4  # room for 40 positions
    for n, sid in enumerate(("s/0", "s/1", "s/2")):
        for pos in range(30):
            x = np.full((1, hidden), float(n), dtype=np.float32)
            a.logs.record(sid, 3, pos, x)
    assert a.logs.nbytes <= a.logs.cap_bytes
    assert a.logs.get("s/2") is not None and a.logs.get("s/2").length == 30
    assert a.logs.get("s/0") is None  # the least recently written went first


@pytest.mark.parametrize("weights", ["f32", "int4"])
def test_layers_that_move_between_live_nodes_take_their_caches_along(tiny_llama: Path, weights: str) -> None:
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[1]))
    if weights == "f32":
        expected = reference_greedy(tiny_llama, prompt, 36)
    else:
        expected = Chain([runtime(tiny_llama, (0, 6), weights)]).generate(prompt, 36)
    a, b = runtime(tiny_llama, (0, 3), weights), runtime(tiny_llama, (3, 6), weights)
    chain = Chain([a, b])
    chain.generate(prompt, 20)
    # a re-plan moves layer 2 from a to b: a hands its cache over (it reaches b before b
    # loads the new plan), and b moves layer 5 on to a newcomer, c
    loaded = a.load_span(0, 2)
    assert [(sid, layer) for sid, layer, _k, _v in loaded.handover] == [(SID, 2)]
    for sid, layer, keys, values in loaded.handover:
        b.import_cache(ImportCache(1, sid, layer, keys, values))
    c = runtime(tiny_llama, (0, 0), weights)
    given = b.load_span(2, 5).handover
    c.load_span(5, 6)
    for sid, layer, keys, values in given:
        c.import_cache(ImportCache(2, sid, layer, keys, values))
    chain.stages = [a, b, c]
    reports = chain.rebuild()
    assert [r.rebuilt_layers for r in reports] == [0, 0, 0]
    assert chain.generate(prompt, 36) == expected


def test_a_replan_reads_only_the_layers_a_node_gains(tiny_llama: Path) -> None:
    rt = runtime(tiny_llama, (0, 3), "int4")
    held = rt.shard.layers
    embedding = rt.shard.embedding
    rt.load_span(1, 5)
    assert rt.shard.layers[0] is held[1] and rt.shard.layers[1] is held[2]  # shared, not read again
    assert rt.shard.embedding is embedding
    assert all(layer is not old for layer in rt.shard.layers[2:] for old in held)


def test_layers_given_up_and_given_back_at_once_keep_their_caches(tiny_llama: Path) -> None:
    """A node joins and takes layers, then is lost before the answer ran on: the layers come
    back to the node that gave them up, with the caches it had."""
    prompt = tuple(chat_ids(tiny_llama, PROMPTS[0]))
    a, b = runtime(tiny_llama, (0, 3), "int8"), runtime(tiny_llama, (3, 6), "int8")
    chain = Chain([a, b])
    chain.generate(prompt, 10)
    position = chain.position
    a.load_span(0, 2)  # layer 2 goes to a joiner...
    a.load_span(0, 3)  # ...that is lost at once
    first, last = chain.rebuild()  # the rebuild takes the cache it gave up back
    assert first.rebuilt_layers == 0 and last.rebuilt_layers == 0
    assert a.shard.layer_lengths(SID) == [position] * 3
