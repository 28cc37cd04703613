"""Aliases through the gateway: a tool's default model id reaches the catalog model it is mapped
onto, the usage record keeps both ids, a key's model scope applies to what the alias names, and
/v1/models (and /v1/models/{id}) tell a key what it may ask for."""

import anthropic
import httpx
import openai
import pytest

from allowances import services as allowance_services
from apikeys import services as api_key_services
from portal.tenancy import scope
from tests.gateway.records import last_record_id, the_record_after

pytestmark = pytest.mark.transactional


@pytest.fixture
def aliased(metered):
    """Claude Code's and Codex CLI's default ids mapped onto the fake provider's models."""
    organization, admin = metered.org.organization, metered.org.members["admin"].user
    with scope(organization):
        for alias, target in (("claude-opus-*", metered.claude), ("claude-sonnet-4-5-20250929", metered.claude),
                              ("gpt-6*", metered.gpt), ("gpt-6.2-sol-latest", metered.gpt)):
            allowance_services.model_alias_create(organization=organization, actor=admin, alias=alias,
                                                  catalog_model=target)
    return metered


def test_an_alias_reaches_its_catalog_model_and_the_record_keeps_both_ids(aliased):
    record_id = last_record_id()
    client = anthropic.Anthropic(api_key=aliased.key, base_url=aliased.url.removesuffix("/v1"), max_retries=0)
    client.messages.create(model="claude-opus-5-5", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert aliased.upstream.requests[-1]["body"]["model"] == "fake-claude"
    record = the_record_after(record_id)
    assert (record.model, record.requested_model, record.status) == ("fake-claude", "claude-opus-5-5", "ok")

    record_id = last_record_id()
    openai.OpenAI(api_key=aliased.key, base_url=aliased.url, max_retries=0).responses.create(
        model="gpt-6.2-sol", input="Hi")
    assert aliased.upstream.requests[-1]["body"]["model"] == "upstream-gpt"
    record = the_record_after(record_id)
    assert (record.model, record.requested_model, record.endpoint) == ("fake-gpt", "gpt-6.2-sol", "responses")


def test_a_catalog_models_own_id_leaves_the_requested_id_empty(aliased):
    record_id = last_record_id()
    openai.OpenAI(api_key=aliased.key, base_url=aliased.url, max_retries=0).chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": "Hi"}])
    assert the_record_after(record_id).requested_model == ""


def test_an_alias_is_usable_by_a_key_limited_to_its_model_and_only_by_it(aliased):
    with scope(aliased.org.organization):
        _key, secret = api_key_services.api_key_create(member=aliased.member, actor=aliased.member.user,
                                                       name="gpt only", endpoints=["chat", "messages"],
                                                       model_ids=["fake-gpt"])
    ok = openai.OpenAI(api_key=secret, base_url=aliased.url, max_retries=0).chat.completions.create(
        model="gpt-6-mini", messages=[{"role": "user", "content": "Hi"}])
    assert ok.choices[0].message.content
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        anthropic.Anthropic(api_key=secret, base_url=aliased.url.removesuffix("/v1"), max_retries=0).messages.create(
            model="claude-opus-5-5", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    assert "claude-opus-5-5` (an alias of `fake-claude`)" in raised.value.body["error"]["message"]


def test_models_lists_catalog_models_and_exact_aliases_and_answers_for_any_id_that_resolves(aliased):
    client = openai.OpenAI(api_key=aliased.key, base_url=aliased.url, max_retries=0)
    assert [m.id for m in client.models.list()] == [
        "claude-sonnet-4-5-20250929", "fake-claude", "fake-gpt", "gpt-6.2-sol-latest", "gpt-test"]
    assert client.models.retrieve("fake-gpt").id == "fake-gpt"
    assert client.models.retrieve("gpt-6.2-sol").id == "gpt-6.2-sol"  # through the prefix alias gpt-6*
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gemini-9")
    assert raised.value.body["code"] == "model_not_found"
    claude = anthropic.Anthropic(api_key=aliased.key, base_url=aliased.url.removesuffix("/v1"), max_retries=0)
    assert claude.models.retrieve("claude-opus-5-5").id == "claude-opus-5-5"
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.models.retrieve("gemini-9")
    assert raised.value.body["error"]["type"] == "not_found_error"


def test_a_model_id_with_slashes_and_another_organizations_model_are_answered_right(aliased, org_b):
    with scope(org_b.organization):
        allowance_services.catalog_model_create(organization=org_b.organization, actor=org_b.members["admin"].user,
                                                model_id="meta/llama-b", connection=org_b.provider_connection)
    headers = {"Authorization": f"Bearer {org_b.api_key_secret}"}
    assert httpx.get(aliased.url + "/models/meta/llama-b", headers=headers).json()["id"] == "meta/llama-b"
    mine = httpx.get(aliased.url + "/models/meta/llama-b", headers={"Authorization": f"Bearer {aliased.key}"})
    assert mine.status_code == 404 and mine.json()["error"]["code"] == "model_not_found"
    assert httpx.get(aliased.url + "/models/fake-gpt", headers=headers).status_code == 404
    assert httpx.post(aliased.url + "/models/fake-gpt", headers=headers).status_code == 405


def test_removing_an_alias_applies_from_the_next_request(aliased):
    client = openai.OpenAI(api_key=aliased.key, base_url=aliased.url, max_retries=0)
    assert client.models.retrieve("gpt-6.2-sol").id == "gpt-6.2-sol"  # the catalog is cached now
    with scope(aliased.org.organization):
        from allowances.models import ModelAlias

        allowance_services.model_alias_delete(model_alias=ModelAlias.objects.get(alias="gpt-6*"), actor=None)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-6.2-sol", messages=[{"role": "user", "content": "Hi"}])
