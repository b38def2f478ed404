"""Plots for docs/weights.md from the JSON that the weight benchmarks write.

    python scripts/plot_weights.py            # reads docs/bench/*.json, writes docs/img/weights_*.png

Inputs (each optional; a missing one skips its plot):
- docs/bench/llamacpp_*.json: ``scripts/bench_vs_llamacpp.py --json``;
- docs/bench/formats.json: ``meshllm bench --local --weights f32,f16,int8,int4 --json``;
- docs/bench/quality.json: ``meshllm bench --quality --weights f32,f16,int8,int4 --json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
IMG = ROOT / "docs" / "img"


def plot_vs_llamacpp() -> Path | None:
    files = sorted(BENCH.glob("llamacpp_*.json"))
    if not files:
        return None
    labels, decode, prompt = [], [], []
    for f in files:
        raw = json.loads(f.read_text())
        name = "SmolLM2-135M" if "smollm2" in f.name else "1.1B synthetic"
        for s in raw["summary"]:
            m = s["meshllm"].get("auto") or next(iter(s["meshllm"].values()))
            llama = s["llama_cpp"]
            labels.append(f"{name}\n{s['threads']} thr, fa {raw['flash_attn']}")
            decode.append(m["decode"] / llama["decode_dn"])
            prompt.append(llama["prompt_ms"] / m["ttft_ms"])
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(labels)), 4.6))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], decode, 0.4, label="decode tok/s, meshllm / llama.cpp (same depth 512)")
    ax.bar([x + 0.2 for x in xs], prompt, 0.4, label="prompt of 512: llama.cpp time / meshllm TTFT")
    ax.axhline(0.5, color="red", lw=1, ls="--", label="decode target 0.5")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ratio (higher: meshllm faster)")
    ax.set_title("meshllm --weights auto (int4) against llama.cpp: same file, same run", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    out = IMG / "weights_vs_llamacpp.png"
    fig.savefig(out, dpi=110)
    return out


def plot_formats() -> Path | None:
    formats_file, quality_file = BENCH / "formats.json", BENCH / "quality.json"
    if not formats_file.exists():
        return None
    runs = json.loads(formats_file.read_text())
    ppl = {q["weights"]: q["perplexity"] for q in json.loads(quality_file.read_text())} if quality_file.exists() else {}
    names = [r["weights"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].bar(names, [r["decode_tokens_per_s"] for r in runs], color="tab:blue")
    axes[0].set_title(f"decode tok/s ({runs[0]['threads']} thread, depth {runs[0]['prompt_tokens']})")
    axes[1].bar(names, [r["weight_rss_bytes"] / 1e6 for r in runs], color="tab:orange")
    axes[1].axhline(runs[0]["file_bytes"] / 1e6, color="grey", ls="--", lw=1, label="GGUF file")
    axes[1].set_title("weight RSS, MB")
    axes[1].legend(fontsize=8)
    if ppl:
        axes[2].bar(names, [ppl.get(n, 0) for n in names], color="tab:green")
        low = min(ppl.values())
        axes[2].set_ylim(low * 0.98, max(ppl.values()) * 1.01)
        axes[2].set_title("perplexity (shipped text, ctx 512)")
    fig.suptitle(f"{runs[0]['model_name']}: one file, four formats in memory", fontsize=10)
    fig.tight_layout()
    out = IMG / "weights_formats.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    IMG.mkdir(parents=True, exist_ok=True)
    made = [p for p in (plot_vs_llamacpp(), plot_formats()) if p is not None]
    for p in made:
        print(f"wrote {p.relative_to(ROOT)}")
    if not made:
        print("no benchmark JSON under docs/bench/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
