"""``meshllm bench``: how fast this machine, a running mesh, or a mesh against one node is.

One module per mode, and what they share (``daemon/cli.py`` parses the flags, ``daemon/cli_bench.py``
dispatches):

- ``local``: ``--local``, the engine in this process, no daemon (``run_local_bench``);
- ``formats``: ``--local --weights a,b,...`` (each format in a fresh process, alternating) and
  ``--quality`` (perplexity per format);
- ``api``: ``--api URL [--api URL ...]``, a running mesh through its HTTP API
  (``measure_api``); the first URL is the entry node, every URL's ``/v1/status`` gives that
  node's stage stats;
- ``mesh``: ``--mesh N``, one run that starts a single-node reference and then an N-node
  local mesh per codec on this machine, measures each the same way and compares them
  (``run_mesh_comparison``, ``compare``);
- ``concurrency``: ``--concurrency 1,2,4,8``, the pure arithmetic and table of N answers at
  once (aggregate decode tokens/s, time between tokens, TTFT, TTFT under load);
- ``streams``: the measuring of concurrent answers through the API, and the loopback nodes
  it starts (one for ``--concurrency`` without ``--api``; nodes pinned to cores for the
  two-devices script);
- ``report``: ``BenchError``, the tables, and the pure arithmetic of a measure.

What is measured through the API:
- time to first token (TTFT) for a prompt of exactly ``prompt_tokens`` tokens (chat template
  included), the median of a few streamed runs;
- decode tokens/s from the arrival times of streamed tokens after the first one;
- per stage, from the nodes' ``stats`` deltas around each window: compute ms per decode
  step, compute ms of one prompt's prefill, and whole encoded message bytes per decode hop;
- per-hop ms, estimated as (ms per token - sum of the stages' compute ms) / hops per token;
- the greedy token ids of a few answers (``meshllm.token_ids`` of non-streamed answers),
  for the token agreement of a lossy codec with the single-node reference.

Every mode reaches a daemon only through ``tui.client``; only ``local`` and ``formats`` load
the model (torch), and only when they run.
"""
