"""What a key may do: its endpoints, its models, its organization's catalog, its validity, its IP
ranges and its own cap. Every refusal is JSON in the API's shape and never reaches the provider."""

import json
from datetime import timedelta

import anthropic
import httpx
import openai
import pytest
from django.utils import timezone

from allowances import services as allowance_services
from allowances.ledger import verify
from allowances.models import KeySpend
from apikeys import secrets as key_format
from apikeys import services as api_key_services
from gateway import bounds
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Hi"}]
GATEWAY_ENDPOINTS = ["chat", "embeddings", "messages"]
REQUESTS = {
    # endpoint: (path, body, family)
    "chat": ("/chat/completions", {"model": "fake-gpt", "messages": PROMPT}, "openai"),
    "embeddings": ("/embeddings", {"model": "fake-gpt", "input": "hello"}, "openai"),
    "messages": ("/messages", {"model": "fake-claude", "max_tokens": 50, "messages": PROMPT}, "anthropic"),
}


# -- helpers -------------------------------------------------------------------------------------


def make_key(member, *, endpoints=GATEWAY_ENDPOINTS, name="test key", **options):
    """A new key of `member` (made by themselves); returns (key, secret)."""
    with scope(member.organization):
        return api_key_services.api_key_create(member=member, actor=member.user, name=name,
                                               endpoints=list(endpoints), **options)


def call(url, secret, endpoint, **changes):
    """POST the endpoint's usual request, with `changes` to its body; the key as the SDKs send it."""
    path, body, _ = REQUESTS[endpoint]
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    return httpx.post(url + path, headers=headers, content=json.dumps(body | changes).encode(), timeout=30)


def list_models(url, secret, *, anthropic_client=False):
    headers = {"Authorization": f"Bearer {secret}"}
    if anthropic_client:
        headers["anthropic-version"] = "2023-06-01"
    response = httpx.get(url + "/models", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return [model["id"] for model in response.json()["data"]]


def error_of(response, endpoint, status):
    """The error object, after checking the status and the endpoint's API error shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if REQUESTS[endpoint][2] == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def put_under_policy_now(org, member):
    """Bring the fixture policy into force for `member` today (the fixture assigns it from next period):
    a key's cap may not exceed the allowance of the policy in force."""
    with scope(org.organization):
        allowance_services.policy_assign(organization=org.organization, actor=org.members["hr"].user,
                                         policy=org.policy, member=member, immediately=True)


def refused_records():
    with unscoped():
        return UsageRecord.all_objects.filter(status=UsageRecord.Status.REFUSED).count()


def spend_of(key):
    with unscoped():
        spend = KeySpend.all_objects.get(pk=key.spend_id)
    return spend.held, spend.used


def flip_one_character(secret, index=20):
    """The same key with one character of its secret changed (so its checksum no longer matches)."""
    replacement = "A" if secret[index] != "A" else "B"
    return secret[:index] + replacement + secret[index + 1:]


def same_public_id_wrong_secret(secret):
    """A well-formed key (valid checksum) naming a real key's row, with another secret."""
    public_id = secret[len(key_format.PREFIX):len(key_format.PREFIX) + key_format.PUBLIC_ID_LENGTH]
    body = f"{key_format.PREFIX}{public_id}_{'x' * key_format.SECRET_LENGTH}"
    return body + key_format._checksum(body)


# -- endpoint and model scopes -------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", GATEWAY_ENDPOINTS)
def test_key_without_the_endpoint_in_its_scopes_is_forbidden(metered, endpoint):
    _, secret = make_key(metered.member, endpoints=[e for e in GATEWAY_ENDPOINTS if e != endpoint])
    before = balance(metered.member)
    response = call(metered.url, secret, endpoint)
    error = error_of(response, endpoint, 403)
    assert error["type"] == "permission_error"
    assert REQUESTS[endpoint][0] in error["message"]
    if REQUESTS[endpoint][2] == "openai":
        assert error["code"] == "endpoint_not_allowed"
    assert metered.upstream.requests == []
    assert balance(metered.member) == before


def test_key_limited_to_one_model_may_not_use_another(metered):
    _, secret = make_key(metered.member, model_ids=["fake-gpt"])
    forbidden = call(metered.url, secret, "messages")
    error = error_of(forbidden, "messages", 403)
    assert error["type"] == "permission_error" and "fake-claude" in error["message"]
    assert metered.upstream.requests == []
    allowed = call(metered.url, secret, "chat")
    assert allowed.status_code == 200, allowed.text
    assert [request["body"]["model"] for request in metered.upstream.requests] == ["upstream-gpt"]


def test_models_list_shows_only_the_keys_models_and_nothing_of_another_organization(metered, org_b):
    with scope(org_b.organization):
        allowance_services.catalog_model_create(
            organization=org_b.organization, actor=org_b.members["admin"].user, model_id="org-b-private",
            connection=org_b.provider_connection)
    _, limited = make_key(metered.member, model_ids=["fake-gpt"])
    assert list_models(metered.url, limited) == ["fake-gpt"]
    assert list_models(metered.url, limited, anthropic_client=True) == ["fake-gpt"]
    assert list_models(metered.url, metered.key) == ["fake-claude", "fake-gpt", "gpt-test"]
    assert "org-b-private" in list_models(metered.url, org_b.api_key_secret)
    error = error_of(call(metered.url, metered.key, "chat", model="org-b-private"), "chat", 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("endpoint", GATEWAY_ENDPOINTS)
def test_unknown_model_is_a_404_model_not_found(metered, endpoint):
    response = call(metered.url, metered.key, endpoint, model="no-such-model")
    error = error_of(response, endpoint, 404)
    assert "no-such-model" in error["message"]
    if REQUESTS[endpoint][2] == "openai":
        assert (error["code"], error["param"]) == ("model_not_found", "model")
    else:
        assert error["type"] == "not_found_error"
    assert metered.upstream.requests == []


def test_switched_off_catalog_model_is_a_404_and_leaves_the_models_list(metered):
    assert call(metered.url, metered.key, "chat").status_code == 200  # the catalog is cached now
    with scope(metered.org.organization):
        allowance_services.catalog_model_update(catalog_model=metered.gpt, actor=metered.org.members["admin"].user,
                                                is_active=False)
    before = balance(metered.member)
    error = error_of(call(metered.url, metered.key, "chat"), "chat", 404)
    assert error["code"] == "model_not_found"
    assert "fake-gpt" not in list_models(metered.url, metered.key)
    assert len(metered.upstream.requests) == 1
    assert balance(metered.member) == before


def test_anthropic_model_on_the_chat_endpoint_is_a_400_naming_v1_messages(metered):
    error = error_of(call(metered.url, metered.key, "chat", model="fake-claude"), "chat", 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert "/v1/messages" in error["message"]
    assert metered.upstream.requests == []


def test_openai_model_on_the_messages_endpoint_is_a_400_naming_v1_chat_completions(metered):
    error = error_of(call(metered.url, metered.key, "messages", model="fake-gpt"), "messages", 400)
    assert error["type"] == "invalid_request_error"
    assert "/v1/chat/completions" in error["message"]
    assert metered.upstream.requests == []


# -- who is calling --------------------------------------------------------------------------------

BAD_KEYS = {
    "missing": lambda secret: None,
    "malformed": lambda secret: "tap_abc",
    "not ours": lambda secret: "sk-" + "a" * 48,
    "checksum broken": flip_one_character,
    "wrong secret": same_public_id_wrong_secret,
}


@pytest.mark.parametrize("endpoint", GATEWAY_ENDPOINTS)
@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_missing_or_invalid_key_is_a_401(metered, case, endpoint):
    response = call(metered.url, BAD_KEYS[case](metered.key), endpoint)
    error = error_of(response, endpoint, 401)
    assert error["type"] == "authentication_error"
    if REQUESTS[endpoint][2] == "openai":
        assert error["code"] == ("missing_api_key" if case == "missing" else "invalid_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert metered.upstream.requests == []


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_models_list_refuses_a_missing_or_invalid_key(metered, case):
    secret = BAD_KEYS[case](metered.key)
    response = httpx.get(metered.url + "/models", headers={"Authorization": f"Bearer {secret}"} if secret else {})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_revoked_key_is_refused_on_the_very_next_request(metered):
    key, secret = make_key(metered.member)
    assert call(metered.url, secret, "chat").status_code == 200  # its identity is cached now
    with scope(metered.org.organization):
        api_key_services.api_key_revoke(key=key, actor=metered.member.user)
    error = error_of(call(metered.url, secret, "chat"), "chat", 401)
    assert "revoked" in error["message"]
    assert len(metered.upstream.requests) == 1


def test_expired_key_is_refused(metered):
    key, secret = make_key(metered.member, expires_at=timezone.now() + timedelta(seconds=30))
    assert call(metered.url, secret, "chat").status_code == 200
    with scope(metered.org.organization):
        key.expires_at = timezone.now() - timedelta(seconds=1)
        key.save()
    error = error_of(call(metered.url, secret, "chat"), "chat", 401)
    assert "expired" in error["message"]
    assert len(metered.upstream.requests) == 1


def test_key_outside_its_allowed_ip_ranges_is_refused(metered):
    _, secret = make_key(metered.member, allowed_cidrs=["10.0.0.0/8"])
    error = error_of(call(metered.url, secret, "chat"), "chat", 401)
    assert "127.0.0.1" in error["message"] and "IP ranges" in error["message"]
    assert metered.upstream.requests == []


def test_key_inside_its_allowed_ip_ranges_works(metered):
    _, secret = make_key(metered.member, allowed_cidrs=["127.0.0.0/8"])
    response = call(metered.url, secret, "chat")
    assert response.status_code == 200, response.text
    assert len(metered.upstream.requests) == 1


# -- a key's own cap -------------------------------------------------------------------------------

CAPPED_BODY = {"model": "fake-gpt", "messages": PROMPT, "max_tokens": 10}
# Its reserve: the input bound (gateway.bounds) plus 10 output tokens at x2. The fake provider
# reports 11 input and 7 output tokens: 25 charged.
CAPPED_RESERVE = bounds.bound("chat", "openai", CAPPED_BODY, most_output=10**6).input_tokens + 2 * 10
CAPPED_CHARGE = 11 + 2 * 7


def test_key_cap_refuses_the_request_whose_reserve_no_longer_fits(metered):
    put_under_policy_now(metered.org, metered.member)
    key, secret = make_key(metered.member, token_cap=CAPPED_RESERVE)
    granted, held, used = balance(metered.member)
    first = call(metered.url, secret, "chat", max_tokens=10)
    assert first.status_code == 200, first.text
    assert balance(metered.member) == (granted, held, used + CAPPED_CHARGE)
    assert spend_of(key) == (0, CAPPED_CHARGE)
    refused_before = refused_records()

    second = call(metered.url, secret, "chat", max_tokens=10)
    error = error_of(second, "chat", 429)
    assert error["type"] == "insufficient_quota"
    assert second.headers["x-should-retry"] == "false"
    assert f"cap of {CAPPED_RESERVE:,} tokens" in error["message"]
    assert f"has {CAPPED_RESERVE - CAPPED_CHARGE:,} left" in error["message"]
    assert balance(metered.member) == (granted, held, used + CAPPED_CHARGE)  # the account is untouched
    assert spend_of(key) == (0, CAPPED_CHARGE)
    assert refused_records() == refused_before + 1
    assert len(metered.upstream.requests) == 1
    assert verify() == []


def test_rotating_a_capped_key_does_not_reset_its_cap(metered):
    put_under_policy_now(metered.org, metered.member)
    key, secret = make_key(metered.member, token_cap=CAPPED_RESERVE)
    assert call(metered.url, secret, "chat", max_tokens=10).status_code == 200
    with scope(metered.org.organization):
        successor, new_secret = api_key_services.api_key_rotate(key=key, actor=metered.member.user)
    assert successor.spend_id == key.spend_id
    before = balance(metered.member)
    error = error_of(call(metered.url, new_secret, "chat", max_tokens=10), "chat", 429)
    assert f"cap of {CAPPED_RESERVE:,} tokens" in error["message"]
    assert error_of(call(metered.url, secret, "chat", max_tokens=10), "chat", 401)  # rotated out, no grace
    assert balance(metered.member) == before
    assert len(metered.upstream.requests) == 1
    assert verify() == []


# -- across organizations ------------------------------------------------------------------------


def test_key_of_another_organization_can_neither_see_nor_use_its_models(metered, org_b):
    secret = org_b.api_key_secret
    assert list_models(metered.url, secret) == ["gpt-test"]  # org B's own sandbox model only
    assert list_models(metered.url, secret, anthropic_client=True) == ["gpt-test"]
    for endpoint in GATEWAY_ENDPOINTS:
        response = call(metered.url, secret, endpoint)
        error = error_of(response, endpoint, 404)
        assert "fake-" in error["message"]
    assert metered.upstream.requests == []
    assert balance(metered.member) == (5_000, 1_000, 0)


# -- the SDKs see a spent allowance as final ------------------------------------------------------


def allow_long_replies(metered, tokens=200_000):
    """Catalog models that can write `tokens` in a reply: a large max_tokens is then held as it is."""
    with scope(metered.org.organization):
        for model in (metered.gpt, metered.claude):
            allowance_services.catalog_model_update(catalog_model=model, actor=metered.org.members["admin"].user,
                                                    max_output_tokens=tokens)


def test_openai_sdk_gets_rate_limit_error_for_a_spent_allowance_and_does_not_retry(metered):
    allow_long_replies(metered)
    client = openai.OpenAI(api_key=metered.key, base_url=metered.url)  # the default max_retries=2
    assert client.max_retries == 2
    before, refused_before = balance(metered.member), refused_records()
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="fake-gpt", messages=PROMPT, max_tokens=100_000)
    error = raised.value
    assert error.status_code == 429
    assert error.body["type"] == "insufficient_quota" and error.type == "insufficient_quota"
    assert "remaining balance" in error.message
    assert "4,000 tokens" in error.message  # 5,000 granted less the fixture's 1,000 hold
    assert f"Request more at {metered.url.removesuffix('/v1')}/" in error.message and "org-a" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert refused_records() == refused_before + 1  # one request, not three
    assert metered.upstream.requests == []
    assert balance(metered.member) == before
    assert verify() == []


def test_reserve_of_a_request_for_several_choices_covers_every_choice(metered):
    # n=50 choices of up to 100 tokens each may produce 5,000 output tokens: worst case the input
    # bound + 2 x 5,000, far beyond the 4,000 available. One choice's worth would let it overdraw.
    client = openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0)
    before = balance(metered.member)
    body = {"model": "fake-gpt", "messages": PROMPT, "max_tokens": 100, "n": 50}
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(**body)
    worst = bounds.bound("chat", "openai", body, most_output=10**6).input_tokens + 2 * 100 * 50
    assert f"may use up to {worst:,} tokens" in raised.value.message
    assert metered.upstream.requests == []
    assert balance(metered.member) == before


def test_anthropic_sdk_gets_rate_limit_error_for_a_spent_allowance_and_does_not_retry(metered):
    allow_long_replies(metered)
    client = anthropic.Anthropic(api_key=metered.key, base_url=metered.url.removesuffix("/v1"))
    assert client.max_retries == 2
    before, refused_before = balance(metered.member), refused_records()
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="fake-claude", max_tokens=2_000, messages=PROMPT)  # reserves 6,000+
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == "rate_limit_error"
    assert "remaining balance" in raised.value.body["error"]["message"]
    assert refused_records() == refused_before + 1
    assert metered.upstream.requests == []
    assert balance(metered.member) == before
