"""Shared fixtures: tiny random models (built once per test session) and the default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshllm.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def default_engine():  # type: ignore[no-untyped-def]
    """The default model (SmolLM2-135M GGUF), converted once into the user's weight cache."""
    from meshllm.model.engine import Engine

    return Engine.load(None)


@pytest.fixture(scope="session")
def default_auto_engine():  # type: ignore[no-untyped-def]
    """One meshllm node's engine on the default model in its default format (int4 from Q4 blocks):
    the reference for meshes in that format."""
    from meshllm.model.engine import Engine

    return Engine.load(None, weights="auto")


@pytest.fixture(scope="session")
def default_reference_model():  # type: ignore[no-untyped-def]
    """Plain transformers on the same GGUF: the single-machine reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from meshllm.model.source import default_gguf_path

    gguf = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
