"""Federated fine-tuning rounds as pure tests: tune cores wired in memory, a fake clock and a
fake trainer, every message encoded and decoded on the way. No torch, no event loop, no sleeps.

The fake trainer moves each tensor of the global adapter by a delta that depends only on the
node and the round, so the final adapter can be computed by hand (FedAvg, median, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshllm import wire
from meshllm.errors import WireError
from meshllm.mesh.events import Logged
from meshllm.tune.aggregate import Bounds
from meshllm.tune.rounds import (
    PENDING_JOB_ID, TUNE_MESSAGES, JobRequest, Train, TuneCore, TuneError, TuneFailed, TuneFinished, TuneProgress, TuneSettings,
    adapter_digest, split_parts, tensor_messages,
)
from tests.fixtures.wire_strategies import MESSAGE_STRATEGIES

HIDDEN = 8
LAYERS = 20  # 20 layers x 2 modules x (A, B) = 80 tensors: two parts of up to 64
SECRET = "my-private-training-text"


def lora_name(layer: int, module: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"


def initial(rank: int, alpha: float, seed: int, layers: int = LAYERS) -> dict[str, np.ndarray]:
    """Like meshllm.model.adapter.init_adapter: A random (rank, in), B zero (out, rank)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            out[lora_name(layer, module, "A")] = rng.normal(0, 0.1, (rank, HIDDEN)).astype(np.float32)
            out[lora_name(layer, module, "B")] = np.zeros((HIDDEN, rank), np.float32)
    return out


def pattern(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed, name-dependent direction for the fake trainer's deltas (values in [-1, 1])."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).uniform(-1, 1, shape)


Delta = Callable[[str, int], float]
"""(node, round) -> how far the node's training moves the adapter along `pattern`."""


def default_delta(node: str, round_no: int) -> float:
    return 0.001 * (ord(node[-1]) - ord("a") + 1) * round_no


def request(examples: int = 10, rounds: int = 3, rank: int = 4, aggregate: str = "mean") -> JobRequest:
    return JobRequest(rounds=rounds, rank=rank, alpha=8.0, steps=2, aggregate=aggregate, examples=examples)


@dataclass
class Node:
    core: TuneCore
    events: list[object] = field(default_factory=list)
    trains: list[Train] = field(default_factory=list)
    pending: deque[Train] = field(default_factory=deque)
    hold: bool = False
    """Its training jobs wait until the test runs them."""
    fail: bool = False
    """Its training fails (with a reason quoting its data)."""

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]

    def logged(self) -> str:
        return "\n".join(e.message for e in self.of(Logged))


FAKE_MAX_NORM = 1000.0
"""The fake trainer is no AdamW: unless a test asks for the AdamW bound, this one stands in."""


def with_fake_bound(settings: TuneSettings) -> TuneSettings:
    if settings.bounds.max_norm is not None:
        return settings
    return replace(settings, bounds=replace(settings.bounds, max_norm=FAKE_MAX_NORM))


class TuneNet:
    def __init__(self, names: str, coordinator: str, settings: dict[str, TuneSettings] | None = None,
                 delta: Delta = default_delta, layers: int = LAYERS, adamw_bound: bool = False) -> None:
        self.now = 0.0
        self.coordinator: str | None = coordinator
        self.delta = delta
        chosen = {n: (settings or {}).get(n, TuneSettings()) for n in names}
        if not adamw_bound:
            chosen = {n: with_fake_bound(s) for n, s in chosen.items()}
        self.nodes = {n: Node(TuneCore(n, lambda r, a, s: initial(r, a, s, layers), chosen[n])) for n in names}
        self.alive = set(names)
        self.queue: deque[tuple[str, str, bytes]] = deque()
        self.sent: list[tuple[str, str, wire.Message]] = []
        self.frames: list[bytes] = []
        self.update_membership()

    def update_membership(self) -> None:
        for name in sorted(self.alive):
            self.nodes[name].core.membership(self.coordinator, frozenset(self.alive - {name}), self.now)
        self.flush()

    def leave(self, name: str, new_coordinator: str | None = None) -> None:
        self.alive.discard(name)
        if new_coordinator is not None or self.coordinator == name:
            self.coordinator = new_coordinator
        self.update_membership()

    def join(self, name: str, req: JobRequest) -> str:
        job_id = self.nodes[name].core.join(req, self.now)
        self.flush()
        return job_id

    def flush(self) -> None:
        while True:
            for name in sorted(self.nodes):
                node = self.nodes[name]
                for send in node.core.sends():
                    frame = wire.encode(send.message)
                    self.frames.append(frame)
                    self.sent.append((name, send.dest, send.message))
                    self.queue.append((name, send.dest, frame))
                for job in node.core.jobs():
                    node.trains.append(job)
                    node.pending.append(job)
                node.events += node.core.events()
            if not self.queue:
                return
            sender, dest, frame = self.queue.popleft()
            if sender in self.alive and dest in self.alive:
                self.nodes[dest].core.receive(sender, wire.decode(frame), self.now)

    def local_adapter(self, name: str, job: Train) -> dict[str, np.ndarray]:
        step = self.delta(name, job.round)
        return {n: (arr + step * pattern(n, arr.shape)).astype(np.float32) for n, arr in job.tensors.items()}

    def run_jobs(self, names: str | None = None) -> bool:
        ran = False
        for name in sorted(self.nodes):
            node = self.nodes[name]
            if (names is None and node.hold) or (names is not None and name not in names) or name not in self.alive:
                continue
            while node.pending:
                self.run_one(name)
                ran = True
        return ran

    def run_one(self, name: str) -> None:
        """Finish ``name``'s oldest training job."""
        node = self.nodes[name]
        job = node.pending.popleft()
        if node.fail:
            node.core.train_failed(job.job_id, job.round, f"tokenizer choked on {SECRET!r}", self.now)
        else:
            loss = 2.0 / job.round + 0.1 * (ord(name[-1]) - ord("a"))
            node.core.trained(job.job_id, job.round, self.local_adapter(name, job), loss, self.now)
        self.flush()

    def tick(self) -> bool:
        """Advance the clock to the next timer and fire it; False when there is none."""
        timers = [t for n in sorted(self.alive) if (t := self.nodes[n].core.next_timer()) is not None]
        if not timers:
            return False
        self.now = max(self.now, min(timers))
        for name in sorted(self.alive):
            timer = self.nodes[name].core.next_timer()
            if timer is not None and timer <= self.now:
                self.nodes[name].core.handle_timer(self.now)
        self.flush()
        return True

    def settle(self, max_steps: int = 200) -> None:
        """Run jobs (except held ones) and timers until nothing is left to do."""
        for _ in range(max_steps):
            if self.run_jobs():
                continue
            if not self.tick():
                return
        raise AssertionError("the tune net did not settle")

    def finished(self) -> dict[str, TuneFinished]:
        out = {}
        for name, node in sorted(self.nodes.items()):
            done = node.of(TuneFinished)
            assert len(done) <= 1, f"{name} finished {len(done)} times"
            if done:
                out[name] = done[0]
        return out


def expected_final(g0: dict[str, np.ndarray], rounds: int, takes_part: Callable[[int], dict[str, int]],
                   delta: Delta = default_delta, method: str = "mean") -> dict[str, np.ndarray]:
    """The final adapter by hand: g_r = g_{r-1} + combine_i(delta_i,r * pattern), in float64."""
    out = {n: a.astype(np.float64) for n, a in g0.items()}
    for r in range(1, rounds + 1):
        examples = takes_part(r)
        if not examples:
            continue
        if method == "mean":
            step = sum(examples[n] * delta(n, r) for n in examples) / sum(examples.values())
        elif method == "median":
            step = float(np.median([delta(n, r) for n in examples]))
        else:
            raise AssertionError(method)
        out = {n: a + step * pattern(n, a.shape) for n, a in out.items()}
    return out


def assert_same_adapter(finished: dict[str, TuneFinished], names: str) -> dict[str, np.ndarray]:
    assert sorted(finished) == sorted(names)
    first = finished[names[0]].tensors
    for name in names:
        assert finished[name].tensors.keys() == first.keys()
        for key in first:
            assert finished[name].tensors[key].dtype == np.float32
            assert finished[name].tensors[key].tobytes() == first[key].tobytes(), (name, key)
    return dict(first)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=2e-6, err_msg=key)


def first_global(net: TuneNet) -> dict[str, np.ndarray]:
    trains = [t for n in sorted(net.nodes) for t in net.nodes[n].trains if t.round == 1]
    assert trains
    return {k: np.array(v) for k, v in trains[0].tensors.items()}


# --- the rounds -----------------------------------------------------------------------------


def test_two_participants_coordinator_among_them_finish_three_rounds_with_the_fedavg_adapter() -> None:
    net = TuneNet("ab", coordinator="a")
    job_id = net.join("a", request(examples=10))
    assert job_id != PENDING_JOB_ID
    assert net.join("b", request(examples=30)) == PENDING_JOB_ID
    net.settle()
    finished = net.finished()
    final = assert_same_adapter(finished, "ab")
    assert finished["a"].job_id == finished["b"].job_id == job_id
    assert finished["a"].participants == ("a", "b") and finished["a"].rounds == 3
    assert (finished["a"].rank, finished["a"].alpha) == (4, 8.0)
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10, "b": 30}))
    for name in "ab":
        assert [t.round for t in net.nodes[name].trains] == [1, 2, 3]
        assert [(t.rounds, t.rank, t.alpha, t.steps) for t in net.nodes[name].trains] == [(3, 4, 8.0, 2)] * 3
        assert not net.nodes[name].of(TuneFailed)
        states = [p.state for p in net.nodes[name].of(TuneProgress)]
        assert states[-1] == "round_done" and states.count("sent") == 3 and states.count("training") == 3
        assert [p.round for p in net.nodes[name].of(TuneProgress) if p.state == "round_done"] == [1, 2, 3]
    b_states = [p.state for p in net.nodes["b"].of(TuneProgress)]
    assert b_states[:2] == ["joining", "waiting"]
    assert net.nodes["b"].of(TuneProgress)[0].job_id == PENDING_JOB_ID
    assert {p.job_id for p in net.nodes["b"].of(TuneProgress)[1:]} == {job_id}
    mesh_losses = [p.loss for p in net.nodes["b"].of(TuneProgress) if p.state == "round_done"]
    assert mesh_losses == pytest.approx([(10 * 2.0 + 30 * 2.1) / 40, (10 * 1.0 + 30 * 1.1) / 40,
                                         (10 * 2 / 3 + 30 * (2 / 3 + 0.1)) / 40])
    log = net.nodes["a"].logged()
    assert "round 1 of 3: participants a, b" in log and "round 3 of 3 done: aggregated (mean) a, b" in log
    assert net.nodes["a"].core.next_timer() is None and net.nodes["a"].core.status_view()["role"] is None
    assert net.nodes["a"].core.status_view()["last_finished"]["digest"] == adapter_digest(final)  # type: ignore[index]


def test_a_coordinator_that_does_not_take_part_still_runs_the_rounds_and_gets_the_adapter() -> None:
    net = TuneNet("abc", coordinator="c")
    assert net.join("a", request(examples=5)) == PENDING_JOB_ID
    net.join("b", request(examples=15))
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert net.nodes["c"].trains == [] and not net.nodes["c"].of(TuneProgress)
    assert net.finished()["c"].participants == ("a", "b")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 5, "b": 15}))


def test_a_member_that_never_joined_gets_the_final_adapter_too() -> None:
    net = TuneNet("abcd", coordinator="a")
    net.join("b", request(examples=7, rounds=1))
    net.settle()
    final = assert_same_adapter(net.finished(), "abcd")
    assert_close(final, expected_final(first_global(net), 1, lambda r: {"b": 7}))


def test_a_participant_lost_mid_round_is_dropped_and_the_round_completes_with_the_rest() -> None:
    net = TuneNet("abc", coordinator="a")
    for name, examples in zip("abc", (10, 20, 30)):
        net.join(name, request(examples=examples))
    net.nodes["c"].hold = True
    net.tick()  # round 1 begins
    net.run_jobs("c")  # c takes part in round 1
    net.run_jobs()  # a and b finish round 1; round 2 begins; c trains ... and is lost
    assert [t.round for t in net.nodes["c"].trains] == [1, 2]
    net.leave("c")
    net.settle()
    final = assert_same_adapter(net.finished(), "ab")
    assert "c" not in net.finished()
    assert_close(final, expected_final(first_global(net), 3,
                                       lambda r: {"a": 10, "b": 20, "c": 30} if r == 1 else {"a": 10, "b": 20}))
    log = net.nodes["a"].logged()
    assert "round 2 of 3 done: aggregated (mean) a, b; dropped c (left the mesh)" in log
    assert "round 3 of 3: participants a, b" in log
    assert net.finished()["a"].participants == ("a", "b", "c")


def test_a_participant_that_never_reports_is_dropped_at_the_round_timeout() -> None:
    settings = TuneSettings(round_timeout_s=50.0)
    net = TuneNet("abc", coordinator="a", settings={n: settings for n in "abc"})
    for name in "abc":
        net.join(name, request(examples=10, rounds=2))
    net.nodes["c"].hold = True  # c's training never ends
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 2, lambda r: {"a": 10, "b": 10}))
    assert "dropped c (no update within 50 s)" in net.nodes["a"].logged()
    assert net.now == pytest.approx(2.0 + 50.0 + 50.0)
    # c's late results are stale: ignored, nothing sent
    net.run_jobs("c")
    assert not net.queue and net.nodes["c"].core.sends() == []


def test_a_huge_update_is_refused_by_norm_and_the_others_are_averaged() -> None:
    evil = TuneSettings(debug_update_scale=1e6)
    net = TuneNet("abc", coordinator="a", settings={"c": evil})
    for name, examples in zip("abc", (10, 20, 30)):
        net.join(name, request(examples=examples))
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10, "b": 20}))
    assert net.finished()["a"].participants == ("a", "b")
    log = net.nodes["a"].logged()
    assert "refused the update of c: norm" in log and "> 1000" in log
    refused = [p for p in net.nodes["c"].of(TuneProgress) if p.state == "refused"]
    assert len(refused) == 3 and "norm" in refused[0].message and "> 1000" in refused[0].message
    assert not net.nodes["c"].of(TuneFailed)  # it stays in the job


def test_with_median_one_large_update_within_bounds_is_outvoted() -> None:
    def delta(node: str, round_no: int) -> float:
        return {"a": 0.01, "b": 0.02, "c": 0.5}[node]

    net = TuneNet("abc", coordinator="b", delta=delta)
    for name in "abc":
        net.join(name, request(examples=10, aggregate="median"))
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    want = expected_final(first_global(net), 3, lambda r: {"a": 10, "b": 10, "c": 10}, delta, "median")
    assert_close(final, want)
    g0 = first_global(net)
    key = lora_name(0, "q_proj", "B")
    np.testing.assert_allclose(final[key], 3 * 0.02 * pattern(key, g0[key].shape), atol=1e-6)
    assert "refused" not in net.nodes["b"].logged()  # within bounds: outvoted, not refused


def test_a_late_joiner_takes_part_from_the_next_round() -> None:
    net = TuneNet("abc", coordinator="a")
    net.join("a", request(examples=10))
    net.join("b", request(examples=10))
    net.tick()  # round 1 begins with a and b
    assert [t.round for t in net.nodes["a"].trains] == [1]
    net.join("c", request(examples=20))
    accepted = [m for s, d, m in net.sent if isinstance(m, wire.TuneAccepted) and d == "c"]
    assert len(accepted) == 1 and accepted[0].round == 2
    waiting = net.nodes["c"].of(TuneProgress)[-1]
    assert waiting.state == "waiting" and "from round 2" in waiting.message
    net.settle()
    assert [t.round for t in net.nodes["c"].trains] == [2, 3]
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 3,
                                       lambda r: {"a": 10, "b": 10} if r == 1 else {"a": 10, "b": 10, "c": 20}))
    assert "c joined tune job" in net.nodes["a"].logged()


def test_a_joiner_with_another_rank_is_refused_and_told_why() -> None:
    net = TuneNet("abc", coordinator="a")
    net.join("a", request(rank=4))
    net.join("b", request(rank=8))
    failed = net.nodes["b"].of(TuneFailed)
    assert len(failed) == 1 and "rank 8 does not match rank 4" in failed[0].reason
    assert "refused the tune join of b" in net.nodes["a"].logged()
    with pytest.raises(TuneError, match="already takes part"):
        net.nodes["a"].core.join(request(), net.now)
    net.settle()
    assert net.finished()["b"].participants == ("a",)  # b still gets the mesh's adapter


# --- elections: the job survives them ---------------------------------------------------------


def _in_round_one(names: str = "abc", held: str = "b", settings: dict[str, TuneSettings] | None = None) -> TuneNet:
    """a coordinates; every node joined (10, 20, 30 examples); round 1 runs and ``held``'s
    training has not come back yet (the others' updates are in)."""
    net = TuneNet(names, coordinator="a", settings=settings)
    for name, examples in zip(names, (10, 20, 30)):
        net.join(name, request(examples=examples))
    net.nodes[held].hold = True
    net.tick()
    net.run_jobs()
    return net


def test_an_election_the_coordinator_wins_again_does_not_end_the_job() -> None:
    net = _in_round_one()
    net.coordinator = None  # an election begins: nobody coordinates for a while
    net.update_membership()
    assert not any(node.of(TuneFailed) for node in net.nodes.values())
    assert net.nodes["a"].core.status_view()["coordinator"]["state"] == "paused"  # type: ignore[index]
    assert [p.state for p in net.nodes["c"].of(TuneProgress)][-1] == "waiting"
    net.run_jobs("b")  # b's training comes back during the election: its update waits
    assert not [m for s, d, m in net.sent if s == "b" and isinstance(m, wire.TuneTensors)]
    net.coordinator = "a"  # a wins again
    net.update_membership()
    net.nodes["b"].hold = False
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10, "b": 20, "c": 30}))
    for name in "abc":  # round 1 started again with the same global adapter: nobody trained it twice
        assert [t.round for t in net.nodes[name].trains] == [1, 2, 3]
        assert not net.nodes[name].of(TuneFailed)
    log = net.nodes["a"].logged()
    assert "paused at round 1 of 3: the mesh is electing a coordinator" in log
    assert "resumed: this node coordinates the mesh again; round 1 of 3 starts again" in log
    assert "round 1 of 3 done: aggregated (mean) a, b, c" in log
    assert net.finished()["a"].participants == ("a", "b", "c")


def test_an_election_won_by_another_participant_hands_the_job_over_and_it_finishes() -> None:
    net = _in_round_one(held="c")
    for name in "abc":
        net.nodes[name].hold = True
    net.run_one("c")  # round 1 done; round 2 runs: a and b report, c still trains
    net.run_jobs("ab")
    net.coordinator = "b"  # b wins an election; a stays in the mesh and in the job
    net.update_membership()
    assert "handed over at round 2 of 3: b now coordinates the mesh" in net.nodes["a"].logged()
    assert "taken over at round 2 of 3" in net.nodes["b"].logged()
    assert not any(node.of(TuneFailed) for node in net.nodes.values())
    for name in "abc":
        net.nodes[name].hold = False
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10, "b": 20, "c": 30}))
    for name in "abc":
        assert [t.round for t in net.nodes[name].trains] == [1, 2, 3]
    assert net.finished()["a"].participants == ("a", "b", "c")
    assert "round 3 of 3 done: aggregated (mean) a, b, c" in net.nodes["b"].logged()
    assert [s for s, d, m in net.sent if isinstance(m, wire.TuneDone)] == ["b", "b"]


@pytest.mark.parametrize("electing", ["none", "the old one", "at once"])
def test_a_coordinator_lost_mid_round_is_replaced_by_a_participant_that_finishes_the_job(electing: str) -> None:
    net = _in_round_one()
    if electing == "none":  # the mesh has no coordinator while it elects one
        net.leave("a")
    elif electing == "the old one":  # the daemon's driver keeps the old coordinator while electing
        net.alive.discard("a")
        for name in "bc":
            net.nodes[name].core.membership("a", frozenset(net.alive - {name}), net.now)
        net.flush()
    if electing != "at once":
        assert net.nodes["c"].core.next_timer() == net.now + 30.0  # it waits this long at most
        net.now += 20.0
        assert net.nodes["c"].core.status_view()["participant"]["waiting_for_coordinator"]  # type: ignore[index]
    net.leave("a", new_coordinator="b")  # a is gone for good; the mesh elected b
    assert not any(net.nodes[n].of(TuneFailed) for n in "bc")
    net.nodes["b"].hold = False
    net.settle()
    final = assert_same_adapter(net.finished(), "bc")
    # round 1 starts again at b without a (a's update was lost with a); c sends its update again
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"b": 20, "c": 30}))
    assert [t.round for t in net.nodes["c"].trains] == [1, 2, 3]
    assert [t.round for t in net.nodes["b"].trains] == [1, 2, 3]
    assert "tune job a/tune-1 resumed by b at round 1 of 3" in net.nodes["c"].logged()
    assert net.finished()["b"].job_id == net.finished()["c"].job_id == "a/tune-1"
    assert net.finished()["b"].participants == ("b", "c")
    # the new coordinator can run a new job afterwards
    net.join("c", request(rounds=1))
    net.settle()
    assert [e.job_id for e in net.nodes["c"].of(TuneFinished)] == ["a/tune-1", "b/tune-1"]


def test_a_coordinator_lost_with_no_successor_fails_the_job_on_every_participant_with_a_reason() -> None:
    settings = TuneSettings(takeover_timeout_s=20.0)
    net = _in_round_one(settings={n: settings for n in "abc"})
    net.leave("a")  # no coordinator: the election does not end
    assert not any(net.nodes[n].of(TuneFailed) for n in "bc")
    assert net.nodes["b"].core.next_timer() == net.now + 20.0
    net.run_jobs("b")  # b's training comes back meanwhile: nowhere to send it
    net.settle()
    for name in "bc":
        failed = net.nodes[name].of(TuneFailed)
        assert len(failed) == 1
        assert failed[0].reason == ("the coordinator a was lost and no coordinator took tune job a/tune-1 over "
                                    "within 20 s: the job cannot finish")
    assert net.finished() == {}
    assert net.nodes["b"].core.status_view()["role"] is None


def test_the_coordinator_link_lost_fails_the_participant_when_nobody_takes_over() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("b", request())
    net.tick()
    net.alive.discard("a")  # b loses its link to a; the driver keeps a as coordinator while electing
    net.nodes["b"].core.membership("a", frozenset(), net.now)
    net.flush()
    assert not net.nodes["b"].of(TuneFailed)
    assert net.nodes["b"].core.status_view()["participant"]["waiting_for_coordinator"]  # type: ignore[index]
    net.tick()
    assert net.nodes["b"].of(TuneFailed)[0].reason.startswith("the coordinator a was lost and no coordinator took")


def test_a_new_coordinator_that_took_no_part_cannot_resume_the_job_and_each_participant_says_why() -> None:
    net = TuneNet("abc", coordinator="a")
    net.join("a", request())
    net.join("b", request())
    net.tick()
    net.coordinator = "c"  # c wins an election; it never joined the job
    net.update_membership()
    assert "handed over at round 1 of 3: c now coordinates the mesh" in net.nodes["a"].logged()
    assert net.nodes["a"].core.status_view()["role"] == "participant"
    assert not any(node.of(TuneFailed) for node in net.nodes.values())
    net.settle()
    for name in "ab":
        assert net.nodes[name].of(TuneFailed)[0].reason == (
            "the mesh's coordinator c did not resume tune job a/tune-1 within 30 s (only a node that took part in "
            "a round can): the job cannot finish")
    assert net.finished() == {}
    assert net.nodes["a"].core.next_timer() is None


def test_an_election_while_gathering_gathers_again_at_the_new_coordinator() -> None:
    net = TuneNet("abc", coordinator="a")
    net.join("a", request(examples=10, rounds=1))
    net.join("b", request(examples=20, rounds=1))
    net.coordinator = "b"  # before round 1: nobody holds an adapter; the joiners join b's job
    net.update_membership()
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 1, lambda r: {"a": 10, "b": 20}))
    assert net.finished()["a"].job_id == "b/tune-1"
    assert not any(node.of(TuneFailed) for node in net.nodes.values())


Step = tuple[str, str | None]


@settings(max_examples=40 * int(os.environ.get("MESHLLM_TUNE_STRESS", "1")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(["elect", "kill", "run", "tick"]), st.sampled_from([None, *"abcd"])),
                      max_size=14))
def test_any_run_of_elections_and_losses_ends_every_job_everywhere_and_never_splits_it(steps: list[Step]) -> None:
    """Elections (to any node, or none for a while), nodes lost and trainings coming back in
    any order: nobody raises, nobody hangs, every participant ends with the job's adapter or
    a reason, and every node that finishes a job holds the same adapter for it.
    MESHLLM_TUNE_STRESS=N multiplies the examples."""
    net = TuneNet("abcd", coordinator="a", settings={n: TuneSettings(takeover_timeout_s=20.0) for n in "abcd"})
    for name, examples in zip("abc", (10, 20, 30)):
        net.join(name, request(examples=examples, rounds=2))
        net.nodes[name].hold = True
    net.tick()
    for action, node in steps:
        if action == "elect" and (node is None or node in net.alive):
            net.coordinator = node
            net.update_membership()
        elif action == "kill" and node is not None and node in net.alive and len(net.alive) > 1:
            net.leave(node)
        elif action == "run" and node in net.alive and net.nodes[node].pending:
            net.run_one(node)
        elif action == "tick":
            net.tick()
    if net.coordinator not in net.alive:
        net.coordinator = min(net.alive)
        net.update_membership()
    for name in net.nodes:
        net.nodes[name].hold = False
    net.settle()
    digests: dict[str, str] = {}
    for name in sorted(net.alive):
        node = net.nodes[name]
        assert node.core.status_view()["role"] is None and node.core.next_timer() is None, name
        for done in node.of(TuneFinished):
            assert digests.setdefault(done.job_id, adapter_digest(done.tensors)) == adapter_digest(done.tensors)
        if name in "abc":
            assert node.of(TuneFinished) or node.of(TuneFailed), name
    net.finished()  # nobody finished twice


def test_a_node_has_one_training_out_at_a_time() -> None:
    settings = TuneSettings(round_timeout_s=50.0)
    net = TuneNet("ab", coordinator="a", settings={n: settings for n in "ab"})
    net.join("a", request(examples=10, rounds=2))
    net.join("b", request(examples=10, rounds=2))
    net.nodes["b"].hold = True
    net.tick()
    net.run_jobs()
    net.tick()  # b is dropped from round 1 at the timeout; round 2 begins while b still trains round 1
    b = net.nodes["b"]
    assert [t.round for t in b.trains] == [1] and b.of(TuneProgress)[-1].state == "training"
    net.run_jobs("b")  # round 1's result is stale: dropped; round 2's training goes out now
    assert [t.round for t in b.trains] == [1, 2]
    assert "ignored a training result for tune job a/tune-1 round 1: superseded (round 2 runs now" in b.logged()
    net.nodes["b"].hold = False
    net.settle()
    assert_close(assert_same_adapter(net.finished(), "ab"),
                 expected_final(first_global(net), 2, lambda r: {"a": 10} if r == 1 else {"a": 10, "b": 10}))


def test_a_participant_that_quits_is_left_out_and_the_rest_go_on() -> None:
    net = TuneNet("abc", coordinator="a")
    for name in "abc":
        net.join(name, request(examples=10))
    net.nodes["b"].hold = True
    net.tick()
    net.run_jobs()
    net.nodes["b"].core.quit(net.now)
    net.flush()
    assert "quit" in net.nodes["b"].of(TuneFailed)[0].reason
    net.nodes["b"].pending.clear()
    net.settle()
    final = assert_same_adapter(net.finished(), "abc")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10, "c": 10}))
    assert "b left tune job" in net.nodes["a"].logged()
    net.nodes["c"].core.quit(net.now)  # in no job: nothing happens
    assert net.nodes["c"].core.sends() == []


def test_a_failed_training_leaves_the_node_out_of_the_round_and_its_reason_stays_local() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("a", request(examples=10))
    net.join("b", request(examples=10))
    net.nodes["b"].fail = True
    net.settle()
    final = assert_same_adapter(net.finished(), "ab")
    assert_close(final, expected_final(first_global(net), 3, lambda r: {"a": 10}))
    failed = [p for p in net.nodes["b"].of(TuneProgress) if p.state == "failed"]
    assert len(failed) == 3 and SECRET in failed[0].message
    assert "refused b (no update: training failed)" in net.nodes["a"].logged()
    assert not any(SECRET.encode() in frame for frame in net.frames)
    assert SECRET not in net.nodes["a"].logged()


def test_when_everyone_quits_the_job_ends_without_a_result() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("b", request())
    net.nodes["b"].core.quit(net.now)
    net.flush()
    net.settle()
    assert net.finished() == {}
    assert "without a result: no participants left" in net.nodes["a"].logged()
    assert net.nodes["a"].core.status_view()["role"] is None


def test_joining_needs_a_coordinator_and_valid_settings() -> None:
    net = TuneNet("ab", coordinator="a")
    core = TuneCore("x", initial)
    with pytest.raises(TuneError, match="no coordinator"):
        core.join(request(), 0.0)
    with pytest.raises(TuneError, match="aggregate"):
        net.nodes["b"].core.join(request(aggregate="sum"), 0.0)
    with pytest.raises(TuneError, match="rounds"):
        net.nodes["b"].core.join(request(rounds=0), 0.0)
    core.membership("a", frozenset(), 0.0)
    with pytest.raises(TuneError, match="not linked"):
        core.join(request(), 0.0)


def test_an_unanswered_join_times_out() -> None:
    net = TuneNet("ab", coordinator="a", settings={"b": TuneSettings(join_timeout_s=5.0)})
    net.alive.discard("a")  # a never gets the join, but b still sees it linked
    net.join("b", request())
    assert net.nodes["b"].core.next_timer() == 5.0
    net.tick()
    assert "did not answer the join within 5 s" in net.nodes["b"].of(TuneFailed)[0].reason



def test_a_join_that_times_out_is_withdrawn_so_the_coordinator_does_not_wait_for_it() -> None:
    net = TuneNet("abc", coordinator="a", settings={"b": TuneSettings(join_timeout_s=0.0)})
    net.join("a", request(examples=10))
    net.nodes["b"].core.join(request(), net.now)
    net.nodes["b"].core.handle_timer(net.now)  # gives up before its join is even delivered
    net.flush()
    assert net.nodes["b"].of(TuneFailed)
    assert [type(m).__name__ for s, d, m in net.sent if s == "b"] == ["TuneJoin", "TuneQuit"]
    net.settle()
    assert net.finished()["a"].participants == ("a",)
    assert [t.round for t in net.nodes["b"].trains] == []


def test_a_node_announced_a_round_of_a_job_it_is_not_in_leaves_that_job() -> None:
    net = TuneNet("abc", coordinator="a")
    net.join("a", request())
    net.join("b", request())
    net.tick()
    announce = next(m for s, d, m in net.sent if isinstance(m, wire.TuneRound))
    net.nodes["c"].core.receive("a", announce, net.now)
    assert [s.message for s in net.nodes["c"].core.sends()] == [wire.TuneQuit(announce.job_id)]


def test_a_joiner_bringing_more_examples_than_the_bounds_allow_is_refused() -> None:
    net = TuneNet("ab", coordinator="a", settings={"a": TuneSettings(bounds=Bounds(max_examples=100))})
    net.join("b", request(examples=101))
    assert "101 examples; a participant may bring at most 100" in net.nodes["b"].of(TuneFailed)[0].reason


# --- what crosses the wire --------------------------------------------------------------------


def test_every_message_of_a_job_is_a_tune_message_carrying_only_counts_loss_names_and_tensors() -> None:
    net = TuneNet("abcd", coordinator="a", settings={"d": TuneSettings(debug_update_scale=1e6)})
    for name in "abcd":
        net.join(name, request(examples=10))
    net.nodes["c"].fail = True
    net.settle()
    names = set(initial(4, 8.0, 0))
    text_fields = {"job_id", "aggregate", "kind", "reason", "digest", "names", "participants"}
    kinds = set()
    for sender, dest, msg in net.sent:
        assert isinstance(msg, TUNE_MESSAGES), msg
        kinds.add(type(msg))
        for f in fields(msg):
            value = getattr(msg, f.name)
            if isinstance(value, str) or (isinstance(value, tuple) and value and isinstance(value[0], str)):
                assert f.name in text_fields, (type(msg).__name__, f.name)
        if isinstance(msg, wire.TuneTensors):
            assert set(msg.names) <= names
            assert all(isinstance(t, wire.TensorPayload) and t.codec == "f32" for t in msg.tensors)
        if isinstance(msg, (wire.TuneRound, wire.TuneDone)):
            assert set(msg.participants) <= set("abcd")
        if isinstance(msg, wire.TuneRefused):
            assert SECRET not in msg.reason
    assert kinds == set(TUNE_MESSAGES) - {wire.TuneQuit, wire.Hello}  # Hello: only after `served`
    assert not any(SECRET.encode() in frame for frame in net.frames)
    assert all(s.channel == "activation" for n in net.nodes.values() for s in n.core.sends())


def test_an_adapter_travels_in_parts_of_at_most_64_tensors_and_4_mib() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("b", request(rounds=1))
    net.settle()
    parts = [m for s, d, m in net.sent if isinstance(m, wire.TuneTensors) and m.kind == "global"]
    assert [(m.part, m.parts, len(m.names)) for m in parts] == [(0, 2, 64), (1, 2, 16)]
    shapes = {"big": (1024, 1024), "small": (4, 4), "huge": (2048, 1024)}  # 4 MiB, 64 B, 8 MiB
    assert split_parts(shapes) == [("big",), ("huge",), ("small",)]
    assert split_parts({f"t{i:03d}": (2, 2) for i in range(130)})[2] == ("t128", "t129")
    tensors = {"a": np.ones((512, 1024), np.float32), "b": np.ones((512, 1024), np.float32),
               "c": np.ones((1, 4), np.float32)}
    msgs = tensor_messages("j", 1, "final", tensors)
    assert [m.names for m in msgs] == [("a", "b"), ("c",)]
    with pytest.raises(Exception, match="at most 4194304"):
        replace(msgs[0], names=("a", "b", "c"), tensors=msgs[0].tensors + msgs[1].tensors)


# --- bad input never raises ---------------------------------------------------------------


def _job_in_round(rounds: int = 2) -> TuneNet:
    net = TuneNet("abc", coordinator="a")
    for name in "abc":
        net.join(name, request(rounds=rounds))
    for name in "abc":
        net.nodes[name].hold = True
    net.tick()
    return net


def _update_parts(net: TuneNet, name: str, scale: float = 1.0) -> list[wire.TuneTensors]:
    job = net.nodes[name].trains[-1]
    local = net.local_adapter(name, job)
    delta = {k: ((v - job.tensors[k]) * scale).astype(np.float32) for k, v in local.items()}
    return tensor_messages(job.job_id, job.round, "update", delta, 10, 1.5)


def test_malformed_update_parts_are_refused_with_a_reason_and_never_raise() -> None:
    net = _job_in_round()
    core = net.nodes["a"].core
    good = _update_parts(net, "b")
    job_id = good[0].job_id
    bad_tensor = wire.encode_tensor(np.zeros((3, 3), np.float32), "f32")
    big_tensor = wire.encode_tensor(np.zeros((10, 10), np.float32), "f32")
    cases = [
        ("b", [good[1]], "part 1 out of order: part 0 expected"),
        ("b", [good[0], good[0]], "part 0 out of order: part 1 expected"),
        ("b", [replace(good[0], names=("nope",) + good[0].names[1:])], "unexpected tensor nope"),
        ("b", [replace(good[0], tensors=(bad_tensor,) + good[0].tensors[1:]), good[1]], "shape (3, 3), expected (4, 8)"),
        ("b", [replace(good[0], tensors=(big_tensor,) + good[0].tensors[1:])], "100 elements; limit 32"),
        ("b", [good[0], replace(good[1], examples=11)], "disagrees with part 0"),
        ("b", [good[0], replace(good[1], parts=3)], "says 3 parts"),
        ("b", [replace(good[0], parts=1000)], "1000 parts for an adapter of 80 tensors"),
        ("b", [good[0], good[1], good[1]], "after a complete update"),
        ("c", [replace(good[0], names=good[1].names, tensors=good[1].tensors), good[1]], "sent twice"),
    ]
    for sender, msgs, words in cases:
        net = _job_in_round()
        core = net.nodes["a"].core
        for msg in msgs:
            msg = replace(msg, job_id=net.nodes[sender].trains[-1].job_id)
            core.receive(sender, wire.decode(wire.encode(msg)), net.now)
        net.flush()
        refusals = [m for s, d, m in net.sent if isinstance(m, wire.TuneRefused) and d == sender]
        assert refusals and words in refusals[-1].reason, (words, refusals)
        assert words in net.nodes["a"].logged()
    # parts for a job or round that is not running, and from a non-participant, are ignored
    net = _job_in_round()
    core = net.nodes["a"].core
    core.receive("b", replace(good[0], job_id="other"), net.now)
    core.receive("b", replace(good[0], round=2, job_id=net.nodes["b"].trains[-1].job_id), net.now)
    assert core.sends() == [] and "not expected" in "".join(e.message for e in core.events() if isinstance(e, Logged))
    assert job_id


def test_bad_global_and_final_parts_fail_the_round_or_the_job_with_a_reason() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("b", request(rounds=1))
    net.tick()
    b = net.nodes["b"]
    train = b.trains[-1]
    parts = tensor_messages(train.job_id, 1, "global", train.tensors)
    # a replayed global part after the round began is ignored (b is training now)
    b.core.receive("a", parts[0], net.now)
    assert "ignored a global adapter part" in b.logged() + "".join(
        e.message for e in b.core.events() if isinstance(e, Logged))
    # a final adapter whose digest does not match is refused: b's job fails with a reason
    done = wire.TuneDone(train.job_id, 1, 4, 8.0, ("b",), 1.0, "0" * 64, len(parts))
    b.core.receive("a", done, net.now)
    for part in parts:
        b.core.receive("a", replace(part, kind="final"), net.now)
    failed = [e for e in b.core.events() if isinstance(e, TuneFailed)]
    assert failed and "digest does not match" in failed[0].reason
    # a final adapter from a node that is not the coordinator is ignored
    net2 = TuneNet("abc", coordinator="a")
    net2.nodes["c"].core.receive("b", done, 0.0)
    assert any("not the mesh's coordinator" in e.message for e in net2.nodes["c"].core.events()
               if isinstance(e, Logged))


def _mixed(genuine: wire.Message, other: wire.Message, take: list[bool]) -> wire.Message:
    """``genuine`` with some of its fields taken from ``other`` (same type), when still valid."""
    changes = {f.name: getattr(other, f.name) for f, t in zip(fields(genuine), take) if t}
    try:
        return replace(genuine, **changes)
    except WireError:
        return genuine


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_tune_message_from_any_peer_in_any_state_never_raises(data: st.DataObject) -> None:
    net = _job_in_round()
    genuine = [m for s, d, m in net.sent] + _update_parts(net, "b") + _update_parts(net, "c", 1e7)
    for name in "abc":
        node = net.nodes[name].core
        for _ in range(4):
            base = data.draw(st.sampled_from(genuine))
            other = data.draw(MESSAGE_STRATEGIES[type(base)])
            msg = _mixed(base, other, data.draw(st.lists(st.booleans(), min_size=12, max_size=12)))
            sender = data.draw(st.sampled_from("abcx"))
            node.receive(sender, wire.decode(wire.encode(msg)), net.now)
        node.receive("b", wire.Heartbeat("b", 1, 0.0), net.now)
    net.flush()
    for name in "abc":
        net.nodes[name].hold = False
    net.settle()  # whatever happened, the mesh ends somewhere: no hang, no exception


# --- determinism ---------------------------------------------------------------------------


def scenario_fingerprint() -> str:
    """Everything a scenario sends and ends with, hashed."""
    net = TuneNet("abcde", coordinator="c", settings={"e": TuneSettings(debug_update_scale=1e6)})
    for name, examples in zip("abde", (3, 5, 7, 11)):
        net.join(name, request(examples=examples, aggregate="trimmed"))
    net.settle()
    digest = hashlib.sha256()
    for frame in net.frames:
        digest.update(frame)
    for name, done in sorted(net.finished().items()):
        digest.update(name.encode() + adapter_digest(done.tensors).encode())
    for name in sorted(net.nodes):
        for event in net.nodes[name].events:
            digest.update(repr(getattr(event, "message", "")).encode())
    return digest.hexdigest()


def test_the_same_inputs_give_the_same_outputs_whatever_the_hash_seed() -> None:
    code = "from tests.unit.test_tune_rounds import scenario_fingerprint; print(scenario_fingerprint())"
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        outs.add(out.stdout.strip())
    assert len(outs) == 1 and outs == {scenario_fingerprint()}


def test_status_view_is_json_and_says_who_does_what() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("a", request())
    net.join("b", request())
    net.tick()
    a, b = net.nodes["a"].core.status_view(), net.nodes["b"].core.status_view()
    json.dumps(a), json.dumps(b)
    assert a["role"] == "coordinator+participant" and b["role"] == "participant"
    assert a["job_id"] == b["job_id"] and a["round"] == b["round"] == 1 and a["rounds"] == 3
    assert a["participants"] == b["participants"] == ["a", "b"]
    assert b["state"] == "training" and a["coordinator"]["state"] == "round"  # type: ignore[index]
    net.settle()
    json.dumps(net.nodes["b"].core.status_view())
