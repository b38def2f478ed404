"""Glue between the HTTP API and the model engine: prompt building and generation streams.

What it needs of the node (the worker thread, the mesh, the local fallback) it names here as
protocols; the node hands in its objects (daemon/node/node.py). The engine is synchronous. Prompts are built on a small thread of their own (so a bad or
too-long prompt is answered at once, even while another request generates); generation runs
on the single worker thread, one request after another in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from meshllm.errors import PromptTooLong

from daemon.answer import AnswerStream, Serving
from daemon.api.chat_request import ChatRequest, RequestError

if TYPE_CHECKING:
    from meshllm.mesh.session import StateChange
    from meshllm.model.engine import ModelInfo, Token
    from meshllm.model.sampling import SamplingParams

ShouldStop = Callable[[], bool]


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


class StreamRunner(Protocol):
    """The node's worker thread (`daemon.node.worker.GenerationWorker`): runs a producer of
    tokens there and streams them to the event loop."""

    def stream(self, produce: Callable[[ShouldStop], Iterator[Token]]) -> AnswerStream: ...


class MeshAnswers(Protocol):
    """The mesh (`daemon.node.driver.MeshDriver`): answers typed on this node, across the mesh."""

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 should_stop: ShouldStop) -> AsyncIterator[Token | StateChange]: ...


class FallbackAnswers(Protocol):
    """The local fallback (`daemon.node.fallback.Fallback`): routes each answer to the mesh or
    to the fallback model, and says which first (a `Serving`)."""

    @property
    def enabled(self) -> bool: ...

    def answer(self, mesh_answer: Callable[[], AsyncIterator[Token | StateChange]], mesh_model: str,
               messages: Sequence[Mapping[str, str]], params: SamplingParams,
               should_stop: ShouldStop) -> AsyncIterator[Serving | Token | StateChange]: ...


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

    def __init__(self, worker: StreamRunner) -> None:
        self._worker = worker
        self._engine: ChatEngine | None = None
        self._mesh: MeshAnswers | None = None
        self._fallback: FallbackAnswers | None = None
        self._prompt_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshllm-prompt")

    def attach(self, engine: ChatEngine, mesh: MeshAnswers | None = None,
               fallback: FallbackAnswers | None = None) -> None:
        """Serve this engine from now on; with a mesh, answers run across the mesh, and with
        a fallback, the ones the mesh cannot serve are answered by the fallback model here."""
        self._engine = engine
        self._mesh = mesh
        self._fallback = fallback

    @property
    def model_name(self) -> str | None:
        """The name of the model served (None: still loading)."""
        return None if self._engine is None else self._engine.info.name

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

    def generate(self, prepared: PreparedChat) -> AnswerStream:
        """Start the generation; close the stream to cancel it."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is not loaded")
        if self._mesh is not None:
            mesh = self._mesh
            fallback = self._fallback
            if fallback is not None and fallback.enabled:
                return MeshStream(lambda should_stop: fallback.answer(
                    lambda: mesh.generate(prepared.prompt_ids, prepared.params, should_stop),
                    prepared.model_name, prepared.request.message_dicts(), prepared.params, should_stop,
                ), announces=True)
            return MeshStream(lambda should_stop: mesh.generate(prepared.prompt_ids, prepared.params, should_stop))
        return self._worker.stream(
            lambda should_stop: engine.generate(prepared.prompt_ids, prepared.params, should_stop)
        )


class MeshStream:
    """An answer generated across the mesh, an `AnswerStream` like the worker's token streams.

    Items are `Token`s and, between tokens, `StateChange`s ("replanning", "running"); with
    `announces`, a `Serving` comes first (mesh or fallback, decided before the first token).
    `close()` asks the generation to stop at its next step and, if it is parked at a
    yield, closes it there so its sessions are dropped on every stage.
    """

    _closing: set[asyncio.Task[None]] = set()

    def __init__(self, start: Callable[[ShouldStop], AsyncIterator[Token | StateChange | Serving]],
                 *, announces: bool = False) -> None:
        self.announces = announces
        """The first item says who serves the answer (a `Serving`)."""
        self._stop = False
        self._agen = start(lambda: self._stop)
        self._running = False

    @property
    def cancelled(self) -> bool:
        return self._stop

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        if not self._running:
            task = asyncio.get_running_loop().create_task(self._agen.aclose())  # type: ignore[attr-defined]
            MeshStream._closing.add(task)
            task.add_done_callback(MeshStream._closing.discard)

    def __aiter__(self) -> AsyncIterator[Token | StateChange | Serving]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Token | StateChange | Serving]:
        while True:
            self._running = True
            try:
                item = await self._agen.__anext__()
            except StopAsyncIteration:
                return
            finally:
                self._running = False
            yield item
