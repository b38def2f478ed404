"""``meshllm bench``: decode speed, time to first token, weight formats, a mesh against one
node, concurrent answers, and speculative decoding (the measuring itself is in ``tui.bench``,
imported once the command runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from daemon.cli_client import client_failure
from daemon.cli_common import EXIT_OK, EXIT_USAGE, fail, setup_logging
from daemon.node.config import WEIGHT_CHOICES, ConfigError, NodeConfig


def cmd_bench(args: argparse.Namespace) -> int:
    """``meshllm bench``: check the flags, then run the one mode they name."""
    formats = [w.strip() for w in (args.weights or "").split(",") if w.strip()]
    if any(w not in WEIGHT_CHOICES for w in formats):
        return fail(f"--weights must be a comma-separated list of {', '.join(WEIGHT_CHOICES)}", EXIT_USAGE)
    if args.mesh is not None and len(formats) > 1:
        return fail("--mesh takes one --weights format", EXIT_USAGE)
    weights = formats[0] if len(formats) == 1 else None
    for name in ("prompt_tokens", "decode_tokens", "ttft_runs", "agreement_tokens", "rounds"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.threads is not None and args.threads < 1:
        return fail("--threads must be at least 1", EXIT_USAGE)
    if args.speculate is not None:
        return _bench_speculation(args, formats)
    for flag in ("prompt_set", "prompts", "answer_tokens", "draft_model", "debug_link_delay_ms"):
        if getattr(args, flag) is not None:
            return fail(f"--{flag.replace('_', '-')} goes with --speculate", EXIT_USAGE)
    if args.concurrency is not None:
        if args.mesh is not None or args.quality:
            return fail("--concurrency runs on one local node or with --api, not with --mesh or --quality",
                        EXIT_USAGE)
        if len(formats) > 1:
            return fail("--concurrency takes one --weights format", EXIT_USAGE)
        return _bench_concurrency(args, weights)
    if not (args.local or args.api or args.mesh is not None or args.quality):
        return fail("say what to measure: --local, --api URL, --mesh N, --quality or --concurrency N[,N...]",
                    EXIT_USAGE)
    if args.quality:
        return _bench_quality(args, formats)
    if args.local and len(formats) > 1:
        return _bench_formats(args, formats)
    if args.local:
        return _bench_local(args, weights)
    from tui.bench.api import measure_api
    from tui.bench.mesh import CODECS, format_comparison, run_mesh_comparison
    from tui.bench.report import BenchError, format_measure
    from tui.client import DaemonError, DaemonUnavailable

    def progress(message: str) -> None:
        print(f"meshllm bench: {message}", file=sys.stderr, flush=True)

    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if args.mesh is not None:
        if args.mesh < 2:
            return fail("--mesh needs at least 2 nodes (the single-node reference runs anyway)", EXIT_USAGE)
        if not codecs or any(c not in CODECS for c in codecs):
            return fail(f"--codecs must be a comma-separated list of {', '.join(CODECS)}", EXIT_USAGE)
    options = dict(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                   ttft_runs=args.ttft_runs, agreement_tokens=args.agreement_tokens, progress=progress)
    try:
        if args.api:
            measure = asyncio.run(measure_api(args.api, **options))  # type: ignore[arg-type]
            print(json.dumps({"mode": "api", **measure.to_json()}, indent=2) if args.json
                  else format_measure(measure))
            return EXIT_OK
        signal.signal(signal.SIGTERM, _interrupt)  # stop the local meshes on the way out
        comparison = run_mesh_comparison(args.mesh, codecs=codecs, cores=args.threads, model=args.model,
                                         cache_dir=args.cache_dir, weights=weights,
                                         **options)  # type: ignore[arg-type]
    except BenchError as error:
        return fail(str(error))
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    print(json.dumps(comparison.to_json(), indent=2) if args.json else format_comparison(comparison))
    return EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _bench_concurrency(args: argparse.Namespace, weights: str | None) -> int:
    """``meshllm bench --concurrency 1,2,4,8``: N answers at once per level, on a local node
    started for the run (``--threads``), or on the running nodes of ``--api``."""
    from tui.bench.concurrency import format_concurrency, parse_levels
    from tui.bench.report import BenchError
    from tui.bench.streams import measure_concurrency, run_local_concurrency
    from tui.client import DaemonError, DaemonUnavailable

    def progress(message: str) -> None:
        print(f"meshllm bench: {message}", file=sys.stderr, flush=True)

    try:
        levels = parse_levels(args.concurrency)
    except BenchError as error:
        return fail(str(error), EXIT_USAGE)
    options = dict(rounds=args.rounds, decode_tokens=args.decode_tokens, progress=progress)
    try:
        if args.api:
            report = asyncio.run(measure_concurrency(args.api, levels, **options))  # type: ignore[arg-type]
        else:
            signal.signal(signal.SIGTERM, _interrupt)  # stop the local node on the way out
            report = run_local_concurrency(levels, threads=args.threads or os.cpu_count() or 1, model=args.model,
                                           cache_dir=args.cache_dir, weights=weights,
                                           **options)  # type: ignore[arg-type]
    except BenchError as error:
        return fail(str(error))
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_concurrency(report))
    return EXIT_OK


def _bench_speculation(args: argparse.Namespace, formats: list[str]) -> int:
    """``meshllm bench --speculate off,ngram,auto``: nodes started for each mode (one, or an
    N-node local mesh with ``--mesh N``), greedy answers over the prompt sets, the modes in turns."""
    from tui.bench.report import BenchError
    from tui.bench.speculation import ANSWER_TOKENS, format_speculation, load_prompt_set, parse_modes, parse_prompt_sets
    from tui.bench.speculation_run import Config, run_speculation_bench
    from tui.client import DaemonError, DaemonUnavailable

    if args.local or args.api or args.quality or args.concurrency is not None:
        return fail("--speculate starts its own nodes (one, or --mesh N): not with --local, --api, --quality or "
                    "--concurrency", EXIT_USAGE)
    if len(formats) > 1:
        return fail("--speculate takes one --weights format", EXIT_USAGE)
    if args.mesh is not None and args.mesh < 2:
        return fail("--mesh needs at least 2 nodes (without it, --speculate runs one node per mode)", EXIT_USAGE)
    for flag in ("prompts", "answer_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be at least 1", EXIT_USAGE)
    if args.debug_link_delay_ms is not None and args.debug_link_delay_ms < 0:
        return fail("--debug-link-delay-ms must be at least 0", EXIT_USAGE)
    try:
        modes = parse_modes(args.speculate)
        sets = {name: load_prompt_set(name)[:args.prompts] for name in parse_prompt_sets(args.prompt_set)}
    except BenchError as error:
        return fail(str(error), EXIT_USAGE)
    nodes = args.mesh or 1
    config = Config(name=f"mesh{nodes}" if nodes > 1 else "one node", nodes=nodes,
                    threads=args.threads or max(1, (os.cpu_count() or 1) // nodes), modes=tuple(modes),
                    weights=formats[0] if formats else None, link_delay_ms=args.debug_link_delay_ms,
                    draft_model=args.draft_model)

    def progress(message: str) -> None:
        print(f"meshllm bench: {message}", file=sys.stderr, flush=True)

    try:
        signal.signal(signal.SIGTERM, _interrupt)  # stop the local nodes on the way out
        report = run_speculation_bench(config, sets, rounds=args.rounds,
                                       answer_tokens=args.answer_tokens or ANSWER_TOKENS, model=args.model,
                                       cache_dir=args.cache_dir, progress=progress)
    except BenchError as error:
        return fail(str(error))
    except (DaemonUnavailable, DaemonError) as error:
        return client_failure(error)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_speculation(report))
    return EXIT_OK


def _bench_local(args: argparse.Namespace, weights: str | None) -> int:
    """``meshllm bench --local``: the engine (every layer) in this process, no daemon."""
    try:
        config = NodeConfig.from_sources(
            {"model": args.model, "cache_dir": args.cache_dir, "threads": args.threads,
             "weights": weights}, os.environ
        )
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    setup_logging("warning")
    import dataclasses

    import torch

    from meshllm.errors import ModelSourceError
    from meshllm.model.cache import prepare
    from meshllm.model.engine import Engine
    from meshllm.model.lean import release_free_memory
    from meshllm.model.sampling import SamplingParams
    from meshllm.model.shape import load_config, model_shape
    from meshllm.model.source import resolve
    from meshllm.model.text import load_tokenizer
    from tui.bench.local import format_bench, peak_rss_bytes, rss_bytes, run_local_bench
    from tui.bench.report import BenchError

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        prepared = prepare(resolve(config.model), config.cache_dir)
        tokenizer = load_tokenizer(prepared.folder)
        model_shape(load_config(prepared))  # the modelling code, imported before the baseline
        release_free_memory()
        baseline = rss_bytes()  # weights only from here: code and tokenizer are loaded
        engine = Engine(prepared, weights=config.weights, tokenizer=tokenizer)
    except (ModelSourceError, ValueError) as error:
        return fail(str(error))
    load_s = time.perf_counter() - started
    with torch.inference_mode():  # touch every weight (file-backed f32 pages count once read)
        for _ in engine.generate(engine.chat_prompt([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=2)):
            pass
    weight_rss = rss_bytes() - baseline
    try:
        with torch.inference_mode():
            result = run_local_bench(engine, threads=config.threads, load_s=load_s,
                                     prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens)
    except BenchError as error:
        return fail(str(error), EXIT_USAGE)
    result = dataclasses.replace(result, weight_rss_bytes=weight_rss, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(result.to_json(), indent=2) if args.json else format_bench(result))
    return EXIT_OK


def _bench_formats(args: argparse.Namespace, formats: list[str]) -> int:
    """``meshllm bench --local --weights a,b``: each format in a fresh process, alternating."""
    from tui.bench.formats import compare_formats, format_formats
    from tui.bench.report import BenchError

    passed = ["--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    for flag, value in (("--model", args.model), ("--cache-dir", args.cache_dir), ("--threads", args.threads)):
        if value is not None:
            passed += [flag, str(value)]
    try:
        runs = compare_formats(formats, args.rounds, passed,
                               progress=lambda m: print(f"meshllm bench: {m}", file=sys.stderr, flush=True))
    except BenchError as error:
        return fail(str(error))
    print(json.dumps(runs, indent=2) if args.json else format_formats(runs))
    return EXIT_OK


def _bench_quality(args: argparse.Namespace, formats: list[str]) -> int:
    """``meshllm bench --quality``: perplexity of each format on the shipped text."""
    try:
        config = NodeConfig.from_sources({"model": args.model, "cache_dir": args.cache_dir,
                                          "threads": args.threads}, os.environ)
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    setup_logging("warning")
    import torch

    from meshllm.errors import ModelSourceError
    from meshllm.model.engine import Engine
    from meshllm.model.quality import perplexity
    from tui.bench.formats import format_quality

    torch.set_num_threads(config.threads)
    results = []
    for weights in formats or ["f32", "auto"]:
        print(f"meshllm bench: perplexity with {weights} weights", file=sys.stderr, flush=True)
        try:
            engine = Engine.load(config.model, cache_dir=str(config.cache_dir) if config.cache_dir else None,
                                 weights=weights)
            results.append(perplexity(engine, ctx=min(512, engine.info.max_positions)))
        except (ModelSourceError, ValueError) as error:
            return fail(str(error))
        del engine
    print(json.dumps([r.__dict__ for r in results], indent=2) if args.json else format_quality(results))
    return EXIT_OK
