"""Combining the participants' adapter updates of one round, and refusing bad ones.

An update is a participant's delta: its trained adapter minus the round's global adapter, one
float32 array per adapter tensor name. :func:`check_update` refuses what must not be averaged
(a missing or extra tensor, a wrong shape or dtype, NaN/inf, a norm past the bound, an
implausible example count); :func:`aggregate` combines what is left:

- ``mean``: FedAvg, the mean weighted by each participant's example count;
- ``median``: the coordinate-wise median (unweighted): one outlier, however large, cannot move
  it past the others' values;
- ``trimmed``: the coordinate-wise trimmed mean (unweighted): drop the ``floor(trim * n)``
  lowest and highest values of each coordinate, average the rest. With fewer than three
  updates nothing is dropped (it is the unweighted mean).

Pure numpy; sums run in float64 over updates sorted by node id, so the result does not depend
on the order the updates came in. The result is float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed")


@dataclass(frozen=True)
class Update:
    """A participant's delta (its local adapter minus the global), and its example count."""

    node_id: str
    examples: int
    tensors: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Bounds:
    """What an acceptable update stays within."""

    max_norm: float = 1000.0
    """L2 norm of the whole update (all its tensors together)."""
    max_examples: int = 1_000_000


def check_update(update: Update, expected: Mapping[str, tuple[int, ...]], bounds: Bounds) -> str | None:
    """None when ``update`` may be aggregated; else why not, in a few words."""
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
    if not norm <= bounds.max_norm:
        return f"norm {norm:.3g} > {bounds.max_norm:g}"
    return None


def aggregate(updates: Sequence[Update], method: str, trim: float = 0.2) -> dict[str, np.ndarray]:
    """The combined delta of ``updates`` (checked ones: same names, shapes, float32).

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
    n = len(ordered)
    out: dict[str, np.ndarray] = {}
    for name in names:
        shape = ordered[0].tensors[name].shape
        if any(u.tensors[name].shape != shape for u in ordered):
            raise ValueError(f"{name}: the updates disagree on its shape")
        stack = np.stack([np.asarray(u.tensors[name], dtype=np.float64) for u in ordered])
        if method == "mean":
            weights = np.array([float(u.examples) for u in ordered], dtype=np.float64)
            weights /= weights.sum()
            combined = np.tensordot(weights, stack, axes=1)
        elif method == "median":
            combined = np.median(stack, axis=0)
        else:
            k = trimmed_count(n, trim)
            kept = np.sort(stack, axis=0)[k:n - k] if k else stack
            combined = kept.mean(axis=0)
        out[name] = combined.astype(np.float32)
    return out


def trimmed_count(n: int, trim: float) -> int:
    """How many of ``n`` values ``trimmed`` drops at each end: ``floor(trim * n)``, none when
    ``n < 3``, and always at least one value left."""
    if n < 3:
        return 0
    return min(math.floor(trim * n), (n - 1) // 2)
