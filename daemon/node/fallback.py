"""The local fallback: a small model on the entry node that answers when the mesh cannot.

``meshllm up --fallback-model PATH|builtin|none`` (docs/api.md). A request that cannot be
served by the mesh for longer than a short grace period (the mesh cannot hold the model, no
plan is active, or its steps keep failing) is answered by the fallback model, here, on this
node: the text never leaves the device. The choice is made before the first token, so an
answer never switches model in the middle; an answer already under way on the mesh keeps the
mesh's own recovery (replay on the new plan). New requests go back to the mesh as soon as it
can serve again. The response says who answered (``meshllm.served_by``), the event log
records the switch and the return.

Three parts:
- ``choose_fallback``: which model, and the bytes it reserves from the node's memory budget
  (pure: paths and sizes in, a ``FallbackChoice`` out);
- ``FallbackPolicy``: when new requests go to the fallback (sans-IO: every input carries
  ``now``);
- ``Fallback``: the daemon side. It loads the model lazily on first need (on a thread of its
  own), generates on the node's worker thread one token per job (so mesh work on this node
  interleaves with it), and routes each answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from meshllm.errors import MeshllmError, MeshUnavailable, ModelSourceError
from meshllm.mesh.session import StateChange, Token

from daemon.answer import Serving, WorkerStopped
from daemon.node.worker import GenerationWorker

if TYPE_CHECKING:
    from meshllm.model.engine import ModelInfo
    from meshllm.model.sampling import SamplingParams

log = logging.getLogger(__name__)

BUILTIN = "builtin"
NONE = "none"
GRACE_S = 3.0
"""How long the mesh may be unable to serve before new requests go to the fallback: long
enough for a re-plan after a lost peer (heartbeat timeout, election, loading spans)."""
MESH_RETRY_S = 30.0
"""After answers failed on a plan that is still active ("steps keep failing"), new requests
try the mesh again after this long even if no new plan came."""
GGUF_MEMORY_FACTOR = 1.2
"""Memory of a GGUF's weights as loaded, per byte of file, at most (int4 from Q4 blocks takes
about 1.14x; int8 from Q8 and f16 from F16 about 1x): the reservation before it is loaded."""


class FallbackError(MeshllmError):
    """The fallback model asked for cannot be used; the message is one line for the user."""


# -- which model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FallbackChoice:
    """The fallback model of one node, decided at start-up."""

    spec: str
    """As given: ``builtin``, ``none`` or a path."""
    path: Path | None
    """The model file or folder; None: no fallback."""
    name: str | None
    """Its name, as the API's ``model`` field will say it."""
    same_as_served: bool = False
    """The fallback is the served model itself, run whole on this node."""
    reserved_bytes: int = 0
    """Taken from the memory budget this node offers the mesh (its weights once loaded)."""
    off_reason: str | None = None
    """Why there is no fallback (None when there is one)."""

    @property
    def enabled(self) -> bool:
        return self.path is not None


def estimate_bytes(path: Path) -> int:
    """The memory a model's weights take once loaded in their own format, before loading it:
    a Hugging Face folder's safetensors as they are, a GGUF's file a little more (its
    quantized blocks are kept, the embedding becomes int8 rows)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return int(path.stat().st_size * GGUF_MEMORY_FACTOR)


def model_name(path: Path) -> str:
    """The name meshllm gives a model at `path` (meshllm.model.source.resolve's rule)."""
    return path.name if path.is_dir() else path.stem.split(".")[0]


def choose_fallback(spec: str, served: Path, served_bytes: int, budget: int, *,
                    builtin: Callable[[], Path] | None = None,
                    estimate: Callable[[Path], int] = estimate_bytes) -> FallbackChoice:
    """Which fallback this node runs, and the bytes it reserves from `budget`.

    `spec` is ``--fallback-model``: ``none``; ``builtin``, the bundled SmolLM2 GGUF (when it
    is the served model itself, only if this node can hold all of it: then it serves it
    alone); or a path (a model that cannot be read, or that does not fit in `budget`, is a
    FallbackError). `served` is the served model's file or folder, `served_bytes` what all
    of it takes in memory in the format it is served in.
    """
    if spec == NONE:
        return FallbackChoice(spec, None, None, off_reason="--fallback-model none")
    if spec == BUILTIN:
        from meshllm.model.source import default_gguf_path

        try:
            path = (builtin or default_gguf_path)()
        except ModelSourceError as error:
            return FallbackChoice(spec, None, None, off_reason=f"no built-in model: {error}")
    else:
        from meshllm.model.source import resolve

        try:
            path = resolve(spec).path
        except ModelSourceError as error:
            raise FallbackError(f"fallback model: {error}") from None
    same = path.resolve() == served.resolve()
    need = served_bytes if same else estimate(path)
    name = model_name(path)
    if need > budget:
        what = f"the fallback model {name} needs about {_mb(need)}; the memory budget is {_mb(budget)}"
        if spec == BUILTIN:
            return FallbackChoice(spec, None, None, off_reason=what)
        raise FallbackError(f"{what} (raise --mem-budget, or --fallback-model none)")
    return FallbackChoice(spec, path, name, same_as_served=same, reserved_bytes=need)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e9 else f"{n / 1e9:.1f} GB"


# -- when ---------------------------------------------------------------------------------------


class FallbackPolicy:
    """When new requests go to the fallback, sans-IO.

    The mesh is in trouble while it has no active plan (forming, re-planning, or unable to
    hold the model), or after answers failed on the plan still active ("steps keep failing",
    until another plan is active or `retry_s` passed). A request goes to the fallback once
    the trouble has lasted `grace_s`; a request that itself failed on the mesh counts its
    trouble from its own start.
    """

    def __init__(self, grace_s: float = GRACE_S, retry_s: float = MESH_RETRY_S) -> None:
        self.grace_s = grace_s
        self.retry_s = retry_s
        self.trouble_since: float | None = None
        self.trouble: str | None = None
        """Why the mesh cannot serve now (None: it can)."""
        self.serving_fallback = False
        """New requests are answered by the fallback (since the last switch)."""
        self._active_key: object | None = None
        self._failing_key: object | None = None
        self._failed_at = 0.0

    def observe(self, active_key: object | None, placement_error: str | None, now: float) -> str | None:
        """The mesh's state: the key of its active plan (None: none) and the planner's error.
        Returns a line for the event log when new requests go back to the mesh."""
        self._active_key = active_key
        if active_key is not None and active_key != self._failing_key:
            return self._healthy()
        if active_key is None:
            if placement_error is None:
                reason = "no active plan: the mesh is forming or re-planning"
            elif placement_error.startswith("the mesh cannot"):  # the planner's own words
                reason = placement_error
            else:
                reason = f"the mesh cannot hold the model: {placement_error}"
        else:
            reason = self.trouble or "steps keep failing"
        self._troubled(reason, now)
        return None

    def mesh_failed(self, reason: str, now: float) -> None:
        """An answer on the mesh failed (MeshUnavailable)."""
        if self._active_key is not None:
            self._failing_key = self._active_key
            self._failed_at = now
        self._troubled(self.trouble or reason, now)  # what the mesh's state says, when it says it

    def mesh_served(self) -> str | None:
        """An answer is on its way on the mesh. A line for the event log when that is a return."""
        if self.serving_fallback:
            self.serving_fallback = False
            return "the mesh serves again: new requests go back to it"
        return None

    def due_at(self, request_start: float, failed: bool, now: float) -> float | None:
        """When a request that started at `request_start` goes to the fallback (None: not
        while the mesh stays as it is). `failed`: it failed on the mesh already."""
        self._expire(now)
        since = self.trouble_since
        if failed:
            since = request_start if since is None else min(since, request_start)
        return None if since is None else since + self.grace_s

    def fallback_due(self, request_start: float, failed: bool, now: float) -> bool:
        due = self.due_at(request_start, failed, now)
        return due is not None and now >= due

    def switched(self) -> str | None:
        """A request goes to the fallback. A line for the event log when that is a switch."""
        if self.serving_fallback:
            return None
        self.serving_fallback = True
        return f"answering new requests from the fallback model: {self.trouble or 'the mesh cannot serve'}"

    def _troubled(self, reason: str, now: float) -> None:
        if self.trouble_since is None:
            self.trouble_since = now
        self.trouble = reason

    def _healthy(self) -> str | None:
        self._failing_key = None
        self.trouble_since = None
        self.trouble = None
        if self.serving_fallback:
            self.serving_fallback = False
            return "the mesh can serve again: new requests go back to it"
        return None

    def _expire(self, now: float) -> None:
        if self._failing_key is not None and now >= self._failed_at + self.retry_s \
                and self._active_key is not None:
            self._failing_key = None
            self.trouble_since = None
            self.trouble = None


# -- the daemon side ----------------------------------------------------------------------------


class FallbackEngine(Protocol):
    """What the fallback needs of an engine (meshllm.model.engine.Engine has it)."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def weight_bytes(self) -> int: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def check_prompt(self, n_prompt_tokens: int) -> None: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 should_stop: Callable[[], bool] | None = None) -> Any: ...


MeshHealth = Callable[[], tuple[object | None, str | None]]
"""The mesh's active plan key (None: none) and placement error, read when it changes
(`daemon.node.driver.MeshDriver.health`)."""
LogFn = Callable[[str, str], object]
"""(kind, message) into the event log."""


def engine_loader(choice: FallbackChoice, *, device: str = "cpu", cache_dir: Path | None = None,
                  served: Any = None) -> Callable[[], FallbackEngine]:
    """Loads the fallback engine (slow: called on a thread of its own). For the served model
    itself, `served` (the node's Runtime) lends its converted weights, format and tokenizer."""
    def load() -> FallbackEngine:
        from meshllm.model.engine import Engine

        if choice.same_as_served and served is not None:
            return Engine(served.prepared, device=device, weights=served.engine.weights,
                          tokenizer=served.engine.tokenizer)
        from meshllm.model.cache import prepare
        from meshllm.model.source import resolve

        assert choice.path is not None
        return Engine(prepare(resolve(choice.path), cache_dir), device=device, weights="auto")
    return load


class Fallback:
    """The fallback model of one node, and the routing of its answers."""

    def __init__(self, choice: FallbackChoice, worker: GenerationWorker, *,
                 load: Callable[[], FallbackEngine] | None = None,
                 log_event: LogFn = lambda kind, message: None,
                 on_change: Callable[[], None] = lambda: None,
                 policy: FallbackPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.choice = choice
        self.policy = policy or FallbackPolicy()
        self._worker = worker
        self._load = load or engine_loader(choice)
        self._log_event = log_event
        self._on_change = on_change
        self._clock = clock
        self._health: MeshHealth | None = None
        self._engine: FallbackEngine | None = None
        self._loading: asyncio.Task[FallbackEngine] | None = None
        self._load_error: str | None = None
        self._changed: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def enabled(self) -> bool:
        return self.choice.enabled and not self._closing

    @property
    def reserved_bytes(self) -> int:
        """What the fallback takes from the memory budget this node offers the mesh."""
        return self.choice.reserved_bytes

    # -- the mesh's state ----------------------------------------------------------------------

    def watch(self, health: MeshHealth) -> None:
        """Follow this mesh from now on (`mesh_changed` is called on each of its changes)."""
        self._health = health
        self.mesh_changed()

    def mesh_changed(self) -> None:
        if self._health is None:
            return
        key, error = self._health()
        line = self.policy.observe(key, error, self._clock())
        if line is not None and self.choice.enabled:
            self._log_event("fallback", line)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None
        self._on_change()

    async def close(self) -> None:
        """The node is stopping: answers that have not started go nowhere."""
        self._closing = True

    # -- answers -------------------------------------------------------------------------------

    async def answer(self, mesh_answer: Callable[[], AsyncIterator[Token | StateChange]], mesh_model: str,
                     messages: Sequence[Mapping[str, str]], params: SamplingParams,
                     should_stop: Callable[[], bool]) -> AsyncIterator[Serving | Token | StateChange]:
        """One answer: `Serving` first, then the tokens of the mesh (`mesh_answer()`) or of
        the fallback, never both. Mesh states seen before the mesh's first token follow the
        `Serving` of a mesh answer and are dropped for a fallback answer."""
        start = self._clock()
        failed = False
        while not self._closing and not self.policy.fallback_due(start, failed, self._clock()):
            held: list[StateChange] = []
            agen = mesh_answer()
            try:
                first = await self._first_token(agen, start, failed, held)
            except MeshUnavailable as error:
                failed = True
                self.policy.mesh_failed(str(error), self._clock())
                self._on_change()
                if self._closing or should_stop():
                    raise
                await self._wait_change(self.policy.due_at(start, failed, self._clock()))
                continue
            if first is _GAVE_UP:
                break
            line = self.policy.mesh_served()
            if line is not None:
                self._log_event("fallback", line)
                self._on_change()
            yield Serving("mesh", mesh_model)
            for state in held:
                yield state
            if first is _ENDED:
                return
            assert isinstance(first, Token)
            try:
                yield first
                async for item in agen:
                    yield item
            except MeshUnavailable as error:  # under way: the mesh's own behaviour, an error
                self.policy.mesh_failed(str(error), self._clock())
                self._on_change()
                raise
            finally:
                await agen.aclose()
            return
        if self._closing:
            raise WorkerStopped("the daemon is stopping")
        line = self.policy.switched()
        if line is not None:
            self._log_event("fallback", f"{line} (model {self.choice.name}, on this node)")
        self._on_change()
        engine = await self._engine_loaded()
        yield Serving("fallback", engine.info.name)
        tokens = self._generate(engine, messages, params, should_stop)
        try:
            async for token in tokens:
                yield token
        finally:
            await tokens.aclose()

    async def _first_token(self, agen: AsyncIterator[Token | StateChange], start: float, failed: bool,
                           held: list[StateChange]) -> object:
        """The mesh answer's first token; `_GAVE_UP` (the answer closed) once the fallback is
        due; `_ENDED` if it ended without one. States before it go to `held`."""
        while True:
            task: asyncio.Future[Token | StateChange] = asyncio.ensure_future(agen.__anext__())
            try:
                while not task.done():
                    now = self._clock()
                    due = self.policy.due_at(start, failed, now)
                    if (due is not None and now >= due) or self._closing:
                        await _cancel(task)
                        await agen.aclose()  # type: ignore[attr-defined]
                        return _GAVE_UP
                    change = self._next_change()
                    await asyncio.wait([task, change], timeout=None if due is None else due - now,
                                       return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                await _cancel(task)
                raise
            try:
                item = task.result()
            except StopAsyncIteration:
                return _ENDED
            if isinstance(item, Token):
                return item
            held.append(item)

    def _next_change(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def _wait_change(self, until: float | None) -> None:
        timeout = None if until is None else max(0.0, until - self._clock())
        await asyncio.wait([self._next_change()], timeout=timeout)

    # -- the model -----------------------------------------------------------------------------

    async def _engine_loaded(self) -> FallbackEngine:
        if self._engine is not None:
            return self._engine
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load_engine())
        try:
            return await asyncio.shield(self._loading)
        finally:
            if self._loading is not None and self._loading.done() and self._engine is None:
                self._loading = None  # a failed load is tried again by the next answer

    async def _load_engine(self) -> FallbackEngine:
        self._load_error = None
        self._log_event("fallback", f"loading the fallback model {self.choice.name}")
        self._on_change()
        try:
            engine = await asyncio.to_thread(self._load)
        except Exception as error:
            self._load_error = f"{type(error).__name__}: {error}"
            self._log_event("error", f"cannot load the fallback model {self.choice.name}: {self._load_error}")
            self._on_change()
            raise
        self._engine = engine
        self._log_event("fallback", f"fallback model {engine.info.name} loaded: "
                                    f"{_mb(engine.weight_bytes)} of weights")
        self._on_change()
        return engine

    async def _generate(self, engine: FallbackEngine, messages: Sequence[Mapping[str, str]],
                        params: SamplingParams, should_stop: Callable[[], bool]) -> AsyncIterator[Token]:
        """The fallback's answer, one token per job on the worker thread."""
        worker = self._worker
        prompt_ids = await worker.call(lambda: engine.chat_prompt(messages))
        engine.check_prompt(len(prompt_ids))  # PromptTooLong: this model's window is its own
        tokens = engine.generate(prompt_ids, params, should_stop)
        try:
            while True:
                token = await worker.call(lambda: next(tokens, None))
                if token is None:
                    return
                yield token
                if token.finish_reason is not None:
                    return
        finally:
            try:
                worker.submit(tokens.close)  # on the worker, after the step in progress
            except WorkerStopped:
                pass

    # -- status --------------------------------------------------------------------------------

    def status_view(self) -> dict[str, object]:
        """The ``fallback`` object of GET /v1/status (docs/api.md)."""
        choice = self.choice
        if not choice.enabled:
            state = "off"
        elif self._engine is not None:
            state = "loaded"
        elif self._loading is not None and not self._loading.done():
            state = "loading"
        elif self._load_error is not None:
            state = "failed"
        else:
            state = "standby"
        return {
            "model": choice.name,
            "path": str(choice.path) if choice.path is not None else None,
            "state": state,
            "serving": choice.enabled and self.policy.serving_fallback,
            "reserved_bytes": choice.reserved_bytes,
            "weight_bytes": self._engine.weight_bytes if self._engine is not None else 0,
            "mesh_trouble": self.policy.trouble,
            "note": choice.off_reason or self._load_error,
        }


_GAVE_UP = object()
_ENDED = object()


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel a pending `__anext__` of a mesh answer and let it finish (its generator closes
    the session on every stage)."""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: nobody else will
