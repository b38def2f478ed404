#!/usr/bin/env python3
"""Write a GGUF file of random weights in the TinyLlama-1.1B shape (or a tiny one) for benchmarks.

    python scripts/make_synthetic_gguf.py OUT.gguf [--seed 0] [--layers 22] [--hidden 2048] ...
    python scripts/make_synthetic_gguf.py OUT.gguf --tiny        # 2 layers, hidden 256: seconds

The file is an ordinary llama-architecture GGUF that llama.cpp (llama-bench, llama-cli) and
Hugging Face transformers (`from_pretrained(folder, gguf_file=name)`) both load: every linear
weight (attn q/k/v/output, ffn gate/up/down) and token_embd are Q4_0, output.weight is Q8_0 (or
tied / Q4_0 / F16 with --output), norms are F32. Weights are N(0, std^2) with std 0.02 from a
seeded generator, so the same arguments always write the same bytes, and activations stay finite.
The output is meaningless text, but the speed and memory are those of a real model of this shape.

The vocabulary is SentencePiece-style ("llama" tokenizer model, like TinyLlama's): <unk>, <s>,
</s>, the 256 byte tokens <0x00>..<0xFF>, then ordinary pieces (characters, "\u2581word"
pieces, letter pairs and triples) with scores, padded to --vocab. The chat template is
Zephyr-style, as TinyLlama-Chat's: "<s><|user|>\\n...</s>\\n<|assistant|>\\n" (it writes the
BOS itself, since transformers' apply_chat_template adds no special tokens).
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np

SPACE = "\u2581"  # SentencePiece's word-boundary mark

TINYLLAMA = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                 context=2048, rope_theta=10000.0, rms_eps=1e-5)
TINY = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1000,
            context=2048, rope_theta=10000.0, rms_eps=1e-5)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Common English words: whole-word pieces ("\u2581the") come before the letter-pair filler.
WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by word but what some we can out other were all there when up use your how said an each
she which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story saw
far sea draw left late run while press close night real life few north mesh model token layer device
hello hi yes thanks please question""".split()


def build_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a SentencePiece-style vocabulary of exactly ``size`` pieces."""
    from gguf import TokenType

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores: list[float] = [0.0, 0.0, 0.0]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    if size < len(tokens) + 100:
        raise ValueError(f"--vocab must be at least {len(tokens) + 100} (specials, 256 bytes and some pieces)")
    seen = set(tokens)

    def pieces():
        # One character at a time, each with and without the word mark; then words, each built up
        # from its prefixes so every piece is one merge of two others (llama.cpp and transformers
        # both tokenize a SentencePiece vocabulary by merging pairs of pieces); then letter pairs
        # and triples as filler.
        chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
        yield SPACE
        for c in chars:
            yield c
        for c in chars:
            yield SPACE + c
        for word in WORDS:
            for end in range(2, len(word) + 1):
                yield SPACE + word[:end]
                yield word[:end]
        letters = string.ascii_lowercase
        for a, b in product(letters, repeat=2):
            yield a + b
            yield SPACE + a + b
        for a, b, c in product(letters, repeat=3):
            yield a + b + c
            yield SPACE + a + b + c
        for n in range(10**9):  # only a very large --vocab gets here
            yield f"{SPACE}x{n}"

    for piece in pieces():
        if len(tokens) >= size:
            break
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(len(tokens)))  # earlier pieces merge first
    return tokens, scores, [int(t) for t in types]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_synthetic_gguf.py",
        description="Write a llama-architecture GGUF of seeded random weights (Q4_0 linears and token "
        "embedding, Q8_0 output, F32 norms) with a SentencePiece-style vocabulary and a chat template, "
        "loadable by llama.cpp and by transformers. Defaults: the TinyLlama-1.1B shape.",
    )
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--tiny", action="store_true",
                        help="small preset for quick checks: hidden 256, 2 layers, 4 heads / 2 KV heads, "
                             "intermediate 512, vocab 1000 (other flags still override)")
    parser.add_argument("--hidden", type=int, help=f"hidden size ({TINYLLAMA['hidden']})")
    parser.add_argument("--layers", type=int, help=f"decoder layers ({TINYLLAMA['layers']})")
    parser.add_argument("--heads", type=int, help=f"attention heads ({TINYLLAMA['heads']})")
    parser.add_argument("--kv-heads", type=int, help=f"key/value heads ({TINYLLAMA['kv_heads']})")
    parser.add_argument("--intermediate", type=int, help=f"MLP intermediate size ({TINYLLAMA['intermediate']})")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size ({TINYLLAMA['vocab']})")
    parser.add_argument("--context", type=int, help=f"context length ({TINYLLAMA['context']})")
    parser.add_argument("--rope-theta", type=float, help=f"RoPE base ({TINYLLAMA['rope_theta']:g})")
    parser.add_argument("--rms-eps", type=float, help=f"RMSNorm epsilon ({TINYLLAMA['rms_eps']:g})")
    parser.add_argument("--output", choices=("q8_0", "q4_0", "f16", "tied"), default="q8_0",
                        help="output.weight (lm head): Q8_0, Q4_0, F16, or omitted = tied to token_embd (q8_0)")
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the random weights (0.02)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0): same arguments, same file")
    parser.add_argument("--name", default=None, help="general.name (default: from the file name)")
    args = parser.parse_args(argv)

    import gguf
    from gguf import GGMLQuantizationType as Q

    cfg = dict(TINY if args.tiny else TINYLLAMA)
    for key in cfg:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    hidden, layers, heads, kv_heads = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"]
    inter, vocab = cfg["intermediate"], cfg["vocab"]
    problems = []
    if min(hidden, layers, heads, kv_heads, inter, vocab, cfg["context"]) < 1:
        problems.append("sizes must be positive")
    elif hidden % heads or heads % kv_heads:
        problems.append("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    elif hidden % 32 or inter % 32 or (hidden // heads) % 2:
        problems.append("--hidden and --intermediate must be multiples of 32 (Q4_0 blocks), head size even")
    if problems:
        parser.error("; ".join(problems))
    head_dim = hidden // heads
    kv_dim = head_dim * kv_heads
    try:
        tokens, scores, token_types = build_vocab(vocab)
    except ValueError as error:
        parser.error(str(error))

    out: Path = args.out
    if out.parent and not out.parent.exists():
        parser.error(f"folder does not exist: {out.parent}")
    name = args.name or out.name.split(".")[0]
    rng = np.random.default_rng(args.seed)
    started = time.monotonic()

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_description(f"synthetic random weights (seed {args.seed}, std {args.std}), not a trained model")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg["context"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_eps"])
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    linear_q = Q.Q4_0
    plan: list[tuple[str, tuple[int, int] | tuple[int], Q]] = [("token_embd.weight", (vocab, hidden), Q.Q4_0)]
    for i in range(layers):
        plan += [
            (f"blk.{i}.attn_norm.weight", (hidden,), Q.F32),
            (f"blk.{i}.attn_q.weight", (hidden, hidden), linear_q),
            (f"blk.{i}.attn_k.weight", (kv_dim, hidden), linear_q),
            (f"blk.{i}.attn_v.weight", (kv_dim, hidden), linear_q),
            (f"blk.{i}.attn_output.weight", (hidden, hidden), linear_q),
            (f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32),
            (f"blk.{i}.ffn_gate.weight", (inter, hidden), linear_q),
            (f"blk.{i}.ffn_up.weight", (inter, hidden), linear_q),
            (f"blk.{i}.ffn_down.weight", (hidden, inter), linear_q),
        ]
    plan.append(("output_norm.weight", (hidden,), Q.F32))
    if args.output != "tied":
        plan.append(("output.weight", (vocab, hidden), {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16}[args.output]))

    total = sum(int(np.prod(shape)) for _, shape, _ in plan)
    print(f"{out}: llama, hidden {hidden}, {layers} layers, {heads} heads / {kv_heads} KV, intermediate {inter}, "
          f"vocab {vocab}, {total / 1e6:.1f} M parameters; Q4_0 linears and token_embd, output "
          f"{args.output}; seed {args.seed}", flush=True)
    done = 0
    last_report = 0.0
    for index, (tname, shape, qtype) in enumerate(plan):
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)  # RMSNorm weights: identity
        else:
            data = rng.standard_normal(shape, dtype=np.float32)
            data *= np.float32(args.std)
        if qtype == Q.F32:
            writer.add_tensor(tname, data)
        elif qtype == Q.F16:
            writer.add_tensor(tname, data.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        done += data.size
        now = time.monotonic()
        if now - last_report > 2 or index == len(plan) - 1:
            last_report = now
            print(f"  quantized {done / total:6.1%}  ({index + 1}/{len(plan)} tensors, {now - started:.0f} s)",
                  flush=True)
        del data

    print("writing ...", flush=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
