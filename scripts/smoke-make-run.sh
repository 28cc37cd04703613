#!/usr/bin/env bash
# The fresh-clone check of `make run`: it must install, migrate, seed, print the demo logins and
# serve a page a person can log in to, on its embedded PostgreSQL. Runs it, waits for the server,
# logs in as the demo HR user, checks the members page and a demo key, and stops it with SIGTERM,
# which must stop the embedded PostgreSQL too; then all of it once more, on the data left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
pid=
trap '[ -z "$pid" ] || kill -- -"$pid" 2>/dev/null || true; rm -f "$log"' EXIT

serve_and_stop() {
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    setsid make run HOST_PORT="127.0.0.1:$port" >"$log" 2>&1 &
    pid=$!
    .venv/bin/python scripts/smoke_login.py "http://127.0.0.1:$port" "$log" "$pid"
    kill -TERM -- -"$pid"
    wait "$pid" || true
    pid=
    # The embedded PostgreSQL stops once the last process using it has gone.
    for _ in $(seq 100); do
        [ -e var/postgres/postmaster.pid ] || return 0
        sleep 0.1
    done
    echo "smoke: the embedded PostgreSQL still runs 10 s after make run was stopped" >&2
    exit 1
}

serve_and_stop
echo "smoke: make run served the portal, the demo HR login works, a demo key gets a sandbox reply, and SIGTERM stopped its PostgreSQL"
serve_and_stop
echo "smoke: and so again on the data the first run left"
