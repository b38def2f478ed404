"""A local tune job's request (``POST /v1/tune``, docs/api.md), checked: what the API parses
and the node's tune runner takes. Both sides import it, neither imports the other."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MAX_ROUNDS = 1000
MAX_RANK = 256
MAX_STEPS = 100_000


@dataclass(frozen=True)
class TuneRequest:
    """What ``POST /v1/tune`` asks for, checked (see `parse_tune_request`)."""

    rounds: int = 3
    rank: int = 8
    alpha: float = 16.0
    steps: int = 10
    aggregate: str = "mean"


def parse_tune_request(body: object) -> tuple[TuneRequest, list[list[dict[str, str]]]]:
    """The request and its examples from a JSON body; raises ValueError (or
    meshllm.tune.data.DataError for the examples) with a clear message."""
    from meshllm.tune.aggregate import AGGREGATES
    from meshllm.tune.data import check_chats

    if not isinstance(body, Mapping):
        raise ValueError("the body must be a JSON object with 'examples'")
    unknown = sorted(set(body) - {"examples", "rounds", "rank", "alpha", "steps_per_round", "aggregate"})
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")

    def integer(name: str, default: int, top: int) -> int:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"'{name}' must be an integer from 1 to {top}, not {value!r}")
        return value

    rank = integer("rank", TuneRequest.rank, MAX_RANK)
    alpha = body.get("alpha", 2.0 * rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 4096:
        raise ValueError(f"'alpha' must be a number above 0 and at most 4096, not {alpha!r}")
    aggregate = body.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise ValueError(f"'aggregate' must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    if "examples" not in body:
        raise ValueError("'examples' is missing: a list of chats, each {'messages': [...]}")
    chats = check_chats(body["examples"])
    request = TuneRequest(integer("rounds", TuneRequest.rounds, MAX_ROUNDS), rank, float(alpha),
                          integer("steps_per_round", TuneRequest.steps, MAX_STEPS), str(aggregate))
    return request, chats
