"""The official SDKs, pointed at the portal, are debited exactly what the provider reported."""

import anthropic
import openai
import pytest

from allowances.ledger import verify
from gateway.models import UsageRecord
from portal.tenancy import unscoped
from tests.allowances.helpers import balance

pytestmark = pytest.mark.transactional


def records():
    with unscoped():
        return list(UsageRecord.all_objects.filter(source="gateway").order_by("id"))


def test_openai_chat_completion_is_debited_by_the_reported_usage(metered):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 40, 9
    granted, held, used = balance(metered.member)
    client = openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0)
    reply = client.chat.completions.create(model="fake-gpt", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello from the fake provider ! ok"
    assert reply.usage.prompt_tokens == 40
    assert balance(metered.member) == (granted, held, used + 40 + 2 * 9)
    assert metered.upstream.requests[-1]["body"]["model"] == "upstream-gpt"
    assert metered.upstream.requests[-1]["headers"]["authorization"] == "Bearer sk-fake-openai-secret-1234"
    record = records()[-1]
    assert (record.status, record.input_tokens, record.output_tokens, record.charged_tokens) == ("ok", 40, 9, 58)
    assert verify() == []


def test_openai_stream_is_debited_by_the_usage_in_its_last_chunk(metered):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 12, 30
    granted, held, used = balance(metered.member)
    client = openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0)
    stream = client.chat.completions.create(model="fake-gpt", messages=[{"role": "user", "content": "Hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the fake provider ! ok"
    assert metered.upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert balance(metered.member) == (granted, held, used + 12 + 2 * 30)
    assert verify() == []


def test_anthropic_messages_stream_and_not(metered):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 20, 5
    granted, held, used = balance(metered.member)
    client = anthropic.Anthropic(api_key=metered.key, base_url=metered.url.removesuffix("/v1"), max_retries=0)
    message = client.messages.create(model="fake-claude", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text == "Hello from the fake provider ! ok"
    with client.messages.stream(model="fake-claude", max_tokens=50,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake provider ! ok"
    assert balance(metered.member) == (granted, held, used + 2 * (20 + 3 * 5))
    assert metered.upstream.requests[-1]["headers"]["x-api-key"] == "sk-ant-fake-secret-5678"
    assert verify() == []
