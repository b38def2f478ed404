"""A safetensors file written one tensor at a time, in bounded memory.

`safetensors.torch.save_file` wants every tensor of the file in memory at once; converting a
model that way holds the whole model (in float32, for the weight cache). `TensorWriter` writes
each tensor's bytes as it comes and the header last, into room left for it at the start of the
file: the header is padded with spaces, which the format allows. When the header outgrows the
room (a caller's estimate was short), the file is rewritten once, the data copied in chunks.

The result reads like any safetensors file (`safe_open`); only the order of the tensors in the
file follows the order they were written in.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "I8": 1, "U8": 1, "BOOL": 1}
_ALIGN = 8
_COPY_CHUNK = 16 << 20


def header_room(entries: list[tuple[str, tuple[int, ...]]], data_bytes: int) -> int:
    """An upper bound of the header's size for tensors of these names and shapes."""
    digits = len(str(max(data_bytes, 1)))
    per = len('{"":{"dtype":"BOOL","shape":[],"data_offsets":[,]}},')
    return 64 + sum(per + len(json.dumps(name)) + sum(len(str(d)) + 1 for d in shape) + 2 * digits
                    for name, shape in entries)


class TensorWriter:
    """`writer[name] = tensor` writes it at once; `close()` writes the header (call it once,
    after the last tensor; the file is not valid before). Use as a context manager.

    `room`: bytes left for the header (see `header_room`); too little costs one copy of the
    data at close, too much costs that many bytes of spaces.
    """

    def __init__(self, path: Path | str, room: int = 1 << 16, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._room = -(-max(room, 16) // _ALIGN) * _ALIGN
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.seek(8 + self._room)
        self._entries: dict[str, dict[str, Any]] = {}
        self._metadata = metadata
        self._offset = 0

    def __setitem__(self, name: str, tensor: Any) -> None:
        if name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        dtype, shape, data = _as_bytes(tensor)
        self._file.write(data)
        end = self._offset + len(data)
        self._entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._offset, end]}
        self._offset = end

    def begin(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start a tensor written in runs of rows (`append`, then `end`): never whole in memory."""
        if name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        self._open = (name, dtype, tuple(int(d) for d in shape), self._offset)

    def append(self, rows: Any) -> None:
        """The next rows of the tensor begun, in its dtype."""
        name, dtype, shape, _ = self._open
        kind, part_shape, data = _as_bytes(rows)
        if kind != dtype or part_shape[1:] != shape[1:]:
            raise ValueError(f"{name}: rows of {kind} {part_shape} for a tensor of {dtype} {shape}")
        self._file.write(data)
        self._offset += len(data)

    def end(self) -> None:
        name, dtype, shape, start = self._open
        expect = _SIZES[dtype]
        for d in shape:
            expect *= d
        if self._offset - start != expect:
            raise ValueError(f"{name}: {self._offset - start} bytes written for {expect}")
        self._entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, self._offset]}
        del self._open

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._file.closed:
            return
        header: dict[str, Any] = {}
        if self._metadata is not None:
            header["__metadata__"] = self._metadata
        header.update(self._entries)
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self._room:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._room) + raw + b" " * (self._room - len(raw)))
            self._file.close()
            return
        self._file.close()  # the header did not fit: rewrite the file with room enough, once
        padded = raw + b" " * (-len(raw) % _ALIGN)
        moved = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, moved)
        try:
            with open(moved, "rb") as src, open(self.path, "wb") as dst:
                dst.write(struct.pack("<Q", len(padded)) + padded)
                src.seek(8 + self._room)
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
        finally:
            moved.unlink(missing_ok=True)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:  # type: ignore[no-untyped-def]
        if kind is None:
            self.close()
        else:
            self.abort()


def _as_bytes(tensor: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(safetensors dtype, shape, the bytes in C order) of a numpy array or torch tensor."""
    if isinstance(tensor, np.ndarray):
        a = np.ascontiguousarray(tensor)
        name = a.dtype.name
        shape = a.shape
        raw = a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)
    else:  # torch.Tensor: bfloat16 has no numpy dtype, so go through its bytes
        import torch

        t = tensor.detach().to("cpu").contiguous()
        name = str(t.dtype).removeprefix("torch.")
        shape = tuple(t.shape)
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        if name == "bool":
            raw = t.reshape(-1).to(torch.uint8).numpy()
    if name not in _DTYPES:
        raise TypeError(f"no safetensors dtype for {name}")
    return _DTYPES[name], tuple(int(d) for d in shape), memoryview(raw).cast("B")
