"""The daemon's configuration: one frozen object built from CLI flags and ``MESHLLM_*`` variables.

Flags win over environment variables, which win over defaults. Every option of ``meshllm up``
has a variable named after it (:func:`env_name`): ``--api-port`` is ``MESHLLM_API_PORT``,
``--heartbeat-timeout`` is ``MESHLLM_HEARTBEAT_TIMEOUT``, ``--join`` is ``MESHLLM_JOIN`` and
``--ice-server`` is ``MESHLLM_ICE_SERVER`` (comma-separated for repeatable options); a variable
takes what its flag takes (``MESHLLM_MEM_BUDGET=2G``), booleans ``1/true/yes/on`` and
``0/false/no/off``. Two older names still work, with a warning: ``MESHLLM_HEARTBEAT_TIMEOUT_S``
and ``MESHLLM_ICE_SERVERS``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from daemon.hostport import parse_host_port
from meshllm.mesh.speculate import MODES as SPECULATE_MODES
from daemon.invite import InviteError, parse_invite
from meshllm.placement.planner import DEFAULT_OBJECTIVE, OBJECTIVES

WEIGHT_CHOICES = ("auto", "f32", "f16", "int8", "int4")
"""`--weights`: the same list as meshllm.model.quant.CHOICES (that module imports torch)."""
ENV_PREFIX = "MESHLLM_"
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8470
DEFAULT_API_URL = f"http://{DEFAULT_API_HOST}:{DEFAULT_API_PORT}"
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger(__name__)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """An option has a value the daemon cannot use; the message names the option."""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/meshllm``, else ``~/.local/state/meshllm``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshllm"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to know at start-up. Built once by the CLI, passed down."""

    model: str | None = None
    """Path of a Hugging Face folder or a GGUF file; ``None`` is the default model."""
    api_host: str = DEFAULT_API_HOST
    """Address the HTTP API listens on. Loopback unless told otherwise."""
    api_port: int = DEFAULT_API_PORT
    """Port of the HTTP API; 0 picks a free one (the ready line says which)."""
    api_key_file: Path | None = None
    """File holding the bearer token an API beyond loopback needs (docs/api.md). None: the key
    in ``<state dir>/api.key``, made on the first start that needs it."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """torch intra-op threads of the generation worker. Several nodes on one machine must split cores."""
    name: str = field(default_factory=socket.gethostname)
    """Human name of this node, shown to the mesh."""
    state_dir: Path = field(default_factory=default_state_dir)
    """Where the node keeps its id and other small state."""
    cache_dir: Path | None = None
    """Where converted model weights are cached; ``None`` lets the engine choose."""
    loopback: bool = False
    """Single-machine mesh mode: discovery and links use 127.0.0.1 only."""
    no_tui: bool = False
    """Never start the terminal UI, even when stdout is a terminal."""
    log_level: str = "warning"
    """stderr log level: ``debug``, ``info``, ``warning`` or ``error``. Quiet by default: the
    ready line (stdout) and the event log (``/v1/events``) say what happens."""
    mesh_name: str = "default"
    """Nodes join only meshes of the same name."""
    mesh_key_file: Path | None = None
    """File holding the mesh key. It wins over ``MESHLLM_MESH_KEY``, which wins over the key
    kept in the state dir (made by the first start, or stored from ``--invite``)."""
    invite: str | None = None
    """An invite code (``meshllm invite`` on a device of the mesh): its key is stored in the
    state dir and used from now on."""
    open_mesh: bool = field(default=False, metadata={"flag": "open"})
    """An open mesh, with no key: anyone on the network can join (warned about)."""
    join: tuple[str, ...] = ()
    """Peers added by hand, as ``HOST:PORT`` (mDNS does not cross subnets)."""
    ice_servers: tuple[str, ...] = field(default=(), metadata={"flag": "ice-server",
                                                               "old_env": "MESHLLM_ICE_SERVERS"})
    """STUN/TURN URLs for meshes across NATs. Empty: a LAN mesh never reaches outside."""
    mesh_port: int = 0
    """Port where peers reach this node for signaling (advertised over mDNS). 0: the API
    port + 1. It listens on 127.0.0.1 with --loopback, else on every address."""
    mem_budget: int = 0
    """Bytes of weights this node offers the mesh. 0: half of the machine's memory."""
    max_sessions: int | None = None
    """Answers this node serves at once; more wait in a queue of 4 per slot, then get a 429
    (docs/operations.md, "Admission"). None: as many as the KV cache of a full context fits in a
    quarter of the memory budget, 1..16."""
    objective: str = DEFAULT_OBJECTIVE
    """Planner objective: ``throughput`` (balanced spans, every node works) or ``latency``."""
    codec: str = "f32"
    """Hidden-state codec between stages: f32 (exact), f16, bf16 or int8 (lossy, opt-in)."""
    heartbeat_timeout_s: float = field(default=1.0, metadata={"flag": "heartbeat-timeout",
                                                              "old_env": "MESHLLM_HEARTBEAT_TIMEOUT_S"})
    """Silence on a link for this long marks the peer lost."""
    weights: str = "auto"
    """Weight format in memory: ``auto`` (the file's own: a 4-bit GGUF stays 4-bit), ``f32``
    (exact, transformers' own layers), ``f16``, ``int8`` or ``int4``."""
    device: str = "cpu"
    """Where this node's layers run: ``cpu``, or ``cuda`` / ``cuda:N`` on a machine with a GPU."""
    fallback_model: str = "builtin"
    """Answers the mesh cannot serve come from this model on this node: ``builtin`` (the
    bundled SmolLM2; for the bundled model itself, only if this node can hold all of it),
    ``none``, or a PATH (Hugging Face folder or .gguf). Its bytes come out of --mem-budget."""
    private_layers: int = 1
    """K: this node runs the first and the last K decoder layers of its own answers itself, so
    neither a prompt's embeddings nor the hidden state its head reads cross a link (every node
    holds them; docs/security.md). 0 lets the plan place every layer."""
    speculate: str = "auto"
    """Speculative decoding of this node's own answers (docs/speculation.md): ``auto`` (drafts
    by prompt lookup, or by the draft model when one is loaded; stops for an answer where it
    does not pay; not on f32), ``ngram`` (prompt lookup), ``draft`` (the draft model) or
    ``off``. With batch-invariant kernels the answer is token for token the answer without it."""
    draft_model: str = "none"
    """The draft model of speculative decoding, on this node: ``none``, ``builtin`` (the
    bundled SmolLM2, 4-bit) or a PATH; it must share the served model's tokenizer. Its bytes
    come out of --mem-budget."""
    rebuild_log_mb: int = 256
    """Memory cap of this node's output logs, in MiB (what a rebuild after a lost peer reads;
    docs/operations.md). 0 keeps none: every loss then replays the answers in progress."""
    debug_delay_ms: float = 0.0
    """Testing aid: sleep this long before every step this node computes (a slow device)."""
    debug_link_delay_ms: float = 0.0
    """Testing aid: delay every message this node sends over its links by this long (a node on
    slow Wi-Fi); peers see it in the round trip they measure. 0..10000, below the heartbeat
    timeout."""
    target_ms_per_token: float | None = None
    """Latency target: the coordinator picks the smallest plan predicted to decode within this."""
    target_ttft_ms: float | None = None
    """Latency target for the first token of an answer (a typical prompt)."""
    adapter: str = "none"
    """A LoRA adapter to serve with the model (docs/fine-tuning.md): ``none``, ``last`` (the
    last tune job finished on this node, kept under the state dir) or the PATH of a peft
    adapter folder. Every node of a mesh must serve the same one: it is part of the model id."""
    accept_adapters: bool = False
    """Serve the adapter of a tune job this node took no part in (docs/fine-tuning.md). Off: the
    node serves only the adapters of jobs its operator joined, and leaves the mesh of the nodes
    that take another one up."""
    debug_tune_scale: float = 1.0
    """Testing aid: this node multiplies the adapter update it sends in a tune round by this
    (a faulty or malicious participant; the coordinator refuses or outvotes it)."""

    @property
    def signal_port(self) -> int:
        if self.mesh_port:
            return self.mesh_port
        return self.api_port + 1 if self.api_port else 0

    @property
    def signal_host(self) -> str:
        return "127.0.0.1" if self.loopback else "0.0.0.0"

    @property
    def api_url(self) -> str:
        """Base URL of this node's HTTP API as a client on this machine would use it."""
        return client_url(self.api_host, self.api_port)

    @classmethod
    def from_sources(
        cls, flags: Mapping[str, object], env: Mapping[str, str]
    ) -> NodeConfig:
        """Build the config from parsed flags (``None`` = not given) and the environment.

        An empty environment variable counts as unset. Raises ConfigError naming the option when a value is unusable.
        """
        values: dict[str, object] = {}
        for option in fields(cls):
            flag_value = flags.get(option.name)
            if flag_value is not None:
                values[option.name] = _from_flag(option.name, flag_value)
                continue
            name = env_name(option.name)
            env_text = env.get(name, "").strip()
            old = option.metadata.get("old_env")
            if not env_text and old and env.get(old, "").strip():
                log.warning("%s is deprecated; use %s", old, name)
                name, env_text = old, env[old].strip()
            if env_text:
                values[option.name] = _from_env(option.name, name, env_text)
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError if a value is out of range."""
        if not 0 <= self.api_port <= 65535:
            raise ConfigError(f"api port must be 0..65535, not {self.api_port}")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, not {self.threads}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        if not self.name or len(self.name) > 63:
            raise ConfigError("name must be 1..63 characters")
        if not self.mesh_name or len(self.mesh_name) > 63:
            raise ConfigError("mesh name must be 1..63 characters")
        for peer in self.join:
            try:
                parse_host_port(peer)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not 0 <= self.mesh_port <= 65535:
            raise ConfigError(f"mesh port must be 0..65535, not {self.mesh_port}")
        if self.open_mesh and (self.mesh_key_file is not None or self.invite is not None):
            raise ConfigError(f"--open runs a mesh without a key, but "
                              f"{'--mesh-key-file' if self.mesh_key_file is not None else '--invite'} "
                              "gives one: drop one of them")
        if self.invite is not None and self.mesh_key_file is not None:
            raise ConfigError("--invite and --mesh-key-file both give a mesh key: use one of them")
        if self.invite is not None:
            try:
                parse_invite(self.invite)
            except InviteError as error:
                raise ConfigError(str(error)) from None
        if self.mem_budget < 0:
            raise ConfigError("mem budget must be >= 0 bytes")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ConfigError(f"max sessions must be at least 1, not {self.max_sessions}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.codec not in ("f32", "f16", "bf16", "int8"):
            raise ConfigError(f"codec must be one of f32, f16, bf16, int8, not {self.codec!r}")
        if self.weights not in WEIGHT_CHOICES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, not {self.weights!r}")
        if not 0.1 <= self.heartbeat_timeout_s <= 600:
            raise ConfigError("heartbeat timeout must be 0.1..600 s")
        if self.fallback_model not in ("builtin", "none") and (
                not self.fallback_model.strip() or not Path(self.fallback_model).expanduser().exists()):
            raise ConfigError(f"fallback model must be builtin, none or an existing PATH; "
                              f"{self.fallback_model!r} does not exist")
        if not 0 <= self.debug_delay_ms <= 60_000:
            raise ConfigError("debug delay must be 0..60000 ms")
        if self.speculate not in SPECULATE_MODES:
            raise ConfigError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, not {self.speculate!r}")
        if not 0 <= self.private_layers <= 64:
            raise ConfigError("private layers must be 0..64")
        if not 0 <= self.rebuild_log_mb <= 1_048_576:
            raise ConfigError("rebuild log cap must be 0..1048576 MiB")
        if not 0 <= self.debug_link_delay_ms <= 10_000:
            raise ConfigError("debug link delay must be 0..10000 ms")
        if self.debug_link_delay_ms >= self.heartbeat_timeout_s * 1000:
            raise ConfigError("debug link delay must be below the heartbeat timeout "
                              f"({self.heartbeat_timeout_s * 1000:.0f} ms), or peers are lost")
        if self.adapter not in ("none", "last") and (
                not self.adapter.strip() or not Path(self.adapter).expanduser().is_dir()):
            raise ConfigError(f"adapter must be none, last or an adapter folder; {self.adapter!r} is not a folder")
        if not 0 <= self.debug_tune_scale <= 1e9:
            raise ConfigError("debug tune scale must be 0..1e9")
        for label, target in (("target ms per token", self.target_ms_per_token),
                              ("target ttft", self.target_ttft_ms)):
            if target is not None and not 0 < target <= 3_600_000:
                raise ConfigError(f"{label} must be above 0 and at most 3600000 ms, not {target}")

    def is_loopback_only(self) -> bool:
        """True when the API listens on a loopback address only."""
        if self.api_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.api_host).is_loopback
        except ValueError:
            return False


def flag_name(field_name: str) -> str:
    """The ``meshllm up`` flag of a NodeConfig field: ``--api-port`` for ``api_port``."""
    meta = _FIELD_META.get(field_name, {})
    return "--" + str(meta.get("flag", field_name.replace("_", "-")))


def env_name(field_name: str) -> str:
    """The variable of a NodeConfig field, derived from its flag: ``--heartbeat-timeout`` is
    ``MESHLLM_HEARTBEAT_TIMEOUT``."""
    return ENV_PREFIX + flag_name(field_name)[2:].upper().replace("-", "_")


def parse_bytes(text: str) -> int:
    """``2G``, ``500M``, ``1.5GiB`` or a plain number of bytes. Raises ValueError."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"not a size: {text!r} (try 2G or 500M)") from None
    if value < 0:
        raise ValueError("a size must be >= 0")
    return value


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a server listening on host:port."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


_FIELD_META = {option.name: option.metadata for option in fields(NodeConfig)}
_BYTES_FIELDS = frozenset({"mem_budget"})
_INT_FIELDS = frozenset({"api_port", "threads", "mesh_port", "rebuild_log_mb",
                         "private_layers", "max_sessions"})
_FLOAT_FIELDS = frozenset({"heartbeat_timeout_s", "debug_delay_ms", "debug_link_delay_ms",
                           "target_ms_per_token", "target_ttft_ms", "debug_tune_scale"})
_BOOL_FIELDS = frozenset({"accept_adapters", "loopback", "no_tui", "open_mesh"})
_PATH_FIELDS = frozenset({"state_dir", "cache_dir", "api_key_file", "mesh_key_file"})
_LIST_FIELDS = frozenset({"join", "ice_servers"})


def _from_flag(name: str, value: object) -> object:
    if name in _PATH_FIELDS:
        return Path(str(value)).expanduser()
    if name in _LIST_FIELDS:
        return tuple(str(item) for item in value)  # type: ignore[attr-defined]
    if name == "log_level":
        return str(value).lower()
    return value


def _from_env(name: str, env_name: str, text: str) -> object:
    if name in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{env_name} must be an integer, not {text!r}") from None
    if name in _BYTES_FIELDS:
        try:
            return parse_bytes(text)
        except ValueError as error:
            raise ConfigError(f"{env_name}: {error}") from None
    if name in _FLOAT_FIELDS:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{env_name} must be a number, not {text!r}") from None
    if name in _BOOL_FIELDS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{env_name} must be true or false, not {text!r}")
    if name in _PATH_FIELDS:
        return Path(text).expanduser()
    if name in _LIST_FIELDS:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if name == "log_level":
        return text.lower()
    return text
