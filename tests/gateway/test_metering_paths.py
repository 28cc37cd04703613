"""abegin and afinish keep the ledger's promises on either database: on SQLite (the embedded
default) they are begin and finish in a thread; on PostgreSQL they run on the event loop (see
test_async_path.py for that path's own cases)."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from allowances.ledger import verify
from gateway import metering
from gateway.models import UsageRecord
from gateway.upstream import Usage
from portal.tenancy import unscoped
from tests.allowances.helpers import balance
from tests.gateway.conftest import close_server_connections

# The event loop's connections see only committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}


@pytest.fixture(autouse=True)
def _no_connection_left():
    """End the sessions of the event loops these tests ran (they are gone, their connections not yet)."""
    yield
    if connection.vendor == "postgresql":
        close_server_connections()


def run(coroutine):
    with ThreadPoolExecutor(max_workers=1) as thread:  # the browser tests leave a loop set on this one
        return thread.submit(asyncio.run, coroutine).result()


def begin(org, request_id):
    return run(metering.abegin(raw_key=org.api_key_secret, ip="127.0.0.1", endpoint="chat", body=BODY,
                               request_id=request_id, started=time.perf_counter()))


def test_a_request_begun_twice_holds_once_and_finished_twice_is_charged_and_recorded_once(org_a):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)

    begun = begin(org_a, "twice")
    assert begin(org_a, "twice").hold.id == begun.hold.id
    assert balance(employee) == (granted, held + begun.hold.tokens, used)

    for _ in range(2):
        charged = run(metering.afinish(begun, status=UsageRecord.Status.OK, usage=Usage(input=10, output=5),
                                       latency_ms=3))
        assert charged == 10 * 1 + 5 * 2  # gpt-test counts output twice

    assert balance(employee) == (granted, held, used + charged)
    with unscoped():
        assert list(UsageRecord.all_objects.filter(request_id="twice").values_list("status", "charged_tokens")) == [
            ("ok", charged)]
    assert verify() == []
