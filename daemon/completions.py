"""Glue between the HTTP API and the model engine: prompt building and generation streams.

The engine is synchronous. Prompts are built on a small thread of their own (so a bad or
too-long prompt is answered at once, even while another request generates); generation runs
on the single worker thread, one request after another in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from meshllm.errors import PromptTooLong

from daemon.chat_request import ChatRequest, RequestError
from daemon.worker import GenerationWorker, TokenStream

if TYPE_CHECKING:
    from meshllm.model.engine import ModelInfo, Token
    from meshllm.model.sampling import SamplingParams


class ChatEngine(Protocol):
    """What the daemon needs from an engine (``meshllm.model.engine.Engine`` has it)."""

    @property
    def info(self) -> ModelInfo: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def check_prompt(self, n_prompt_tokens: int) -> None: ...

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Token]: ...

    def measure_ms_per_layer(self) -> float: ...


class NotReady(RuntimeError):
    """The model is not loaded yet (or the daemon is stopping)."""


@dataclass(frozen=True)
class PreparedChat:
    """A checked request with its prompt tokens, ready to generate."""

    request: ChatRequest
    prompt_ids: list[int]
    params: SamplingParams
    model_name: str


class Completions:
    """Turns checked chat requests into token streams from the engine."""

    def __init__(self, worker: GenerationWorker) -> None:
        self._worker = worker
        self._engine: ChatEngine | None = None
        self._prompt_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshllm-prompt")

    def attach(self, engine: ChatEngine) -> None:
        """Serve this engine from now on."""
        self._engine = engine

    @property
    def engine(self) -> ChatEngine | None:
        return self._engine

    def model_names(self) -> tuple[str, ...]:
        """Names a request's ``model`` field may use: the model's name and its id."""
        if self._engine is None:
            return ()
        return (self._engine.info.name, self._engine.info.model_id)

    def close(self) -> None:
        self._prompt_thread.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, request: ChatRequest) -> PreparedChat:
        """Build the prompt and check it fits; raise RequestError (4xx) or NotReady."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is still loading")
        if request.model is not None and request.model not in self.model_names():
            raise RequestError(
                f"model {request.model!r} is not served here; this daemon serves {engine.info.name!r}",
                "model",
                status=404,
                code="model_not_found",
            )
        loop = asyncio.get_running_loop()
        try:
            prompt_ids = await loop.run_in_executor(
                self._prompt_thread, engine.chat_prompt, request.message_dicts()
            )
        except ValueError as error:  # the chat template refused the messages
            raise RequestError(f"the model's chat template refused the messages: {error}",
                               "messages") from None
        try:
            engine.check_prompt(len(prompt_ids))
        except PromptTooLong as error:
            raise RequestError(str(error), "messages", code="context_length_exceeded") from None
        from meshllm.model.sampling import SamplingParams  # torch: imported once a model serves

        params = SamplingParams(
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            max_tokens=request.max_tokens,
        )
        return PreparedChat(request, prompt_ids, params, engine.info.name)

    def generate(self, prepared: PreparedChat) -> TokenStream[Token]:
        """Queue the generation on the worker; close the stream to cancel it."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is not loaded")
        return self._worker.stream(
            lambda should_stop: engine.generate(prepared.prompt_ids, prepared.params, should_stop)
        )
