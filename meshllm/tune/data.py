"""Training data for LoRA fine-tuning: chats in OpenAI's shape, checked and bounded, then
tokenized with the model's own chat template.

One example is one chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``, whose last
message is the assistant reply to learn. A file holds one chat a line (JSON Lines). Parsing and checking import neither torch nor transformers. The prompt
is built exactly as the served model builds it for the same chat (``chat_prompt_ids``), and
only the tokens of the last reply are learned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["IGNORE", "MAX_EXAMPLES", "MAX_MESSAGES", "MAX_MESSAGE_CHARS", "MAX_TOKENS", "DataError", "Example",
           "check_chats", "parse_jsonl", "tokenize_chats"]

MAX_EXAMPLES = 10_000
MAX_MESSAGES = 256
"""Messages in one chat, at most."""
MAX_MESSAGE_CHARS = 32_768
MAX_TOKENS = 512
IGNORE = -100
"""The label of a token that is not learned (the loss skips it), as transformers expects."""
ROLES = frozenset({"system", "user", "assistant"})
"""meshllm.model.text's roles, repeated so that checking data imports no transformers."""

Chat = list[dict[str, str]]


class DataError(ValueError):
    """Training data that cannot be used; the message names the line or example and the fault."""


@dataclass(frozen=True)
class Example:
    """One tokenized chat. `labels[i]` is `input_ids[i]` for the tokens of the last assistant
    reply and `IGNORE` before it (transformers shifts them inside its loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def _check_chat(obj: object, where: str) -> Chat:
    """One chat: a {"messages": [...]} object (or the bare list of messages)."""
    messages = obj.get("messages") if isinstance(obj, Mapping) else obj
    if isinstance(obj, Mapping) and "messages" not in obj:
        raise DataError(f"{where}: no \"messages\" list")
    if not isinstance(messages, list):
        raise DataError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    if len(messages) < 2:
        raise DataError(f"{where}: a chat needs at least one message before the assistant reply to learn")
    if len(messages) > MAX_MESSAGES:
        raise DataError(f"{where}: {len(messages)} messages; at most {MAX_MESSAGES} a chat")
    chat: Chat = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: message {j} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}; roles are {', '.join(sorted(ROLES))}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} has no text content (\"content\" must be a string)")
        if len(content) > MAX_MESSAGE_CHARS:
            raise DataError(f"{where}: message {j} is {len(content)} characters long; "
                            f"at most {MAX_MESSAGE_CHARS}")
        chat.append({"role": role, "content": content})
    if chat[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant reply to learn "
                        f"(it is a {chat[-1]['role']!r} message)")
    return chat


def parse_jsonl(text: str) -> list[Chat]:
    """Chats from JSON Lines, one ``{"messages": [...]}`` a line; blank lines are skipped."""
    chats: list[Chat] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(chats) >= MAX_EXAMPLES:
            raise DataError(f"line {n}: more than {MAX_EXAMPLES} examples")
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"line {n}: not valid JSON ({e})") from None
        if not isinstance(obj, Mapping):
            raise DataError(f"line {n}: expected a {{\"messages\": [...]}} object")
        chats.append(_check_chat(obj, f"line {n}"))
    if not chats:
        raise DataError("no examples: the data holds no chats")
    return chats


def check_chats(obj: object) -> list[Chat]:
    """The checks of `parse_jsonl` on chats already parsed (an API body's "examples"): a list
    of ``{"messages": [...]}`` objects, or of bare message lists."""
    if not isinstance(obj, list):
        raise DataError("examples must be a list of {\"messages\": [...]} objects")
    if not obj:
        raise DataError("no examples: the list is empty")
    if len(obj) > MAX_EXAMPLES:
        raise DataError(f"{len(obj)} examples; at most {MAX_EXAMPLES}")
    return [_check_chat(chat, f"example {i}") for i, chat in enumerate(obj)]


def _template_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:  # type: ignore[no-untyped-def]
    out = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=False, tokenize=True)
    if isinstance(out, Mapping):
        out = out["input_ids"]
    return [int(t) for t in out]


def tokenize_chats(tokenizer, chats: Sequence[Sequence[Mapping[str, str]]],  # type: ignore[no-untyped-def]
                   max_tokens: int = MAX_TOKENS) -> list[Example]:
    """Tokenize checked chats with the tokenizer's chat template.

    The prompt is every message but the last with the generation prompt added, exactly what
    the served model is given for that conversation; the whole chat follows the same template.
    Its tokens past the prompt (the reply and the template's end-of-turn) are learned. An
    example is cut to `max_tokens`; one whose prompt leaves no reply token inside the cut is a
    DataError.
    """
    from meshllm.model.text import chat_prompt_ids

    if max_tokens < 2:
        raise DataError(f"max_tokens must be at least 2, got {max_tokens}")
    examples: list[Example] = []
    for i, chat in enumerate(chats):
        prompt = chat_prompt_ids(tokenizer, chat[:-1])
        full = _template_ids(tokenizer, chat)
        if full[: len(prompt)] != prompt:
            raise DataError(f"example {i}: the chat template renders this chat in a way that does not start with "
                            "its prompt, so the reply cannot be told apart")
        ids = full[:max_tokens]
        labels = [IGNORE] * min(len(prompt), len(ids)) + ids[len(prompt):]
        example = Example(tuple(ids), tuple(labels))
        if example.trainable_tokens == 0:
            raise DataError(f"example {i}: its prompt is {len(prompt)} tokens, which leaves no reply token "
                            f"inside max_tokens={max_tokens}; shorten it")
        examples.append(example)
    return examples
