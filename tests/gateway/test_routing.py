"""Budget-aware routing through the gateway: near the limit a premium model's requests are served
by its economy counterpart (saying so in headers and in the model field), above it by the
premium model; a key that opted out is refused as before; the usage record keeps both ids; both
API families, each only ever to a model that speaks it; concurrent requests never overspend."""

import anthropic
import httpx
import openai
import pytest

from allowances import ledger
from allowances import services as allowance_services
from apikeys import services as api_key_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, the_record_after
from tests.gateway.test_overspend import assert_within_limits, at_once

pytestmark = pytest.mark.transactional

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def routing(metered):
    """fake-gpt routes to fake-gpt-mini (same OpenAI connection, x1 in and out, 20 tokens a reply
    at most) and fake-claude to fake-claude-haiku (Anthropic); the employee's own policy routes
    below 50% left. Their account: 5,000 granted, 1,000 held (80% left)."""
    organization, admin = metered.org.organization, metered.org.members["admin"].user
    with scope(organization):
        mini = allowance_services.catalog_model_create(
            organization=organization, actor=admin, model_id="fake-gpt-mini", display_name="Fake GPT mini",
            connection=metered.openai_connection, upstream_model="upstream-gpt-mini", max_output_tokens=20)
        haiku = allowance_services.catalog_model_create(
            organization=organization, actor=admin, model_id="fake-claude-haiku", display_name="Fake Claude haiku",
            connection=metered.anthropic_connection, max_output_tokens=20)
        allowance_services.catalog_model_update(catalog_model=metered.gpt, actor=admin, economy_counterpart=mini)
        allowance_services.catalog_model_update(catalog_model=metered.claude, actor=admin, economy_counterpart=haiku)
        policy = allowance_services.policy_create(organization=organization, actor=admin, name="Routes near the end",
                                                  monthly_tokens=0, economy_below_percent=50)
        allowance_services.policy_assign(organization=organization, actor=admin, policy=policy, member=metered.member,
                                         immediately=True)
    metered.mini, metered.haiku = mini, haiku
    return metered


def hold_down_to(metered, available: int, *, key_id=None, spend_id=None, idempotency_key="test:hold-down"):
    """Hold tokens on the employee's account until `available` are left."""
    granted, held, used = balance(metered.member)
    with scope(metered.org.organization):
        ledger.authorize(account=metered.org.account, tokens=granted - held - used - available,
                         idempotency_key=idempotency_key, api_key_id=key_id, spend_id=spend_id)
    assert sum(balance(metered.member)[:1]) - sum(balance(metered.member)[1:]) == available


def chat(metered, key=None, model="fake-gpt"):
    return httpx.post(metered.url + "/chat/completions", json={"model": model, "messages": HI},
                      headers={"Authorization": f"Bearer {key or metered.key}"}, timeout=30)


def test_above_the_threshold_the_premium_model_answers(routing):
    record_id = last_record_id()
    response = chat(routing)
    assert response.status_code == 200, response.text
    assert "x-portal-routed-from" not in response.headers and "x-portal-routed-to" not in response.headers
    assert response.json()["model"] == "upstream-gpt"
    record = the_record_after(record_id)
    assert (record.model, record.requested_model, record.routed_from) == ("fake-gpt", "", "")


def test_below_the_threshold_the_economy_model_answers_and_says_so(routing):
    hold_down_to(routing, 2_000)  # 40% of 5,000 left
    record_id = last_record_id()
    response = chat(routing)
    assert response.status_code == 200, response.text
    assert response.headers["x-portal-routed-from"] == "fake-gpt"
    assert response.headers["x-portal-routed-to"] == "fake-gpt-mini"
    assert routing.upstream.requests[-1]["body"]["model"] == "upstream-gpt-mini"
    assert response.json()["model"] == "upstream-gpt-mini"  # the model that answered
    # The economy model's own cap is what the provider was told to keep to.
    assert routing.upstream.requests[-1]["body"]["max_completion_tokens"] == 20
    record = the_record_after(record_id)
    assert (record.model, record.requested_model, record.routed_from) == ("fake-gpt-mini", "fake-gpt", "fake-gpt")
    assert record.charged_tokens == record.input_tokens + record.output_tokens  # charged at the economy's x1
    with unscoped():
        usage = ledger.LedgerEntry.all_objects.filter(account=routing.org.account, kind="usage").latest("id")
    assert usage.model == "fake-gpt-mini"


def test_the_dashboard_counts_the_requests_routed_to_economy_models(routing, login):
    page = login(routing.member).get(f"/o/{routing.org.slug}/")
    assert 'data-testid="routed-to-economy"' not in page.content.decode()
    hold_down_to(routing, 2_000)
    for _ in range(3):
        assert chat(routing).headers["x-portal-routed-to"] == "fake-gpt-mini"
    assert "x-portal-routed-to" not in chat(routing, model="fake-gpt-mini").headers  # asked for: not routed
    page = login(routing.member).get(f"/o/{routing.org.slug}/").content.decode()
    assert "routed to economy models since" in page and ": 3 requests (fake-gpt → fake-gpt-mini)." in page


def test_the_openai_sdk_sees_the_routing_headers_on_a_stream_too(routing):
    hold_down_to(routing, 2_000)
    client = openai.OpenAI(api_key=routing.key, base_url=routing.url, max_retries=0)
    with client.chat.completions.with_streaming_response.create(model="fake-gpt", messages=HI, stream=True) as raw:
        assert raw.headers["x-portal-routed-to"] == "fake-gpt-mini"
        chunks = list(raw.parse())
    assert {chunk.model for chunk in chunks} == {"upstream-gpt-mini"}


def test_anthropic_requests_are_routed_to_a_model_that_speaks_messages(routing):
    hold_down_to(routing, 2_000)
    record_id = last_record_id()
    client = anthropic.Anthropic(api_key=routing.key, base_url=routing.url.removesuffix("/v1"), max_retries=0)
    raw = client.messages.with_raw_response.create(model="fake-claude", max_tokens=50, messages=HI)
    assert raw.headers["x-portal-routed-from"] == "fake-claude"
    assert raw.headers["x-portal-routed-to"] == "fake-claude-haiku"
    assert raw.parse().model == "fake-claude-haiku"
    record = the_record_after(record_id)
    assert (record.model, record.routed_from, record.endpoint) == ("fake-claude-haiku", "fake-claude", "messages")


def test_routing_never_crosses_api_families(routing):
    """A counterpart in another API is refused when it is set, and one made reachable only in
    another API (its connection changed afterwards) is never routed to."""
    organization, admin = routing.org.organization, routing.org.members["admin"].user
    with scope(organization), pytest.raises(allowance_services.ValidationError) as raised:
        allowance_services.catalog_model_update(catalog_model=routing.claude, actor=admin,
                                                economy_counterpart=routing.mini)
    assert "another kind" in raised.value.message_dict["economy_counterpart"][0]

    with scope(organization):
        from allowances.models import CatalogModel

        CatalogModel.objects.filter(pk=routing.haiku.pk).update(connection=routing.openai_connection)
    from gateway.metering import invalidate_config

    invalidate_config(organization.pk)
    hold_down_to(routing, 2_000)
    record_id = last_record_id()
    client = anthropic.Anthropic(api_key=routing.key, base_url=routing.url.removesuffix("/v1"), max_retries=0)
    raw = client.messages.with_raw_response.create(model="fake-claude", max_tokens=50, messages=HI)
    assert "x-portal-routed-to" not in raw.headers and raw.parse().model == "fake-claude"
    assert the_record_after(record_id).routed_from == ""


def test_a_key_that_opted_out_is_refused_where_another_is_routed(routing):
    with scope(routing.org.organization):
        _key, opted_out = api_key_services.api_key_create(member=routing.member, actor=routing.member.user,
                                                          name="no routing", endpoints=["chat"],
                                                          economy_routing=False)
    hold_down_to(routing, 200)  # the premium hold (about 340) no longer fits; the economy one (about 160) does
    refused = chat(routing, key=opted_out)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert "x-portal-routed-to" not in refused.headers
    routed = chat(routing)
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-portal-routed-to"] == "fake-gpt-mini"
    with unscoped():
        assert UsageRecord.all_objects.filter(api_key__name="no routing").get().status == "refused"


def test_a_keys_nearly_spent_cap_routes_while_the_account_is_well_above(routing):
    with scope(routing.org.organization):
        key, secret = api_key_services.api_key_create(member=routing.member, actor=routing.member.user,
                                                      name="capped", endpoints=["chat"], token_cap=1_000)
        ledger.authorize(account=routing.org.account, tokens=600, idempotency_key="test:cap-spent", api_key_id=key.pk,
                         spend_id=key.spend_id)  # 40% of the cap left; the account still has 3,400 of 5,000
    assert chat(routing, key=secret).headers["x-portal-routed-to"] == "fake-gpt-mini"
    assert "x-portal-routed-to" not in chat(routing).headers  # the fixture key has no cap


def test_without_a_routing_policy_nothing_is_routed(routing):
    with scope(routing.org.organization):
        policy = allowance_services.policy_create(organization=routing.org.organization, actor=None,
                                                  name="No routing", monthly_tokens=0)
        allowance_services.policy_assign(organization=routing.org.organization, actor=None, policy=policy,
                                         member=routing.member, immediately=True)
    hold_down_to(routing, 2_000)
    response = chat(routing)
    assert response.status_code == 200 and "x-portal-routed-to" not in response.headers


def test_concurrent_requests_near_the_limit_are_routed_or_refused_and_never_overspend(routing):
    """Taken on the locked account row: the first holds are the premium model's while they leave
    more than the threshold; every later one is the economy model's, or refused when even that
    does not fit."""
    routing.upstream.behaviour.worst_case = True  # every reply written to the cap its request carries
    hold_down_to(routing, 2_700)  # the threshold is 2,500 (50% of 5,000 granted)
    record_id = last_record_id()

    statuses = at_once(routing, [("/chat/completions", {"model": "fake-gpt", "messages": HI})] * 12)

    assert statuses == [200] * 12  # about 340 for the first, 160 for each economy one
    with unscoped():
        served = list(UsageRecord.all_objects.filter(id__gt=record_id, status="ok"))
    assert {r.model for r in served} == {"fake-gpt", "fake-gpt-mini"}
    assert all(r.routed_from == ("fake-gpt" if r.model == "fake-gpt-mini" else "") for r in served)
    assert_within_limits()

    hold_down_to(routing, 200, idempotency_key="test:hold-down-again")
    statuses = at_once(routing, [("/chat/completions", {"model": "fake-gpt", "messages": HI})] * 24)
    assert set(statuses) == {200, 429}
    with unscoped():
        assert not UsageRecord.all_objects.filter(id__gt=record_id, status="ok", model="fake-gpt").exclude(
            pk__in=[r.pk for r in served]).exists()
    assert all(r.uncharged_tokens == 0 for r in served)
    assert_within_limits()
