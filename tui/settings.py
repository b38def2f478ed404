"""The terminal UI's settings, read once from ``MESHLLM_*`` environment variables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TuiSettings:
    """Chat sampling and reconnect pacing. Environment: ``MESHLLM_CHAT_MAX_TOKENS`` and so on."""

    chat_max_tokens: int = 512
    """Longest answer, in tokens (the API allows 1..4096)."""
    chat_temperature: float = 0.7
    """0 is greedy; the API allows 0..2."""
    reconnect_initial_s: float = 0.5
    """First wait before trying a daemon that went away again; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = 8.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> tuple[TuiSettings, list[str]]:
        """Settings from ``MESHLLM_<FIELD>`` variables, and one line per value that was ignored."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for field in fields(cls):
            name = f"MESHLLM_{field.name.upper()}"
            raw = environ.get(name, "").strip()
            if not raw:
                continue
            check = _CHECKS[field.name]
            try:
                value = _PARSERS[field.type](raw)  # type: ignore[index]
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number; using {getattr(cls, field.name)}")
                continue
            if not check(value):
                problems.append(f"{name}={raw!r} is out of range; using {getattr(cls, field.name)}")
                continue
            values[field.name] = value
        return cls(**values), problems


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float}
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "chat_max_tokens": lambda v: 1 <= v <= 4096,
    "chat_temperature": lambda v: 0 <= v <= 2,
    "reconnect_initial_s": lambda v: 0 < v <= 60,
    "reconnect_max_s": lambda v: 0 < v <= 600,
}
