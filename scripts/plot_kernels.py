#!/usr/bin/env python3
"""Plot meshllm's kernels against llama.cpp (AVX2) and against torch's kernels (before/after).

    python scripts/plot_kernels.py   # reads docs/bench/llamacpp_avx2_*.json, before_after_*.json
                                     # writes docs/img/kernels.png
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, decode, prompt = [], [], []
    for name, title in (("smollm2", "SmolLM2-135M"), ("synth11b", "1.1B synthetic")):
        for row in json.loads((DOCS / "bench" / f"llamacpp_avx2_{name}.json").read_text())["summary"]:
            m, l = row["meshllm"]["auto"], row["llama_cpp"]
            labels.append(f"{title}\n{row['threads']} thread{'s' if row['threads'] > 1 else ''}")
            decode.append(m["decode"] / l["decode_dn"])
            prompt.append(l["prompt_ms"] / m["ttft_ms"])
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], decode, 0.4, label="decode tok/s (llama.cpp at depth 512)")
    left.bar([i + 0.2 for i in x], prompt, 0.4, label="512-token prompt speed")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.axhline(0.7, color="grey", linewidth=0.8, linestyle="--")
    left.set_xticks(list(x), labels)
    left.set_ylabel("meshllm / llama.cpp (higher is faster)")
    left.set_title("AVX2 laptop (simulated), meshllm vs llama.cpp")
    left.legend(fontsize=8)

    names = [("native_1thread", "AVX-512\n1 thread"), ("native_2threads", "AVX-512\n2 threads"),
             ("avx2_1thread", "AVX2\n1 thread")]
    dec, ttft = [], []
    for key, _ in names:
        runs = json.loads((DOCS / "bench" / f"before_after_{key}.json").read_text())["runs"]
        med = {side: {k: statistics.median(r[k] for r in runs[side]) for k in ("decode_tokens_per_s", "ttft_ms")}
               for side in ("before", "after")}
        dec.append(med["after"]["decode_tokens_per_s"] / med["before"]["decode_tokens_per_s"])
        ttft.append(med["before"]["ttft_ms"] / med["after"]["ttft_ms"])
    x = range(len(names))
    right.bar([i - 0.2 for i in x], dec, 0.4, label="decode tok/s")
    right.bar([i + 0.2 for i in x], ttft, 0.4, label="512-token prompt speed")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(list(x), [n for _, n in names])
    right.set_ylabel("meshllm's kernels / torch's (higher is faster)")
    right.set_title("Default model: after / before, same CPU (AMD EPYC Zen 4)")
    right.legend(fontsize=8)
    fig.tight_layout()
    out = DOCS / "img" / "kernels.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
