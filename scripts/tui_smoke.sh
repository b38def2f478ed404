#!/usr/bin/env bash
# Drive the real terminal UI in a real terminal (tmux, 100x30) on a real two-node mesh.
#
#   scripts/tui_smoke.sh                 # the default model (SmolLM2-135M-Instruct)
#   MODEL=path/to/hf-folder scripts/tui_smoke.sh
#
# Both daemons run in loopback mode (discovery and links on 127.0.0.1 only) under a mesh
# name of their own, so nothing is advertised on a real interface and no other mesh is joined.
#
# 1. Starts node "smoke-b" headless (`meshllm up --no-tui`). It offers more memory, so it is
#    the coordinator.
# 2. Starts node "smoke-a" with `meshllm up --invite CODE` in tmux, CODE from `meshllm invite`
#    on smoke-b (each node has a mesh key of its own otherwise, and they would not join). The UI
#    opens attached to its own node. Checks the mesh view shows both nodes and a layer map, asks the question once with
#    `meshllm ask` (greedy) for the expected answer, types the question in the chat view and
#    checks that the same answer shows. Ctrl+Q quits: `meshllm up` must exit 0 and the
#    coordinator's log must say that smoke-a is leaving and handing its layers over.
# 3. Opens `meshllm chat` on smoke-b, now a mesh of one, and quits it: the UI exits 0 and the
#    daemon keeps running (`chat` only watches).
# Exits non-zero (with the screen and the daemons' logs) on failure.
#
# MESHLLM may name another command to run meshllm with (it is split on spaces).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
read -r -a MESHLLM <<<"${MESHLLM:-.venv/bin/meshllm}"
PROMPT=${PROMPT:-"What is the capital of France?"}
MAX_TOKENS=${MAX_TOKENS:-16}
WAIT_S=${WAIT_S:-180}
WORK=$(mktemp -d -t meshllm-tui-smoke.XXXXXX)
MESH="tui-smoke-$$-$RANDOM"
SESSION="meshllm-tui-smoke-$$"
B_PID=""

say() { printf 'tui_smoke: %s\n' "$*" >&2; }

screen() { tmux capture-pane -p -t "$SESSION" 2>/dev/null || true; }

fail() {
    say "FAIL: $*"
    say "--- screen ---"; screen >&2
    say "--- smoke-a log (tail) ---"; grep -v "incompatible" "$WORK/a/meshllm.log" 2>/dev/null | tail -n 20 >&2 || true
    say "--- smoke-b log (tail) ---"; grep -v "incompatible" "$WORK/b.log" 2>/dev/null | tail -n 20 >&2 || true
    exit 1
}

cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    if [[ -n "$B_PID" ]] && kill -0 "$B_PID" 2>/dev/null; then
        kill "$B_PID" 2>/dev/null || true
        wait "$B_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for TEXT SECONDS [GIVE_UP]: until the screen shows TEXT (not once it shows GIVE_UP)
wait_for() {
    local text=$1 deadline=$((SECONDS + $2)) give_up=${3:-}
    while ((SECONDS < deadline)); do
        if screen | grep -qF -- "$text"; then return 0; fi
        if [[ -n $give_up ]] && screen | grep -qF -- "$give_up"; then return 1; fi
        sleep 0.5
    done
    return 1
}

# mesh_of URL NODES: until the daemon at URL sees NODES nodes under one active plan
mesh_of() {
    $PY - "$1" "$2" "$WAIT_S" <<'EOF'
import sys, time
from tui.client import DaemonClient, DaemonError, DaemonUnavailable, run_sync
url, nodes, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait_s
while time.monotonic() < deadline:
    try:
        st = run_sync(DaemonClient(url, connect_timeout_s=2, request_timeout_s=2).status())
        plan = st.get("plan") or {}
        if len(st["nodes"]) == nodes and plan.get("state") == "active" \
                and all(n["state"] == "ready" for n in st["nodes"]):
            print(next(n["name"] for n in st["nodes"] if n["role"] == "coordinator"))
            sys.exit(0)
    except (DaemonUnavailable, DaemonError):
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

free_port_pair() {
    $PY -c 'from tui.launcher import free_port_pair; print(free_port_pair())'
}

if ! command -v tmux >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing tmux"
        apt-get install -y -qq tmux >/dev/null || { apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }
    else
        say "tmux is needed (apt-get install tmux)"; exit 1
    fi
fi
[[ -x ${MESHLLM[0]} ]] || command -v "${MESHLLM[0]}" >/dev/null || { say "no ${MESHLLM[0]}: run 'make setup' first"; exit 1; }

PORT_A=$(free_port_pair)
PORT_B=$(free_port_pair)
[[ $PORT_A != "$PORT_B" && $PORT_A != $((PORT_B + 1)) && $PORT_B != $((PORT_A + 1)) ]] || PORT_B=$(free_port_pair)
API_A="http://127.0.0.1:$PORT_A"
API_B="http://127.0.0.1:$PORT_B"
common=(--loopback --mesh-name "$MESH" --threads 1 --log-level info)
[[ -n ${MODEL:-} ]] && common+=(--model "$MODEL")

say "mesh $MESH: smoke-b on $API_B (headless), smoke-a on $API_A (with the UI)"
"${MESHLLM[@]}" up --no-tui "${common[@]}" --name smoke-b --api-port "$PORT_B" --state-dir "$WORK/b" \
    --mem-budget 8G >"$WORK/b.out" 2>"$WORK/b.log" &
B_PID=$!
deadline=$((SECONDS + WAIT_S))
until grep -q "meshllm ready" "$WORK/b.out"; do
    kill -0 "$B_PID" 2>/dev/null || fail "smoke-b stopped before it was ready"
    ((SECONDS < deadline)) || fail "smoke-b was not ready after ${WAIT_S} s"
    sleep 0.5
done

CODE=$("${MESHLLM[@]}" invite --state-dir "$WORK/b" 2>/dev/null | awk '{print $NF}') \
    || fail "meshllm invite found no key in smoke-b's state dir"
up_a=$(printf '%q ' "${MESHLLM[@]}" up "${common[@]}" --name smoke-a --api-port "$PORT_A" \
    --state-dir "$WORK/a" --mem-budget 1G --invite "$CODE")
tmux new-session -d -s "$SESSION" -x 100 -y 30 \
    "env MESHLLM_CHAT_TEMPERATURE=0 MESHLLM_CHAT_MAX_TOKENS=$MAX_TOKENS $up_a; echo \"MESHLLM EXITED \$?\"; sleep 600"

wait_for "f3 Chat" "$WAIT_S" "MESHLLM EXITED" || fail "the UI never opened under meshllm up"
coordinator=$(mesh_of "$API_A" 2) || fail "smoke-a never saw a two-node mesh with an active plan"
[[ $coordinator == smoke-b ]] || fail "the coordinator is $coordinator, not smoke-b"
wait_for "smoke-b" 20 || fail "the mesh view never showed smoke-b"
screen | grep -qE "smoke-a +● +member +ready" || fail "the table does not show smoke-a as this node, a ready member"
screen | grep -qE "smoke-b +coord +ready" || fail "the table does not show smoke-b as the ready coordinator"
screen | grep -qF "█ smoke-a [" || fail "the layer map has no span for smoke-a"
screen | grep -qF "█ smoke-b [" || fail "the layer map has no span for smoke-b"
say "the UI opened on its own node: both nodes and the layer map show"

"${MESHLLM[@]}" ask --api "$API_A" --max-tokens "$MAX_TOKENS" --temperature 0 "$PROMPT" >"$WORK/expected"
expected=$(head -n 1 "$WORK/expected" | tr -s ' ' | cut -c 1-60 | sed 's/[[:space:]]*$//')
[[ -n $expected ]] || fail "meshllm ask gave an empty answer"
say "expected answer starts: $expected"

tmux send-keys -t "$SESSION" F3
wait_for "Message the model" 20 || fail "the chat input never showed"
wait_for "on 2 nodes" 20 || fail "the chat does not say it runs on 2 nodes"
tmux send-keys -t "$SESSION" -l "$PROMPT"
tmux send-keys -t "$SESSION" Enter
wait_for "done" 120 || fail "the answer never finished"
screen | tr -s ' ' | grep -qF -- "$expected" || fail "the answer on screen is not '$expected…'"
screen | grep -qE "[0-9.]+ tok/s" || fail "no tokens/s shown"
say "the answer streamed in"

tmux send-keys -t "$SESSION" C-q
wait_for "MESHLLM EXITED" 30 || fail "meshllm up did not end after Ctrl+Q"
wait_for "MESHLLM EXITED 0" 1 || fail "meshllm up did not exit 0 after Ctrl+Q"
if screen | grep -q "Traceback"; then fail "a traceback showed"; fi
grep -qF "smoke-a is leaving: handing its layers over" "$WORK/b.log" \
    || fail "the coordinator's log does not say smoke-a is leaving"
say "Ctrl+Q stopped smoke-a cleanly: it handed its layers over"

tmux kill-session -t "$SESSION"
mesh_of "$API_B" 1 >/dev/null || fail "smoke-b never took all the layers back"
chat_b=$(printf '%q ' "${MESHLLM[@]}" chat --api "$API_B")
tmux new-session -d -s "$SESSION" -x 100 -y 30 "$chat_b; echo \"TUI EXITED \$?\"; sleep 600"
wait_for "on 1 node" 60 || fail "meshllm chat never connected to smoke-b"
tmux send-keys -t "$SESSION" C-q
wait_for "TUI EXITED 0" 20 || fail "meshllm chat did not quit cleanly with Ctrl+Q"
sleep 1
kill -0 "$B_PID" 2>/dev/null || fail "quitting meshllm chat stopped the daemon"
say "meshllm chat opened on smoke-b and quit, leaving it running"
say "OK"
