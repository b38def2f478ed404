"""``meshllm status`` as a readable table. Pure: status JSON in, text out."""

from __future__ import annotations

from typing import Any

_COLUMNS = ("NODE", "ROLE", "STATE", "MEMORY", "WEIGHTS", "MS/LAYER", "SPAN", "RTT", "MB/S", "PREDICTED",
            "MEASURED", "ADDRESS")
"""RTT and MB/S: this node's link to that one (idle round trip; rate of an activation-sized
message / of bulk bytes). PREDICTED and MEASURED: ms per token with that node as the entry."""


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


def _rates(link: dict[str, Any] | None) -> str:
    if not link:
        return "-"
    def one(value: float | None) -> str:
        return "?" if value is None else f"{value:.0f}" if value < 10_000 else ">10k"
    return f"{one(link.get('small_mb_s'))}/{one(link.get('large_mb_s'))}"


def _rtt(node: dict[str, Any]) -> str:
    link = node.get("link")
    rtt = link.get("rtt_ms") if link else node.get("rtt_ms")
    return "-" if rtt is None else f"{rtt:.1f} ms"


def _target_text(value: float | None, target: float | None, miss: float | None) -> str:
    if target is None or value is None:
        return ""
    return "meets it" if not miss else f"misses it by {miss:.1f} ms"


def format_latency(latency: dict[str, Any] | None) -> str | None:
    """Predicted and measured ms per token (and the first token) against the targets, in a
    line or two; None when there is no active plan."""
    if not latency:
        return None
    predicted, measured = latency.get("predicted_ms_per_token"), latency.get("measured_ms_per_token")
    target, ttft_target = latency.get("target_ms_per_token"), latency.get("target_ttft_ms")
    entries = latency.get("entry_ids") or []
    where = ("on average over the nodes (nobody asked yet)" if latency.get("entry_mean")
             else f"at the slowest of {len(entries)} entry node(s)" if len(entries) > 1 else "at the entry node")
    text = f"{_number(predicted, 1)} ms/token predicted {where}, {_number(measured, 1)} measured"
    if target is not None:
        text += f"; target {target:g} ms: prediction {_target_text(predicted, target, latency.get('miss_ms_per_token'))}"
        if measured is not None:
            text += f", measurement {_target_text(measured, target, latency.get('measured_miss_ms_per_token'))}"
    else:
        text += "; no target"
    lines = [text]
    ttft = latency.get("predicted_ttft_ms")
    if ttft is not None:
        second = f"{ttft:.0f} ms to the first token of a 256-token prompt, predicted"
        if ttft_target is not None:
            second += f"; target {ttft_target:g} ms: {_target_text(ttft, ttft_target, latency.get('miss_ttft_ms'))}"
        lines.append(second)
    return "\n          ".join(lines)


def format_sessions(sessions: object) -> str:
    """Answers running and waiting on this node, with their limits."""
    if not isinstance(sessions, dict):
        return "-"
    running, queued = sessions.get("running", 0), sessions.get("queued", 0)
    most, queue_max = sessions.get("max"), sessions.get("queue_max")
    if most is None:
        return f"{running} running, {queued} waiting"
    return f"{running} running (at most {most} at once), {queued} waiting (at most {queue_max})"


def format_speculation(spec: object) -> str:
    """Speculative decoding of this node's answers: the mode, and the last answers' figures."""
    if not isinstance(spec, dict):
        return "-"
    mode = spec.get("mode", "off")
    acceptance, per_trip = spec.get("acceptance"), spec.get("tokens_per_trip")
    if mode == "off" or acceptance is None or per_trip is None:
        return str(mode)
    return f"{mode}, {acceptance:.0%} of drafted tokens kept, {per_trip:.1f} tokens a trip (last {spec.get('answers')} answers)"


def format_fallback(fallback: dict[str, Any]) -> str:
    """The local fallback model in one line: off, standing by, or answering (and why)."""
    if fallback.get("state") == "off" or not fallback.get("model"):
        return f"none ({fallback.get('note') or 'off'})"
    held = fallback.get("weight_bytes") or fallback.get("reserved_bytes")
    text = f"{fallback['model']} ({fallback.get('state')}, {format_bytes(held)})"
    if fallback.get("serving"):
        text += f"; ANSWERING: {fallback.get('mesh_trouble') or 'the mesh cannot serve'}"
    return text


def format_tune(tune: object) -> str | None:
    """The tune job this node takes part in, or the last one that finished (None: neither)."""
    if not isinstance(tune, dict):
        return None
    if tune.get("job_id"):
        loss = tune.get("loss")
        return (f"job {tune['job_id']} ({tune.get('role') or 'member'}): round {tune.get('round')}/"
                f"{tune.get('rounds')}, {tune.get('state')}, {len(tune.get('participants') or [])} participant(s)"
                + (f", loss {loss:.3f}" if isinstance(loss, (int, float)) else ""))
    last = tune.get("last_finished")
    if isinstance(last, dict) and last.get("job_id"):
        return f"last job {last['job_id']} finished: adapter {last.get('adapter') or str(last.get('digest', ''))[:16]}"
    return None


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
        f"sessions: {format_sessions(status.get('sessions'))}",
        f"drafting: {format_speculation(status.get('speculation'))}",
    ]
    if isinstance(model, dict) and model.get("kernel"):
        invariant = ", batch-invariant" if model.get("batch_invariant") else ""
        lines.insert(1, f"kernel:   {model['kernel']}{invariant}")
    latency = format_latency(status.get("latency"))
    if latency is not None:
        lines.append(f"latency:  {latency}")
    fallback = status.get("fallback")
    if isinstance(fallback, dict):
        lines.append(f"fallback: {format_fallback(fallback)}")
    tune = format_tune(status.get("tune"))
    if tune is not None:
        lines.append(f"tune:     {tune}")
    key_id = status.get("mesh_key_id")
    if key_id == "open":
        lines.append("mesh key: none: an open mesh, anyone on this network can join (--open)")
    elif isinstance(key_id, str):
        lines.append(f"mesh key: id {key_id} (`meshllm invite` prints the code another device joins with)")
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
            _rtt(node),
            _rates(node.get("link")),
            _number(node.get("predicted_ms_per_token"), 1),
            _number(node.get("measured_ms_per_token"), 1),
            node.get("address") or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    incompatible = status.get("incompatible", [])
    if incompatible:
        lines += ["", "seen but not joined:"]
        lines += [f"  {n['name']} at {n['address']}: {n['reason']}" for n in incompatible]
    return "\n".join(lines)
