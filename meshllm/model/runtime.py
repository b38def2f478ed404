"""What a mesh node runs on its worker thread: the entry side (embed, head, sample) and one span.

Hidden states cross this boundary as numpy float32 arrays `(positions, hidden)`, the form
the wire's tensor codecs take, so nothing above this module handles torch tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from meshllm.mesh.jobs import Compute, Computed, ImportCache, Loaded, RebuildPart
from meshllm.mesh.rebuild import DEFAULT_LOG_CAP_BYTES, OutputLogs, Rebuilder
from meshllm.model.adapter import Adapter
from meshllm.model.cache import PreparedModel
from meshllm.model.draft import DraftModel
from meshllm.model.engine import Engine, shard_ms_per_layer
from meshllm.model.layer_shape import attention_shape
from meshllm.model.private import PrivateLayers, private_layers_for
from meshllm.model.sampling import Sampler
from meshllm.model.shard import open_shard
from meshllm.model.span import ShardLike

log = logging.getLogger(__name__)

MAX_PENDING_IMPORT_BYTES = 256 * 1024 * 1024
"""Handed-over layer caches held for a plan not loaded yet, at most (more are dropped: their
layers are then rebuilt from the logs, or the session replayed)."""


class Runtime:
    """The model side of one node: tokenizer and entry pieces always, layers of one span.

    Every method runs on the node's worker thread (torch work; `inference_mode` is entered
    by the worker).
    """

    def __init__(self, engine: Engine, log_cap_bytes: int = DEFAULT_LOG_CAP_BYTES, private_layers: int = 0) -> None:
        self.engine = engine
        self.prepared: PreparedModel = engine.prepared
        self.shard: ShardLike = engine.shards[0]
        self.hidden_size = engine.info.hidden_size
        self.num_layers = engine.info.num_layers
        k = private_layers_for(self.num_layers, private_layers)
        if k < private_layers:
            log.warning("a model of %d layers keeps %d private layers at each end, not %d (one must be left "
                        "for the mesh)", self.num_layers, k, private_layers)
        self.private: PrivateLayers | None = None if k == 0 else PrivateLayers(
            *(open_shard(self.prepared, lo, hi, weights=engine.weights, device=self.device, reuse=self.shard,
                         adapter=self.adapter) for lo, hi in ((0, k), (self.num_layers - k, self.num_layers))))
        """The first and last layers of this node's own answers (meshllm.model.private)."""
        self.plan_end = self.num_layers - k
        """One past the last layer a plan places: the last stage's output goes to the entry node."""
        self.logs = OutputLogs(log_cap_bytes)
        """What this node's span sent downstream, per session (meshllm.mesh.rebuild)."""
        self.draft: DraftModel | None = None
        """The draft model of this node's own answers (`--draft-model`, meshllm.model.draft)."""
        self._imports: list[tuple[str, int, np.ndarray, np.ndarray]] = []
        """Layer caches handed over to this node, taken up by the next rebuild of their session."""
        self.rebuilder = Rebuilder(self.shard, self.logs, self.plan_end, self._offers)
        self._given: tuple[tuple[str, int, np.ndarray, np.ndarray], ...] = ()
        """The caches of the layers this node gave up at its last re-plan: if the next plan
        gives them back (the node that took them is lost at once), they are taken up again."""
        """Layer caches handed over before this node loaded the plan that gives it the layer."""

    @classmethod
    def load(cls, prepared: PreparedModel, device: str = "cpu", weights: str = "f32",
             log_cap_bytes: int = DEFAULT_LOG_CAP_BYTES, adapter: Adapter | None = None,
             private_layers: int = 0) -> "Runtime":
        """Start holding no layers of a plan: only what an entry node needs (embedding, norm,
        head, and `private_layers` layers at each end: `private_layers_for`).
        `adapter`: a LoRA adapter the layers this node loads apply (see `set_adapter`)."""
        return cls(Engine(prepared, spans=[], device=device, weights=weights, adapter=adapter), log_cap_bytes,
                   private_layers)

    @property
    def mesh_model_id(self) -> str:
        """The model id peers must share to form one mesh with this node: the weights, format
        and adapter served (`ModelInfo.model_id`), and the private layers, which decide the
        layers a plan places."""
        k = self.private_layers
        return self.engine.info.model_id + (f"-private{k}" if k else "")

    @property
    def private_layers(self) -> int:
        """K: the layers at each end this node runs for its own answers only."""
        return 0 if self.private is None else self.private.count

    @property
    def adapter(self) -> Adapter | None:
        return self.engine.adapter

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Serve `adapter` (None: the base model) from the next step on: the layers held now
        apply it at once, and so does every span loaded later; `engine.info.model_id` changes
        with it. Raises AdapterError (and changes nothing) when it does not fit the model.

        KV caches and output logs of sessions in flight were computed with the previous
        adapter: switch between answers, or replay them."""
        self.engine.set_adapter(adapter)  # checks it first
        if all(self.shard is not s for s in self.engine.shards):
            self.shard.set_adapter(adapter)
        if self.private is not None:
            self.private.set_adapter(adapter)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim) of the model's keys and values."""
        shape = attention_shape(self.shard.config)
        return shape.kv_heads, shape.head_dim

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def batch_invariant(self) -> bool:
        """Whether this node's kernels give a position the same bits alone, in a chunk or in
        a batch (the weight format's; `LeanShard.batch_invariant`). Then a rebuild runs each
        part in one pass and an entry node plans large parts (`MeshSettings.batch_invariant`);
        otherwise both keep the original chunking (meshllm.mesh.rebuild)."""
        return self.shard.batch_invariant

    @property
    def can_draft(self) -> bool:
        """Whether this node's answers may carry drafts (meshllm.mesh.speculate): the drafts
        that fall must be cut off the caches again, which every lean shard can do and
        transformers' sliding-window layers cannot."""
        config = self.shard.config
        return self.batch_invariant or not (getattr(config, "sliding_window", None)
                                            and getattr(config, "use_sliding_window", True))

    @property
    def span(self) -> tuple[int, int]:
        return (self.shard.start_layer, self.shard.end_layer)

    def load_span(self, start_layer: int, end_layer: int) -> Loaded:
        """Hold layers [start_layer, end_layer) from now on. The KV caches of the layers this
        node held already are kept (a rebuild recomputes the rest), and so are the output logs;
        the caches of the layers it gives up are returned, for their new owners."""
        if (start_layer, end_layer) == self.span:
            return Loaded()
        t0 = time.perf_counter()
        old = self.shard
        given = [kv for lo, hi in ((old.start_layer, min(old.end_layer, start_layer)),
                                   (max(old.start_layer, end_layer), old.end_layer)) if lo < hi
                 for kv in old.export_layers(lo, hi)]
        shard = open_shard(self.prepared, start_layer, end_layer, weights=self.engine.weights, device=self.device,
                           reuse=old, adapter=self.adapter)
        if start_layer == end_layer:
            self.logs = OutputLogs(self.logs.cap_bytes)  # out of the plan: nothing to keep
        else:
            shard.adopt_sessions(old)
        self.shard = shard
        self.rebuilder = Rebuilder(shard, self.logs, self.plan_end, self._offers)
        installed = len(self._imports)
        # caches given up now, and those given up before whose layers this span holds again
        self._given = tuple(given) + tuple(kv for kv in self._given if start_layer <= kv[1] < end_layer)
        log.info("loaded layers [%d, %d) in %.0f ms (kept the caches of %d sessions, took over %d layer caches, "
                 "handing over %d)", start_layer, end_layer, (time.perf_counter() - t0) * 1000,
                 len(shard.session_ids), installed, len(given))
        return Loaded(tuple(given))

    def import_cache(self, job: ImportCache) -> None:
        """Keys and values of a layer handed over by its previous owner: the next rebuild of
        the session here takes them up for a layer it lacks (so a hand-over never lands
        between the steps of an answer)."""
        held = sum(k.nbytes + v.nbytes for _s, _l, k, v in self._imports)
        if held + job.keys.nbytes + job.values.nbytes <= MAX_PENDING_IMPORT_BYTES:
            self._imports.append((job.session_id, job.layer, job.keys, job.values))

    def _offers(self, session_id: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """What a rebuild of the session may take up: caches handed over to this node, then
        those it gave up at its last re-plan (if the layers came back)."""
        mine = [(layer, k, v) for sid, layer, k, v in (*self._imports, *self._given) if sid == session_id]
        self._imports = [kv for kv in self._imports if kv[0] != session_id]
        return mine

    def compute(self, job: Compute, sampler: Sampler | None = None, delay_s: float = 0.0) -> Computed:
        """One mesh job: embed or take the hidden state, run the span, then hand the hidden
        state on, or sample with the head (`sampler`), or drop it (meshllm.mesh.jobs).

        `delay_s` is the testing aid of a slow device: a sleep before the layers, counted in
        their time."""
        if job.token_ids is not None:
            x = self.shard.embed(list(job.token_ids))  # (1, positions, hidden)
            if self.private is not None:
                x = self.private.into(job.session_id, x, job.start_pos)
        else:
            assert job.hidden is not None
            x = torch.from_numpy(job.hidden).unsqueeze(0)
        span_ms = 0.0
        if job.run_span:
            t0 = time.perf_counter()
            if delay_s:
                time.sleep(delay_s)
            self._rewind(job)
            x = self.shard.forward(job.session_id, x, job.start_pos)
            span_ms = (time.perf_counter() - t0) * 1000
        if job.finish != "send" and self.private is not None:
            x = self.private.out_of(job.session_id, x, job.start_pos)  # the plan's output, for the head
        if job.finish == "sample":
            if sampler is None:
                raise RuntimeError(f"no sampler for session {job.session_id}: the answer is over")
            if job.drafts:
                tokens = sampler.verify(self.shard.logits_all(x[:, -(len(job.drafts) + 1):, :]), job.drafts)
            else:
                tokens = [sampler.sample(self.shard.head(x))]
            return self._sampled(job, tokens, span_ms)
        if job.finish == "discard":
            return Computed(span_ms=span_ms)
        return Computed(hidden=self._sent(job, x), span_ms=span_ms)

    def compute_batch(self, jobs: Sequence[Compute], samplers: Mapping[str, Sampler],
                      delay_s: float = 0.0) -> list[Computed | Exception]:
        """Several sessions' steps (meshllm.mesh.batching): each job's outcome, in order, as
        `compute` gives it, or the error it raises.

        With batch-invariant kernels the steps run as one: one embedding lookup each, then
        the private layers, the span, the private layers again and the head each see every
        step's rows at once (each weight is read once per run, not once per session); each
        position gets the bits it gets alone. A step that cannot run as it stands (its caches
        are out of step, its answer is over) runs alone, for its own error. Otherwise (f32:
        transformers' GEMMs change their blocking with the shape) the steps run one by one."""
        together = [j for j in jobs if self._fits(j, samplers)] if self.batch_invariant and len(jobs) > 1 else []
        outcomes: dict[int, Computed | Exception] = {}
        if len(together) > 1:
            try:
                outcomes.update(zip((j.job_id for j in together), self._batched(together, samplers, delay_s)))
            except Exception:  # noqa: BLE001 - each step alone then, for its own outcome
                log.debug("a batch of %d steps failed; running them one by one", len(together), exc_info=True)
        for job in jobs:
            if job.job_id not in outcomes:
                try:
                    outcomes[job.job_id] = self.compute(job, samplers.get(job.session_id), delay_s)
                except Exception as error:  # noqa: BLE001 - the step's own outcome
                    outcomes[job.job_id] = error
        return [outcomes[j.job_id] for j in jobs]

    def _fits(self, job: Compute, samplers: Mapping[str, Sampler]) -> bool:
        """Whether the step can run in a batch: its caches hold what it continues (a step
        sent again may rewind the private layers' caches, `meshllm.model.private`)."""
        def holds(shard: ShardLike) -> bool:  # what the step continues, perhaps more (it rewinds)
            return job.start_pos == 0 or 0 <= job.start_pos <= shard.cache_length(job.session_id)

        if job.finish == "sample" and job.session_id not in samplers:
            return False
        if job.run_span and not holds(self.shard):
            return False
        if self.private is not None:
            if job.token_ids is not None and not holds(self.private.head_end):
                return False
            if job.finish != "send" and not holds(self.private.tail_end):
                return False
        return True

    def _rewind(self, job: Compute) -> None:
        """A step that starts before the end of the session's caches here: the positions after
        its start were drafted and not accepted (speculative decoding), or the step is sent
        again after a loss. They are cut off, in the caches and the output log, and computed
        anew (the same bits, for a step sent again)."""
        if 0 < job.start_pos < self.shard.cache_length(job.session_id):
            self.shard.keep_layers(job.session_id, 0, self.shard.num_span_layers, job.start_pos)
            self.logs.truncate(job.session_id, job.start_pos)

    def _batched(self, jobs: Sequence[Compute], samplers: Mapping[str, Sampler], delay_s: float) -> list[Computed]:
        """`compute` for every job, as one forward at each stage of the node's work."""
        xs = [self.shard.embed(list(j.token_ids)) if j.token_ids is not None
              else torch.from_numpy(j.hidden).unsqueeze(0) for j in jobs]  # type: ignore[arg-type]

        def through(run: object, which: list[int]) -> None:
            if which:
                outs = run([(jobs[i].session_id, xs[i], jobs[i].start_pos) for i in which])  # type: ignore[operator]
                for i, out in zip(which, outs):
                    xs[i] = out

        private = self.private
        if private is not None:
            through(private.into_batch, [i for i, j in enumerate(jobs) if j.token_ids is not None])
        span = [i for i, j in enumerate(jobs) if j.run_span]
        span_ms = 0.0
        if span:
            t0 = time.perf_counter()
            if delay_s:
                time.sleep(delay_s)
            for i in span:
                self._rewind(jobs[i])
            through(self.shard.forward_batch, span)
            span_ms = (time.perf_counter() - t0) * 1000
        if private is not None:
            through(private.out_of_batch, [i for i, j in enumerate(jobs) if j.finish != "send"])
        sampled = [i for i, j in enumerate(jobs) if j.finish == "sample"]
        rows = [len(jobs[i].drafts) + 1 for i in sampled]  # the last position, and the drafts'
        logits = dict(zip(sampled, self.shard.logits_all(torch.cat(
            [xs[i][:, -n:, :] for i, n in zip(sampled, rows)], dim=1)).split(rows))) if sampled else {}
        span_positions = sum(jobs[i].positions for i in span) or 1
        results = []
        for i, job in enumerate(jobs):
            ms = span_ms * job.positions / span_positions if job.run_span else 0.0
            if job.finish == "sample":
                sampler = samplers[job.session_id]
                tokens = sampler.verify(logits[i], job.drafts) if job.drafts else [sampler.sample(logits[i][0])]
                results.append(self._sampled(job, tokens, ms))
            elif job.finish == "discard":
                results.append(Computed(span_ms=ms))
            else:
                results.append(Computed(hidden=self._sent(job, xs[i]), span_ms=ms))
        return results

    def _sampled(self, job: Compute, tokens: list[int], span_ms: float) -> Computed:
        """A sampling step's outcome, with the draft model's proposal for the next step."""
        offered: tuple[int, ...] = ()
        if job.draft_k > 0 and self.draft is not None:
            offered = tuple(self.draft.propose(job.session_id, (*job.draft_context, *tokens), job.draft_k))
        return Computed(token_id=tokens[0], token_ids=tuple(tokens) if job.drafts else (), span_ms=span_ms,
                        offered=offered)

    def _sent(self, job: Compute, x: torch.Tensor) -> np.ndarray:
        """The step's output for the next stage, logged where a rebuild may need it."""
        out = x[0].float().cpu().numpy().copy()
        if job.run_span and self.shard.end_layer < self.plan_end:
            self.logs.record(job.session_id, self.shard.end_layer, job.start_pos, out)
        return out

    def rebuild_part(self, job: RebuildPart) -> Computed:
        """One part of a session's rebuild on a new plan (meshllm.mesh.rebuild)."""
        t0 = time.perf_counter()
        x = job.hidden
        if job.token_ids is not None:
            x = self.shard.embed(list(job.token_ids))[0].float().cpu().numpy()
            if self.private is not None:
                x = self.private.rebuild_input(job.session_id, x, job.start_pos, job.position, job.prefill)
        out, report, error = self.rebuilder.run(job, x)
        return Computed(hidden=out, span_ms=(time.perf_counter() - t0) * 1000, rebuild=report, rebuild_error=error)

    def drop(self, session_id: str) -> None:
        self.shard.drop(session_id)
        if self.private is not None:
            self.private.drop(session_id)
        self._given = tuple(kv for kv in self._given if kv[0] != session_id)
        self._imports = [kv for kv in self._imports if kv[0] != session_id]
        self.logs.forget(session_id)
        self.rebuilder.forget(session_id)
        if self.draft is not None:
            self.draft.drop(session_id)

    def measure_ms_per_layer(self, layers: int = 2, steps: int = 8) -> float:
        """ms per decoder layer per token, measured on a throwaway shard of a few layers."""
        n = min(layers, self.engine.info.num_layers)
        return shard_ms_per_layer(open_shard(self.prepared, 0, n, weights=self.engine.weights,
                                             device=self.device, adapter=self.adapter), steps)
