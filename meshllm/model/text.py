"""Tokenizer side of the entry node: the chat template, and incremental detokenization."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from meshllm.model.hfconfig import import_config_validators

ROLES = frozenset({"system", "user", "assistant"})


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    import_config_validators()  # AutoTokenizer may read the config
    return AutoTokenizer.from_pretrained(folder)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids exactly as `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` builds them."""
    if not messages:
        raise ValueError("messages must not be empty")
    clean = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    out = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return [int(t) for t in out]


class Detokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    It decodes a short window of recent tokens rather than the whole answer, and holds text
    back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_ids: frozenset[int] = frozenset()) -> None:
        self._tok = tokenizer
        self._skip = skip_ids
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]
