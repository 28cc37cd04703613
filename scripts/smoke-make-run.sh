#!/usr/bin/env bash
# The fresh-clone check of `make run`: it must install, migrate, seed, print the demo logins and
# serve a page a person can log in to. Runs it, waits for the server, logs in as the demo HR user
# and checks the members page, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
setsid make run HOST_PORT="127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill -- -$pid 2>/dev/null || true; rm -f "$log"' EXIT

.venv/bin/python scripts/smoke_login.py "http://127.0.0.1:$port" "$log" "$pid"
echo "smoke: make run served the portal, the demo HR login works and a demo key gets a sandbox reply"
