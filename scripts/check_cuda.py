#!/usr/bin/env python3
"""Check the CUDA path (`--device cuda`) on a machine with a GPU.

For tiny random Llama, Qwen2 and Mistral models (built here, nothing downloaded), greedy
answers of meshllm's engine on the GPU, whole and split into three uneven spans, must equal
plain transformers `generate` on the same GPU, token for token; in each quantized weight
format (f16, int8, int4: dequantized to float16 on the GPU), the split engine must answer what
the whole one answers. Prints JSON; exit 1 on a mismatch. Run: `python scripts/check_cuda.py [--device cuda]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.sampling import SamplingParams
    from meshllm.model.source import resolve
    from meshllm.model.tiny import PROMPTS, build_tiny_model

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    report: dict[str, object] = {"device": args.device, "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen2", "mistral"):
            folder = build_tiny_model(Path(tmp) / arch, arch)
            prepared = prepare(resolve(folder))
            whole = Engine(prepared, device=args.device)
            split = Engine(prepared, [(0, 1), (1, 4), (4, 6)], device=args.device)
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)
            matches, total, t_engine = 0, 0, 0.0
            for messages in PROMPTS[:5]:
                prompt = whole.chat_prompt(messages)
                with torch.inference_mode():
                    out = ref.generate(torch.tensor([prompt], device=args.device),
                                       attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=args.device),
                                       do_sample=False, max_new_tokens=args.tokens)
                want = out[0, len(prompt):].tolist()
                t0 = time.perf_counter()
                got = [t.id for t in whole.generate(prompt, SamplingParams(max_tokens=args.tokens))]
                t_engine += time.perf_counter() - t0
                got_split = [t.id for t in split.generate(prompt, SamplingParams(max_tokens=args.tokens))]
                total += 1
                matches += int(got == want and got_split == want)
            report[arch] = {"identical": f"{matches}/{total}",
                            "engine_tokens_per_s": round(total * args.tokens / t_engine, 1),
                            "shard_device": str(whole.shards[0].embed_tokens.weight.device)}
            ok = ok and matches == total
            for weights in ("f16", "int8", "int4"):
                q_whole = Engine(prepared, device=args.device, weights=weights)
                q_split = Engine(prepared, [(0, 1), (1, 4), (4, 6)], device=args.device, weights=weights)
                same = 0
                for messages in PROMPTS[:5]:
                    prompt = q_whole.chat_prompt(messages)
                    a = [t.id for t in q_whole.generate(prompt, SamplingParams(max_tokens=args.tokens))]
                    b = [t.id for t in q_split.generate(prompt, SamplingParams(max_tokens=args.tokens))]
                    same += int(a == b and len(a) > 0)
                report[f"{arch}-{weights}"] = {"split_equals_whole": f"{same}/5"}
                ok = ok and same == 5
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
