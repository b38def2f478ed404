"""The exception classes of the core library, under one base."""

from __future__ import annotations


class MeshllmError(Exception):
    """Base class of every error meshllm raises on purpose."""


class ModelSourceError(MeshllmError):
    """A model path does not exist, is not a supported model, or is corrupt."""


class PromptTooLong(MeshllmError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens; the model's limit is {limit} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class PlacementError(MeshllmError):
    """The nodes together cannot hold the model; ``shortfall_bytes`` says by how much."""

    def __init__(self, message: str, shortfall_bytes: int) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes


class WireError(MeshllmError):
    """A frame or message from the network is malformed, oversized or of another version."""


class MeshUnavailable(MeshllmError):
    """The mesh cannot answer now: no active plan in time, too little memory, or steps that
    keep failing."""
