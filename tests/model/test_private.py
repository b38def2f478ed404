"""The private layers on the real model: an entry node with K private layers, driven by hand as
the mesh core drives it, answers exactly; what it sends on is the input of layer K, never the
embedding; a retried step and a rebuild give the first stage the same bits again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.mesh.jobs import Compute, RebuildPart
from meshllm.mesh.rebuild import parts
from meshllm.model.cache import prepare
from meshllm.model.runtime import Runtime
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.source import resolve
from tests.tinymodel import PROMPTS, chat_ids, reference_greedy

SID = "entry/0"


@pytest.fixture(autouse=True)
def _inference_mode():  # type: ignore[no-untyped-def]
    with torch.inference_mode():  # as on a node's worker thread
        yield


def entry_and_stage(model: Path, k: int, weights: str = "f32") -> tuple[Runtime, Runtime]:
    """An entry node holding no stage, and one stage holding every layer a plan places."""
    prepared = prepare(resolve(model))
    entry = Runtime.load(prepared, weights=weights, private_layers=k)
    stage = Runtime.load(prepared, weights=weights, private_layers=k)
    stage.load_span(k, stage.num_layers - k)
    return entry, stage


def run(entry: Runtime, stage: Runtime, prompt: list[int], tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens, and what the entry node sent on at each step."""
    sampler = Sampler(SamplingParams(max_tokens=tokens))
    sent: list[np.ndarray] = []
    ids, pos, out = list(prompt), 0, []
    for _ in range(tokens):
        step = ids[pos:]
        first = entry.compute(Compute(0, SID, pos, len(step), token_ids=tuple(step), run_span=False))
        assert first.hidden is not None
        sent.append(first.hidden)
        mid = stage.compute(Compute(1, SID, pos, len(step), hidden=first.hidden))
        last = entry.compute(Compute(2, SID, pos, len(step), hidden=mid.hidden, run_span=False, finish="sample"),
                             sampler)
        assert last.token_id is not None
        pos += len(step)
        ids.append(last.token_id)
        out.append(last.token_id)
    return out, sent


@pytest.mark.parametrize("k", [1, 2])
def test_an_entry_with_private_layers_answers_exactly_and_never_sends_the_embedding(tiny_llama: Path,
                                                                                   k: int) -> None:
    entry, stage = entry_and_stage(tiny_llama, k)
    assert entry.private_layers == k and stage.span == (k, 6 - k)
    prompt = chat_ids(tiny_llama, PROMPTS[0])
    got, sent = run(entry, stage, prompt, 16)
    assert got == reference_greedy(tiny_llama, prompt, 16)
    table = entry.shard.embed(list(range(int(entry.shard.config.vocab_size))))[0].numpy()
    for rows in sent:
        assert not any(np.any(np.all(table == row, axis=1)) for row in rows)


def test_the_private_layers_share_the_embedding_and_head_of_the_node(tiny_llama: Path) -> None:
    entry, _stage = entry_and_stage(tiny_llama, 1)
    assert entry.private is not None
    for shard in (entry.private.head_end, entry.private.tail_end):
        assert shard.embed_tokens is entry.shard.embed_tokens  # type: ignore[attr-defined]
        assert shard.lm_head is entry.shard.lm_head  # type: ignore[attr-defined]


def test_private_layers_are_clamped_to_leave_a_layer_to_the_mesh(tiny_llama: Path) -> None:
    entry = Runtime.load(prepare(resolve(tiny_llama)), private_layers=9)
    assert entry.private_layers == 2  # of 6 layers: [0, 2) and [4, 6), with [2, 4) placed
    assert entry.mesh_model_id.endswith("-private2")


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_a_retried_step_and_a_rebuild_send_the_first_stage_the_same_bits(tiny_llama: Path, weights: str) -> None:
    entry, stage = entry_and_stage(tiny_llama, 1, weights)
    prompt = chat_ids(tiny_llama, PROMPTS[1])
    _got, sent = run(entry, stage, prompt, 12)
    position = sum(rows.shape[0] for rows in sent)
    # the last step again, as after a loss further on: the same bits
    again = entry.compute(Compute(3, SID, position - 1, 1, token_ids=(1,), run_span=False))
    retried = entry.compute(Compute(4, SID, position - 1, 1, token_ids=(1,), run_span=False))
    assert np.array_equal(again.hidden, retried.hidden)
    # a rebuild of every position before it: the inputs the stage got step by step
    history = tuple(prompt) + tuple(int(t) for t in _got[:-1])
    want = np.concatenate(sent[:-1])
    got = []
    for start, end in parts(position - 1, len(prompt), entry.batch_invariant):
        part = entry.rebuild_part(RebuildPart(5, SID, 1, position - 1, len(prompt), start, end - start,
                                              token_ids=history[start:end], run_span=False))
        assert part.hidden is not None
        got.append(part.hidden)
    assert np.array_equal(np.concatenate(got), want)
