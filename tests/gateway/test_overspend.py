"""No allowance can be overspent through the gateway, whatever a client sends (DESIGN.md, invariant 2).

The findings this answers: requests without `max_tokens` were forwarded with no cap, so long
replies were charged in full (20 at once took an account with 5,000 tokens to -27,040); and a body
of 4,000 bare numbers as "messages" held almost nothing but was charged 12,000 input tokens. Now
the forwarded request carries the cap its hold covers, the input bound is a true upper bound,
a malformed body is refused, and what a provider reports beyond a hold is recorded, never charged.
"""

import asyncio
import json

import httpx
import pytest
from django.core import mail
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allowances import ledger
from allowances.ledger import verify
from allowances.models import Account
from apikeys import services as api_key_services
from gateway.metering import invalidate_config
from gateway.models import ProviderConnection
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after
from tests.gateway.test_concurrency import available_tokens, set_available

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Write me a very long story."}]
PATHS = {"openai": "/chat/completions", "anthropic": "/messages"}


def post(metered, path, body, key=None):
    return httpx.post(metered.url + path, json=body, headers={"Authorization": f"Bearer {key or metered.key}"},
                      timeout=60)


async def _all_at_once(url, key, requests):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(requests))) as client:
        async def one(path, body):
            response = await client.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"})
            await response.aread()
            return response.status_code

        return await asyncio.gather(*(one(path, body) for path, body in requests))


def at_once(metered, requests, key=None):
    """[(path, body)] sent together; their statuses."""
    return asyncio.run(_all_at_once(metered.url, key or metered.key, requests))


def assert_within_limits():
    with unscoped():
        below = [(a.pk, a.available, a.overdraft_limit) for a in Account.all_objects.all()
                 if a.available < -a.overdraft_limit]
    assert below == [], "an account went below its limit"
    assert verify() == []


def uncharged_records(after):
    return [r for r in records_after(after) if r.uncharged_tokens]


def test_a_request_without_max_tokens_is_forwarded_with_the_cap_its_hold_covers(metered):
    assert post(metered, "/chat/completions", {"model": "fake-gpt", "messages": PROMPT}).status_code == 200
    forwarded = metered.upstream.requests[-1]["body"]
    # OpenAI's own API is sent max_completion_tokens (its reasoning models refuse max_tokens).
    assert forwarded["max_completion_tokens"] == metered.gpt.max_output_tokens and "max_tokens" not in forwarded

    with scope(metered.org.organization):
        ProviderConnection.objects.filter(pk=metered.openai_connection.pk).update(kind="openai_compatible")
    invalidate_config(metered.org.organization.pk)
    assert post(metered, "/chat/completions", {"model": "fake-gpt", "messages": PROMPT, "n": 3}).status_code == 200
    forwarded = metered.upstream.requests[-1]["body"]
    assert forwarded["max_tokens"] == metered.gpt.max_output_tokens and forwarded["n"] == 3

    # A cap the client sent is sent as it is.
    assert post(metered, "/chat/completions", {"model": "fake-gpt", "messages": PROMPT,
                                              "max_tokens": 9}).status_code == 200
    assert metered.upstream.requests[-1]["body"]["max_tokens"] == 9


def test_twenty_requests_at_once_without_max_tokens_never_overspend(metered):
    """The finding's storm, against a provider that writes every reply to the cap it is given."""
    metered.upstream.behaviour.worst_case = True
    set_available(metered.org, metered.member, 6_000)
    record_id = last_record_id()

    statuses = at_once(metered, [("/chat/completions", {"model": "fake-gpt", "messages": PROMPT})] * 20)

    assert set(statuses) <= {200, 429} and 200 in statuses
    assert available_tokens(metered.member) >= 0
    assert uncharged_records(record_id) == []  # every reply fitted its hold: nothing went unpaid
    assert_within_limits()


def test_a_provider_reporting_beyond_the_hold_is_a_fault_never_a_debit_past_the_limit(metered, client):
    """A provider that ignores the cap: the excess is recorded, admins are told, nothing goes below zero."""
    metered.upstream.behaviour.worst_case = True
    metered.upstream.behaviour.beyond_cap = 30_000
    set_available(metered.org, metered.member, 6_000)
    record_id = last_record_id()
    mail.outbox.clear()

    statuses = at_once(metered, [("/chat/completions", {"model": "fake-gpt", "messages": PROMPT})] * 20)

    ok = statuses.count(200)
    assert ok >= 1 and set(statuses) <= {200, 429}
    assert available_tokens(metered.member) >= 0
    faults = uncharged_records(record_id)
    assert len(faults) == ok
    for record in faults:
        assert record.uncharged_tokens > 30_000  # most of the 30,000 output tokens beyond the cap, at x2
        assert record.charged_tokens + record.uncharged_tokens == record.input_tokens + 2 * record.output_tokens
        assert "not charged" in record.detail
    assert_within_limits()
    with unscoped():
        assert AuditLogEntry.all_objects.filter(organization=metered.org.organization,
                                                action="usage.beyond_hold").count() == ok
    # One email to the owners and admins, however many requests (at most one an hour).
    (alarm,) = [m for m in mail.outbox if "more usage than was held" in m.subject]
    assert set(alarm.to) == {metered.org.members["owner"].user.email, metered.org.members["admin"].user.email}
    # The usage page shows it to HR and admins.
    client.force_login(metered.org.members["admin"].user, backend="django.contrib.auth.backends.ModelBackend")
    page = client.get(f"/o/{metered.org.slug}/usage/").content.decode()
    assert "data-testid=\"uncharged-faults\"" in page and f"{ok} request" in page


def test_four_thousand_bare_numbers_are_refused_not_charged(metered):
    before, record_id = balance(metered.member), last_record_id()

    response = post(metered, "/chat/completions", {"model": "fake-gpt", "messages": [0] * 4000, "max_tokens": 1})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert balance(metered.member) == before and records_after(record_id) == []
    assert metered.upstream.requests == []


@pytest.mark.parametrize("body", [
    {"model": "fake-gpt", "messages": [{"role": "user", "content": "bad \ud800"}]},
    {"model": "fake-gpt", "messages": PROMPT, "n": 10_000_000_000_000_000_000},
    {"model": "fake-gpt", "messages": PROMPT, "max_tokens": 10**30},
])
def test_inputs_that_gave_a_500_get_a_400_and_change_nothing(metered, body):
    before = balance(metered.member)
    response = httpx.post(metered.url + "/chat/completions", headers={"Authorization": f"Bearer {metered.key}",
                                                                       "content-type": "application/json"},
                          content=json.dumps(body).encode(), timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert balance(metered.member) == before and metered.upstream.requests == []


def test_json_nested_a_hundred_thousand_levels_deep_gets_a_400(metered):
    before = balance(metered.member)
    deep = b'{"model": "fake-gpt", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/chat/completions", "/messages", "/embeddings"):
        response = httpx.post(metered.url + path, content=deep, timeout=30,
                              headers={"Authorization": f"Bearer {metered.key}", "content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
    assert balance(metered.member) == before


def test_usage_after_its_hold_was_released_and_spent_is_charged_only_as_far_as_the_limit(metered):
    """A request outliving its hold's time-to-live: the sweeper gave the tokens back and another
    request used them. Its settlement may not take the account below zero."""
    set_available(metered.org, metered.member, 6_000)
    metered.upstream.behaviour.chunk_delay = 0.2
    record_id = last_record_id()

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", metered.url + "/chat/completions", headers={
                    "Authorization": f"Bearer {metered.key}"}, json={"model": "fake-gpt", "messages": PROMPT,
                                                                    "max_tokens": 200, "stream": True}) as response:
                chunks = response.aiter_bytes()
                await chunks.__anext__()  # the hold is taken and the stream has begun
                # The sweeper releases it (as after its time-to-live) and the room is spent elsewhere.
                await asyncio.to_thread(_release_and_spend, metered)
                async for _ in chunks:
                    pass

    asyncio.run(scenario())
    (record,) = [r for r in records_after(record_id) if r.status == "ok"]
    assert available_tokens(metered.member) >= 0
    assert record.charged_tokens + record.uncharged_tokens == record.input_tokens * 1 + record.output_tokens * 2
    assert record.uncharged_tokens > 0
    assert_within_limits()


def _release_and_spend(metered):
    with unscoped():
        account = Account.all_objects.get(member=metered.member)
    ledger.release_expired_holds(now=timezone.now() + ledger.HOLD_TTL * 2)
    with scope(metered.org.organization):
        account.refresh_from_db()
        spender = ledger.authorize(account=account, tokens=account.available, idempotency_key="another-request")
        ledger.settle(hold=spender, used_tokens=spender.tokens)


# -- property: adversarial requests ----------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=80) | st.sampled_from(
    ["😀" * 40, "漢字" * 50, "a\u0301" * 30, "\u0000 nul"])
image = st.sampled_from([
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo" * 20, "detail": "high"}},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])
openai_content = texts | st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, texts), image),
                                  min_size=1, max_size=3)
tool = st.builds(lambda name, about: {"type": "function", "function": {
    "name": name, "description": about, "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
    st.text("abcxyz_", min_size=1, max_size=12), texts)
caps = st.one_of(st.none(), st.integers(1, 300), st.integers(10**6, 10**7))  # none, small, huge


response_items = st.lists(st.one_of(
    st.builds(lambda role, content: {"role": role, "content": content},
              st.sampled_from(["user", "assistant", "developer"]), texts),
    st.builds(lambda text: {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": text}, {"type": "input_image", "image_url": "https://example.com/a.png"}]},
        texts),
    st.builds(lambda name, args: {"type": "function_call", "call_id": "c1", "name": name, "arguments": args},
              st.text("abcxyz_", min_size=1, max_size=12), texts),
    st.builds(lambda text: {"type": "function_call_output", "call_id": "c1", "output": text}, texts)),
    min_size=1, max_size=8)


@st.composite
def adversarial_request(draw):
    """(path, body) for the sandbox or the worst-case fake provider, in either API."""
    model = draw(st.sampled_from(["fake-gpt", "fake-claude", "gpt-test"]))
    if model != "fake-claude" and draw(st.integers(0, 3)) == 0:  # the Responses API, native or translated
        body = {"model": model, "input": draw(st.one_of(texts.filter(bool), response_items))}
        if (cap := draw(caps)) is not None:
            body["max_output_tokens"] = cap
        if draw(st.booleans()):
            body["instructions"] = draw(texts)
        return "/responses", body
    if model != "fake-claude" and draw(st.integers(0, 5)) == 0:  # legacy completions, several prompts
        body = {"model": model, "prompt": draw(st.lists(texts.filter(bool), min_size=1, max_size=4)),
                "n": draw(st.integers(1, 3))}
        if (cap := draw(caps)) is not None:
            body["max_tokens"] = cap
        return "/completions", body
    messages = draw(st.lists(st.builds(lambda role, content: {"role": role, "content": content},
                                       st.sampled_from(["user", "assistant"]), openai_content),
                             min_size=1, max_size=draw(st.sampled_from([3, 200]))))
    cap = draw(caps)
    if model == "fake-claude":
        messages = [m | {"content": m["content"] if isinstance(m["content"], str) else [
            p if p["type"] == "text" else {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
            for p in m["content"]]} for m in messages]
        return "/messages", {"model": model, "messages": messages, "max_tokens": cap or 50}
    body = {"model": model, "messages": messages}
    if cap is not None:
        body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = cap
    if draw(st.booleans()):
        body["n"] = draw(st.integers(2, 8))
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(tool, min_size=1, max_size=3))
    return "/chat/completions", body


@pytest.fixture
def adversarial(metered):
    metered.upstream.behaviour.worst_case = True
    with scope(metered.org.organization):
        key, secret = api_key_services.api_key_create(member=metered.member, actor=metered.member.user,
                                                      name="everything", endpoints=["chat", "messages", "responses",
                                                                                    "completions"])
    set_available(metered.org, metered.member, 20_000)
    return secret


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(batch=st.lists(adversarial_request(), min_size=1, max_size=12))
def test_adversarial_requests_never_take_an_account_below_its_limit(metered, adversarial, batch):
    record_id = last_record_id()

    statuses = at_once(metered, batch, key=adversarial)

    assert set(statuses) <= {200, 400, 429}, statuses
    assert_within_limits()
    # The worst a provider could report always fitted the hold: the bound is a true upper bound.
    assert uncharged_records(record_id) == []
