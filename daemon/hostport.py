"""``HOST:PORT`` addresses, as a user types them (``--join``) and as links dial them."""

from __future__ import annotations


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[V6]:PORT``); raise ValueError when it is not one."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"join peer must be HOST:PORT, not {text!r}")
    return host, int(port_text)
