"""Federated fine-tuning on this node (docs/fine-tuning.md): the I/O shell of
`meshllm.tune.rounds.TuneCore`.

- The core decides the rounds; the driver carries its messages with the mesh's own, and this
  module runs its `Train` jobs: a full local copy of the model with a LoRA adapter
  (`meshllm.tune.train.LocalTrainer`), one optimizer step per worker call, so answers in
  progress interleave with training.
- A local job (``POST /v1/tune``, ``meshllm tune``) brings this node's examples. They are
  tokenized here and never leave the node: only the adapter's deltas do.
- A member that took part in a finished job, or runs with ``--accept-adapters``, saves its
  adapter under the state directory (folders 0700, files 0600), in the peft format, and serves
  it from then on (`Runtime.set_adapter`; the model id gains its digest); then it announces
  its new hello to its peers, and the core closes the links to peers that serve another model
  id (`meshllm.tune.serving`). The others keep serving what they served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshllm import wire
from meshllm.model.adapter import Adapter, AdapterSpec, init_adapter, save_adapter
from meshllm.tune.rounds import (
    JobRequest, Train, TuneCore, TuneError, TuneFailed, TuneFinished, TuneProgress, TuneSettings,
)

from daemon.answer import WorkerStopped
from daemon.tasks import TaskSet
from daemon.tune_request import TuneRequest
from daemon.node.worker import GenerationWorker

if TYPE_CHECKING:
    from meshllm.mesh.events import Send
    from meshllm.model.runtime import Runtime
    from meshllm.tune.data import Example
    from meshllm.tune.train import LocalTrainer

log = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
LAST_ADAPTER_FILE = "last"
"""In the adapters folder: the digest of the last finished job's adapter (``--adapter last``)."""


def adapters_dir(state_dir: Path) -> Path:
    return state_dir / ADAPTERS_DIR


def save_final(state_dir: Path, adapter: Adapter, base_model: str) -> Path:
    """Save a finished job's adapter as ``adapters/<digest>/`` and record it as the last one.
    Only this user can read them: the folders are 0700 and the files 0600, whatever the umask
    (`save_adapter` writes each file through ``mkstemp``, which makes it 0600)."""
    folder = adapters_dir(state_dir) / adapter.digest
    for path in (adapters_dir(state_dir), folder):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    save_adapter(adapter, folder, base_model=base_model)
    last = adapters_dir(state_dir) / LAST_ADAPTER_FILE
    tmp = last.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(adapter.digest + "\n")
    tmp.replace(last)
    return folder


def last_adapter(state_dir: Path) -> Path | None:
    """The folder of the last finished job's adapter on this node, if any."""
    try:
        digest = (adapters_dir(state_dir) / LAST_ADAPTER_FILE).read_text().strip()
    except OSError:
        return None
    folder = adapters_dir(state_dir) / digest
    return folder if digest and folder.is_dir() else None


@dataclass
class _LocalJob:
    """This node's own participation: its examples and what its client is waiting for."""

    examples: list["Example"]
    queue: asyncio.Queue[dict[str, Any]]
    base_loss: float
    started: float
    job_id: str | None = None


class TuneRunner:
    """Runs the tune core's jobs on the worker and feeds the results back."""

    def __init__(self, node_id: str, runtime: "Runtime", worker: GenerationWorker, *,
                 state_dir: Path | None, settings: TuneSettings = TuneSettings(),
                 pump: Callable[[], None] = lambda: None,
                 log_event: Callable[[str, str], None] = lambda kind, message: None,
                 adapter_finished: Callable[[Adapter], Any] | None = None,
                 hello: Callable[[], wire.Hello] | None = None) -> None:
        """`adapter_finished`: serve this adapter from now on (the driver's `serve_adapter`).
        `hello`: this node's hello now (its model id); without it the node neither announces
        what it serves nor hears its peers' announcements."""
        self.node_id = node_id
        self.runtime = runtime
        self.worker = worker
        self.state_dir = state_dir
        self._pump = pump
        self._log_event = log_event
        self._adapter_finished = adapter_finished
        self._hello = hello
        config = runtime.shard.config
        self.core = TuneCore(node_id, lambda rank, alpha, seed: dict(
            init_adapter(config, AdapterSpec(rank, alpha), seed).tensors), settings)
        self._tasks = TaskSet("tune")
        self._trainer: "LocalTrainer | None" = None
        self._local: _LocalJob | None = None
        self.saved: dict[str, Path] = {}
        """Adapters this node saved, by job id."""
        self.adapters: dict[str, str] = {}
        """The digest (as in the model id) of each finished job's adapter, by job id."""

    def close(self) -> None:
        self._tasks.cancel()

    # -- the core, as the mesh driver drives it -------------------------------------------------

    def next_timer(self) -> float | None:
        return self.core.next_timer()

    def handle_timer(self, now: float) -> None:
        self.core.handle_timer(now)

    def receive(self, sender: str, msg: "wire.Message", now: float) -> None:
        """A tune message from a peer (`meshllm.tune.rounds.TUNE_MESSAGES`); a ``Hello`` is
        the peer announcing the model id it serves now."""
        if isinstance(msg, wire.Hello):
            if self._hello is not None:
                self.core.announced(sender, msg, self._hello())
            return
        self.core.receive(sender, msg, now)

    def membership(self, coordinator_id: str | None, members: frozenset[str], now: float) -> None:
        """The mesh's coordinator and the other members, whenever they change."""
        self.core.membership(coordinator_id, members, now)

    def sends(self) -> list[Send]:
        """The core's messages to peers (the driver carries them with the mesh's own)."""
        return self.core.sends()

    def drain(self) -> list[object]:
        """Run the core's new jobs and act on its events; the events (the driver logs them)."""
        events = self.core.events()
        self._handle(self.core.jobs(), events)
        return events

    # -- the core's output -------------------------------------------------------------------

    def _handle(self, jobs: Sequence[Train], events: Sequence[object]) -> None:
        for job in jobs:
            self._tasks.spawn(self._train(job), name=f"tune-train-{job.round}")
        for event in events:
            if isinstance(event, TuneProgress):
                self._progress(event)
            elif isinstance(event, TuneFinished):
                self._tasks.spawn(self._finished(event), name="tune-finished")
            elif isinstance(event, TuneFailed):
                self._failed(event.reason)

    def _progress(self, event: TuneProgress) -> None:
        local = self._local
        if local is None:
            return
        local.job_id = event.job_id
        local.queue.put_nowait({"type": "progress", "job_id": event.job_id, "state": event.state,
                                "round": event.round, "rounds": event.rounds, "peers": event.peers,
                                "loss": event.loss, "message": event.message,
                                "elapsed_s": round(time.monotonic() - local.started, 3)})

    def _failed(self, reason: str) -> None:
        local, self._local = self._local, None
        if local is not None:
            local.queue.put_nowait({"type": "error", "message": reason})
        self._drop_trainer()

    # -- training ----------------------------------------------------------------------------

    async def _train(self, job: Train) -> None:
        local = self._local
        try:
            if local is None:
                raise TuneError("this node has no examples for the job (its local job ended)")
            trainer = await self._trainer_for(AdapterSpec(job.rank, job.alpha))
            await self.worker.call(lambda: trainer.set_adapter(job.tensors))
            losses = []
            for _ in range(job.steps):  # one step a call: answers in progress interleave
                losses.append(await self.worker.call(lambda: trainer.train(local.examples, 1)))
            tensors = await self.worker.call(trainer.adapter_tensors)
        except WorkerStopped:
            return
        except Exception as error:  # noqa: BLE001 - a failed round is reported, the node goes on
            log.info("training round %d failed", job.round, exc_info=True)
            self.core.train_failed(job.job_id, job.round, f"{type(error).__name__}: {error}", time.monotonic())
            self._pump()
            return
        self.core.trained(job.job_id, job.round, tensors, float(np.mean(losses)) if losses else math.nan,
                          time.monotonic())
        self._pump()

    async def _trainer_for(self, spec: AdapterSpec) -> "LocalTrainer":
        from meshllm.tune.train import LocalTrainer

        trainer = self._trainer
        if trainer is None or trainer.spec != spec:
            engine = self.runtime.engine
            self._trainer = trainer = await self.worker.call(
                lambda: LocalTrainer(engine.prepared, engine.weights, spec, device=engine.device))
        return trainer

    def _drop_trainer(self) -> None:
        self._trainer = None  # its full model copy goes with it

    # -- a finished job ------------------------------------------------------------------------

    async def _finished(self, event: TuneFinished) -> None:
        adapter = Adapter(AdapterSpec(event.rank, event.alpha), dict(event.tensors))
        self.adapters[event.job_id] = adapter.digest
        if not event.serve:
            self._log_event("info", f"tune job {event.job_id} finished with adapter {adapter.digest}: not served "
                                    "here (this node took no part in the job; --accept-adapters serves them)")
            return
        try:
            path = await self._take_up(event, adapter)
        finally:
            if self._hello is not None:  # announce what this node serves now, even if loading failed
                self.core.served(self._hello())
                self._pump()
        if path is not None:
            self.saved[event.job_id] = path
        local = self._local
        if local is None or local.job_id not in (None, event.job_id):
            return
        self._local = None
        trainer = self._trainer
        final_loss: float | None = None
        try:
            if trainer is not None:
                await self.worker.call(lambda: trainer.set_adapter(adapter.tensors))
                final_loss = await self.worker.call(lambda: trainer.loss(local.examples))
        except WorkerStopped:
            return
        finally:
            self._drop_trainer()
        local.queue.put_nowait({"type": "done", "job_id": event.job_id, "rounds": event.rounds,
                                "participants": len(event.participants), "digest": adapter.digest,
                                "adapter": str(path) if path else None, "base_loss": local.base_loss,
                                "loss": final_loss})

    async def _take_up(self, event: TuneFinished, adapter: Adapter) -> Path | None:
        """Save the adapter (when the node has a state dir) and serve it; where it was saved."""
        job_id = event.job_id
        path: Path | None = None
        if self.state_dir is not None:
            state_dir, name = self.state_dir, self.runtime.engine.info.name
            try:
                path = await asyncio.to_thread(save_final, state_dir, adapter, name)
            except OSError as error:
                self._log_event("error", f"cannot save the adapter of tune job {job_id}: {error}")
        self._log_event("info", f"tune job {job_id} finished after {event.rounds} rounds with "
                                f"{len(event.participants)} participants: adapter {adapter.digest}"
                                + (f" saved at {path}" if path else ""))
        if self._adapter_finished is not None:
            try:
                await self._adapter_finished(adapter)
            except Exception as error:  # noqa: BLE001 - serving goes on with the old weights
                self._log_event("error", f"cannot serve the adapter {adapter.digest}: {error}")
        return path

    # -- a local job -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._local is not None

    async def run(self, request: TuneRequest, chats: list[list[dict[str, str]]]) -> AsyncIterator[dict[str, Any]]:
        """Join (or start) a job with this node's examples; yield its progress until it ends.

        Raises TuneError (or DataError) before the first item when the job cannot start."""
        from meshllm.tune.data import tokenize_chats

        if self._local is not None:
            raise TuneError("this node already takes part in a tune job; wait for it to end")
        tokenizer = self.runtime.engine.tokenizer
        examples = await self.worker.call(lambda: tokenize_chats(tokenizer, chats))
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        local = self._local = _LocalJob(examples, queue, base_loss=math.nan, started=time.monotonic())
        try:
            yield {"type": "progress", "state": "loading", "round": 0, "rounds": request.rounds, "peers": 0,
                   "loss": None, "message": f"{len(examples)} examples; loading the training copy of the model"}
            trainer = await self._trainer_for(AdapterSpec(request.rank, request.alpha))
            local.base_loss = await self.worker.call(lambda: trainer.loss(examples, base=True))
            yield {"type": "base", "loss": local.base_loss, "examples": len(examples)}
            self.core.join(JobRequest(request.rounds, request.rank, request.alpha, request.steps,
                                      request.aggregate, len(examples)), time.monotonic())
            self._pump()
            while True:
                item = await queue.get()
                yield item
                if item["type"] in ("done", "error"):
                    return
        finally:
            if self._local is local:  # the client left, or the job could not start
                self._local = None
                self._drop_trainer()
                try:
                    self.core.quit(time.monotonic())
                except TuneError:
                    pass
                self._pump()

    def status_view(self) -> dict[str, object]:
        view = dict(self.core.status_view())
        last = view.get("last_finished")
        if isinstance(last, dict) and last.get("job_id") in self.adapters:
            view["last_finished"] = {**last, "adapter": self.adapters[last["job_id"]]}
        view["saved"] = {job: str(path) for job, path in sorted(self.saved.items())}
        return view
