"""Legacy completions and moderations: forwarded and metered where the model's provider has them
(OpenAI's API, OpenAI-compatible servers), a clear 4xx otherwise."""

import httpx
import openai
import pytest

from allowances.ledger import verify
from apikeys import services as api_key_services
from gateway import bounds
from portal.tenancy import scope
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after, the_record_after

pytestmark = pytest.mark.transactional


def client_of(metered):
    return openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_completions_are_forwarded_with_an_explicit_cap_and_debited_by_the_usage_reported(metered, stream):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 14, 7
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    reply = client_of(metered).completions.create(model="fake-gpt", prompt="Say this is a test", stream=stream)
    text = "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text
    assert text == "Hello from the fake provider ! ok"
    sent = metered.upstream.requests[-1]
    assert sent["path"] == "/v1/completions" and sent["body"]["model"] == "upstream-gpt"
    assert sent["body"]["max_tokens"] == bounds.COMPLETIONS_DEFAULT_OUTPUT  # OpenAI's own default, made explicit
    if stream:
        assert sent["body"]["stream_options"] == {"include_usage": True}
    record = the_record_after(record_id)
    assert (record.endpoint, record.status, record.input_tokens, record.output_tokens) == ("completions", "ok", 14, 7)
    assert balance(metered.member) == (granted, held, used + 14 + 2 * 7)
    assert verify() == []


def test_moderations_are_forwarded_and_charged_their_input_bound(metered):
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    result = client_of(metered).moderations.create(model="fake-gpt", input="Is this fine?")
    assert result.results[0].flagged is False
    assert metered.upstream.requests[-1]["path"] == "/v1/moderations"
    record = the_record_after(record_id)
    bound = bounds.bound("moderations", "openai", {"model": "fake-gpt", "input": "Is this fine?"}, most_output=1)
    assert (record.endpoint, record.status, record.input_tokens) == ("moderations", "ok", bound.input_tokens)
    assert balance(metered.member) == (granted, held, used + bound.input_tokens)


def test_an_anthropic_model_has_neither_and_nothing_is_charged(metered):
    before, record_id = balance(metered.member), last_record_id()
    client = client_of(metered)
    for call in (lambda: client.completions.create(model="fake-claude", prompt="Hi"),
                 lambda: client.moderations.create(model="fake-claude", input="Hi")):
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert "/v1/messages" in raised.value.message and raised.value.body["param"] == "model"
    assert balance(metered.member) == before and records_after(record_id) == [] and metered.upstream.requests == []


def test_a_provider_without_the_endpoint_answers_a_clear_4xx_and_nothing_is_charged(metered):
    metered.upstream.behaviour.fail_status = 404
    before = balance(metered.member)
    with pytest.raises(openai.NotFoundError):
        client_of(metered).completions.create(model="fake-gpt", prompt="Hi")
    assert balance(metered.member) == before


@pytest.mark.parametrize("body, param", [
    ({"model": "fake-gpt", "prompt": ""}, "prompt"), ({"model": "fake-gpt", "prompt": [1, "a"]}, "prompt"),
    ({"model": "fake-gpt", "prompt": "Hi", "best_of": 500}, "best_of"),
    ({"model": "fake-gpt", "input": [{"type": "image_url"}, 3]}, "input"),
])
def test_malformed_legacy_bodies_are_a_400(metered, body, param):
    path = "/completions" if "prompt" in body else "/moderations"
    response = httpx.post(metered.url + path, json=body, headers={"Authorization": f"Bearer {metered.key}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert metered.upstream.requests == []


def test_each_needs_its_own_scope(metered):
    with scope(metered.org.organization):
        _key, secret = api_key_services.api_key_create(member=metered.member, actor=metered.member.user,
                                                       name="chat", endpoints=["chat", "responses"])
    client = openai.OpenAI(api_key=secret, base_url=metered.url, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.completions.create(model="fake-gpt", prompt="Hi")
    assert "/v1/completions" in raised.value.message
    with pytest.raises(openai.PermissionDeniedError):
        client.moderations.create(model="fake-gpt", input="Hi")
