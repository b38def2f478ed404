"""Parse and check the body of ``POST /v1/chat/completions`` (rules in docs/api.md). Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
ROLES = ("system", "user", "assistant")
SEED_RANGE = (-(2**63), 2**64 - 1)

_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "top_k", "seed", "stream", "stream_options", "n", "user", "stop",
    }
)
_STREAM_OPTIONS = frozenset({"include_usage"})


class RequestError(ValueError):
    """The request is not one the daemon accepts; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat completion request."""

    messages: tuple[ChatMessage, ...]
    model: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def parse_chat_request(body: object) -> ChatRequest:
    """Check a decoded JSON body; raise RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise RequestError(f"unknown field {key!r}", key)
    if "messages" not in body:
        raise RequestError("'messages' is required", "messages")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError(
            "give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens"
        )
    max_tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _optional_int(body, "n", 1, 1)
    if n != 1:
        raise RequestError("'n' must be 1: one answer per request", "n")
    _optional_str(body, "user", "")
    stream = _optional_bool(body, "stream", False)
    return ChatRequest(
        messages=_messages(body["messages"]),
        model=_optional_str(body, "model", None),
        max_tokens=_optional_int(body, max_tokens_key, DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_LIMIT),
        temperature=_optional_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=_optional_int(body, "top_k", 0, 0),
        seed=_optional_int(body, "seed", None, *SEED_RANGE),
        stream=stream,
        include_usage=_include_usage(body.get("stream_options")),
        stop=_stop(body.get("stop")),
    )


def _messages(value: object) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list):
        raise RequestError("'messages' must be a list of messages", "messages")
    if not value:
        raise RequestError("'messages' must not be empty", "messages")
    if len(value) > MAX_MESSAGES:
        raise RequestError(f"'messages' may hold at most {MAX_MESSAGES} messages", "messages")
    messages = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise RequestError(f"'{where}' must be an object with 'role' and 'content'", where)
        for key in item:
            if key not in ("role", "content"):
                raise RequestError(f"unknown field {key!r} in '{where}'", f"{where}.{key}")
        for key in ("role", "content"):
            if key not in item:
                raise RequestError(f"'{where}.{key}' is required", f"{where}.{key}")
        role, content = item["role"], item["content"]
        if role not in ROLES:
            raise RequestError(
                f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role"
            )
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string", f"{where}.content")
        messages.append(ChatMessage(role, content))
    return tuple(messages)


def _top_p(body: Mapping[str, Any]) -> float:
    top_p = _optional_number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise RequestError("'top_p' must be greater than 0 and at most 1", "top_p")
    return top_p


def _include_usage(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    for key in value:
        if key not in _STREAM_OPTIONS:
            raise RequestError(
                f"unknown field {key!r} in 'stream_options'", f"stream_options.{key}"
            )
    return _optional_bool(value, "include_usage", False, where="stream_options.include_usage")


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"each 'stop' string must be 1..{MAX_STOP_CHARS} characters", "stop")
    return tuple(stops)


def _optional_str(body: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"'{key}' must be a string", key)
    return value


def _optional_bool(body: Mapping[str, Any], key: str, default: bool, *,
                   where: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{where or key}' must be true or false", where or key)
    return value


def _optional_int(body: Mapping[str, Any], key: str, default: int | None,
                  low: int, high: int | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer", key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"'{key}' must be {bound}, not {value}", key)
    return value


def _optional_number(body: Mapping[str, Any], key: str, default: float,
                     low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise RequestError(f"'{key}' must be between {low:g} and {high:g}, not {value}", key)
    return float(value)
