"""scripts/bench_kernels.py runs end to end on tiny shapes and writes its JSON and tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_kernels.py"


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "k.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--m", "1,4,32", "--threads", "1,2", "--repeats", "1",
         "--sample-s", "0.001", "--no-import-rss", "--json", str(out), *extra],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_the_kernel_benchmark_times_and_checks_each_candidate(tmp_path: Path) -> None:
    """A user runs the candidate benchmark: a table of timings and of batch invariance, and the
    same rows in JSON, every candidate computing the same 4-bit matrix."""
    from meshllm.model import kernels

    built = kernels.get() is not None  # where there is no C compiler, meshllm's candidate is skipped, said so
    report, stdout = _run(tmp_path, "--candidates", "a,b,b_prompt,e")
    assert "## Kernel timings" in stdout and "## Invariance" in stdout
    timed = {(r["shape"], r["M"], r["threads"], r["candidate"]) for r in report["results"] if "median_ms" in r}
    for m in (1, 4, 32):
        assert ("tiny", m, 1, "a") in timed
    assert ("tiny", 32, 2, "b_prompt") in timed and ("tiny", 4, 2, "b_prompt") not in timed
    inv = {(e["shape"], e["candidate"]): e for e in report["invariance"]}
    assert set(inv) >= {("tiny", c) for c in ("a", "b", "b_prompt", *(("e",) if built else ()))}
    for e in inv.values():
        if e["rel_err"] is not None:
            assert e["rel_err"] < 0.05, e  # every candidate computes the same 4-bit matrix
        assert set(e["batch_invariant"]) == {"1", "2"}
    if built:
        assert all(b["invariant"] for b in inv[("tiny", "e")]["batch_invariant"].values())  # the same bits in any batch
    else:
        assert "candidate e skipped" in stdout
