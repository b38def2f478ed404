"""NodeConfig: flags win over MESHLLM_* variables, which win over defaults; bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.node.config import ConfigError, NodeConfig


def test_defaults() -> None:
    config = NodeConfig.from_sources({}, {})
    assert (config.api_host, config.api_port, config.mesh_name) == ("127.0.0.1", 8470, "default")
    assert config.model is None and config.join == () and config.ice_servers == ()
    assert config.threads >= 1 and config.name
    assert config.api_url == "http://127.0.0.1:8470"
    assert config.is_loopback_only()
    assert config.weights == "auto"  # a 4-bit GGUF stays 4-bit


def test_weights_come_from_the_flag_or_the_environment() -> None:
    assert NodeConfig.from_sources({}, {"MESHLLM_WEIGHTS": "int8"}).weights == "int8"
    assert NodeConfig.from_sources({"weights": "f32"}, {"MESHLLM_WEIGHTS": "int8"}).weights == "f32"


def test_environment_fills_what_flags_leave_out() -> None:
    env = {
        "MESHLLM_API_PORT": "9000", "MESHLLM_THREADS": "3", "MESHLLM_LOOPBACK": "yes",
        "MESHLLM_JOIN": "10.0.0.2:8470, [::1]:9001", "MESHLLM_ICE_SERVERS": "stun:stun.example:3478",
        "MESHLLM_STATE_DIR": "/tmp/state", "MESHLLM_MODEL": "/models/x.gguf", "MESHLLM_NO_TUI": "0",
        "MESHLLM_NAME": "",  # empty counts as unset
    }
    config = NodeConfig.from_sources({"api_port": None, "threads": 2}, env)
    assert config.api_port == 9000 and config.threads == 2
    assert config.loopback is True and config.no_tui is False
    assert config.join == ("10.0.0.2:8470", "[::1]:9001")
    assert config.ice_servers == ("stun:stun.example:3478",)
    assert config.state_dir == Path("/tmp/state") and config.model == "/models/x.gguf"
    assert config.name  # the hostname


def test_the_rebuild_log_cap_comes_from_the_flag_or_the_environment() -> None:
    assert NodeConfig.from_sources({}, {}).rebuild_log_mb == 256
    assert NodeConfig.from_sources({}, {"MESHLLM_REBUILD_LOG_MB": "0"}).rebuild_log_mb == 0
    assert NodeConfig.from_sources({"rebuild_log_mb": 64}, {"MESHLLM_REBUILD_LOG_MB": "0"}).rebuild_log_mb == 64


def test_flags_win() -> None:
    env = {"MESHLLM_API_PORT": "9000", "MESHLLM_JOIN": "a:1"}
    config = NodeConfig.from_sources({"api_port": 9100, "join": ["b:2"], "no_tui": True}, env)
    assert config.api_port == 9100 and config.join == ("b:2",) and config.no_tui


def test_api_url_for_wildcard_hosts() -> None:
    assert NodeConfig(api_host="0.0.0.0", api_port=1).api_url == "http://127.0.0.1:1"
    assert NodeConfig(api_host="::", api_port=1).api_url == "http://[::1]:1"
    assert not NodeConfig(api_host="0.0.0.0").is_loopback_only()


@pytest.mark.parametrize(
    ("flags", "env", "words"),
    [
        ({}, {"MESHLLM_API_PORT": "eighty"}, "MESHLLM_API_PORT"),
        ({}, {"MESHLLM_LOOPBACK": "maybe"}, "MESHLLM_LOOPBACK"),
        ({"api_port": 70000}, {}, "port"),
        ({"threads": 0}, {}, "threads"),
        ({"log_level": "loud"}, {}, "log level"),
        ({"join": ["nohost"]}, {}, "HOST:PORT"),
        ({"name": "x" * 64}, {}, "name"),
        ({}, {"MESHLLM_WEIGHTS": "int3"}, "weights must be one of auto, f32, f16, int8, int4"),
        ({"rebuild_log_mb": -1}, {}, "rebuild log cap"),
        ({}, {"MESHLLM_REBUILD_LOG_MB": "lots"}, "MESHLLM_REBUILD_LOG_MB"),
    ],
)
def test_bad_values_are_named(flags: dict[str, object], env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        NodeConfig.from_sources(flags, env)


def test_the_weights_choices_are_the_models_own() -> None:
    from daemon.node.config import WEIGHT_CHOICES
    from meshllm.model.quant import CHOICES

    assert WEIGHT_CHOICES == CHOICES  # written twice: the config must not import torch
