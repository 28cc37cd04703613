"""The gateway's event-loop path: with the key and catalog cached, a request takes its hold and
settles without a worker thread (metering.begin, metering.finish); only what is rare (loading an
identity or a catalog, explaining a hold that posted nothing, finishing a hold closed before)
calls sync code in a thread. Both keep the ledger's promises."""

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from allowances import ledger
from allowances import services as allowance_services
from allowances.ledger import verify
from allowances.models import LedgerEntry
from apikeys import services as api_key_services
from apikeys import authentication
from gateway import metering
from gateway.models import UsageRecord
from gateway.upstream import Usage
from portal import async_db, shared_cache
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.conftest import close_server_connections
from tests.gateway.records import last_record_id, records_after
from tests.gateway.test_concurrency import (
    CONCURRENT,
    FITTING,
    INPUT_ESTIMATE,
    MAX_TOKENS,
    RESERVE,
    assert_complete_stream,
    assert_refused_for_allowance,
    available_tokens,
    set_available,
    storm,
)
from tests.gateway.test_scopes import call, error_of, make_key, same_public_id_wrong_secret

pytestmark = pytest.mark.transactional

BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
CHARGED = 11 * 1 + 7 * 2  # the fake provider's usage (11 in, 7 out) at fake-gpt's multipliers


@pytest.fixture(autouse=True)
def _no_connection_left():
    """End the sessions of the event loops these tests ran (they are gone, their connections not yet)."""
    yield
    close_server_connections()


@pytest.fixture
def threads(monkeypatch):
    """How often each slow path (sync code in a worker thread) ran, in the server or in the test:
    loading an identity or a catalog, authorize (a hold that posted nothing), finishing a hold
    that was closed before."""
    calls = Counter()
    for module, name, label in ((authentication, "identity_load", "load"), (metering, "org_config", "load"),
                                (metering, "_authorize", "authorize"), (metering, "_finish_closed", "finish_closed")):
        original = getattr(module, name)

        def counted(*args, _label=label, _original=original, **kwargs):
            calls[_label] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def run(coroutine):
    """asyncio.run in a thread of its own (the browser tests' Playwright leaves an event loop set on
    the main thread), closing the loop's connection pool at the end as a server's shutdown does."""
    async def and_close():
        try:
            return await coroutine
        finally:
            await async_db.close()

    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(asyncio.run, and_close()).result()


def chat(metered, body=BODY):
    return httpx.post(metered.url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {metered.key}"}, timeout=30)


def warm(metered):
    """Cache the key's identity and its organization's catalog, as any earlier request would."""
    run(metering.lookup(raw_key=metered.key, ip="127.0.0.1", endpoint="chat"))


def begin(metered, request_id):
    return run(metering.begin(raw_key=metered.key, ip="127.0.0.1", endpoint="chat", body=BODY,
                              request_id=request_id, started=time.perf_counter()))


def finish(begun, *, status=UsageRecord.Status.OK, usage=Usage(input=11, output=7)):
    return run(metering.finish(begun, status=status, usage=usage, latency_ms=5))


def entries_of(hold):
    with unscoped():
        return list(LedgerEntry.all_objects.filter(account_id=hold.account_id, idempotency_key__in=[
            f"settle:{hold.id}", f"release:{hold.id}"]).order_by("id"))


def test_a_cached_key_is_metered_without_a_worker_thread(metered, threads):
    granted, held, used = balance(metered.member)
    record_id = last_record_id()

    first, second = chat(metered), chat(metered)

    assert (first.status_code, second.status_code) == (200, 200)
    # The first request found nothing cached and loaded the identity and the catalog. Nothing else
    # needed a thread.
    assert threads == {"load": 2}
    assert balance(metered.member) == (granted, held, used + 2 * CHARGED)
    records = records_after(record_id)
    assert [(r.status, r.charged_tokens, r.input_tokens, r.output_tokens) for r in records] == [
        ("ok", CHARGED, 11, 7), ("ok", CHARGED, 11, 7)]
    for record in records:
        assert (record.member_id, record.api_key_id, record.model, record.endpoint, record.source) == (
            metered.member.pk, metered.org.api_key.pk, "fake-gpt", "chat", "gateway")
        assert record.cost == Decimal("0.000025")
    assert {r.request_id for r in records} == {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert verify() == []


def test_a_key_revoked_is_refused_on_the_next_request_on_the_event_loop_path(metered, threads):
    key, secret = make_key(metered.member)
    assert [call(metered.url, secret, "chat").status_code for _ in range(2)] == [200, 200]
    assert threads["load"] == 2  # the second request ran on the event loop
    with scope(metered.org.organization):
        api_key_services.api_key_revoke(key=key, actor=metered.member.user)

    error = error_of(call(metered.url, secret, "chat"), "chat", 401)

    assert "revoked" in error["message"]
    assert len(metered.upstream.requests) == 2


def test_a_cached_identity_is_refused_a_wrong_secret(metered, threads):
    _, secret = make_key(metered.member)
    assert call(metered.url, secret, "chat").status_code == 200  # its identity is cached now

    error = error_of(call(metered.url, same_public_id_wrong_secret(secret), "chat"), "chat", 401)

    assert error["code"] == "invalid_api_key"
    assert threads["load"] == 2  # refused on the event loop, from the cached identity
    assert len(metered.upstream.requests) == 1


def test_a_cached_identity_is_refused_outside_its_ip_ranges(metered, threads):
    _, secret = make_key(metered.member, allowed_cidrs=["10.0.0.0/8"])
    for _ in range(2):  # the first refusal loaded and cached the identity; the second used it
        error = error_of(call(metered.url, secret, "chat"), "chat", 401)
        assert "127.0.0.1" in error["message"] and "IP ranges" in error["message"]
    assert threads["load"] == 1  # the identity (the catalog was never needed)
    assert metered.upstream.requests == []


def test_a_cached_identity_is_refused_once_its_key_expires(metered, threads):
    expires_at = timezone.now() + timedelta(seconds=2)
    _, secret = make_key(metered.member, expires_at=expires_at)
    assert call(metered.url, secret, "chat").status_code == 200  # its identity is cached now
    time.sleep(max((expires_at - timezone.now()).total_seconds(), 0) + 0.1)

    error = error_of(call(metered.url, secret, "chat"), "chat", 401)

    assert "expired" in error["message"]
    assert threads["load"] == 2
    assert len(metered.upstream.requests) == 1


def test_a_catalog_change_reaches_the_next_request_on_the_event_loop_path(metered, threads):
    assert [chat(metered).status_code for _ in range(2)] == [200, 200]  # the second ran on the event loop
    with scope(metered.org.organization):
        allowance_services.catalog_model_update(catalog_model=metered.gpt, actor=metered.org.members["admin"].user,
                                                is_active=False)

    response = chat(metered)

    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert len(metered.upstream.requests) == 2


def test_concurrent_requests_on_the_event_loop_path_never_overspend(metered, threads):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = INPUT_ESTIMATE, MAX_TOKENS
    metered.upstream.behaviour.chunk_delay = 0.01
    set_available(metered.org, metered.member, FITTING * RESERVE)
    granted, _, used = balance(metered.member)
    warm(metered)
    threads.clear()

    results = storm(metered)

    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: FITTING, 429: CONCURRENT - FITTING}
    for status, headers, text in results:
        if status == 200:
            assert_complete_stream(headers, text)
        else:
            assert_refused_for_allowance(headers, text)
    # Every hold was taken on the event loop; only the refusals went to authorize to be explained.
    assert threads == {"authorize": CONCURRENT - FITTING}
    assert balance(metered.member) == (granted, 0, used + FITTING * RESERVE)
    assert available_tokens(metered.member) == 0
    assert verify() == []


def test_a_retried_hold_is_the_same_hold(metered, threads):
    warm(metered)
    threads.clear()
    _, held, _ = balance(metered.member)

    first = begin(metered, "retried-request")
    again = begin(metered, "retried-request")

    assert again.hold.id == first.hold.id
    assert again.hold.tokens == first.hold.tokens
    assert balance(metered.member)[1] == held + first.hold.tokens  # held once
    assert threads == {"authorize": 1}  # the retry posted nothing and authorize found the existing hold
    assert verify() == []


def test_a_finish_run_twice_settles_and_records_once(metered, threads):
    warm(metered)
    threads.clear()
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    begun = begin(metered, "finished-twice")

    assert finish(begun) == CHARGED
    assert finish(begun) == CHARGED

    assert [(e.kind, e.used_delta, e.held_delta, e.closes_hold_id) for e in entries_of(begun.hold)] == [
        ("usage", CHARGED, -begun.hold.tokens, begun.hold.id)]
    assert balance(metered.member) == (granted, held, used + CHARGED)
    assert [(r.status, r.charged_tokens) for r in records_after(record_id)] == [("ok", CHARGED)]
    assert threads == {"finish_closed": 1}
    assert verify() == []


def test_usage_after_the_hold_was_released_is_recorded_once(metered, threads):
    warm(metered)
    threads.clear()
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    begun = begin(metered, "released-meanwhile")
    with scope(metered.org.organization):
        ledger.release(hold=begun.hold, reason="time-to-live passed")  # as the sweeper would

    assert finish(begun) == CHARGED

    kinds = [(e.kind, e.used_delta, e.held_delta, e.closes_hold_id) for e in entries_of(begun.hold)]
    assert kinds == [("release", 0, -begun.hold.tokens, begun.hold.id), ("usage", CHARGED, 0, None)]
    assert balance(metered.member) == (granted, held, used + CHARGED)
    assert [(r.status, r.charged_tokens) for r in records_after(record_id)] == [("ok", CHARGED)]
    assert threads == {"finish_closed": 1}
    assert verify() == []


def test_a_request_that_consumed_nothing_releases_its_hold_on_the_event_loop(metered, threads):
    warm(metered)
    threads.clear()
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    begun = begin(metered, "nothing-consumed")

    assert finish(begun, status=UsageRecord.Status.UPSTREAM_ERROR, usage=None) == 0

    assert [(e.kind, e.held_delta) for e in entries_of(begun.hold)] == [("release", -begun.hold.tokens)]
    assert balance(metered.member) == (granted, held, used)
    assert [(r.status, r.charged_tokens) for r in records_after(record_id)] == [("upstream_error", 0)]
    assert threads == {}
    assert verify() == []


def test_a_request_after_the_database_dropped_its_connections_is_metered_once(metered, threads):
    assert [chat(metered).status_code for _ in range(2)] == [200, 200]  # the event loop holds connections now
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    close_server_connections()  # as a database restart would

    response = chat(metered)

    assert response.status_code == 200, response.text
    assert balance(metered.member) == (granted, held, used + CHARGED)
    assert [(r.status, r.charged_tokens) for r in records_after(record_id)] == [("ok", CHARGED)]
    assert verify() == []


def test_a_statement_cut_short_leaves_no_broken_connection_for_the_next_requests():
    async def scenario():
        pool = await async_db.pool()
        with pytest.raises(asyncio.TimeoutError):
            async with pool.connection() as cut_short:
                await asyncio.wait_for(cut_short.execute("SELECT pg_sleep(10)"), 0.2)
        answers = []
        for _ in range(async_db.MAX_CONNECTIONS + 1):
            async with pool.connection() as conn:
                answers.append(await (await conn.execute("SELECT 1")).fetchone())
        return answers

    assert run(scenario()) == [(1,)] * (async_db.MAX_CONNECTIONS + 1)


def test_the_event_loop_reads_what_sync_code_wrote_and_dropped_in_the_shared_cache():
    shared_cache.set("async-path:object", {"tokens": 5}, timeout=60)
    shared_cache.set("async-path:number", 7, timeout=60)
    assert run(shared_cache.aget_many(["async-path:object", "async-path:number", "async-path:never"])) == {
        "async-path:object": {"tokens": 5}, "async-path:number": 7}
    shared_cache.delete_many(["async-path:object"])
    assert run(shared_cache.aget_many(["async-path:object"])) == {}
