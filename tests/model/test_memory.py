"""A shard holds the memory of its span, not of the whole model (design §11)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO

_PROBE = textwrap.dedent(
    """
    import gc, json, os, sys
    import torch
    from transformers import AutoModelForCausalLM
    from meshllm.model.cache import prepare
    from meshllm.model.shard import Shard, span_config
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve

    start, end = int(sys.argv[1]), int(sys.argv[2])
    prepared = prepare(resolve(None))
    config = load_config(prepared)
    shape = model_shape(config)
    with torch.device("meta"):  # load the modelling code before the baseline
        AutoModelForCausalLM.from_config(span_config(config, 0, 1))
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        gc.collect()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    base = rss()
    shard = Shard(prepared, start, end)
    with torch.inference_mode():  # touch every weight: one prefill through the span and the head
        shard.head(shard.forward("probe", shard.embed([1, 2, 3]), 0))
    shard.drop("probe")
    grown = rss() - base
    expected = (end - start) * shape.layer_bytes + shape.embed_head_bytes
    print(json.dumps({"grown": grown, "expected": expected, "layer_bytes": shape.layer_bytes}))
    """
)


_INT4_PROBE = textwrap.dedent(
    """
    import gc, json, os, resource
    import torch
    from meshllm.model.cache import prepare
    from meshllm.model.formats import format_file
    from meshllm.model.shard import open_shard
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve

    prepared = prepare(resolve(None))
    format_file(prepared, "int4")  # written once, before the measure
    shape = model_shape(load_config(prepared), "int4")
    open_shard(prepared, 0, 1, weights="int4")  # the modelling code, before the baseline
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    base = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = open_shard(prepared, 0, 30, weights="int4")
    with torch.inference_mode():
        shard.head(shard.forward("probe", shard.embed([1, 2, 3]), 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": peak - max(base, peak_before) if peak > peak_before else 0,
                      "grown": rss() - base, "held": shard.nbytes, "file": prepared.gguf_path.stat().st_size,
                      "expected": 30 * shape.layer_bytes + shape.embed_head_bytes}))
    """
)


def _measure(start: int, end: int, probe: str = _PROBE) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", probe, str(start), str(end)],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_third_of_the_layers_costs_a_third_of_the_layer_memory(default_engine) -> None:  # type: ignore[no-untyped-def]
    # default_engine makes sure the weight cache exists before the probe runs
    third = _measure(10, 20)
    assert third["grown"] <= 1.15 * third["expected"], third
    whole = _measure(0, 30)
    assert whole["grown"] <= 1.15 * whole["expected"], whole
    # memory grows with the span: 20 more layers cost about 20 layers' bytes
    assert whole["grown"] - third["grown"] >= 0.8 * 20 * third["layer_bytes"]


def test_the_default_model_in_int4_holds_about_its_file_size(default_engine) -> None:  # type: ignore[no-untyped-def]
    """4-bit weights stay 4-bit in memory: the resident growth of a whole-model int4 shard is about
    the GGUF's size, and loading never holds the weights twice."""
    m = _measure(0, 30, _INT4_PROBE)
    assert 0.8 * m["expected"] <= m["held"] <= 1.2 * m["expected"], m
    assert m["grown"] <= 1.3 * m["file"], m
    assert m["peak_growth"] <= 1.5 * m["file"], m


def test_the_allocator_is_tuned_once_per_process(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """mallopt is the whole process's setting: the first load sets it, later loads do not."""
    from meshllm.model import allocator

    calls = []

    class Libc:
        def mallopt(self, *args: int) -> int:
            calls.append(args)
            return 1

    monkeypatch.setattr(allocator, "_mapped", False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc())
    for _ in range(3):
        allocator.map_large_allocations()
    assert calls == [(-3, allocator.LARGE_ALLOCATION_BYTES)]
