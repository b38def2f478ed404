"""An adapter on the wire: its digest, its `TuneTensors` parts, and their checked assembly.

An adapter is a mapping of tensor names to float32 arrays. It travels as parts of at most 64
tensors and 4 MiB (`split_parts`, `tensor_messages`); a receiver takes the parts of one
adapter from one sender in order, each name once, each tensor no larger than expected
(`Assembly`, `assemble`), so its memory stays within one adapter. `adapter_digest` names an
adapter's content. Pure: no clock, no torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import numpy as np

from meshllm import wire
from meshllm.errors import WireError
from meshllm.tune.aggregate import Bounds, Update, check_update
from meshllm.wire import tune_messages as wm


def adapter_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 (hex) over the names, shapes and float32 little-endian values, by sorted name."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(name.encode("utf-8") + b"\0" + repr(tuple(arr.shape)).encode("ascii") + b"\0")
        digest.update(arr.tobytes())
    return digest.hexdigest()


def split_parts(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, ...]]:
    """Tensor names (sorted) in parts of at most 64 tensors and 4 MiB of float32 values; a
    larger tensor goes alone in its part."""
    parts: list[tuple[str, ...]] = []
    current: list[str] = []
    size = 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        if current and (len(current) == wm.MAX_TUNE_TENSORS_PER_PART or size + nbytes > wm.MAX_TUNE_PART_BYTES):
            parts.append(tuple(current))
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        parts.append(tuple(current))
    return parts


def adapter_problem(tensors: Mapping[str, np.ndarray]) -> str | None:
    """Why an adapter cannot travel as TuneTensors parts, or None."""
    if not tensors:
        return "it has no tensors"
    for name in sorted(tensors):
        arr = tensors[name]
        if not isinstance(name, str) or not 1 <= len(name) <= wm.MAX_TUNE_NAME_CHARS or not name.isprintable():
            return f"tensor name {name!r} is not 1..{wm.MAX_TUNE_NAME_CHARS} printable characters"
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            return f"{name}: dtype {getattr(arr, 'dtype', type(arr).__name__)}, expected float32"
        if not 1 <= arr.ndim <= 8 or arr.size == 0:
            return f"{name}: shape {arr.shape} cannot travel"
        if arr.size > wm.MAX_TUNE_TENSOR_ELEMENTS:
            return f"{name}: {arr.size} elements; at most {wm.MAX_TUNE_TENSOR_ELEMENTS}"
        if not np.isfinite(arr).all():
            return f"{name}: non-finite values"
    parts = len(split_parts({name: arr.shape for name, arr in tensors.items()}))
    if parts > wm.MAX_TUNE_PARTS:
        return f"it takes {parts} parts; at most {wm.MAX_TUNE_PARTS}"
    return None


def tensor_messages(job_id: str, round_no: int, kind: str, tensors: Mapping[str, np.ndarray],
                    examples: int = 0, loss: float = 0.0) -> list[wire.TuneTensors]:
    """An adapter (checked by `adapter_problem`) as its TuneTensors parts, in order."""
    groups = split_parts({name: arr.shape for name, arr in tensors.items()})
    return [
        wire.TuneTensors(job_id=job_id, round=round_no, kind=kind, part=i, parts=len(groups), examples=examples,
                         loss=loss, names=names,
                         tensors=tuple(wire.encode_tensor(np.asarray(tensors[n], dtype=np.float32), "f32")
                                       for n in names))
        for i, names in enumerate(groups)
    ]


def frozen(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read-only float32 copies, by sorted name."""
    out = {}
    for name in sorted(tensors):
        arr = np.array(tensors[name], dtype=np.float32, copy=True)
        arr.setflags(write=False)
        out[name] = arr
    return out


def shapes_problem(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``tensors`` are not exactly the ``expected`` names and shapes (float32, finite), or None."""
    return check_update(Update("", 1, tensors), expected, Bounds(max_norm=math.inf, max_examples=1))


class Assembly:
    """The parts of one adapter from one sender, taken in order, each name once, each tensor
    no larger than the expected one (so memory stays within one adapter)."""

    def __init__(self, kind: str, round_no: int, first: wire.TuneTensors,
                 expected: Mapping[str, tuple[int, ...]]) -> None:
        self.kind = kind
        self.round = round_no
        self.parts = first.parts
        self.examples = first.examples
        self.loss = first.loss
        self.expected = expected
        self.next = 0
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, msg: wire.TuneTensors) -> str | None:
        """Take one part; the reason when it is refused (the assembly is then void)."""
        if msg.kind != self.kind or msg.round != self.round:
            return f"a {msg.kind} part of round {msg.round} where {self.kind} of round {self.round} was expected"
        if msg.part != self.next:
            return f"part {msg.part} out of order: part {self.next} expected"
        if msg.parts != self.parts:
            return f"part {msg.part} says {msg.parts} parts; part 0 said {self.parts}"
        if self.parts > len(self.expected):
            return f"{self.parts} parts for an adapter of {len(self.expected)} tensors"
        if msg.examples != self.examples or msg.loss != self.loss:
            return f"part {msg.part} disagrees with part 0 on examples or loss"
        for name, payload in zip(msg.names, msg.tensors):
            shape = self.expected.get(name)
            if shape is None:
                return f"unexpected tensor {name}"
            if name in self.tensors:
                return f"tensor {name} sent twice"
            try:
                self.tensors[name] = wire.decode_tensor(payload, expect_codec="f32",
                                                        max_elements=max(1, math.prod(shape)))
            except WireError as error:
                return f"{name}: {error}"
        self.next += 1
        return None

    @property
    def complete(self) -> bool:
        return self.next == self.parts


def assemble(assembly: Assembly | None, kind: str, round_no: int, msg: wire.TuneTensors, parts: int,
             expected: Callable[[], Mapping[str, tuple[int, ...]]],
             ) -> tuple[Assembly | None, str | None, dict[str, np.ndarray] | None]:
    """Start one adapter's assembly with its first part (announced as ``parts`` parts) or go on
    with it. Returns (assembly, the reason it is refused, its tensors once complete and whole)."""
    if assembly is None:
        if msg.parts != parts:
            return None, f"{msg.parts} parts where {parts} were announced", None
        try:
            assembly = Assembly(kind, round_no, msg, expected())
        except Exception as error:  # noqa: BLE001 - the model's own check
            return None, f"cannot check it: {error}", None
    problem = assembly.add(msg)
    if problem is None and assembly.complete:
        problem = shapes_problem(assembly.tensors, assembly.expected)
        if problem is None:
            return assembly, None, assembly.tensors
    return assembly, problem, None
