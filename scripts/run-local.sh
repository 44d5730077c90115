#!/usr/bin/env bash
# Install into .venv and run a relay and a daemon on embedded defaults, on this machine:
# the relay on http://127.0.0.1:8000, the daemon on http://127.0.0.1:8377 connected to it.
# State lives in ./.repowire-local (REPOWIRE_HOME; it holds the API key, and is gitignored).
#
# Ctrl-C, SIGTERM or SIGHUP stops both, and the script returns only once both are gone (so
# their ports are free and the script can run again at once).
#
# Environment overrides:
#   REPOWIRE_HOME             state directory (default ./.repowire-local)
#   RUN_LOCAL_RELAY_PORT      the relay's port (default 8000)
#   RUN_LOCAL_DAEMON_PORT     the daemon's port (default 8377)
#   RUN_LOCAL_METRICS_LISTEN  the relay's --metrics-listen (default: the relay's own default)
#   RUN_LOCAL_STOP_TIMEOUT    seconds each process gets to stop after SIGTERM before SIGKILL
#                             (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/repowire ] || { python3 -m venv .venv && .venv/bin/python -m pip install --quiet -e .; }
export REPOWIRE_HOME="${REPOWIRE_HOME:-$PWD/.repowire-local}"
relay_port="${RUN_LOCAL_RELAY_PORT:-8000}"
daemon_port="${RUN_LOCAL_DAEMON_PORT:-8377}"
stop_timeout="${RUN_LOCAL_STOP_TIMEOUT:-10}"
relay_url="http://127.0.0.1:$relay_port"

relay_pid=""
serve_pid=""
step_pid=""

# Stop one child: SIGTERM, then SIGKILL if it is still there after $stop_timeout seconds.
stop() {
    local pid="$1" tenths=$((stop_timeout * 10))
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && [ "$tenths" -gt 0 ]; do
        sleep 0.1
        tenths=$((tenths - 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# On any way out: the daemon first (it closes its relay link cleanly), then the relay.
cleanup() {
    trap - EXIT INT TERM HUP
    stop "$step_pid"
    stop "$serve_pid"
    stop "$relay_pid"
}
trap cleanup EXIT
# A signal ends the script (running cleanup through EXIT) with the shell's usual status.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

relay_args=(relay start --port "$relay_port")
if [ -n "${RUN_LOCAL_METRICS_LISTEN:-}" ]; then
    relay_args+=(--metrics-listen "$RUN_LOCAL_METRICS_LISTEN")
fi
# Every child runs in the background and the script waits with `wait`: bash runs a trap only
# between commands, so a foreground child would delay the trap until it exits by itself.
step() {
    # <&0: an asynchronous command would otherwise read /dev/null, not the caller's input.
    "$@" <&0 &
    step_pid=$!
    wait "$step_pid"
    step_pid=""
}
.venv/bin/repowire "${relay_args[@]}" &
relay_pid=$!
RELAY_HEALTH="$relay_url/health" step .venv/bin/python - <<'PY'
import os, sys, time, urllib.request
# Up to 100 attempts 0.2 s apart (about 20 s) for the relay to answer.
for _ in range(100):
    try:
        urllib.request.urlopen(os.environ["RELAY_HEALTH"], timeout=1)
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("repowire relay did not answer within 20 seconds")
PY
step .venv/bin/repowire setup --relay --relay-url "ws://127.0.0.1:$relay_port"
echo "Open $relay_url/ and sign in with the relay.api_key from $REPOWIRE_HOME/config.yaml,"
echo "or run: REPOWIRE_HOME=$REPOWIRE_HOME .venv/bin/repowire relay login-link"
.venv/bin/repowire serve --relay --port "$daemon_port" &
serve_pid=$!
# Return when either stops by itself (the EXIT trap then stops the other) or on a signal.
status=0
wait -n "$relay_pid" "$serve_pid" || status=$?
exit "$status"
