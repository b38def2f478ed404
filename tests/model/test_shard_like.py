"""Every kind of shard offers the whole of `ShardLike`, the interface the runtime and the
engine call (no union of shard classes, no check of a shard's kind)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from meshllm.model.cache import prepare
from meshllm.model.shard import open_shard
from meshllm.model.source import resolve
from meshllm.model.span import ShardLike

_MEMBERS = sorted(n for n in vars(ShardLike) if not n.startswith("_"))


@pytest.mark.parametrize("weights", ["f32", "int8"])
def test_each_kind_of_shard_has_every_member(tiny_llama: Path, weights: str) -> None:
    shard = open_shard(prepare(resolve(tiny_llama)), 0, 2, weights=weights)
    assert len(_MEMBERS) > 20
    missing = [n for n in _MEMBERS if not hasattr(shard, n)]
    assert missing == []
    for name in _MEMBERS:
        want = getattr(ShardLike, name)
        if inspect.isfunction(want):
            params = list(inspect.signature(want).parameters)[1:]
            assert list(inspect.signature(getattr(shard, name)).parameters) == params, name
    assert isinstance(shard.batch_invariant, bool) and shard.span == (0, 2) and shard.weights == weights


def test_a_shard_takes_over_the_caches_of_its_own_kind_only(tiny_llama: Path) -> None:
    prepared = prepare(resolve(tiny_llama))
    f32, int8 = open_shard(prepared, 0, 2), open_shard(prepared, 0, 2, weights="int8")
    with pytest.raises(TypeError, match="LeanShard cannot take over the caches of a Shard"):
        int8.adopt_sessions(f32)
