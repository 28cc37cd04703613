"""Faults survived with the real services: PostgreSQL restarted while the gateway is under load, and
Redis stopped and started. Requests in flight fail cleanly or complete; nothing is charged twice, no
hold is left open, the gateway recovers without a restart, and the ledger adds up after each."""

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import pytest
import redis
from django.db import connections

from allowances.ledger import verify
from allowances.models import LedgerEntry
from apikeys import services as api_key_services
from apikeys.models import ApiKey
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after
from tests.gateway.test_concurrency import set_available
from tests.support import services

pytestmark = pytest.mark.services

BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}
CHARGED = 11 * 1 + 7 * 2  # the fake provider's usage at fake-gpt's multipliers


async def _one(client, url, key):
    try:
        async with client.stream("POST", url + "/chat/completions", json=BODY,
                                 headers={"Authorization": f"Bearer {key}"}) as response:
            text = (await response.aread()).decode()
        return response.status_code, response.headers.get("content-type", ""), text
    except httpx.HTTPError as error:  # the gateway must never drop a connection instead of answering
        return 0, "", repr(error)


async def _load(url, key, stop: threading.Event, results: list, concurrency=8):
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker():
            while not stop.is_set():
                results.append(await _one(client, url, key))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


class Load:
    """Streaming requests, several at a time, until stopped: [(status, content type, body)]."""

    def __init__(self, metered):
        self.results, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(_load(metered.url, metered.key, self.stop,
                                                                        self.results),))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(180)


def wait_for(condition, seconds=150):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def open_holds(member):
    with unscoped():
        return LedgerEntry.all_objects.filter(account__member=member, kind="hold", closed_by__isnull=True).count()


def assert_each_answer_clean(results):
    for status, content_type, text in results:
        assert status in (200, 503), (status, text[:300])
        if status == 503:  # refused while the database was away, in the API's own error shape
            error = json.loads(text)["error"]
            assert error["code"] == "database_unavailable" and "nothing was charged" in error["message"]
        else:
            assert content_type.startswith("text/event-stream") and text.rstrip().endswith("data: [DONE]"), text


def test_postgres_restarted_under_load_charges_each_request_once_and_leaves_no_hold_open(metered, caplog):
    metered.upstream.behaviour.chunk_delay = 0.05
    set_available(metered.org, metered.member, 10_000_000)
    granted, _, used = balance(metered.member)
    record_id = last_record_id()

    with Load(metered) as load:
        wait_for(lambda: len(load.results) >= 10)
        services.stop_postgres()
        # A request begun while the database is away is refused once it waited for a connection.
        refused = httpx.post(metered.url + "/chat/completions", json=BODY | {"stream": False}, timeout=60,
                             headers={"Authorization": f"Bearer {metered.key}"})
        services.start_postgres()
        connections.close_all()  # this process's own sessions died with the server
        served = len(load.results)
        wait_for(lambda: sum(1 for status, _, _ in load.results[served:] if status == 200) >= 10)

    statuses = Counter(status for status, _, _ in load.results)
    assert_each_answer_clean(load.results)
    assert_each_answer_clean([(refused.status_code, refused.headers["content-type"], refused.text)])
    assert refused.status_code == 503
    # The settlements due in the outage waited for the database, and the streams ended after them.
    assert any("waits for the database" in message for message in caplog.messages)
    # The settlements cut off by the restart finish once the database is back: no hold stays open.
    wait_for(lambda: open_holds(metered.member) == 0, seconds=60)
    records = [r for r in records_after(record_id) if r.status == UsageRecord.Status.OK]
    assert Counter(r.request_id for r in records).most_common(1)[0][1] == 1  # none recorded twice
    assert len(records) == statuses[200]
    assert balance(metered.member) == (granted, 0, used + CHARGED * statuses[200])  # each charged once
    assert verify() == []
    # The gateway recovered by itself: the next request is metered as usual.
    with httpx.Client(timeout=30) as client:
        answer = client.post(metered.url + "/chat/completions", json=BODY | {"stream": False},
                             headers={"Authorization": f"Bearer {metered.key}"})
    assert answer.status_code == 200, answer.text


def test_redis_stopped_and_started_the_gateway_meters_from_the_database(metered):
    set_available(metered.org, metered.member, 1_000_000)
    _, secret = make_key(metered)
    granted, held, used = balance(metered.member)
    chat = BODY | {"stream": False}

    def call(key):
        return httpx.post(metered.url + "/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"},
                          timeout=30)

    assert call(metered.key).status_code == 200  # the identity and catalog are cached in Redis now
    services.stop_redis()
    try:
        # With the cache gone the gateway reads the database: still metered, exactly.
        assert [call(metered.key).status_code for _ in range(3)] == [200, 200, 200]
        assert call(secret).status_code == 200  # a key never seen before loads from the database too
        assert balance(metered.member) == (granted, held, used + 5 * CHARGED)
        # A revocation that could not reach the cache is refused, not left half done.
        with pytest.raises(redis.ConnectionError), scope(metered.org.organization):
            key = key_of(secret)
            api_key_services.api_key_revoke(key=key, actor=metered.member.user)
        assert key_of(secret).revoked_at is None
    finally:
        services.start_redis()
    assert [call(metered.key).status_code for _ in range(2)] == [200, 200]
    with scope(metered.org.organization):
        api_key_services.api_key_revoke(key=key_of(secret), actor=metered.member.user)
    assert call(secret).status_code == 401  # and once Redis is back a revocation reaches the next request
    assert balance(metered.member) == (granted, held, used + 7 * CHARGED)
    assert verify() == []


def make_key(metered):
    with scope(metered.org.organization):
        return api_key_services.api_key_create(member=metered.member, actor=metered.member.user, name="outage",
                                               endpoints=["chat"])


def key_of(secret):
    from apikeys.models import ApiKey

    with unscoped():
        return ApiKey.objects.get(public_id=api_key_services.presented(secret).public_id)
