#!/usr/bin/env bash
# Install into .venv and run a relay and a daemon on embedded defaults, on this machine:
# the relay on http://127.0.0.1:8000, the daemon on http://127.0.0.1:8377 connected to it.
# State lives in ./.repowire-local (REPOWIRE_HOME); Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/repowire ] || { python3 -m venv .venv && .venv/bin/python -m pip install --quiet -e .; }
export REPOWIRE_HOME="${REPOWIRE_HOME:-$PWD/.repowire-local}"
.venv/bin/repowire relay start --port 8000 &
relay_pid=$!
trap 'kill $relay_pid 2>/dev/null; wait $relay_pid 2>/dev/null' EXIT
.venv/bin/python - <<'PY'
import time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1)
        break
    except OSError:
        time.sleep(0.2)
PY
.venv/bin/repowire setup --relay --relay-url ws://127.0.0.1:8000
echo "Sign in at http://127.0.0.1:8000/ with the relay.api_key from $REPOWIRE_HOME/config.yaml"
.venv/bin/repowire serve --relay
