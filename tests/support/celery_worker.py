"""Real Celery worker processes for tests: `celery -A portal worker --pool=solo` on the test broker.

The test process's own Celery app is eager (no CELERY_BROKER_URL), so tests send tasks through a
separate app configured with `PORTAL_TEST_BROKER_URL` (exported by scripts/with-services.sh), and
the worker runs as a child process pointed at pytest-django's test database. Each worker gets a
queue and a node name of its own test, and a log file whose tail is put into failure messages.

The worker opens its own database connections: stop it (and end any connection it left behind)
before pytest-django flushes the test database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from django.db import connection

PROJECT_DIR = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0


def broker_url() -> str:
    url = os.environ.get("PORTAL_TEST_BROKER_URL")
    if not url:
        raise RuntimeError("PORTAL_TEST_BROKER_URL is not set: run the tests through scripts/with-services.sh (make test)")
    return url


def worker_database_url() -> str:
    """DATABASE_URL with the database name replaced by the test database's actual name."""
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


def sender_app() -> Celery:
    """A Celery app of the test's own, on the test broker, that reads results from it too."""
    url = broker_url()
    app = Celery(f"test-sender-{uuid.uuid4().hex[:6]}", broker=url, backend=url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=600, task_default_queue="unused-default")
    return app


def purge(app: Celery, *queues: str) -> None:
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in queues:
            channel.queue_purge(queue)


def terminate_database_backends() -> None:
    """End every other connection to the test database (a killed worker's, an idle pooled one)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@dataclass
class Worker:
    name: str
    queues: tuple[str, ...]
    log_path: Path
    process: subprocess.Popen
    app: Celery = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-chars:] or "(empty log)"

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with {self.process.returncode}"
        return f"worker {self.name} (pid {self.pid}, {state}); its log ends with:\n{self.log_tail()}"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the worker answers a ping on the broker (it consumes its queues by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"the Celery worker died while starting: {self.describe()}")
            replies = self.app.control.ping(destination=[self.name], timeout=0.5)
            if any(self.name in reply for reply in replies or []):
                return
        raise AssertionError(f"the Celery worker did not answer a ping within {timeout:.0f}s: {self.describe()}")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, the task in progress is cut where it stands."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL if it does not exit within `grace` seconds."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerPool:
    """Starts workers for one test and stops every one of them at teardown."""

    def __init__(self, app: Celery, log_dir: Path):
        self.app = app
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    def start(self, *queues: str, wait: bool = True) -> Worker:
        name = f"{queues[0]}-{len(self.workers) + 1}@tests"
        log_path = self.log_dir / f"worker-{len(self.workers) + 1}.log"
        env = os.environ | {
            "CELERY_BROKER_URL": broker_url(),
            "CELERY_RESULT_BACKEND": broker_url(),
            "DATABASE_URL": worker_database_url(),
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PYTHONUNBUFFERED": "1",
        }
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool=solo", "--concurrency=1",
                 "-Q", ",".join(queues), "-n", name, "--without-heartbeat", "--without-gossip", "--without-mingle",
                 "-l", "WARNING"],
                env=env, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        worker = Worker(name=name, queues=queues, log_path=log_path, process=process, app=self.app)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def describe(self) -> str:
        return "\n\n".join(worker.describe() for worker in self.workers) or "(no workers)"

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
