"""Celery beat for the embedded default: `make run` has no broker and no beat process, so the same
CELERY_BEAT_SCHEDULE is run by a thread of the web process (tasks run in-process, eagerly).

Started only when PORTAL_EMBEDDED_SCHEDULER=1 (`make run` sets it); deployments run `celery beat`.
"""

import logging
import threading
import time
from datetime import timedelta

from celery.schedules import schedule as every
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

log = logging.getLogger(__name__)
TICK_SECONDS = 5


def _schedules() -> dict:
    entries = {}
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        spec = entry["schedule"]
        entries[name] = (entry["task"], spec if hasattr(spec, "is_due") else every(timedelta(seconds=float(spec))))
    return entries


def run_forever(stop: threading.Event) -> None:
    from portal.celery import app

    app.loader.import_default_modules()  # the apps' tasks modules (autodiscovery is lazy)
    entries = _schedules()
    last_run = {name: timezone.now() - timedelta(days=1) for name in entries}  # everything is due at start
    while not stop.is_set():
        for name, (task, spec) in entries.items():
            due, _next = spec.is_due(last_run[name])
            if not due:
                continue
            last_run[name] = timezone.now()
            close_old_connections()
            try:
                app.tasks[task].apply(throw=True)
            except Exception:
                log.exception("scheduled task %s failed", task)
            finally:
                close_old_connections()
        stop.wait(TICK_SECONDS)


def start() -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=run_forever, args=(stop,), name="portal-scheduler", daemon=True).start()
    log.info("embedded scheduler started: %s", ", ".join(settings.CELERY_BEAT_SCHEDULE))
    return stop
