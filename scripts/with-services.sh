#!/usr/bin/env bash
# Run a command against private PostgreSQL and Redis servers on loopback.
# Installs them (and Chromium for the browser tests) from Debian packages when missing, starts
# them on free ports in a temporary folder, exports DATABASE_URL and REDIS_URL, and stops them
# whatever the command does. Usage: scripts/with-services.sh COMMAND [ARGS...]
set -euo pipefail

apt_updated=
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "missing $*: install it (Debian: apt-get install $*) or run as root" >&2
        exit 1
    fi
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bin_dir() {
    local dir
    for dir in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")" /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
    done
    return 1
}

PG_BIN=$(pg_bin_dir) || { apt_install postgresql; PG_BIN=$(pg_bin_dir); }
command -v redis-server >/dev/null || apt_install redis-server
command -v chromium >/dev/null || apt_install chromium fonts-dejavu-core
# Tools only some callers need (the benchmarks' load generator): EXTRA_COMMANDS="wrk".
for tool in ${EXTRA_COMMANDS:-}; do command -v "$tool" >/dev/null || apt_install "$tool"; done

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/portal-services.XXXXXX)
chmod 755 "$work"
pg_port=$(free_port)
redis_port=$(free_port)

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    mkdir -p "$work/pg" && chown postgres "$work/pg"
    as_pg=(runuser -u postgres --)
fi

cleanup() {
    "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
    [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"${as_pg[@]}" "$PG_BIN/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
# fsync off: test data is disposable. PG_DURABLE=1 (the benchmarks) keeps PostgreSQL's durable
# defaults, with the WAL room a write-heavy server is given (a month's close of a million accounts
# writes about 3 GB of WAL; at the 1 GB default it would checkpoint several times on the way).
durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
[ "${PG_DURABLE:-}" = 1 ] && durability="-c max_wal_size=8GB"
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w \
    -o "-h 127.0.0.1 -p $pg_port -k $work/pg $durability -c max_connections=400 -c shared_buffers=256MB" \
    start >/dev/null

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$work/redis.pid" --dir "$work" --logfile "$work/redis.log"

export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/portal"
export REDIS_URL="redis://127.0.0.1:$redis_port/0"
export PORTAL_TEST_BROKER_URL="redis://127.0.0.1:$redis_port/1"
echo "services: PostgreSQL on 127.0.0.1:$pg_port, Redis on 127.0.0.1:$redis_port"
"$@"
