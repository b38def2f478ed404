"""The first start converts a GGUF tensor by tensor: the same tensors as transformers' whole-model
loader, in memory bounded by the largest tensor, not by the model (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from meshllm.model import cache, formats
from meshllm.model.cache import prepare
from meshllm.model.formats import format_file
from meshllm.model.source import resolve
from tests.conftest import REPO


def _gguf(folder: Path, name: str, *args: str) -> Path:
    out = folder / f"{name}.gguf"
    subprocess.run([sys.executable, "scripts/make_synthetic_gguf.py", str(out), *args],
                   cwd=REPO, check=True, capture_output=True)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("output", ["q8_0", "tied"])
def test_the_streamed_conversion_writes_what_transformers_loads(tmp_path: Path, output: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 heads over 2 KV heads: the q/k rows are permuted in the file, and must be put back
    gguf = _gguf(tmp_path, f"tiny-{output}", "--tiny", "--output", output)
    monkeypatch.setattr(cache, "_CHUNK_BYTES", 4096)  # the large tensors in runs of rows as well
    monkeypatch.setattr(formats, "_ROWS_BYTES", 4096)
    prepared = prepare(resolve(gguf), tmp_path / "cache")
    streamed = _tensors(prepared.folder / "model.safetensors")
    cache._load_float32(gguf, tmp_path / "whole.safetensors")
    whole = _tensors(tmp_path / "whole.safetensors")
    assert sorted(streamed) == sorted(whole)
    assert all(torch.equal(streamed[k], whole[k]) and streamed[k].dtype == whole[k].dtype for k in whole)
    # the int4 file: its row chunks and its 4-bit blocks read one tensor at a time
    int4 = _tensors(format_file(prepared, "int4"))
    embed = whole["model.embed_tokens.weight"]
    scale = embed.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    assert torch.equal(int4["model.embed_tokens.scale"], scale)
    assert torch.equal(int4["model.embed_tokens.q"], torch.round(embed / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert sum(k.endswith(".codes") for k in int4) == 2 * 7


_PEAK_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from meshllm.model.cache import prepare
    from meshllm.model.formats import format_file
    from meshllm.model.source import resolve

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    warm, big, out = (Path(a) for a in sys.argv[1:4])
    format_file(prepare(resolve(warm), out / "warm"), "int4")  # every import a conversion needs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from here
    base = status("VmRSS")
    format_file(prepare(resolve(big), out / "big"), "int4")
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
    """
)


def test_a_first_start_converts_in_memory_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to reset the peak RSS")
    warm = _gguf(tmp_path, "warm", "--tiny")
    shape = dict(hidden=768, layers=8, heads=12, kv=4, inter=2048, vocab=8000)
    big = _gguf(tmp_path, "big", "--hidden", "768", "--layers", "8", "--heads", "12", "--kv-heads", "4",
                "--intermediate", "2048", "--vocab", "8000")
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(warm), str(big), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    h, kv_rows = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv"]
    per_layer = 2 * h * h + 2 * kv_rows * h + 3 * h * shape["inter"]
    whole = 4 * (shape["layers"] * per_layer + 2 * shape["vocab"] * h)  # the model in float32
    largest = 4 * max(shape["vocab"] * h, h * shape["inter"])
    bound = 32 * 2**20 + 4 * largest  # metadata, tokenizer, and a few copies of one tensor
    assert bound < 0.75 * whole  # a regression to the whole model in float32 at once cannot pass
    assert got["peak"] - got["base"] <= bound, (got, bound, whole)
