"""A session moved to a new plan replays its steps and then continues with the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meshllm.mesh.rebuild import INVARIANT_PART_POSITIONS
from meshllm.model import kernels
from meshllm.model.cache import prepare
from meshllm.model.engine import Engine
from meshllm.model.sampling import Sampler, SamplingParams
from meshllm.model.source import resolve
from tests.tinymodel import PROMPTS


def _drive(engine_for_step, session, sampler, n_replan_at: set[int], merge: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    """Run a session; at the given token counts, throw every KV cache away and switch engines
    (`merge`: replay in steps of up to that many positions, `Session.restart`)."""
    engines_used = 0
    engine = engine_for_step(engines_used)
    out: list[int] = []
    with torch.inference_mode():
        while (step := session.next_step()) is not None:
            if step.sample and len(session.generated) in n_replan_at:
                n_replan_at.discard(len(session.generated))
                for shard in engine.shards:
                    shard.drop(session.session_id)
                engines_used += 1
                engine = engine_for_step(engines_used)  # a new plan: other spans, empty caches
                session.restart(merge)
                continue
            logits = engine._run_chain(session.session_id, list(step.token_ids), step.start_pos)
            if not step.sample:
                session.step_done()
                continue
            out.append(session.accept(sampler.sample(logits)).id)
    return out


@pytest.mark.parametrize("weights", ["f32", "int4"])
def test_replay_onto_other_spans_gives_identical_greedy_tokens(tiny_qwen2: Path, weights: str) -> None:
    prepared = prepare(resolve(tiny_qwen2))
    plans = [[(0, 2), (2, 6)], [(0, 5), (5, 6)], [(0, 6)], [(0, 1), (1, 3), (3, 6)]]
    engines = [Engine(prepared, p, weights=weights) for p in plans]
    for messages in PROMPTS[:3]:
        prompt = engines[0].chat_prompt(messages)
        params = SamplingParams(max_tokens=40)
        want = [t.id for t in engines[2].generate(prompt, params)]
        session = engines[0].new_session(prompt, params)
        got = _drive(lambda i: engines[i % len(engines)], session, Sampler(params), {1, 7, 20})
        assert got == want


def test_a_merged_replay_on_invariant_kernels_gives_identical_greedy_tokens(tiny_qwen2: Path) -> None:
    """Batch-invariant int4 kernels (issue 18): a replay runs every position so far in one
    step (the entry node's full-replay fallback), and the answer does not change."""
    # (without a C compiler the kernels are torch's: the replay then keeps the original steps)
    invariant = kernels.get() is not None
    prepared = prepare(resolve(tiny_qwen2))
    plans = [[(0, 2), (2, 6)], [(0, 5), (5, 6)], [(0, 6)]]
    engines = [Engine(prepared, p, weights="int4") for p in plans]
    assert all(getattr(s, "batch_invariant", False) == invariant for e in engines for s in e.shards)
    for messages in PROMPTS[:2]:
        prompt = engines[0].chat_prompt(messages)
        params = SamplingParams(max_tokens=40)
        want = [t.id for t in engines[2].generate(prompt, params)]
        session = engines[0].new_session(prompt, params)
        got = _drive(lambda i: engines[i % len(engines)], session, Sampler(params), {7, 20},
                     merge=INVARIANT_PART_POSITIONS if invariant else 0)
        assert got == want


def test_replay_keeps_the_seeded_sampler_state(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    a, b = Engine(prepared, [(0, 3), (3, 6)]), Engine(prepared, [(0, 6)])
    prompt = a.chat_prompt(PROMPTS[1])
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=30)
    want = [t.id for t in b.generate(prompt, params)]
    got = _drive(lambda i: (a, b)[i % 2], a.new_session(prompt, params), Sampler(params), {5, 12})
    assert got == want
