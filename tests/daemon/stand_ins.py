"""What the mesh driver reads of a node when it is made, without a model: the tests of the
driver's own logic (dialling, faults, discovery) share these."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meshllm import wire


def hello(node_id: str) -> wire.Hello:
    return wire.Hello(node_id, node_id, wire.PROTOCOL_VERSION, "test", "model0123", 8000, 10**9, 1.0, True)


def stand_in_runtime() -> Any:
    """What the driver reads of a runtime when it is made (no model: nothing is computed)."""
    shape = SimpleNamespace(num_layers=4, layer_bytes=1000, embed_head_bytes=500)
    engine = SimpleNamespace(shape=shape, info=SimpleNamespace(max_positions=128, model_id="model0123"))
    return SimpleNamespace(engine=engine, hidden_size=16, kv_shape=(2, 8), shard=SimpleNamespace(config=None),
                           private_layers=0, mesh_model_id="model0123", batch_invariant=True, can_draft=True,
                           draft=None)
