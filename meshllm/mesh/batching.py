"""Which jobs the worker runs together, sans-IO.

The core issues jobs in order (meshllm.mesh.jobs); the node's worker runs them one *run* at a
time. A run is either one job, or a batch of `Compute` jobs: the steps of several sessions,
computed in one forward that reads each weight once (`meshllm.model.runtime.Runtime.compute_batch`).

A batch takes, from the jobs waiting at the head of the queue up to the first job that is not a
`Compute` (a span load, a cache import, a drop, a rebuild part: those keep their place):
- every decode step (one position, or the last token and its drafts), and
- at most one step of several positions (a chunk of a prompt), the one that waited longest:
  a long prompt is read one chunk a run, and the running answers keep streaming meanwhile.

In a mesh of N stages the sessions fall in N groups, and a run holds one group's steps: while
one stage computes a group, the stage before it computes the next group, so every device works
at once (a pipeline of N micro-batches). Batched all together, the answers would move down the
chain in one lockstep batch, and only one device would work at a time.

A session's steps keep their order (a later step of a session never joins a run ahead of an
earlier one), and so does every job against the jobs that are not batched. Jobs of different
sessions commute, so a batch computes what the same jobs would one by one; with batch-invariant
kernels, to the bit. Where the kernels are not batch-invariant, every run is one job.
"""

from __future__ import annotations

from collections import deque

from meshllm.mesh.jobs import Compute, Job
from meshllm.mesh.speculate import MAX_DRAFT

WIDE_POSITIONS = MAX_DRAFT + 1
"""A step of more positions is a prompt chunk; up to this many, a decode step (the last token
and its drafts: meshllm.mesh.speculate), which batches with the others."""

MAX_BATCH_STEPS = 64
"""Decode steps one run carries at most (the rest wait for the next run, oldest first)."""


class JobQueue:
    """The jobs issued and not yet run, cut into runs (see the module doc)."""

    def __init__(self, batching: bool = True, max_steps: int = MAX_BATCH_STEPS) -> None:
        self.batching = batching
        self.max_steps = max_steps
        self._jobs: deque[Job] = deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        self._jobs.append(job)

    def take(self, groups: int = 1) -> list[Job]:
        """The next run, in issue order ([] when nothing waits). With `groups` > 1 (the stages
        of the plan in force), a run holds the steps of one group of sessions only: the
        group of the oldest step waiting (`session_group`)."""
        if not self._jobs:
            return []
        head = self._jobs[0]
        if not self.batching or not isinstance(head, Compute):
            return [self._jobs.popleft()]
        group = session_group(head.session_id, groups)
        run: list[Job] = []
        kept: list[Job] = []
        seen: set[str] = set()
        chunk = False
        while self._jobs and isinstance(self._jobs[0], Compute):
            job = self._jobs.popleft()
            assert isinstance(job, Compute)
            wide = job.positions > WIDE_POSITIONS
            if job.session_id in seen or len(run) >= self.max_steps or (wide and chunk) \
                    or session_group(job.session_id, groups) != group:
                kept.append(job)
            else:
                run.append(job)
                chunk = chunk or wide
            seen.add(job.session_id)  # a session's later step waits behind its earlier one
        self._jobs.extendleft(reversed(kept))
        return run


def session_group(session_id: str, groups: int) -> int:
    """The group of a session's steps among `groups`: its entry node's counter (the session id
    is `node/<counter>`) modulo `groups`, the same on every node, so that consecutive answers
    of an entry node fall in different groups."""
    if groups <= 1:
        return 0
    counter = session_id.rpartition("/")[2]
    return int(counter) % groups if counter.isdigit() else 0
