"""Combining the participants' adapter updates of one round, and refusing bad ones.

An update is a participant's delta: its trained adapter minus the round's global adapter, one
float32 array per adapter tensor name. :func:`check_update` refuses what must not be averaged
(a missing or extra tensor, a wrong shape or dtype, NaN/inf, a norm past the absolute bound,
an example count outside ``[1, 10,000]``); :func:`aggregate` combines what is left.

Robust by default: before any method combines them, the round's updates are **clipped
relative to the round's median** (:func:`clip_updates`). With ``m`` the lower median of the
update norms (for an even count, the smaller of the two middle ones), an update longer than
``clip * m`` is scaled down to that length; with ``w`` the lower median of the example
counts, a count above ``clip * w`` weighs as ``clip * w``. ``clip`` is 3: the honest updates of one
round are trained with the same steps and learning rate, so their sizes are alike, and a
participant that lies (a huge update, a huge count) counts at most as three typical ones. The combined delta itself is never longer than the
longest clipped update, so a round moves the adapter by at most the absolute bound.

- ``mean`` (the default): FedAvg on the clipped updates, the mean weighted by each (capped)
  example count. With every update within ``clip`` times the median (norms and counts) it is
  exactly FedAvg;
- ``median``: the coordinate-wise median (unweighted): one outlier, however large, cannot move
  it past the others' values;
- ``trimmed``: the coordinate-wise trimmed mean (unweighted): drop the ``floor(trim * n)``
  lowest and highest values of each coordinate, average the rest. With fewer than three
  updates nothing is dropped (it is the unweighted mean).

The absolute bound (:func:`adamw_norm_bound`) follows from the trainer: AdamW moves each
parameter by at most a known multiple of its learning rate a step, whatever the gradients,
so an honest update of ``steps`` steps over ``P`` parameters is never longer than
``lr * sum_t B(t) * sqrt(P)``. For the default job (rank 8 on the default model, 10 steps)
that is about 8.3.

Pure numpy; sums run in float64 over updates sorted by node id, so the result does not depend
on the order the updates came in. The result is float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.tune.data import MAX_EXAMPLES

AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed")
CLIP = 3.0
"""An update counts at most as ``CLIP`` times the round's median one (norm and example count)."""
TRAIN_LR = 5e-4
"""The trainer's AdamW learning rate (`meshllm.tune.train.LocalTrainer`): the absolute bound
of an update follows from it."""
TRAIN_BETAS = (0.9, 0.999)
"""The trainer's AdamW betas (torch's defaults; weight decay 0)."""
NORM_MARGIN = 1.05
"""Slack on the AdamW bound for float32 rounding."""


@dataclass(frozen=True)
class Update:
    """A participant's delta (its local adapter minus the global), and its example count."""

    node_id: str
    examples: int
    tensors: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Bounds:
    """What an acceptable update stays within, and how the round's updates are clipped."""

    max_norm: float | None = None
    """L2 norm of the whole update (all its tensors together); None: `adamw_norm_bound` of
    the job's steps and the adapter's size."""
    max_examples: int = MAX_EXAMPLES
    """A participant's example count, at most (the data limit of `meshllm.tune.data`)."""
    clip: float | None = CLIP
    """Updates are clipped to ``clip`` times the round's median (see the module docstring);
    None: not clipped (plain FedAvg, median or trimmed mean)."""

    def __post_init__(self) -> None:
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"max_norm must be above 0, got {self.max_norm}")
        if not 1 <= self.max_examples <= MAX_EXAMPLES:
            raise ValueError(f"max_examples must be in [1, {MAX_EXAMPLES}], got {self.max_examples}")
        if self.clip is not None and not (1.0 <= self.clip < math.inf):
            raise ValueError(f"clip must be at least 1 and finite, got {self.clip}")

    def norm_limit(self, steps: int, parameters: int) -> float:
        """The largest norm an update of a job of ``steps`` steps may have."""
        return self.max_norm if self.max_norm is not None else adamw_norm_bound(steps, parameters)


def adamw_step_sum(steps: int, betas: tuple[float, float] = TRAIN_BETAS) -> float:
    """``sum_{t=1..steps} B(t)``: the most AdamW (no weight decay) can move one parameter in
    ``steps`` steps from a fresh optimizer, in learning rates.

    ``B(t) = (1-b1)/sqrt(1-b2) * sqrt(sum_{k<t} (b1^2/b2)^k) * sqrt(1-b2^t)/(1-b1^t)`` bounds
    ``|m_hat / sqrt(v_hat)|`` at step t for any gradients (Cauchy-Schwarz on the two moving
    averages); it is 1 at t = 1 and rises to 7.27 for (0.9, 0.999)."""
    if steps <= 0:
        return 0.0
    b1, b2 = betas
    ratio = b1 * b1 / b2
    head = min(steps, 20_000)
    t = np.arange(1, head + 1, dtype=np.float64)
    scale = (1 - b1) / math.sqrt(1 - b2)
    bound = scale * np.sqrt((1 - ratio ** t) / (1 - ratio)) * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    tail = (steps - head) * scale / math.sqrt(1 - ratio)  # past 20,000 steps: the supremum
    return float(bound.sum()) + tail


def adamw_norm_bound(steps: int, parameters: int, lr: float = TRAIN_LR) -> float:
    """The longest update an honest participant can send: ``steps`` AdamW steps of learning
    rate ``lr`` on ``parameters`` parameters (with `NORM_MARGIN`)."""
    return NORM_MARGIN * lr * adamw_step_sum(steps) * math.sqrt(max(parameters, 0))


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def update_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all the tensors together, in float64, by sorted name."""
    return math.sqrt(sum(float(np.square(np.asarray(tensors[n]), dtype=np.float64).sum()) for n in sorted(tensors)))


def check_update(update: Update, expected: Mapping[str, tuple[int, ...]], bounds: Bounds,
                 steps: int = 0) -> str | None:
    """None when ``update`` may be aggregated; else why not, in a few words. ``steps``: the
    job's steps a round (for the AdamW bound when ``bounds.max_norm`` is None)."""
    examples = update.examples
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)):
        return f"examples is {type(examples).__name__}, not an integer"
    if not 1 <= examples <= bounds.max_examples:
        return f"examples {examples} is outside [1, {bounds.max_examples}]"
    names = set(update.tensors)
    missing = sorted(set(expected) - names)
    if missing:
        return f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(names - set(expected))
    if extra:
        return f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    squares = 0.0
    for name in sorted(expected):
        arr = update.tensors[name]
        if not isinstance(arr, np.ndarray):
            return f"{name}: {type(arr).__name__}, not an array"
        if arr.dtype != np.float32:
            return f"{name}: dtype {arr.dtype}, expected float32"
        if tuple(arr.shape) != tuple(expected[name]):
            return f"{name}: shape {tuple(arr.shape)}, expected {tuple(expected[name])}"
        if not np.isfinite(arr).all():
            return f"{name}: non-finite values"
        squares += float(np.square(arr, dtype=np.float64).sum())
    norm = math.sqrt(squares)
    limit = bounds.norm_limit(steps, parameter_count(expected))
    if not norm <= limit:
        return f"norm {norm:.3g} > {limit:.4g}"
    return None


def lower_median(values: Sequence[float]) -> float:
    """The middle value; for an even count the smaller of the two middle ones (so that with
    two values the larger is measured against the smaller)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class Clipped:
    """The round's updates after clipping, with the weight each counts for."""

    updates: tuple[Update, ...]
    """Sorted by node id; an update longer than ``norm_limit`` scaled down to it."""
    weights: dict[str, float]
    """Each node's example count, capped at ``clip`` times the median count."""
    norm_limit: float
    """The longest a clipped update may be: ``clip`` times the median norm."""
    longest: float
    """The norm of the longest clipped update: the combined delta is never longer."""
    clipped: tuple[str, ...]
    """The nodes whose update or count was cut down (for the log)."""


def clip_updates(updates: Sequence[Update], clip: float | None) -> Clipped:
    """Clip ``updates`` relative to their lower-median norm and example count (see the module
    docstring); ``clip`` None: unchanged."""
    ordered = tuple(sorted(updates, key=lambda u: u.node_id))
    norms = {u.node_id: update_norm(u.tensors) for u in ordered}
    counts = {u.node_id: float(u.examples) for u in ordered}
    if clip is None or not ordered:
        longest = max(norms.values(), default=0.0)
        return Clipped(ordered, counts, longest, longest, ())
    norm_limit = clip * lower_median(list(norms.values()))
    weight_limit = clip * lower_median(list(counts.values()))
    out, cut = [], []
    for u in ordered:
        norm = norms[u.node_id]
        if norm > norm_limit:
            factor = norm_limit / norm
            u = Update(u.node_id, u.examples, {n: (np.asarray(a, np.float64) * factor).astype(np.float32)
                                               for n, a in u.tensors.items()})
            cut.append(u.node_id)
        elif counts[u.node_id] > weight_limit:
            cut.append(u.node_id)
        out.append(u)
    weights = {n: min(c, weight_limit) for n, c in counts.items()}
    longest = min(max(norms.values()), norm_limit)
    return Clipped(tuple(out), weights, norm_limit, longest, tuple(cut))


def aggregate(updates: Sequence[Update], method: str, trim: float = 0.2,
              clip: float | None = CLIP) -> dict[str, np.ndarray]:
    """The combined delta of ``updates`` (checked ones: same names, shapes, float32), clipped
    first (`clip_updates`; ``clip`` None: not clipped).

    Raises ValueError for no updates, an unknown method, a trim outside [0, 0.5), or updates
    that disagree on names or shapes."""
    if method not in AGGREGATES:
        raise ValueError(f"unknown aggregate {method!r}; known: {', '.join(AGGREGATES)}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim {trim} is outside [0, 0.5)")
    if not updates:
        raise ValueError("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.node_id)
    names = sorted(ordered[0].tensors)
    for update in ordered[1:]:
        if sorted(update.tensors) != names:
            raise ValueError(f"the updates of {ordered[0].node_id} and {update.node_id} have different tensors")
    for name in names:
        shape = ordered[0].tensors[name].shape
        if any(u.tensors[name].shape != shape for u in ordered):
            raise ValueError(f"{name}: the updates disagree on its shape")
    clipped = clip_updates(ordered, clip)
    ordered = list(clipped.updates)
    n = len(ordered)
    combined: dict[str, np.ndarray] = {}
    for name in names:
        stack = np.stack([np.asarray(u.tensors[name], dtype=np.float64) for u in ordered])
        if method == "mean":
            weights = np.array([clipped.weights[u.node_id] for u in ordered], dtype=np.float64)
            weights /= weights.sum()
            combined[name] = np.tensordot(weights, stack, axes=1)
        elif method == "median":
            combined[name] = np.median(stack, axis=0)
        else:
            k = trimmed_count(n, trim)
            kept = np.sort(stack, axis=0)[k:n - k] if k else stack
            combined[name] = kept.mean(axis=0)
    if clip is not None:  # a coordinate-wise median or trimmed mean may be longer than any update
        norm = update_norm(combined)
        if norm > clipped.longest * (1 + 1e-9):
            combined = {name: arr * (clipped.longest / norm) for name, arr in combined.items()}
    return {name: arr.astype(np.float32) for name, arr in combined.items()}


def final_problem(final: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray], rounds: int, steps: int,
                  bounds: Bounds) -> str | None:
    """Why a job's final adapter is out of bounds, or None. It is the job's initial adapter
    plus one aggregate a round, and no aggregate is longer than an update may be, so
    ``|final - initial| <= rounds * norm_limit(steps)``. ``final`` has the initial's names and
    shapes (checked before)."""
    if set(final) != set(initial):
        return "its tensors are not the adapter's"
    for name in sorted(initial):
        if np.shape(final[name]) != np.shape(initial[name]):
            return f"{name}: shape {np.shape(final[name])}, expected {np.shape(initial[name])}"
    moved = update_norm({name: np.asarray(final[name], np.float64) - np.asarray(initial[name], np.float64)
                         for name in initial})
    limit = rounds * bounds.norm_limit(steps, parameter_count({n: np.shape(a) for n, a in initial.items()}))
    if not moved <= limit:
        return f"it moved {moved:.3g} from the job's initial adapter; {rounds} rounds move it at most {limit:.3g}"
    return None


def trimmed_count(n: int, trim: float) -> int:
    """How many of ``n`` values ``trimmed`` drops at each end: ``floor(trim * n)``, none when
    ``n < 3``, and always at least one value left."""
    if n < 3:
        return 0
    return min(math.floor(trim * n), (n - 1) // 2)
