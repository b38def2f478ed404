#!/usr/bin/env bash
# The suite's trust check: `make test` N times in a row (default 3) on a fresh clone of this
# repository, with one CPU hog (`yes > /dev/null`) per core running beside it the whole time.
#
#   bash scripts/test_under_load.sh [RUNS] [CLONE_DIR]
#
# Stops at the first failing run. Each run's log and duration go to CLONE_DIR/run-N.log.
set -euo pipefail
runs="${1:-3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${2:-$(mktemp -d /tmp/meshllm-under-load-XXXXXX)}"
rm -rf "$clone/repo"
mkdir -p "$clone"
git clone --quiet "$repo" "$clone/repo"
hogs=()
cleanup() { for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq "$(nproc)"); do yes > /dev/null & hogs+=($!); done
for i in $(seq "$runs"); do
    start=$(date +%s)
    if (cd "$clone/repo" && make test ARGS="-p no:cacheprovider") > "$clone/run-$i.log" 2>&1; then
        echo "run $i: passed in $(( $(date +%s) - start )) s ($(tail -1 "$clone/run-$i.log"))"
    else
        echo "run $i: FAILED after $(( $(date +%s) - start )) s; see $clone/run-$i.log"
        tail -30 "$clone/run-$i.log"
        exit 1
    fi
done
