"""A hundred streams at once against an allowance that covers fifty: the holds, taken side by side,
never spend more than the account has, and the ledger adds up afterwards."""

import asyncio
import json
from collections import Counter

import httpx
import pytest

from allowances import ledger
from allowances.ledger import verify
from allowances.models import Account
from gateway import bounds
from gateway import services as gateway_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance

pytestmark = pytest.mark.transactional

CONCURRENT, FITTING = 100, 50
PROMPT = [{"role": "user", "content": "Hi"}]
MAX_TOKENS = 100
BODY = {"model": "fake-gpt", "messages": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
# The reserve of each request: its input bound x1, plus max_tokens x2 (fake-gpt).
INPUT_ESTIMATE = bounds.bound("chat", "openai", BODY, most_output=10**6).input_tokens
RESERVE = INPUT_ESTIMATE * 1 + MAX_TOKENS * 2


# -- helpers -------------------------------------------------------------------------------------


def available_tokens(member):
    granted, held, used = balance(member)
    return granted - held - used


def set_available(org, member, tokens):
    """Release the fixture's hold and top the account up so that exactly `tokens` are available."""
    with scope(org.organization):
        ledger.release(hold=org.hold, reason="test: start from nothing held")
        top_up = tokens - available_tokens(member)
        assert top_up > 0
        ledger.post(account=org.account, kind="bonus", tokens=top_up, idempotency_key="test:concurrency-top-up")
    with unscoped():
        assert Account.all_objects.get(pk=org.account.pk).overdraft_limit == 0  # no overage to dip into
    assert available_tokens(member) == tokens
    assert balance(member)[1] == 0


def last_record_id():
    with unscoped():
        return UsageRecord.all_objects.order_by("-id").values_list("id", flat=True).first() or 0


def records_after(record_id):
    with unscoped():
        return list(UsageRecord.all_objects.filter(id__gt=record_id))


async def _one_stream(client, url, key):
    async with client.stream("POST", url + "/chat/completions", json=BODY,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        content = await response.aread()
    return response.status_code, response.headers, content.decode()


async def _all_at_once(url, key, count):
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_one_stream(client, url, key) for _ in range(count)))


def storm(metered, count=CONCURRENT):
    """`count` streaming chat requests sent at once; [(status, headers, body text)]."""
    return asyncio.run(_all_at_once(metered.url, metered.key, count))


def assert_refused_for_allowance(headers, text):
    assert headers["content-type"].startswith("application/json")
    assert headers["x-should-retry"] == "false"
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "remaining balance" in error["message"]


def assert_complete_stream(headers, text):
    assert headers["content-type"].startswith("text/event-stream")
    assert text.rstrip().endswith("data: [DONE]")
    assert '"error"' not in text


# -- tests ---------------------------------------------------------------------------------------


def test_hundred_concurrent_streams_against_room_for_fifty_exactly_fifty_succeed(metered):
    # Each request uses exactly its reserve: a settled request frees nothing for the others.
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = INPUT_ESTIMATE, MAX_TOKENS
    metered.upstream.behaviour.chunk_delay = 0.01
    set_available(metered.org, metered.member, FITTING * RESERVE)
    granted, _, used = balance(metered.member)
    record_id = last_record_id()

    results = storm(metered)

    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: FITTING, 429: CONCURRENT - FITTING}
    for status, headers, text in results:
        if status == 200:
            assert_complete_stream(headers, text)
        else:
            assert_refused_for_allowance(headers, text)
    assert len(metered.upstream.requests) == FITTING
    assert balance(metered.member) == (granted, 0, used + FITTING * RESERVE)
    assert available_tokens(metered.member) == 0
    records = records_after(record_id)
    assert Counter(record.status for record in records) == {"ok": FITTING, "refused": CONCURRENT - FITTING}
    charged = sum(record.charged_tokens for record in records if record.status == UsageRecord.Status.OK)
    assert charged == balance(metered.member)[2] - used == FITTING * RESERVE
    assert verify() == []


def test_hundred_concurrent_streams_using_less_than_their_reserve_never_overspend(metered):
    # Each request uses a quarter of its reserve: finished requests free room, so more may fit,
    # but the account can never go below zero.
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = INPUT_ESTIMATE, MAX_TOKENS // 4
    metered.upstream.behaviour.chunk_delay = 0.01
    actual = INPUT_ESTIMATE + 2 * (MAX_TOKENS // 4)
    set_available(metered.org, metered.member, FITTING * RESERVE)
    granted, _, used = balance(metered.member)
    record_id = last_record_id()

    results = storm(metered)

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}
    assert FITTING <= statuses[200] <= CONCURRENT
    for status, headers, text in results:
        if status == 200:
            assert_complete_stream(headers, text)
        else:
            assert_refused_for_allowance(headers, text)
    granted_after, held_after, used_after = balance(metered.member)
    assert (granted_after, held_after) == (granted, 0)
    assert used_after - used == statuses[200] * actual
    assert available_tokens(metered.member) >= 0
    records = records_after(record_id)
    assert Counter(record.status for record in records) == {"ok": statuses[200], "refused": statuses[429]}
    assert sum(record.charged_tokens for record in records if record.status == "ok") == used_after - used
    assert verify() == []


# -- agents' max_tokens ----------------------------------------------------------------------------

AGENT_ASKS = 64_000  # what coding agents send as max_tokens on every call
AGENT_MODEL_MOST = 8_192  # what the catalog says the models write at most
AGENT_STREAMS = {
    # path: (body, the reply's real usage as the fake provider reports it, charged)
    "/chat/completions": ({"model": "fake-gpt", "messages": PROMPT, "max_tokens": AGENT_ASKS, "stream": True},
                          11 + 2 * 7),
    "/messages": ({"model": "fake-claude", "messages": PROMPT, "max_tokens": AGENT_ASKS, "stream": True},
                  11 + 3 * 7),
    "/responses": ({"model": "fake-gpt", "input": "Hi", "max_output_tokens": AGENT_ASKS, "stream": True},
                   11 + 2 * 7),
}


async def _agent_storm(url, key, requests):
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(path, body):
            async with client.stream("POST", url + path, json=body,
                                     headers={"Authorization": f"Bearer {key}"}) as response:
                return response.status_code, (await response.aread()).decode()

        return await asyncio.gather(*(one(path, body) for path, body in requests))


def test_fifty_agent_streams_asking_64000_are_not_refused_for_phantom_reserves(metered):
    """Fifty streams at once, each asking max_tokens 64,000 of models that write at most 8,192, on an
    account that covers what they really write many times over but not fifty reserves of 64,000:
    each holds what its model can write, none is refused, nothing is overspent."""
    from allowances import services as allowance_services

    with scope(metered.org.organization):
        for model in (metered.gpt, metered.claude):
            allowance_services.catalog_model_update(catalog_model=model, actor=metered.org.members["admin"].user,
                                                    max_output_tokens=AGENT_MODEL_MOST)
    metered.upstream.behaviour.chunk_delay = 0.01  # the streams overlap
    requests = [(path, body) for path, (body, _) in AGENT_STREAMS.items()] * 17
    requests = requests[:50]
    endpoints = {"/chat/completions": "chat", "/messages": "messages", "/responses": "responses"}
    reserves = [bounds.bound(endpoints[path], "anthropic" if path == "/messages" else "openai", body,
                             most_output=AGENT_MODEL_MOST) for path, body in requests]
    held_at_most = sum(r.input_tokens * 1 + r.output_cap * (3 if path == "/messages" else 2)
                       for r, (path, _) in zip(reserves, requests))
    unclamped = sum(r.input_tokens + AGENT_ASKS * (3 if path == "/messages" else 2)
                    for r, (path, _) in zip(reserves, requests))
    available = held_at_most + 1_000
    assert unclamped > 7 * available  # unclamped, no more than a seventh of them could be held at once
    set_available(metered.org, metered.member, available)
    granted, _, used = balance(metered.member)
    record_id = last_record_id()

    results = asyncio.run(_agent_storm(metered.url, metered.key, requests))

    assert [status for status, _ in results] == [200] * 50, [text for status, text in results if status != 200][:2]
    assert all('"error": {' not in text and "event: error" not in text for _, text in results)
    assert all(text.rstrip().endswith(("data: [DONE]", '{"type": "message_stop"}')) or "response.completed" in
               text.rsplit("event: ", 1)[-1] for _, text in results)
    sent = [request["body"] for request in metered.upstream.requests]
    caps = {body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens") for body in sent}
    assert len(sent) == 50 and caps == {AGENT_MODEL_MOST}
    real = sum(AGENT_STREAMS[path][1] for path, _ in requests)
    assert balance(metered.member) == (granted, 0, used + real)
    records = records_after(record_id)
    assert len(records) == 50 and {(r.status, r.uncharged_tokens) for r in records} == {("ok", 0)}
    assert available_tokens(metered.member) == available - real >= 0
    assert verify() == []


def test_more_streams_than_two_hundred_reach_one_provider_at_once(metered):
    # The provider starts none of the streams until all of them are open with it: a gateway that
    # kept fewer connections to it than it has streams would leave the rest queued for one while
    # those through wait on the provider, until the read time-out failed them all.
    count = 250
    with scope(metered.org.organization):
        gateway_services.provider_connection_update(connection=metered.openai_connection,
                                                    actor=metered.org.members["admin"].user, read_timeout=20)
    metered.upstream.behaviour.streams_together = count
    set_available(metered.org, metered.member, count * RESERVE)
    record_id = last_record_id()

    results = storm(metered, count)

    assert Counter(status for status, _, _ in results) == {200: count}
    for _, headers, text in results:
        assert_complete_stream(headers, text)
    assert Counter(record.status for record in records_after(record_id)) == {UsageRecord.Status.OK: count}
    assert verify() == []


def test_a_burst_of_requests_waits_for_a_shared_cache_connection_rather_than_go_without(metered, caplog):
    # More requests at once than an event loop has connections to Redis: those beyond them wait
    # for one (a read is quick), instead of missing the cache and loading from the database.
    count = 250
    set_available(metered.org, metered.member, (count + 1) * RESERVE)
    storm(metered, 1)  # the key's identity and the catalog are cached

    with caplog.at_level("WARNING", logger="portal.shared_cache"):
        results = storm(metered, count)

    assert Counter(status for status, _, _ in results) == {200: count}
    assert [record.getMessage() for record in caplog.records if record.name == "portal.shared_cache"] == []
    assert verify() == []
