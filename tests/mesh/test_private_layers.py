"""The text stays on the device it was typed on: with private layers, no frame that crosses a
link carries the prompt, its token ids, a prompt token's embedding or the hidden state the head
reads, during answers, a rebuild after a lost stage and a re-plan that hands caches over;
and the answers stay exactly plain transformers' greedy ones.

The inspection is an exact-lookup attack on every frame: every tensor row is looked up in the
public embedding table, and put through the final norm to be looked up among the states the
head read. With ``private_layers=0`` the same attack finds both (the inspector has teeth)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meshllm import wire
from meshllm.mesh.session import Token
from meshllm.model.sampling import SamplingParams
from tests.mesh.memnet import MemoryNet, memory_net
from tests.tinymodel import PROMPTS, reference_greedy

TOKENS = 24


def _walk(value: Any) -> Any:
    """Every leaf of a decoded message: its tensors, texts, bytes and int sequences."""
    if isinstance(value, wire.TensorPayload):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            yield tuple(value)
        else:
            for v in value:
                yield from _walk(v)
    elif isinstance(value, (str, bytes)):
        yield value


class Inspector:
    """What an exact lookup on the frames recovers: per kind of leak, the messages it came from."""

    def __init__(self, model_dir: Path, texts: list[str], sequences: list[list[int]], num_layers: int) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.table = model.get_input_embeddings().weight.detach().numpy()
        self.norm = model.model.norm
        self.texts = texts
        self.sequences = [tuple(s) for s in sequences]
        heads = []
        with torch.inference_mode():
            for seq in sequences:
                out = model(torch.tensor([seq]), output_hidden_states=True)
                heads.append(out.hidden_states[num_layers][0].numpy())  # what the head reads (normed)
        self.head_states = np.concatenate(heads)

    def leaks(self, record: list[tuple[str, str, wire.Message]]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {"text": set(), "token ids": set(), "embedding row": set(), "head state": set()}
        for _sender, _receiver, msg in record:
            kind = type(msg).__name__
            raw = wire.encode(msg)
            if any(t.encode() in raw for t in self.texts):
                found["text"].add(kind)
            for leaf in _walk(msg):
                if isinstance(leaf, tuple) and any(_contains(leaf, s[:8]) for s in self.sequences):
                    found["token ids"].add(kind)
                elif isinstance(leaf, wire.TensorPayload) and leaf.codec == "f32" and leaf.shape[-1] == self.table.shape[1]:
                    rows = wire.decode_tensor(leaf).reshape(-1, self.table.shape[1])
                    if _near_any(rows, self.table):
                        found["embedding row"].add(kind)
                    with torch.inference_mode():
                        normed = self.norm(torch.from_numpy(rows)).numpy()
                    if _near_any(normed, self.head_states):
                        found["head state"].add(kind)
        return found


def _contains(seq: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def _near_any(rows: np.ndarray, table: np.ndarray) -> bool:
    """Whether some row equals some table row, to float32 rounding."""
    for row in rows:
        if np.any(np.all(np.abs(table - row) <= 1e-5 * (1 + np.abs(row)), axis=1)):
            return True
    return False


async def _mesh(net: MemoryNet, model: Path, private_layers: int) -> None:
    from meshllm.model.shape import model_shape, load_config
    from meshllm.model.cache import prepare
    from meshllm.model.source import resolve

    shape = model_shape(load_config(prepare(resolve(model))))
    # room for the fixed bytes, the private layers and half the others: a plan needs two stages
    placed = shape.num_layers - 2 * private_layers
    budget = shape.embed_head_bytes + (2 * private_layers + (placed + 1) // 2) * shape.layer_bytes
    for nid in ("a", "b", "c"):
        await net.add(nid, model, mem_budget_bytes=budget, private_layers=private_layers)
    net.connect_all()
    await net.wait_active()


async def _answer(net: MemoryNet, entry: str, prompt: list[int], kill_after: int | None = None,
                  join: tuple[int, Path, int] | None = None) -> list[int]:
    """The greedy answer at `entry`; after `kill_after` tokens a stage is lost; with `join`
    (after, model, private layers) a fast node with room for every layer joins then."""
    got: list[int] = []
    async for item in net.meshes[entry].generate(prompt, SamplingParams(max_tokens=TOKENS)):
        if isinstance(item, Token):
            got.append(item.id)
            if join is not None and len(got) == join[0]:
                await net.add("d", join[1], ms_per_layer=0.01, private_layers=join[2])
                for peer in sorted(net.meshes):
                    if peer != "d":
                        net.connect("d", peer)
            if kill_after is not None and len(got) == kill_after:
                plan = net.meshes[entry].core.book.active
                assert plan is not None
                stages = [n for n in plan.node_ids if n != entry]
                coordinator = net.meshes[entry].core.coordinator_id
                await net.kill(sorted(stages, key=lambda n: n == coordinator)[0])
    return got


@pytest.mark.parametrize("private_layers", [1, 2])
async def test_no_frame_carries_the_prompt_its_embeddings_or_the_head_state(tiny_llama: Path,
                                                                           private_layers: int) -> None:
    async with memory_net() as net:
        await _mesh(net, tiny_llama, private_layers)
        plan = net.meshes["a"].core.book.active
        assert plan is not None
        assert (plan.stages[0].start_layer, plan.stages[-1].end_layer) == (private_layers, 6 - private_layers)
        engine = net.meshes["a"].runtime.engine
        prompts = [engine.chat_prompt(PROMPTS[i]) for i in range(3)]
        texts = [m["content"] for i in range(3) for m in PROMPTS[i] if len(m["content"]) >= 8]
        net.record = []
        sequences = []
        for entry, prompt in zip(("a", "b", "c"), prompts):
            want = reference_greedy(tiny_llama, prompt, TOKENS)
            assert await _answer(net, entry, prompt) == want
            sequences.append(prompt + want)
        # a lost stage mid-answer: the others rebuild its caches and the plan changes
        want = reference_greedy(tiny_llama, prompts[1], TOKENS)
        assert await _answer(net, "a", prompts[1], kill_after=8) == want
        sequences.append(prompts[1] + want)
        # a fast node joins mid-answer: layers move to it, with their caches
        want = reference_greedy(tiny_llama, prompts[2], TOKENS)
        assert await _answer(net, "a", prompts[2], join=(8, tiny_llama, private_layers)) == want
        sequences.append(prompts[2] + want)
        kinds = {type(m).__name__ for _s, _r, m in net.record}
        assert {"Forward", "Result"} <= kinds
        leaks = Inspector(tiny_llama, texts, sequences, 6).leaks(net.record)
        assert leaks == {"text": set(), "token ids": set(), "embedding row": set(), "head state": set()}


async def test_without_private_layers_the_same_inspection_finds_the_prompt(tiny_llama: Path) -> None:
    async with memory_net() as net:
        await _mesh(net, tiny_llama, 0)
        engine = net.meshes["a"].runtime.engine
        prompts = [engine.chat_prompt(PROMPTS[i]) for i in range(3)]
        net.record = []
        sequences = []
        for entry, prompt in zip(("a", "b", "c"), prompts):
            got = await _answer(net, entry, prompt)
            sequences.append(prompt + got)
        leaks = Inspector(tiny_llama, [], sequences, 6).leaks(net.record)
        assert "Forward" in leaks["embedding row"]  # an entry node that is not the first stage
        assert leaks["head state"]  # the last stage's output goes to the entry node's head
