"""What a review of the gateway found, each now a test: a hold never outlives its request in either
direction (kept while it runs, released when the gateway fails), a provider's malformed usage is a
recorded fault, a revocation read mid-load is never cached, and holds for unusable keys or events
from year one are refused."""

import asyncio
import threading
import time
from datetime import timedelta

import httpx
import pytest
from django.db import connection

from allowances import ledger
from allowances.ledger import verify
from apikeys import services as key_services
from apikeys.authentication import ApiKeyAuthentication
from apikeys.models import ApiKey
from gateway import metering, sandbox
from gateway.models import UsageRecord
from gateway.upstream import StreamReader
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Hi"}]


def chat(metered, body):
    return httpx.post(metered.url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {metered.key}"})


def test_a_gateway_failure_after_the_hold_releases_it_at_once(metered, monkeypatch):
    def broken(body, limit):
        raise RuntimeError("a bug in the sandbox")

    monkeypatch.setattr(sandbox, "chat_completion", broken)
    granted, held, used = balance(metered.member)
    record_id = last_record_id()

    response = chat(metered, {"model": "gpt-test", "messages": PROMPT, "max_tokens": 10})

    assert response.status_code == 500 and response.json()["error"]["type"] == "api_error"
    assert balance(metered.member) == (granted, held, used)  # the hold is back, nothing charged
    (record,) = records_after(record_id)
    assert (record.status, record.charged_tokens) == ("upstream_error", 0)
    assert verify() == []


@pytest.mark.parametrize("usage", [{"output_tokens": -50}, {"input_tokens": 10**15}])
def test_malformed_usage_from_a_provider_is_a_recorded_fault_not_free(metered, usage):
    for name, value in usage.items():
        setattr(metered.upstream.behaviour, name, value)
    granted, held, used = balance(metered.member)
    record_id = last_record_id()

    response = chat(metered, {"model": "fake-gpt", "messages": PROMPT, "max_tokens": 10})

    assert response.status_code == 200
    (record,) = records_after(record_id)
    assert record.status == UsageRecord.Status.NO_USAGE_REPORTED  # charged its input bound, flagged
    assert record.charged_tokens > 0 and balance(metered.member) == (granted, held, used + record.charged_tokens)
    assert verify() == []


def test_the_hold_of_a_stream_outliving_its_time_to_live_is_kept_not_swept(metered, monkeypatch):
    monkeypatch.setattr(metering, "HOLD_TTL", timedelta(seconds=0.6))
    monkeypatch.setattr(metering, "HOLD_RENEW_SECONDS", 0.15)
    metered.upstream.behaviour.chunk_delay = 0.3  # 9 chunks: the stream runs for about 3 s
    swept, stop = [], threading.Event()

    def sweeper():  # as the beat job would, again and again while the stream runs
        while not stop.is_set():
            swept.append(ledger.release_expired_holds())
            connection.close()
            time.sleep(0.1)

    thread = threading.Thread(target=sweeper)
    thread.start()
    record_id = last_record_id()
    try:
        response = chat(metered, {"model": "fake-gpt", "messages": PROMPT, "max_tokens": 20, "stream": True})
    finally:
        stop.set()
        thread.join(10)

    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert sum(swept) == 0, "the sweeper released the hold of a request still running"
    (record,) = records_after(record_id)
    assert (record.status, record.charged_tokens, record.uncharged_tokens) == ("ok", 11 + 7 * 2, 0)
    assert verify() == []


def test_a_hold_the_sweeper_released_before_a_request_that_consumed_nothing_is_recorded_once(metered):
    async def scenario():
        begun = await metering.begin(raw_key=metered.key, ip="127.0.0.1", endpoint="chat",
                                     body={"model": "fake-gpt", "messages": PROMPT, "max_tokens": 5},
                                     request_id="swept-first", started=time.perf_counter())
        await asyncio.to_thread(_sweep, begun.hold)
        await metering.finish(begun, status=UsageRecord.Status.UPSTREAM_ERROR, usage=None, latency_ms=1)
        await metering.finish(begun, status=UsageRecord.Status.UPSTREAM_ERROR, usage=None, latency_ms=1)

    asyncio.run(_closing_the_pool(scenario()))
    with unscoped():
        assert list(UsageRecord.all_objects.filter(request_id="swept-first").values_list("status", flat=True)) == [
            "upstream_error"]
    assert verify() == []


async def _closing_the_pool(coroutine):
    from portal import async_db

    try:
        return await coroutine
    finally:
        await async_db.close()


def _sweep(hold):
    with scope_of(hold):
        assert ledger.release(hold=hold, reason="time-to-live passed").created
    connection.close()


def scope_of(hold):
    from portal.models import Organization

    with unscoped():
        return scope(Organization.objects.get(pk=hold.organization_id))


def test_an_identity_read_before_a_revocation_committed_is_not_cached_after_it(org_a, monkeypatch):
    """The loader read the row, the revocation committed and dropped the cache, then the loader
    wrote what it had read: the next request must still be refused."""
    secret = org_a.api_key_secret
    real_load = key_services._load
    read, go = threading.Event(), threading.Event()

    def slow_load(public_id):
        identity = real_load(public_id)
        read.set()
        go.wait(10)  # the thread descheduled between the SELECT and the cache SET
        return identity

    monkeypatch.setattr(key_services, "_load", slow_load)
    admitted = {}

    def request():
        try:
            admitted["id"] = ApiKeyAuthentication.identify(secret, ip="127.0.0.1").id
        finally:
            connection.close()

    thread = threading.Thread(target=request)
    thread.start()
    assert read.wait(10)
    with scope(org_a.organization):
        key_services.api_key_revoke(key=ApiKey.objects.get(pk=org_a.api_key.pk), actor=None)
    go.set()
    thread.join(10)
    monkeypatch.setattr(key_services, "_load", real_load)

    assert admitted["id"] == org_a.api_key.pk  # that request read the key before it was revoked
    with pytest.raises(key_services.KeyRefused, match="revoked"):
        ApiKeyAuthentication.identify(secret, ip="127.0.0.1")


def test_a_hold_through_the_authorize_api_for_a_revoked_key_is_refused(client, org_a, ingest_key):
    with scope(org_a.organization):
        key_services.api_key_revoke(key=ApiKey.objects.get(pk=org_a.api_key.pk), actor=None)
    body = {"idempotency_key": "revoked-1", "api_key": org_a.api_key.display_prefix, "model": "gpt-test",
            "input_tokens": 5, "max_output_tokens": 5}
    before = balance(org_a.members["employee"])

    response = client.post("/api/v1/authorize", data=body, content_type="application/json", **ingest_key)

    assert response.status_code == 400 and "revoked" in response.json()["api_key"][0]
    assert balance(org_a.members["employee"]) == before


def test_an_event_from_year_one_is_rejected_and_the_usage_page_still_reads(client, org_a, ingest_key, login):
    body = {"events": [{"idempotency_key": "old-1", "member": "employee@a.example", "model": "gpt-test",
                        "input_tokens": 1, "timestamp": "0001-01-01T00:00:00+14:00"}]}

    answer = client.post("/api/v1/usage", data=body, content_type="application/json", **ingest_key).json()

    assert answer["rejected"] == 1 and "timestamp" in answer["results"][0]["errors"]
    login(org_a.members["admin"])
    assert client.get(f"/o/{org_a.slug}/usage/").status_code == 200


def test_anthropics_cumulative_counts_in_message_delta_are_taken():
    reader = StreamReader("messages", pass_usage_chunk=False)
    reader.feed(b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
                b'{"input_tokens": 10, "output_tokens": 1}}}\n\n')
    reader.feed(b'event: message_delta\ndata: {"type": "message_delta", "usage": {"input_tokens": 250, '
                b'"cache_read_input_tokens": 40, "output_tokens": 30}}\n\n')
    assert (reader.usage.input, reader.usage.output, reader.usage.cached) == (250, 30, 40)
