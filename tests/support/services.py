"""Stop and start the private PostgreSQL and Redis of scripts/with-services.sh, for fault tests.

Each comes back on the same port with the same options, so DATABASE_URL and REDIS_URL stay
valid; each call returns when the server is down, or answers again. Django's connections to a
stopped server are broken: close them (`django.db.connections.close_all()`) before the test
process uses the database again.
"""

import os
import subprocess
import time
from pathlib import Path

import psutil
import redis

WAIT_SECONDS = 30.0


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run the tests through scripts/with-services.sh (make test)")
    return value


def _pg_ctl(*args: str) -> None:
    # The server's own pg_ctl, written by with-services.sh: its user, data folder, log and options.
    subprocess.run([_env("PORTAL_TEST_PG_CTL"), "-w", *args], check=True, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)


def stop_postgres() -> None:
    _pg_ctl("-m", "fast", "stop")


def start_postgres() -> None:
    _pg_ctl("start")


def restart_postgres() -> None:
    stop_postgres()
    start_postgres()


def _redis() -> redis.Redis:
    return redis.Redis.from_url(_env("REDIS_URL"), socket_timeout=5)


def _wait_for_redis(*, up: bool) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            answers = _redis().ping()
        except redis.ConnectionError:
            answers = False
        if answers == up:
            return
        time.sleep(0.05)
    raise RuntimeError(f"Redis did not {'start' if up else 'stop'} within {WAIT_SECONDS:.0f} s")


def stop_redis() -> None:
    _redis().shutdown(nosave=True)
    _wait_for_redis(up=False)


def start_redis() -> None:
    subprocess.run(["redis-server", _env("PORTAL_TEST_REDIS_CONF")], check=True, stdout=subprocess.DEVNULL)
    _wait_for_redis(up=True)


def restart_redis() -> None:
    stop_redis()
    start_redis()


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The live processes of the PostgreSQL server in `data_dir`: every one of them works there."""
    return [process for process in psutil.process_iter(["cwd", "status"])
            if process.info["cwd"] == str(data_dir.resolve()) and process.info["status"] != psutil.STATUS_ZOMBIE]


def wait_for_postgres_to_stop(data_dir: Path) -> bool:
    """True once no process of the server in `data_dir` is left, False if some still are after a while."""
    deadline = time.monotonic() + WAIT_SECONDS
    while postgres_processes(data_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
