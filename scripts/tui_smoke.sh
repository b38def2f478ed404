#!/usr/bin/env bash
# Drive the real terminal UI in a real terminal (tmux) against a real daemon on 127.0.0.1.
#
#   scripts/tui_smoke.sh                 # the default model (SmolLM2-135M-Instruct)
#   MODEL=path/to/hf-folder scripts/tui_smoke.sh
#
# Starts `meshllm up --no-tui`, asks the question once with `meshllm ask` (greedy) for the
# expected answer, opens the chat UI in a 100x30 tmux session, types the question, and checks
# that the same answer and the mesh table show on screen; then quits with Ctrl+Q and checks
# the UI exited cleanly. Exits non-zero (with the screen and the daemon's log) on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
MESHLLM=.venv/bin/meshllm
PROMPT=${PROMPT:-"What is the capital of France?"}
MAX_TOKENS=${MAX_TOKENS:-16}
WAIT_S=${WAIT_S:-180}
WORK=$(mktemp -d -t meshllm-tui-smoke.XXXXXX)
SESSION="meshllm-tui-smoke-$$"
DAEMON_PID=""

say() { printf 'tui_smoke: %s\n' "$*" >&2; }

screen() { tmux capture-pane -p -t "$SESSION" 2>/dev/null || true; }

fail() {
    say "FAIL: $*"
    say "--- screen ---"; screen >&2
    say "--- daemon log (tail) ---"; tail -n 30 "$WORK/daemon.log" >&2 || true
    exit 1
}

cleanup() {
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    if [[ -n "$DAEMON_PID" ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for TEXT SECONDS: until the screen shows TEXT
wait_for() {
    local text=$1 deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if screen | grep -qF -- "$text"; then return 0; fi
        sleep 0.5
    done
    return 1
}

if ! command -v tmux >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing tmux"
        apt-get install -y -qq tmux >/dev/null || { apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }
    else
        say "tmux is needed (apt-get install tmux)"; exit 1
    fi
fi
[[ -x $MESHLLM ]] || { say "no $MESHLLM: run 'make setup' first"; exit 1; }

PORT=${PORT:-$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
API="http://127.0.0.1:$PORT"
model_args=()
[[ -n ${MODEL:-} ]] && model_args=(--model "$MODEL")

say "starting a daemon on $API"
"$MESHLLM" up --no-tui --api-port "$PORT" --state-dir "$WORK/state" --threads 1 "${model_args[@]}" \
    >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
deadline=$((SECONDS + WAIT_S))
until grep -q "meshllm ready" "$WORK/daemon.log"; do
    kill -0 "$DAEMON_PID" 2>/dev/null || fail "the daemon stopped before it was ready"
    ((SECONDS < deadline)) || fail "the daemon was not ready after ${WAIT_S} s"
    sleep 0.5
done

"$MESHLLM" ask --api "$API" --max-tokens "$MAX_TOKENS" --temperature 0 "$PROMPT" >"$WORK/expected"
expected=$(head -n 1 "$WORK/expected" | tr -s ' ' | cut -c 1-60 | sed 's/[[:space:]]*$//')
[[ -n $expected ]] || fail "meshllm ask gave an empty answer"
say "expected answer starts: $expected"

# `meshllm chat` when the CLI has it, else the entry point it calls
if "$MESHLLM" chat --help >/dev/null 2>&1; then
    chat_cmd="$MESHLLM chat --api $API"
else
    chat_cmd="$PY -c 'from tui.app import run_chat; run_chat(\"$API\")'"
fi
tmux new-session -d -s "$SESSION" -x 100 -y 30 \
    "env MESHLLM_CHAT_TEMPERATURE=0 MESHLLM_CHAT_MAX_TOKENS=$MAX_TOKENS $chat_cmd; echo \"TUI EXITED \$?\"; sleep 600"

wait_for "f3 Chat" 60 || fail "the UI never started"
tmux send-keys -t "$SESSION" F3  # `meshllm chat` may open on the mesh view
wait_for "Message the model" 20 || fail "the chat input never showed"
wait_for "on 1 node" 60 || fail "the UI never connected to the daemon"
tmux send-keys -t "$SESSION" -l "$PROMPT"
tmux send-keys -t "$SESSION" Enter
wait_for "done" 120 || fail "the answer never finished"
screen | tr -s ' ' | grep -qF -- "$expected" || fail "the answer on screen is not '$expected…'"
screen | grep -qE "[0-9.]+ tok/s" || fail "no tokens/s shown"
say "the answer streamed in"

tmux send-keys -t "$SESSION" F2
wait_for "ms/layer" 20 || fail "the mesh table never showed"
screen | grep -qE "coord +ready" || fail "the table does not show this node as a ready coordinator"
screen | grep -qF "[0, " || fail "the table shows no layer span"
say "the mesh table shows"

tmux send-keys -t "$SESSION" C-q
wait_for "TUI EXITED 0" 20 || fail "the UI did not quit cleanly with Ctrl+Q"
if screen | grep -q "Traceback"; then fail "a traceback showed"; fi
say "OK"
