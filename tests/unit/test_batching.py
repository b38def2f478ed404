"""Which jobs run together on a node's worker (meshllm.mesh.batching), and how a prompt is cut
into chunks (meshllm.mesh.session), without a model or an event loop."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.mesh.batching import JobQueue
from meshllm.mesh.jobs import Compute, DropSessions, LoadSpan
from meshllm.mesh.session import Session

_ids = iter(range(10**6))


def step(session: str, positions: int = 1) -> Compute:
    return Compute(next(_ids), session, 10, positions, hidden=np.zeros((positions, 4), np.float32))


def sessions(run: list) -> list[str]:  # type: ignore[type-arg]
    return [job.session_id for job in run]


def test_decode_steps_of_different_sessions_run_as_one_batch() -> None:
    queue = JobQueue()
    for s in "abcd":
        queue.add(step(s))
    assert sessions(queue.take()) == list("abcd")
    assert queue.take() == []


def test_a_run_carries_at_most_one_prompt_chunk_and_the_oldest_goes_first() -> None:
    queue = JobQueue()
    for job in (step("a"), step("p", 32), step("b"), step("q", 32), step("c")):
        queue.add(job)
    assert sessions(queue.take()) == ["a", "p", "b", "c"]
    assert sessions(queue.take()) == ["q"]


def test_a_sessions_later_step_never_runs_ahead_of_its_earlier_one() -> None:
    queue = JobQueue()
    for job in (step("p", 32), step("q", 32), step("q")):
        queue.add(job)
    assert sessions(queue.take()) == ["p"]  # q's decode step waits behind q's chunk
    assert sessions(queue.take()) == ["q"]
    assert [j.positions for j in queue.take()] == [1]


def test_jobs_that_are_not_steps_keep_their_place() -> None:
    queue = JobQueue()
    queue.add(step("a"))
    queue.add(LoadSpan(next(_ids), 0, 4))
    queue.add(step("b"))
    queue.add(DropSessions(next(_ids), ("a",)))
    runs = [queue.take() for _ in range(4)]
    assert [type(r[0]).__name__ for r in runs] == ["Compute", "LoadSpan", "Compute", "DropSessions"]
    assert all(len(r) == 1 for r in runs)


def test_without_batch_invariant_kernels_every_run_is_one_job() -> None:
    queue = JobQueue(batching=False)
    for s in "abc":
        queue.add(step(s))
    assert [sessions(queue.take()) for _ in range(3)] == [["a"], ["b"], ["c"]]


def test_a_run_is_bounded_and_the_rest_waits_in_order() -> None:
    queue = JobQueue(max_steps=3)
    for s in "abcde":
        queue.add(step(s))
    assert sessions(queue.take()) == list("abc")
    assert sessions(queue.take()) == list("de")


def _session(prompt_len: int, chunk: int) -> Session:
    return Session("s", tuple(range(100, 100 + prompt_len)), max_tokens=3, eos_token_ids=frozenset(),
                   prefill_chunk=chunk)


def test_a_prompt_runs_in_chunks_and_only_its_last_chunk_is_sampled() -> None:
    s = _session(70, 32)
    seen = []
    while (st := s.next_step()) is not None and not st.sample:
        seen.append((st.start_pos, len(st.token_ids)))
        s.step_done()
    assert seen == [(0, 32), (32, 32)]
    assert st is not None and (st.start_pos, len(st.token_ids)) == (64, 6)
    s.accept(7)
    nxt = s.next_step()
    assert nxt is not None and nxt.token_ids == (7,) and nxt.start_pos == 70 and nxt.sample
    assert s.history()[1] == 32  # a rebuild repeats the session's own chunking


def test_a_replay_repeats_the_chunks_and_then_the_answer_goes_on() -> None:
    s = _session(40, 32)
    s.step_done()
    s.accept(5)
    s.accept(6)
    s.restart()
    replayed = []
    while (st := s.next_step()) is not None and st.replay:
        replayed.append(st.token_ids)
        s.step_done()
    assert [len(t) for t in replayed] == [32, 8, 1]
    assert st is not None and st.token_ids == (6,) and st.sample


def test_accept_refuses_a_chunk_that_is_not_sampled() -> None:
    s = _session(40, 32)
    with pytest.raises(RuntimeError):
        s.accept(1)


def test_without_chunking_the_prompt_is_one_step() -> None:
    s = _session(70, 0)
    st = s.next_step()
    assert st is not None and len(st.token_ids) == 70 and st.sample


def test_in_a_mesh_a_run_holds_one_group_of_sessions_so_the_stages_work_at_once() -> None:
    queue = JobQueue()
    for s in ("e/0", "e/1", "e/2", "e/3", "f/7"):
        queue.add(step(s))
    assert sessions(queue.take(groups=2)) == ["e/0", "e/2"]  # the oldest step's group
    assert sessions(queue.take(groups=2)) == ["e/1", "e/3", "f/7"]
    for s in ("e/0", "e/1", "e/2"):
        queue.add(step(s))
    assert sessions(queue.take(groups=1)) == ["e/0", "e/1", "e/2"]  # one node: every step at once
