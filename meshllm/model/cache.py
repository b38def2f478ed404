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
    """Dequantize a GGUF with transformers (which shows a progress bar) and save safetensors.

    Written into a temporary folder and renamed into place, so an interrupted conversion
    never leaves a half cache behind.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in the parser
            raise ModelSourceError(f"cannot read GGUF {gguf.name}: {type(e).__name__}: {_one_line(e)}") from e
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        config = model.config
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
