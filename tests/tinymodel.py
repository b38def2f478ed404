"""Tiny random models in the tests, and the ground truth they are held to.

The models themselves (`build_tiny_model`, `PROMPTS`) live in meshllm/model/tiny.py, where
scripts can reach them too. `reference_greedy` is plain transformers `generate` on the same
folder: the ground truth that every meshllm path is compared with, token for token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from meshllm.model.tiny import PROMPTS, TINY_MAX_POSITIONS, build_tiny_model

__all__ = ["PROMPTS", "TINY_MAX_POSITIONS", "build_tiny_model", "chat_ids", "reference_greedy"]


def reference_greedy(
    model_dir: Path | str, prompt_ids: Sequence[int], max_new_tokens: int, *, gguf_file: str | None = None, model=None
) -> list[int]:
    """Greedy tokens of plain transformers `generate` (fp32), EOS included when it comes."""
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt_ids):].tolist()


def chat_ids(model_dir: Path | str, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids exactly as the tokenizer's own chat template builds them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return list(out)
