"""The weight cache: a GGUF is converted once into safetensors, keyed by the file's content hash.

After that, a node reads only the tensors of its span (`safetensors.safe_open`), in
milliseconds, with memory in proportion to the span. A Hugging Face folder is used in place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meshllm.errors import ModelSourceError
from meshllm.model.source import ModelSource

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_DONE_MARKER = "meshllm-cache.json"
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to load spans from: config, tokenizer and safetensors files in one folder."""

    model_id: str
    """Content hash of the weights (short hex); peers must agree on it to share a mesh."""
    name: str
    folder: Path
    weight_files: tuple[Path, ...]
    gguf_path: Path | None = None
    """The GGUF this was converted from (its 4-bit blocks are read as they are), if any."""
    formats_folder: Path | None = None
    """Where the other weight formats are written (see ``formats``); None: `folder`/formats."""


def default_cache_dir() -> Path:
    """`$MESHLLM_CACHE_DIR`, else `$XDG_CACHE_HOME/meshllm`, else `~/.cache/meshllm`."""
    if env := os.environ.get("MESHLLM_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshllm"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file: names, dtypes, shapes and offsets."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelSourceError(f"truncated safetensors file: {path}")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ModelSourceError(f"corrupt safetensors header in {path}")
        return f.read(n)


def folder_model_id(folder: Path, files: Iterable[Path]) -> str:
    """Identity of a Hugging Face folder: its config plus each weight file's header and size.

    Hashing headers (not gigabytes of weights) keeps start-up fast; two folders with the
    same tensors at the same offsets and sizes are treated as the same model.
    """
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(_safetensors_header(f))
    return h.hexdigest()[:16]


def prepare(source: ModelSource, cache_dir: Path | None = None) -> PreparedModel:
    """Make `source` loadable span by span. Converts a GGUF on first use (slow, shows progress)."""
    if source.kind == "hf":
        files = tuple(sorted(source.path.glob("*.safetensors")))
        model_id = folder_model_id(source.path, files)
        formats = (cache_dir or default_cache_dir()) / "models" / f"{source.name}-{model_id}" / "formats"
        return PreparedModel(model_id, source.name, source.path, files, formats_folder=formats)

    digest = file_sha256(source.path)
    model_id = digest[:16]
    root = (cache_dir or default_cache_dir()) / "models"
    folder = root / f"{source.name}-{model_id}"
    marker = folder / _DONE_MARKER
    if not _cache_complete(marker, digest):
        locks = root.parent / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        # several nodes on one machine share the cache: one converts, the others wait for it
        with open(locks / f"{source.name}-{model_id}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _cache_complete(marker, digest):
                log.info("converting %s once into the weight cache at %s", source.path.name, folder)
                _convert_gguf(source.path, folder, digest)
    files = tuple(sorted(folder.glob("*.safetensors")))
    return PreparedModel(model_id, source.name, folder, files, source.path)


def _cache_complete(marker: Path, digest: str) -> bool:
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == digest and meta.get("format") == CACHE_FORMAT


def _convert_gguf(gguf: Path, folder: Path, digest: str) -> None:
    """Dequantize a GGUF tensor by tensor into float32 safetensors, with its config and tokenizer.

    Written into a temporary folder and renamed into place, so an interrupted conversion
    never leaves a half cache behind. Memory stays bounded by a few times the largest tensor
    (`_stream_float32`); a file whose tensors that cannot place goes through transformers'
    whole-model loader instead (`_load_float32`), which writes the same tensors.
    """
    from transformers import AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = _stream_float32(gguf, tmp / "model.safetensors")
            if config is None:
                config = _load_float32(gguf, tmp / "model.safetensors")
        except ModelSourceError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in the parser
            raise ModelSourceError(f"cannot read GGUF {gguf.name}: {type(e).__name__}: {_one_line(e)}") from e
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(
            json.dumps({"format": CACHE_FORMAT, "sha256": digest, "source": str(gguf)})
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_float32(gguf: Path, out: Path):  # type: ignore[no-untyped-def]
    """The whole model through transformers' GGUF loader (the whole model in float32 at once):
    the reference `_stream_float32` equals, and its fallback. Returns the model's config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return model.config


_CHUNK_BYTES = 64 << 20
"""A tensor whose float32 form is larger than this is dequantized and written in row chunks."""


def _stream_float32(gguf: Path, out: Path):  # type: ignore[no-untyped-def]
    """What `_load_float32` writes, one tensor at a time: each GGUF tensor is read from the
    file, dequantized with gguf's own code, given transformers' per-architecture processing
    (the q/k row order of Llama-family files is undone there), named by transformers' map and
    written at once. Returns the config, or None (nothing written) when the file holds a tensor
    this cannot place or lacks one the model has: then the caller uses `_load_float32`."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        LlamaTensorProcessor,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from meshllm.model.gguf_blocks import read_tensor_infos
    from meshllm.model.allocator import map_large_allocations
    from meshllm.model.stwriter import TensorWriter, header_room

    map_large_allocations()  # each tensor's temporaries go back to the system when freed
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32  # as a model loaded with dtype=float32 records it
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(_gguf_architecture(gguf), TensorProcessor)(config=parsed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = get_gguf_hf_weights_map(model, processor)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    infos = read_tensor_infos(gguf)

    def plain(name: str) -> bool:  # the processor returns this tensor as it is: rows can stream
        kind = type(processor).process
        if kind is TensorProcessor.process:
            return True
        return kind is LlamaTensorProcessor.process and ".attn_q." not in name and ".attn_k." not in name

    room = header_room([(k, v) for k, v in expected.items()], 4 * sum(int(np.prod(v)) for v in expected.values()))
    writer = TensorWriter(out, room)
    try:
        with open(gguf, "rb") as f:
            for info in infos.values():
                kind = GGMLQuantizationType[info.type_name]
                dims = tuple(reversed(info.shape))
                hf = names.get(info.name)
                if plain(info.name):
                    if hf is None or hf not in expected:
                        continue  # as transformers: a tensor the model has no place for is dropped
                    rows = dims[0]
                    row_bytes = 4 * int(np.prod(dims[1:]))
                    if len(dims) == 2 and rows * row_bytes > _CHUNK_BYTES:  # in runs of rows
                        if expected[hf] != dims:
                            return _abandon(writer, f"{info.name}: shape {dims}, the model has {expected[hf]}")
                        step = max(1, _CHUNK_BYTES // row_bytes)
                        stride = info.nbytes // rows
                        writer.begin(hf, "F32", dims)
                        for r in range(0, rows, step):
                            n = min(step, rows - r)
                            f.seek(info.offset + r * stride)
                            writer.append(_dequantized(np, dequantize, kind, f.read(n * stride), (n, *dims[1:])))
                        writer.end()
                        continue
                f.seek(info.offset)
                weights = _dequantized(np, dequantize, kind, f.read(info.nbytes), dims)
                result = processor.process(weights=weights, name=info.name, tensor_key_mapping=names,
                                           parsed_parameters={"config": parsed, "tensors": {}})
                hf = names.get(result.name)
                if hf is None or hf not in expected:
                    continue
                if tuple(result.weights.shape) != expected[hf]:
                    return _abandon(writer, f"{info.name}: shape {result.weights.shape}, the model has {expected[hf]}")
                if hf in writer:
                    return _abandon(writer, f"{hf} twice")
                writer[hf] = np.ascontiguousarray(result.weights, dtype=np.float32)
                del weights, result
        missing = sorted(set(expected) - set(writer))
        if missing:
            return _abandon(writer, f"no tensor for {', '.join(missing[:3])}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return config


def _dequantized(np, dequantize, kind, raw: bytes, dims: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """Float32 values of one GGUF tensor (or a run of its rows) from its bytes, `dims` in
    numpy order, as gguf's reader and `dequantize` give them to transformers."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if kind in plain:
        data = np.frombuffer(raw, dtype=plain[kind]).reshape(dims)
    else:
        data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(dims, kind))
    return np.asarray(dequantize(data, kind), dtype=np.float32)


def _abandon(writer, why: str) -> None:  # type: ignore[no-untyped-def]
    log.info("converting tensor by tensor is not possible (%s): loading the whole model instead", why)
    writer.abort()
    return None


def _gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF: the first metadata values read until it is found."""
    import struct as st

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with path.open("rb") as f:
        def take(fmt: str):  # type: ignore[no-untyped-def]
            size = st.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise ValueError(f"truncated GGUF header in {path.name}")
            return st.unpack(fmt, raw)[0]

        def string() -> str:
            return f.read(take("<Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind in scalar:
                f.seek(scalar[kind], 1)
            elif kind == 8:
                f.seek(take("<Q"), 1)
            elif kind == 9:
                item, count = take("<I"), take("<Q")
                if item in scalar:
                    f.seek(scalar[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"unknown GGUF value type {kind} in {path.name}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file: {path.name}")
        take("<I")
        take("<Q")
        for _ in range(take("<Q")):
            key, kind = string(), take("<I")
            if key == "general.architecture" and kind == 8:
                return string()
            skip(kind)
    raise ValueError(f"no general.architecture in {path.name}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
