"""tests/support/services.py stops and starts the private PostgreSQL and Redis of `make test` on
their own ports: a server that was stopped refuses connections, and after its start the same URL
reaches a new server process."""

import os

import pytest
import redis
from django.db import OperationalError, connection, connections

from tests.support import services

pytestmark = pytest.mark.services


def postgres_started_at():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()")
        return cursor.fetchone()[0]


def test_postgres_answers_again_after_a_restart():
    before = postgres_started_at()

    services.stop_postgres()
    connections.close_all()  # the old session is gone with the server
    with pytest.raises(OperationalError):
        connection.ensure_connection()

    services.start_postgres()
    started = postgres_started_at()
    assert started > before

    services.restart_postgres()
    connections.close_all()
    assert postgres_started_at() > started


def test_redis_answers_again_after_a_restart():
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    before = client.info("server")["run_id"]

    services.stop_redis()
    with pytest.raises(redis.ConnectionError):
        client.ping()

    services.start_redis()
    assert client.ping()
    started = client.info("server")["run_id"]
    assert started != before

    services.restart_redis()
    assert client.info("server")["run_id"] not in {before, started}
