"""A hostile member cannot steer a federated round, push an unbounded adapter, or make a node
serve an adapter it did not ask for (docs/fine-tuning.md, "Bounds"). Pure: tune cores wired in
memory (`tests.unit.test_tune_rounds.TuneNet`), no torch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from meshllm import wire
from meshllm.mesh.events import Logged
from meshllm.tune.aggregate import (
    AGGREGATES, CLIP, Bounds, Update, adamw_norm_bound, aggregate, check_update, clip_updates, update_norm,
)
from meshllm.tune.data import MAX_EXAMPLES
from meshllm.tune.interface import MAX_JOB_ALPHA, MAX_JOB_RANK, MAX_JOB_ROUNDS, MAX_JOB_STEPS, job_seed
from meshllm.tune.rounds import TuneCore, TuneFailed, TuneFinished, TuneSettings, adapter_digest, tensor_messages
from tests.unit.test_tune_rounds import TuneNet, initial, pattern, request

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {A: (2, 3), B: (3, 2)}


def along(node: str, direction: np.ndarray, length: float, examples: int = 10) -> Update:
    """An update of norm ``length`` along ``direction`` (6 + 6 values, A then B)."""
    unit = direction / np.linalg.norm(direction)
    return Update(node, examples, {A: (length * unit[:6]).reshape(2, 3).astype(np.float32),
                                   B: (length * unit[6:]).reshape(3, 2).astype(np.float32)})


def flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[A], np.float64).ravel(), np.asarray(tensors[B], np.float64).ravel()])


HONEST = np.linspace(-1.0, 1.0, 12) + 0.3
EVIL = -np.linspace(1.0, 2.0, 12)


# --- one round: clipping relative to the median -----------------------------------------------


@pytest.mark.parametrize("method", AGGREGATES)
def test_one_huge_update_cannot_move_the_aggregate_past_three_times_the_median(method: str) -> None:
    honest = [along("a", HONEST, 1.0), along("b", HONEST + 0.1, 1.2), along("c", HONEST - 0.1, 0.9)]
    evil = along("evil", EVIL, 1e6, examples=MAX_EXAMPLES)
    median = 1.0  # the lower median of 0.9, 1.0, 1.2 and 1e6
    out = aggregate([*honest, evil], method)
    assert update_norm(out) <= CLIP * median * (1 + 1e-6)
    without = aggregate(honest, method)
    # the evil update, whatever its size, moves the result by at most its clipped share
    assert np.linalg.norm(flat(out) - flat(without)) <= 2 * CLIP * median


def test_a_huge_example_count_weighs_as_three_times_the_median_count() -> None:
    honest = [along("a", HONEST, 1.0, 10), along("b", HONEST, 1.0, 20), along("c", HONEST, 1.0, 10)]
    evil = along("evil", EVIL, 1.0, examples=MAX_EXAMPLES)
    clipped = clip_updates([*honest, evil], CLIP)
    assert clipped.weights == {"a": 10, "b": 20, "c": 10, "evil": 30}  # the lower median count is 10
    assert clipped.clipped == ("evil",)
    out = flat(aggregate([*honest, evil], "mean"))
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    np.testing.assert_allclose(out, (40 * unit(HONEST) + 30 * unit(EVIL)) / 70, rtol=1e-5)
    # without the cap the liar's direction is all that is left
    plain = flat(aggregate([*honest, evil], "mean", clip=None))
    assert np.dot(unit(plain), unit(EVIL)) > 0.99


def test_a_count_beyond_the_data_limit_is_refused_at_join_and_in_an_update() -> None:
    assert Bounds().max_examples == MAX_EXAMPLES == 10_000
    net = TuneNet("ab", coordinator="a")
    net.join("b", request(examples=MAX_EXAMPLES + 1))
    assert "10001 examples; a participant may bring at most 10000" in net.nodes["b"].of(TuneFailed)[0].reason
    zero = {A: np.zeros((2, 3), np.float32), B: np.zeros((3, 2), np.float32)}
    assert check_update(Update("x", MAX_EXAMPLES + 1, zero), SHAPES, Bounds()) == "examples 10001 is outside [1, 10000]"
    assert check_update(Update("x", MAX_EXAMPLES, zero), SHAPES, Bounds(), steps=10) is None


@pytest.mark.parametrize("method", AGGREGATES)
def test_equal_honest_updates_give_exactly_the_plain_mean(method: str) -> None:
    same = [along(n, HONEST, 0.7, examples=e) for n, e in (("a", 10), ("b", 30), ("c", 20), ("d", 5))]
    out = aggregate(same, method)
    for name in SHAPES:
        assert out[name].tobytes() == same[0].tensors[name].tobytes()


def test_honest_updates_within_three_times_the_median_are_not_changed_by_clipping() -> None:
    rng = np.random.default_rng(7)
    updates = [along(n, rng.normal(size=12), length, examples)
               for n, length, examples in (("a", 1.0, 10), ("b", 2.5, 25), ("c", 0.5, 8), ("d", 1.4, 12))]
    assert clip_updates(updates, CLIP).clipped == ()
    for method in AGGREGATES:
        for name in SHAPES:
            assert aggregate(updates, method)[name].tobytes() == aggregate(updates, method, clip=None)[name].tobytes()


def test_with_two_participants_the_larger_update_is_clipped_to_three_times_the_smaller() -> None:
    out = aggregate([along("a", HONEST, 1.0), along("b", HONEST, 10.0)], "mean")
    assert update_norm(out) == pytest.approx((1.0 + 3.0) / 2, rel=1e-6)
    assert clip_updates([along("a", HONEST, 1.0), along("b", HONEST, 10.0)], CLIP).clipped == ("b",)


def test_a_coordinate_wise_median_is_never_longer_than_the_longest_update() -> None:
    e = np.eye(12)
    updates = [along("a", e[0] + e[1], 1.0), along("b", e[0] + e[2], 1.0), along("c", e[1] + e[2], 1.0)]
    assert update_norm(aggregate(updates, "median", clip=None)) > 1.2  # (1, 1, 1) / sqrt 2
    assert update_norm(aggregate(updates, "median")) == pytest.approx(1.0, rel=1e-6)


def test_the_absolute_bound_follows_from_adamw_and_is_tight() -> None:
    params = 2_442_240  # rank 8 on the default model
    bound = adamw_norm_bound(10, params)
    assert 5 < bound < 10  # was 1000: every parameter moving lr per step is sqrt(P) * 10 * 5e-4 = 7.8
    assert adamw_norm_bound(20, params) > 2 * adamw_norm_bound(10, params) * 0.99
    assert Bounds().norm_limit(10, params) == bound and Bounds(max_norm=5.0).norm_limit(10, params) == 5.0
    big = {A: np.full((2, 3), 1.0, np.float32), B: np.zeros((3, 2), np.float32)}
    reason = check_update(Update("x", 1, big), SHAPES, Bounds(), steps=10)
    assert reason is not None and reason.startswith("norm 2.45 > 0.")


def test_a_huge_update_is_clipped_in_a_job_and_the_log_says_so() -> None:
    def delta(node: str, round_no: int) -> float:
        return {"a": 0.001, "b": 0.0012, "c": 0.5}[node]  # c: 400 times the others, within the bound

    net = TuneNet("abc", coordinator="a", delta=delta)
    for name in "abc":
        net.join(name, request(examples=10, rounds=1))
    net.settle()
    final = net.finished()["a"].tensors
    g0 = {k: np.array(v) for k, v in net.nodes["a"].trains[0].tensors.items()}
    moved = update_norm({k: final[k].astype(np.float64) - g0[k] for k in g0})
    one = update_norm({k: 0.0012 * pattern(k, g0[k].shape) for k in g0})  # the lower median is b's update
    assert moved <= CLIP * one * (1 + 1e-5)
    assert "clipped to 3x the round's median c" in net.nodes["a"].logged()


# --- the final adapter ---------------------------------------------------------------------------


def final_messages(job_id: str, tensors: dict[str, np.ndarray], rounds: int = 1, rank: int = 4,
                   alpha: float = 8.0) -> list[wire.Message]:
    parts = tensor_messages(job_id, rounds, "final", tensors)
    done = wire.TuneDone(job_id, rounds, rank, alpha, ("a",), 1.0, adapter_digest(tensors), len(parts))
    return [done, *parts]


def member(settings: TuneSettings = TuneSettings(), ranks: list[int] | None = None) -> TuneCore:
    def make(rank: int, alpha: float, seed: int) -> dict[str, np.ndarray]:  # records the ranks made
        if ranks is not None:
            ranks.append(rank)
        return initial(rank, alpha, seed)

    core = TuneCore("m", make, settings)
    core.membership("a", frozenset({"a"}), 0.0)
    return core


def shifted(job_id: str, by: float) -> dict[str, np.ndarray]:
    g0 = initial(4, 8.0, job_seed(job_id))
    return {k: (v + by * pattern(k, v.shape)).astype(np.float32) for k, v in g0.items()}


@pytest.mark.parametrize("by, taken", [(10.0, True), (1e4, False)])
def test_a_member_refuses_a_final_adapter_beyond_what_the_rounds_can_make(by: float, taken: bool) -> None:
    core = member()
    for msg in final_messages("a/tune-1", shifted("a/tune-1", by)):
        core.receive("a", msg, 0.0)
    events = core.events()
    finished = [e for e in events if isinstance(e, TuneFinished)]
    assert bool(finished) == taken
    if not taken:
        log = "\n".join(e.message for e in events if isinstance(e, Logged))
        assert "the final adapter of tune job a/tune-1 from a is refused: it moved" in log


def test_a_participant_checks_the_final_adapter_against_its_job_steps() -> None:
    net = TuneNet("ab", coordinator="a", adamw_bound=True, delta=lambda node, r: 0.0002)
    net.join("b", request(examples=10, rounds=1))
    net.nodes["b"].hold = True
    net.tick()  # round 1 begins; b trains
    job_id = net.nodes["b"].trains[0].job_id
    # a coordinator that sends a final adapter far beyond one round of 2 AdamW steps
    for msg in final_messages(job_id, shifted(job_id, 0.05)):
        net.nodes["b"].core.receive("a", msg, net.now)
    failed = [e for e in net.nodes["b"].core.events() if isinstance(e, TuneFailed)]
    assert failed and "was refused: it moved" in failed[0].reason
    # an honest job of the same size passes the same check
    honest = TuneNet("ab", coordinator="a", adamw_bound=True, delta=lambda node, r: 0.0002)
    honest.join("b", request(examples=10, rounds=1))
    honest.settle()
    assert set(honest.finished()) == {"a", "b"}


def test_a_final_adapter_of_a_job_beyond_the_limits_is_refused_before_anything_is_built() -> None:
    ranks: list[int] = []
    core = member(ranks=ranks)
    done = wire.TuneDone("a/tune-1", 1, 1024, 8.0, ("a",), 1.0, "0" * 64, 3)
    core.receive("a", done, 0.0)
    log = "\n".join(e.message for e in core.events() if isinstance(e, Logged))
    assert "is refused: a job of rank 1024; at most 256" in log and ranks == []
    assert MAX_JOB_RANK == 256 and MAX_JOB_ROUNDS == 1000 and MAX_JOB_STEPS == 100_000 and MAX_JOB_ALPHA == 4096


def test_the_job_limits_are_the_api_limits() -> None:
    from daemon import tune_request

    assert (tune_request.MAX_RANK, tune_request.MAX_ROUNDS, tune_request.MAX_STEPS) == (
        MAX_JOB_RANK, MAX_JOB_ROUNDS, MAX_JOB_STEPS)


def test_a_coordinator_refuses_to_start_a_job_beyond_the_limits() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("b", replace(request(), steps=MAX_JOB_STEPS + 1))
    assert "cannot start a tune job of 100001 steps a round; at most 100000" in net.nodes["b"].of(TuneFailed)[0].reason


# --- who serves the adapter ---------------------------------------------------------------------


def test_only_the_nodes_that_took_part_or_accept_adapters_serve_it() -> None:
    net = TuneNet("abcd", coordinator="c", settings={"d": TuneSettings(accept_adapters=True)})
    net.join("a", request(examples=10))
    net.join("b", request(examples=10))
    net.settle()
    finished = net.finished()
    assert sorted(finished) == ["a", "b", "c", "d"]
    assert {n: f.serve for n, f in finished.items()} == {"a": True, "b": True, "c": False, "d": True}
    assert "this node took no part in it and keeps serving what it served" in net.nodes["c"].logged()
    assert net.nodes["c"].core.status_view()["last_finished"]["served"] is False  # type: ignore[index]
    assert net.nodes["a"].core.switching == finished["a"].job_id and net.nodes["c"].core.switching is None


def test_a_participant_that_quit_before_the_end_does_not_serve_the_adapter() -> None:
    net = TuneNet("abc", coordinator="a")
    for name in "abc":
        net.join(name, request(examples=10, rounds=2))
    net.tick()
    net.nodes["c"].core.quit(net.now)
    net.flush()
    net.settle()
    assert {n: f.serve for n, f in net.finished().items()} == {"a": True, "b": True, "c": False}


def hello(node: str, model: str) -> wire.Hello:
    return wire.Hello(node, node, wire.PROTOCOL_VERSION, "test", model, 8000, 10**9, 1.0, True)


def deliver(net: TuneNet, own: dict[str, wire.Hello]) -> list[tuple[str, str]]:
    """Carry the announcements between the cores (as the driver does); the Byes sent."""
    byes = []
    while True:
        sends = [(n, s) for n in sorted(net.nodes) for s in net.nodes[n].core.sends()]
        if not sends:
            return byes
        for sender, send in sends:
            if isinstance(send.message, wire.Bye):
                byes.append((sender, send.dest))
            elif isinstance(send.message, wire.Hello):
                net.nodes[send.dest].core.announced(sender, send.message, own[send.dest])


def test_nodes_that_took_the_adapter_up_stay_linked_and_the_others_close_their_links() -> None:
    net = TuneNet("abcd", coordinator="a", settings={"d": TuneSettings(accept_adapters=True)})
    net.join("a", request(examples=10))
    net.join("b", request(examples=10))
    net.settle()
    serving = sorted(n for n, f in net.finished().items() if f.serve)
    assert serving == ["a", "b", "d"]
    own = {n: hello(n, "base") for n in "abcd"}
    for name in serving:  # each driver loads the adapter, then reports what it serves
        own[name] = hello(name, "base-aDIGEST")
        net.nodes[name].core.served(own[name])
    byes = deliver(net, own)
    assert sorted(byes) == [("c", "a"), ("c", "b"), ("c", "d")]  # c declined: it leaves their mesh
    log = "\n".join(e.message for e in net.nodes["c"].core.events() if isinstance(e, Logged))
    assert "closing the link to a: model base-aDIGEST != base (after a tune job's adapter)" in log


def test_a_node_taking_the_adapter_up_waits_before_judging_an_announcement() -> None:
    net = TuneNet("ab", coordinator="a")
    net.join("a", request(examples=10))
    net.join("b", request(examples=10))
    net.settle()
    assert net.nodes["b"].core.switching is not None
    own = {"a": hello("a", "base-aX"), "b": hello("b", "base")}
    net.nodes["a"].core.served(own["a"])
    assert deliver(net, own) == []  # b is still loading the adapter: no Bye yet
    net.nodes["b"].core.served(hello("b", "base-aX"))
    assert deliver(net, {"a": own["a"], "b": hello("b", "base-aX")}) == []  # the same model id: linked
    # had b failed to load it, it would have closed the link once it knew
    net2 = TuneNet("ab", coordinator="a")
    net2.join("a", request(examples=10))
    net2.join("b", request(examples=10))
    net2.settle()
    net2.nodes["a"].core.served(own["a"])
    assert deliver(net2, own) == []
    net2.nodes["b"].core.served(own["b"])  # b still serves the base model: both close the link
    assert sorted(deliver(net2, own)) == [("a", "b"), ("b", "a")]


def test_a_hello_that_names_another_node_is_ignored() -> None:
    core = member()
    core.announced("a", hello("z", "other"), hello("m", "base"))
    assert core.sends() == []
    assert any("it names z" in e.message for e in core.events() if isinstance(e, Logged))
    core.announced("a", hello("a", "other"), hello("m", "base"))
    assert [type(s.message) for s in core.sends()] == [wire.Bye]

