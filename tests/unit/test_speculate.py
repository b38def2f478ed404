"""Speculative decoding's pure parts (meshllm.mesh.speculate, Session.accept_verified,
Sampler.verify), without a model or an event loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshllm.mesh.batching import JobQueue
from meshllm.mesh.jobs import Compute
from meshllm.mesh.session import Session
from meshllm.mesh.speculate import MAX_DRAFT, DraftPolicy, ngram_draft, policy_for
from meshllm.model.sampling import Sampler, SamplingParams


def test_prompt_lookup_drafts_what_followed_the_latest_match_of_the_longest_suffix() -> None:
    assert ngram_draft([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == (4, 5, 9)
    assert ngram_draft([1, 2, 7, 9, 1, 2, 8, 5, 1, 2], 2) == (8, 5)  # the latest occurrence
    assert ngram_draft([4, 4, 5, 6, 4], 8) == (5, 6, 4)  # n = 1 when nothing longer matches
    assert ngram_draft([4, 4, 5, 6, 4], 8, min_ngram=2) == ()  # auto: no guess from one token
    assert ngram_draft([5, 6, 7], 2) == ()
    assert ngram_draft([1, 2, 1], 0) == ()


def test_the_draft_length_grows_while_drafts_stand_and_shrinks_past_a_miss() -> None:
    policy = DraftPolicy()
    assert policy.draft_length(room=100) == 4
    policy.verified(4, 4)
    assert policy.draft_length(100) == 6
    policy.verified(6, 6)
    policy.verified(8, 8)
    assert policy.draft_length(100) == MAX_DRAFT
    assert policy.draft_length(room=3) == 3  # never past the answer's end
    policy.verified(8, 1)
    assert policy.draft_length(100) == 2


def test_auto_stops_drafting_for_an_answer_whose_drafts_seldom_stand() -> None:
    auto = policy_for("auto", has_draft_model=False)
    assert auto is not None and auto.mode == "ngram"
    for _ in range(10):
        auto.verified(2, 0)
    assert auto.draft_length(100) == 0
    assert policy_for("off", False) is None and policy_for("draft", False) is None
    assert policy_for("auto", True).mode == "draft"  # type: ignore[union-attr]


def _decoding(prompt: tuple[int, ...]) -> Session:
    s = Session("s", prompt, max_tokens=20, eos_token_ids=frozenset({0}), drafting=DraftPolicy())
    s.accept(9)
    return s


def test_a_verified_step_keeps_the_last_token_and_the_drafts_that_stood() -> None:
    s = _decoding((5, 6, 9, 5, 6, 9, 5, 6))
    step = s.next_step()
    assert step is not None and step.drafts == (5, 6, 9) and step.token_ids == (9, 5, 6, 9)
    assert s.next_step() is step  # drafted once
    tokens = s.accept_verified([5, 6, 7])  # two drafts stood, the third was 7
    assert [t.id for t in tokens] == [5, 6, 7]
    assert s.position == 8 + 3  # the prompt, then 9, 5, 6: the next step starts after them
    assert tokens[-1].speculation == (3, 2, 1)
    nxt = s.next_step()
    assert nxt is not None and nxt.start_pos == 11 and nxt.token_ids[0] == 7


def test_a_verified_step_ends_at_eos_and_refuses_tokens_that_do_not_follow_the_drafts() -> None:
    s = _decoding((5, 6, 9, 5, 6, 9, 5, 6))
    with pytest.raises(ValueError):
        s.accept_verified([1, 2])  # 1 is not the first draft, so nothing may come after it
    tokens = s.accept_verified([5, 0])
    assert [t.finish_reason for t in tokens] == [None, "stop"] and s.finished


def test_greedy_verification_is_decoding_one_at_a_time() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    greedy = [int(torch.argmax(row)) for row in logits]
    sampler = Sampler(SamplingParams())
    assert sampler.verify(logits, greedy[:4]) == greedy
    assert sampler.verify(logits, [greedy[0], (greedy[1] + 1) % 50, 3, 4]) == greedy[:2]


def test_sampled_verification_keeps_a_sure_draft_and_never_redraws_a_refused_one() -> None:
    sure = torch.full((2, 10), -1e9)
    sure[0, 3] = 0.0  # the draft 3 has probability 1
    sure[1, 4] = 0.0
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    assert sampler.verify(sure, [3]) == [3, 4]
    flat = torch.zeros(1, 10)
    flat[0, 3] = -1e9  # the draft 3 has probability 0: refused, and the redraw is never 3
    draws = [Sampler(SamplingParams(temperature=1.0, seed=i)).verify(torch.cat([flat, flat]), [3]) for i in range(20)]
    assert all(len(d) == 1 and d[0] != 3 for d in draws)


def test_a_verify_step_batches_like_a_decode_step_and_a_prompt_chunk_does_not() -> None:
    queue = JobQueue()
    for i, n in enumerate((1, MAX_DRAFT + 1, 3, 32, 32)):
        queue.add(Compute(i, f"s{i}", 0, n, hidden=np.zeros((n, 4), np.float32)))
    assert [job.positions for job in queue.take()] == [1, MAX_DRAFT + 1, 3, 32]
    assert [job.positions for job in queue.take()] == [32]
