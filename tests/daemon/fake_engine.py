"""A fake engine with the real engine's interface, for fast API tests (no model, no torch math).

Its "tokenizer" is one token per character (id = code point). Its answer to a conversation is
``reply_for(messages)`` one character per token, then EOS (id 0), so tests know the exact
text to expect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from meshllm.errors import PromptTooLong
from meshllm.model.engine import ModelInfo, Token
from meshllm.model.sampling import SamplingParams

EOS_ID = 0
REFUSED_CONTENT = "<refuse>"
"""A message with this content makes the chat template raise ValueError."""


def reply_for(messages: Sequence[Mapping[str, str]]) -> str:
    """The fake model's whole answer: an echo of the last message."""
    return f"echo: {messages[-1]['content']}"


class FakeEngine:
    def __init__(self, *, max_positions: int = 256, token_delay_s: float = 0.0,
                 endless: bool = False) -> None:
        self.info = ModelInfo(
            model_id="fake0123456789ab",
            name="fake-model",
            num_layers=4,
            hidden_size=8,
            max_positions=max_positions,
            eos_token_ids=(EOS_ID,),
        )
        self.token_delay_s = token_delay_s
        self.endless = endless
        """Never emit EOS: answer with the reply over and over until max_tokens or a stop."""
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.generate_threads: list[str] = []
        self.calls: list[tuple[list[int], SamplingParams]] = []
        self._replies: dict[tuple[int, ...], str] = {}

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        rendered = ""
        for message in messages:
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {message['role']!r}")
            if message["content"] == REFUSED_CONTENT:
                raise ValueError("the template refuses this content")
            rendered += f"<{message['role']}>{message['content']}"
        rendered += "<assistant>"
        ids = [ord(c) for c in rendered]
        self._replies[tuple(ids)] = reply_for(messages)
        return ids

    def check_prompt(self, n_prompt_tokens: int) -> None:
        if n_prompt_tokens >= self.info.max_positions:
            raise PromptTooLong(n_prompt_tokens, self.info.max_positions)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Token]:
        self.calls.append((list(prompt_ids), params))
        self.generate_threads.append(threading.current_thread().name)
        self.started.set()
        reply = self._replies.get(tuple(prompt_ids), "echo: ?")
        budget = min(params.max_tokens, self.info.max_positions - len(prompt_ids))
        for i in range(budget):
            if should_stop is not None and should_stop():
                self.cancelled.set()
                yield Token(-1, "", "cancelled")
                return
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            position = i % (len(reply) + 1) if self.endless else i
            if position >= len(reply):
                if not self.endless:
                    yield Token(EOS_ID, "", "stop")
                    return
                char = "\n"
            else:
                char = reply[position]
            yield Token(ord(char), char, "length" if i == budget - 1 else None)

    def measure_ms_per_layer(self) -> float:
        return 1.5
