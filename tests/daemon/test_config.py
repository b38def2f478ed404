"""NodeConfig: flags win over MESHLLM_* variables, which win over defaults; bad values are named."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from daemon.cli import build_parser
from daemon.invite import invite_code
from daemon.node.config import ConfigError, NodeConfig, env_name, flag_name


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


# -- every option of `meshllm up` has its MESHLLM_ variable, which takes what the flag takes -----------

SAMPLES: dict[str, tuple[str, ...]] = {
    "--api-host": ("0.0.0.0",), "--log-level": ("debug",), "--join": ("10.0.0.2:8470", "[::1]:9001"),
    "--ice-server": ("stun:a.example:3478", "turn:b.example:3478"), "--mem-budget": ("2G",),
    "--heartbeat-timeout": ("2.5",), "--device": ("cuda:1",), "--fallback-model": ("none",),
    "--adapter": ("last",), "--debug-link-delay-ms": ("30",), "--codec": ("int8",), "--weights": ("int8",),
    "--invite": (invite_code(b"0123456789abcdef0123"),), "--state-dir": ("/tmp/meshllm-state",),
}
"""A value each option takes that differs from its default; the others get one by their kind."""


def up_options() -> list[argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in commands.choices["up"]._actions
            if a.option_strings and a.option_strings[0].startswith("--") and a.dest != "help"]


def sample(action: argparse.Action) -> tuple[str, ...]:
    flag = action.option_strings[0]
    if flag in SAMPLES:
        return SAMPLES[flag]
    if action.choices:
        default = getattr(NodeConfig.from_sources({}, {}), action.dest)
        return (next(str(c) for c in action.choices if c != default),)
    if action.type is int:
        return ("3",)
    if action.type is float:
        return ("2.5",)
    return (f"/tmp/meshllm-{flag[2:]}",)


def test_every_up_option_reads_its_derived_variable_and_takes_the_same_values() -> None:
    default = NodeConfig.from_sources({}, {})
    options = up_options()
    assert len(options) >= 30
    for action in options:
        flag = action.option_strings[0]
        assert flag_name(action.dest) == flag, f"{flag} sets {action.dest}: name the field after the flag"
        variable = "MESHLLM_" + flag[2:].upper().replace("-", "_")
        assert env_name(action.dest) == variable
        if isinstance(action, argparse._StoreTrueAction):
            argv, text = [flag], "1"
        else:
            values = sample(action)
            argv = [word for value in values for word in (flag, value)]
            text = ",".join(values)
        from_flag = NodeConfig.from_sources(vars(build_parser().parse_args(["up", *argv])), {})
        from_env = NodeConfig.from_sources({}, {variable: text})
        assert from_env == from_flag, f"{variable}={text!r} is not {' '.join(argv)}"
        assert from_flag != default, f"{' '.join(argv)} changed nothing: give {flag} a sample in SAMPLES"


def test_sizes_and_the_renamed_variables() -> None:
    assert NodeConfig.from_sources({}, {"MESHLLM_MEM_BUDGET": "2G"}).mem_budget == 2 << 30
    assert NodeConfig.from_sources({}, {"MESHLLM_MEM_BUDGET": "500M"}).mem_budget == 500 << 20
    with pytest.raises(ConfigError, match="MESHLLM_MEM_BUDGET: not a size: 'lots'"):
        NodeConfig.from_sources({}, {"MESHLLM_MEM_BUDGET": "lots"})
    assert NodeConfig.from_sources({}, {"MESHLLM_HEARTBEAT_TIMEOUT": "3"}).heartbeat_timeout_s == 3.0
    assert NodeConfig.from_sources({}, {"MESHLLM_ICE_SERVER": "stun:a:1,stun:b:2"}).ice_servers == (
        "stun:a:1", "stun:b:2")


def test_the_old_variable_names_still_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="daemon.node.config"):
        config = NodeConfig.from_sources({}, {"MESHLLM_HEARTBEAT_TIMEOUT_S": "3", "MESHLLM_ICE_SERVERS": "stun:a:1"})
    assert config.heartbeat_timeout_s == 3.0 and config.ice_servers == ("stun:a:1",)
    warnings = [r.getMessage() for r in caplog.records]
    assert "MESHLLM_HEARTBEAT_TIMEOUT_S is deprecated; use MESHLLM_HEARTBEAT_TIMEOUT" in warnings
    assert "MESHLLM_ICE_SERVERS is deprecated; use MESHLLM_ICE_SERVER" in warnings
    new_wins = {"MESHLLM_HEARTBEAT_TIMEOUT": "4", "MESHLLM_HEARTBEAT_TIMEOUT_S": "3"}
    assert NodeConfig.from_sources({}, new_wins).heartbeat_timeout_s == 4.0
