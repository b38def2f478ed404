"""Rebuilding a session's KV caches on a new plan from what the stages kept, sans-IO.

When the plan changes under an answer, every stage of the new plan must hold the KV caches
of its layers for every position the answer has run so far. Most of them it already has:
a stage keeps its caches across re-plans for the layers it held before (`LayerStore`). What
it lacks it recomputes here, locally, so that the arithmetic and the tokens are exactly those
of an undisturbed run (design §8, "one numerics for every shape"):

- where the store's kernels are batch-invariant (`LayerStore.batch_invariant`: a position
  gets the same bits alone, in a chunk or in a batch), all the positions of a part in one
  pass, and the entry node plans few, large parts (`parts(..., invariant=True)`);
- elsewhere (f32 on transformers' kernels), in the original chunking: the prompt's chunk,
  then one position at a time (`steps`).

What it recomputes comes from:

- layers it gained *below* the ones it kept need the hidden states entering its first layer
  (boundary ``start_layer``): its upstream neighbour sends them, from its output log or from
  its own rebuild, or the entry node embeds them;
- layers it gained *above* the ones it kept need the hidden states entering the first gained
  layer, which this stage itself sent downstream before: its own output log.

Every stage keeps an output log per session (`OutputLogs`): the hidden states it sent
downstream, the input of the next stage's first layer. A rebuild streams through the chain
in parts (`parts`): each stage runs a part as soon as it arrives and passes its own output
on, so neighbours that took over adjacent lost layers rebuild at the same time. A stage that
cannot rebuild (its log is gone too: several nodes lost at once, or a log over the memory
cap) raises `RebuildError`; the entry node then sends a *whole* rebuild, in which every stage
that lacks a log recomputes all its layers from its upstream's output, streamed from the
embedding as before; only if that fails too does it replay the session step by step
(`Session.restart`: the original steps, or with invariant numerics steps of up to
`INVARIANT_PART_POSITIONS`). Nothing is ever wrong, only slower.

The torch side (`meshllm.model.runtime`) and the pure tests' toy model implement
`LayerStore`; everything else lives here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from meshllm.mesh.jobs import RebuildPart

PART_POSITIONS = 32
"""Decode positions a rebuild part carries (the first part carries the whole prompt)."""

INVARIANT_PART_POSITIONS = 512
"""Positions a rebuild part carries at most where the numerics are batch-invariant: each
stage runs such a part in one pass, so this bounds the memory of a pass (activations and
attention scores of this many rows). The first part still carries at least the whole prompt,
which its first step ran in one pass already."""

DEFAULT_LOG_CAP_BYTES = 256 * 1024 * 1024
"""Default memory cap of one node's output logs (every session together)."""


class RebuildError(Exception):
    """This stage cannot rebuild the session: an input it needs is gone."""


def parts(position: int, prefill: int, invariant: bool = False) -> list[tuple[int, int]]:
    """The parts `[start, end)` of a rebuild of positions `[0, position)` whose first step
    ran `prefill` positions: the prompt's chunk, then up to `PART_POSITIONS` at a time.

    With `invariant` (batch-invariant numerics), up to `INVARIANT_PART_POSITIONS` at a time,
    the first part holding at least the prompt's chunk: a stage whose kernels are not
    invariant after all can still run each part in the original steps (`steps`)."""
    if not 0 < prefill <= position:
        raise ValueError(f"a rebuild of {position} positions cannot start with a step of {prefill}")
    size = INVARIANT_PART_POSITIONS if invariant else PART_POSITIONS
    first = min(position, max(prefill, size)) if invariant else prefill
    out = [(0, first)]
    for start in range(first, position, size):
        out.append((start, min(start + size, position)))
    return out


def steps(start: int, end: int, prefill: int, invariant: bool = False) -> Iterator[tuple[int, int]]:
    """The steps that recompute positions `[start, end)`: with `invariant`, one; otherwise
    the original ones, the prompt's chunk and then single positions."""
    if invariant:
        yield (start, end)
        return
    if start == 0:
        if end < prefill:
            raise ValueError("a part must hold the prompt's whole chunk")
        yield (0, prefill)
        start = prefill
    for p in range(start, end):
        yield (p, p + 1)


class LayerStore(Protocol):
    """One node's span and the KV caches of its sessions, layer by layer.

    A store may also have a boolean `batch_invariant` (read with `getattr`, False when
    absent): True when `run_layers` gives every position the same bits whether it runs alone
    or among others, so a rebuild may run a whole part in one call."""

    @property
    def span(self) -> tuple[int, int]: ...

    def layer_lengths(self, session_id: str) -> list[int]:
        """Positions cached for each layer of the span (0 where there is no cache)."""
        ...

    def keep_layers(self, session_id: str, lo: int, hi: int, positions: int) -> None:
        """Keep the caches of span-local layers `[lo, hi)`, cut to `positions`; drop the rest."""
        ...

    def run_layers(self, session_id: str, x: np.ndarray, start_pos: int, lo: int, hi: int) -> np.ndarray:
        """Run span-local layers `[lo, hi)` on `x` `(positions, hidden)` at `start_pos`, as a
        normal step would (their caches must hold `start_pos` positions); their output."""
        ...

    def install_layer(self, session_id: str, layer: int, keys: np.ndarray, values: np.ndarray) -> bool:
        """Take up a handed-over cache of global `layer` if the span holds it and it is empty."""
        ...


# -- output logs --------------------------------------------------------------------------


@dataclass
class OutputLog:
    """The hidden states entering layer `boundary` at positions `[0, length)`, in steps."""

    boundary: int
    chunks: list[np.ndarray] = field(default_factory=list)
    length: int = 0
    nbytes: int = 0

    def append(self, start_pos: int, hidden: np.ndarray) -> bool:
        if start_pos != self.length:
            return False
        self.chunks.append(hidden)
        self.length += hidden.shape[0]
        self.nbytes += hidden.nbytes
        return True

    def slice(self, start: int, end: int) -> np.ndarray:
        """Rows `[start, end)` (the log must hold them)."""
        rows, pos = [], 0
        for chunk in self.chunks:
            lo, hi = max(start, pos), min(end, pos + chunk.shape[0])
            if lo < hi:
                rows.append(chunk[lo - pos:hi - pos])
            pos += chunk.shape[0]
            if pos >= end:
                break
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def truncate(self, positions: int) -> None:
        if positions >= self.length:
            return
        kept, pos = [], 0
        for chunk in self.chunks:
            if pos + chunk.shape[0] <= positions:
                kept.append(chunk)
            elif pos < positions:
                kept.append(chunk[: positions - pos].copy())
            pos += chunk.shape[0]
        self.chunks = kept
        self.length = positions
        self.nbytes = sum(c.nbytes for c in kept)


class OutputLogs:
    """Every session's output log on one node, under a memory cap.

    At the cap, the logs of the sessions written least recently go first; a session whose
    own log alone passes the cap keeps none until it starts again at position 0. A session
    without a log can still be rebuilt, by replaying it whole (see the module docstring).
    """

    def __init__(self, cap_bytes: int = DEFAULT_LOG_CAP_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self._logs: OrderedDict[str, OutputLog] = OrderedDict()
        self._over_cap: set[str] = set()
        self.nbytes = 0
        self.evicted = 0
        """Logs dropped at the cap so far."""

    def __len__(self) -> int:
        return len(self._logs)

    def get(self, session_id: str) -> OutputLog | None:
        return self._logs.get(session_id)

    def record(self, session_id: str, boundary: int, start_pos: int, hidden: np.ndarray) -> None:
        """A step's output entering layer `boundary`: append it to the session's log.

        A step at position 0 starts a new log. A step that does not follow the log (another
        boundary, a gap) ends it: a log with a hole would rebuild wrong caches."""
        log = self._logs.get(session_id)
        if start_pos == 0:
            self._over_cap.discard(session_id)
            self.drop(session_id)
            log = None
        if session_id in self._over_cap:
            return
        if log is None:
            if start_pos != 0:
                return
            log = self._logs[session_id] = OutputLog(boundary)
        if log.boundary != boundary or not log.append(start_pos, hidden):
            self.drop(session_id)
            return
        self._logs.move_to_end(session_id)
        self.nbytes += hidden.nbytes
        self._fit(session_id)

    def replace(self, session_id: str, log: OutputLog) -> None:
        """A rebuild made a new log for the session (its new boundary, every position)."""
        self.drop(session_id)
        self._over_cap.discard(session_id)
        self._logs[session_id] = log
        self.nbytes += log.nbytes
        self._fit(session_id)

    def truncate(self, session_id: str, positions: int) -> None:
        log = self._logs.get(session_id)
        if log is not None:
            self.nbytes -= log.nbytes
            log.truncate(positions)
            self.nbytes += log.nbytes

    def drop(self, session_id: str) -> None:
        log = self._logs.pop(session_id, None)
        if log is not None:
            self.nbytes -= log.nbytes

    def forget(self, session_id: str) -> None:
        """The session is over here."""
        self.drop(session_id)
        self._over_cap.discard(session_id)

    def _fit(self, session_id: str) -> None:
        while self.nbytes > self.cap_bytes and self._logs:
            victim = next(iter(self._logs))
            if victim == session_id and len(self._logs) == 1:
                self._over_cap.add(session_id)
            self.drop(victim)
            self.evicted += 1


# -- the rebuild of one session on one stage ----------------------------------------------


@dataclass(frozen=True)
class RebuildReport:
    """What a stage did for one session's rebuild (global layer spans, half-open)."""

    span: tuple[int, int]
    positions: int
    kept: tuple[int, int] | None
    """Layers whose caches this stage already held."""
    from_upstream: tuple[int, int] | None
    """Layers recomputed from the hidden states its upstream neighbour (or the embedding) sent."""
    from_log: tuple[int, int] | None
    """Layers recomputed from this stage's own output log."""
    passes: int = 0
    """Forward passes over recomputed layers so far (calls to `LayerStore.run_layers`): per
    part, one per recomputed range with batch-invariant numerics, one per original step
    otherwise."""

    @property
    def rebuilt_layers(self) -> int:
        return sum(r[1] - r[0] for r in (self.from_upstream, self.from_log) if r is not None)

    def describe(self) -> str:
        def fmt(r: tuple[int, int] | None) -> str:
            return f"[{r[0]}, {r[1]})" if r else "none"
        passes = f" in {self.passes} pass{'' if self.passes == 1 else 'es'}" if self.rebuilt_layers else ""
        return (f"kept {fmt(self.kept)}, rebuilt {fmt(self.from_upstream)} from upstream and "
                f"{fmt(self.from_log)} from its own log, over {self.positions} positions{passes}")


@dataclass
class _Rebuild:
    seq: int
    position: int
    prefill: int
    report: RebuildReport
    old_log: OutputLog | None
    new_log: OutputLog | None
    next_pos: int = 0
    passes: int = 0


class Rebuilder:
    """The rebuilds of the sessions on one stage, part by part (one worker thread)."""

    def __init__(self, store: LayerStore, logs: OutputLogs, num_layers: int,
                 offers: Callable[[str], list[tuple[int, np.ndarray, np.ndarray]]] | None = None) -> None:
        self.store = store
        self.logs = logs
        self.num_layers = num_layers
        self._offers = offers
        """Layer caches handed over for a session, (layer, keys, values): taken up into the
        layers it lacks when its rebuild begins."""
        self._active: dict[str, _Rebuild] = {}

    def forget(self, session_id: str) -> None:
        self._active.pop(session_id, None)

    def rebuilding(self, session_id: str) -> bool:
        """A rebuild of the session is under way here (its parts keep coming)."""
        return session_id in self._active

    def part(self, session_id: str, seq: int, position: int, prefill: int, start_pos: int,
             positions: int, x: np.ndarray | None, whole: bool = False) -> tuple[np.ndarray | None, RebuildReport]:
        """Make this stage's caches hold positions `[start_pos, start_pos + positions)` of
        the session; `x` is the hidden state entering the span's first layer there, or None
        when the upstream has none. Returns this stage's output for those positions (None
        when it has none) and what the rebuild does here. Raises `RebuildError`.

        With `whole`, a stage that could not give its output (its log is gone) recomputes every
        layer of its span from the upstream's output instead: starting from the embedding,
        which the entry node always sends, every stage then has an output to pass on, so such
        a rebuild cannot fail for want of a log."""
        end = start_pos + positions
        if x is not None and x.shape[0] != positions:
            raise ValueError(f"a part of {positions} positions came with {x.shape[0]} rows")
        state = self._active.get(session_id)
        if state is not None and seq < state.seq:
            raise RebuildError(f"part of an older rebuild of session {session_id}")
        if start_pos == 0:
            state = self._begin(session_id, seq, position, prefill, whole)
        elif state is None or state.seq != seq or state.next_pos != start_pos or end > state.position:
            self._active.pop(session_id, None)
            raise RebuildError(f"part [{start_pos}, {end}) of session {session_id} out of order")
        try:
            out = self._run(session_id, state, start_pos, end, x)
        except RebuildError:
            self._active.pop(session_id, None)
            raise
        state.next_pos = end
        report = replace(state.report, passes=state.passes)
        if end == state.position:
            self._active.pop(session_id, None)
            if state.new_log is not None:
                self.logs.replace(session_id, state.new_log)
            else:
                self.logs.drop(session_id)
        return out, report

    def _begin(self, session_id: str, seq: int, position: int, prefill: int, whole: bool) -> _Rebuild:
        a, b = self.store.span
        for layer, keys, values in self._offers(session_id) if self._offers is not None else ():
            self.store.install_layer(session_id, layer, keys, values)  # only into an empty layer
        lengths = self.store.layer_lengths(session_id)
        held = [i for i, n in enumerate(lengths) if n >= position]
        if held and held != list(range(held[0], held[-1] + 1)):
            held = []  # not one run of layers: rebuild the whole span
        log = self.logs.get(session_id)

        def logged(boundary: int) -> bool:
            return log is not None and log.boundary == boundary and log.length >= position

        if held and whole:
            top = a + held[-1] + 1  # what this stage can give downstream without its log
            if (top < b and not logged(top)) or (top == b < self.num_layers and not logged(b)):
                held = []  # recompute every layer from the upstream's output, for an output here
        lo, hi = (held[0], held[-1] + 1) if held else (0, 0)
        self.store.keep_layers(session_id, lo, hi, position)
        kept = (a + lo, a + hi) if held else None
        up = (a, a + lo) if held and lo > 0 else (None if held else (a, b))
        down = (a + hi, b) if held and a + hi < b else None
        old_log = None
        if down is not None:
            if not logged(down[0]):
                raise RebuildError(f"no output log at layer {down[0]} for session {session_id} "
                                   f"(needed to rebuild layers [{down[0]}, {down[1]}))")
            old_log = log
        elif logged(b):
            old_log = log  # its output did not change: passed on as it is
        if old_log is not None:
            self.logs.truncate(session_id, position)
        report = RebuildReport((a, b), position, kept, up, down)
        new_log = OutputLog(b) if b < self.num_layers else None
        state = _Rebuild(seq, position, prefill, report, old_log, new_log)
        self._active[session_id] = state
        return state

    def _run(self, session_id: str, state: _Rebuild, start: int, end: int,
             x: np.ndarray | None) -> np.ndarray | None:
        a, b = self.store.span
        report = state.report
        out: np.ndarray | None = None
        if report.from_upstream is not None:
            if x is None:
                raise RebuildError(f"no hidden states from upstream to rebuild layers "
                                   f"[{report.from_upstream[0]}, {report.from_upstream[1]}) of session {session_id}")
            lo, hi = report.from_upstream[0] - a, report.from_upstream[1] - a
            out = self._steps(session_id, state, x, start, end, lo, hi)
            if hi < b - a:
                out = None  # the output of a kept layer's input; this stage's output comes below
        if report.from_log is not None:
            assert state.old_log is not None
            lo, hi = report.from_log[0] - a, report.from_log[1] - a
            out = self._steps(session_id, state, state.old_log.slice(start, end), start, end, lo, hi)
        elif report.from_upstream is None or out is None:
            log = state.old_log
            out = log.slice(start, end) if log is not None and log.boundary == b else None
        if state.new_log is not None:
            if out is None:
                state.new_log = None  # this stage has no output to log for the session
            else:
                state.new_log.append(start, out)
        return out

    def run(self, job: "RebuildPart", x: np.ndarray | None) -> tuple[np.ndarray | None, RebuildReport | None, str | None]:
        """A `RebuildPart` job whose input `x` is embedded already (or came from upstream):
        (output, report, None), or (None, None, why) when this node cannot rebuild."""
        if not job.run_span:
            return x, None, None  # the entry node only embeds, for a first stage elsewhere
        try:
            out, report = self.part(job.session_id, job.seq, job.position, job.prefill, job.start_pos,
                                    job.positions, x, job.whole)
        except RebuildError as e:
            return None, None, str(e)
        return out, report, None

    def _steps(self, session_id: str, state: _Rebuild, x: np.ndarray, start: int, end: int,
               lo: int, hi: int) -> np.ndarray:
        """Span-local layers `[lo, hi)` over positions `[start, end)`: in one pass where the
        store is batch-invariant, in the original steps otherwise."""
        invariant = bool(getattr(self.store, "batch_invariant", False))
        cut = list(steps(start, end, state.prefill, invariant))
        state.passes += len(cut)
        outs = [self.store.run_layers(session_id, x[s - start:e - start], s, lo, hi) for s, e in cut]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)
