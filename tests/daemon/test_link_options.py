"""The link and latency-target options of ``meshllm up``: flag, MESHLLM_* variable, bounds."""

from __future__ import annotations

import pytest

from daemon.cli import build_parser
from daemon.node.config import ConfigError, NodeConfig


def test_defaults_are_off() -> None:
    config = NodeConfig.from_sources({}, {})
    assert config.debug_link_delay_ms == 0.0
    assert config.target_ms_per_token is None and config.target_ttft_ms is None


def test_flags_and_environment() -> None:
    args = build_parser().parse_args(
        ["up", "--debug-link-delay-ms", "30", "--target-ms-per-token", "45.5", "--target-ttft-ms", "900"])
    config = NodeConfig.from_sources(vars(args), {})
    assert (config.debug_link_delay_ms, config.target_ms_per_token, config.target_ttft_ms) == (30.0, 45.5, 900.0)
    env = {"MESHLLM_DEBUG_LINK_DELAY_MS": "12.5", "MESHLLM_TARGET_MS_PER_TOKEN": "40",
           "MESHLLM_TARGET_TTFT_MS": "700"}
    config = NodeConfig.from_sources({}, env)
    assert (config.debug_link_delay_ms, config.target_ms_per_token, config.target_ttft_ms) == (12.5, 40.0, 700.0)
    assert NodeConfig.from_sources({"debug_link_delay_ms": 5.0}, env).debug_link_delay_ms == 5.0


@pytest.mark.parametrize(
    ("flags", "env", "words"),
    [
        ({"debug_link_delay_ms": -1.0}, {}, "debug link delay must be 0..10000"),
        ({"debug_link_delay_ms": 10_001.0}, {}, "debug link delay must be 0..10000"),
        ({"debug_link_delay_ms": float("nan")}, {}, "debug link delay must be 0..10000"),
        ({"debug_link_delay_ms": 1000.0}, {}, "below the heartbeat timeout"),
        ({}, {"MESHLLM_DEBUG_LINK_DELAY_MS": "slow"}, "MESHLLM_DEBUG_LINK_DELAY_MS must be a number"),
        ({"target_ms_per_token": 0.0}, {}, "target ms per token must be above 0"),
        ({"target_ttft_ms": -5.0}, {}, "target ttft must be above 0"),
        ({"target_ttft_ms": float("inf")}, {}, "target ttft must be above 0"),
        ({}, {"MESHLLM_TARGET_MS_PER_TOKEN": "fast"}, "MESHLLM_TARGET_MS_PER_TOKEN must be a number"),
    ],
)
def test_bad_values_are_named(flags: dict[str, object], env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        NodeConfig.from_sources(flags, env)


def test_a_longer_heartbeat_timeout_allows_a_longer_delay() -> None:
    config = NodeConfig.from_sources({"debug_link_delay_ms": 5000.0, "heartbeat_timeout_s": 6.0}, {})
    assert config.debug_link_delay_ms == 5000.0
