"""``meshllm status`` as a readable table. Pure: status JSON in, text out."""

from __future__ import annotations

from typing import Any

_COLUMNS = ("NODE", "ROLE", "STATE", "MEMORY", "WEIGHTS", "MS/LAYER", "SPAN", "RTT", "ADDRESS")


def format_bytes(n: int | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _span(span: list[int] | None) -> str:
    return "-" if span is None else f"[{span[0]}, {span[1]})"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_fallback(fallback: dict[str, Any]) -> str:
    """The local fallback model in one line: off, standing by, or answering (and why)."""
    if fallback.get("state") == "off" or not fallback.get("model"):
        return f"none ({fallback.get('note') or 'off'})"
    held = fallback.get("weight_bytes") or fallback.get("reserved_bytes")
    text = f"{fallback['model']} ({fallback.get('state')}, {format_bytes(held)})"
    if fallback.get("serving"):
        text += f"; ANSWERING: {fallback.get('mesh_trouble') or 'the mesh cannot serve'}"
    return text


def format_status(status: dict[str, Any]) -> str:
    """A header, one row per node, and the incompatible nodes seen, if any."""
    model = status.get("model")
    plan = status.get("plan")
    model_text = "loading" if model is None else (
        f"{model['name']} ({model['num_layers']} layers, {model.get('weights', 'f32')} weights, id {model['id'][:12]})")
    plan_text = "none yet" if plan is None else f"term {plan['term']}, {plan['state']}, {len(plan['stages'])} stage(s)"
    lines = [
        f"model:    {model_text}",
        f"plan:     {plan_text}; codec {status.get('codec', '-')}",
        f"sessions: {status.get('sessions', 0)}",
    ]
    fallback = status.get("fallback")
    if isinstance(fallback, dict):
        lines.append(f"fallback: {format_fallback(fallback)}")
    lines += [
        "",
    ]
    rows = [_COLUMNS]
    for node in status.get("nodes", []):
        rows.append((
            node["name"] + (" *" if node.get("is_self") else ""),
            node["role"],
            node["state"],
            format_bytes(node.get("mem_budget_bytes")),
            format_bytes(node.get("weight_bytes")),
            _number(node.get("ms_per_layer"), 2),
            _span(node.get("span")),
            "-" if node.get("rtt_ms") is None else f"{node['rtt_ms']:.1f} ms",
            node.get("address") or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    incompatible = status.get("incompatible", [])
    if incompatible:
        lines += ["", "seen but not joined:"]
        lines += [f"  {n['name']} at {n['address']}: {n['reason']}" for n in incompatible]
    return "\n".join(lines)
