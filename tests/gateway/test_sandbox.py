"""The built-in sandbox provider through the real gateway: deterministic replies, streams and
embeddings, each charged exactly its reported usage times the catalog model's multipliers."""

import math
from decimal import Decimal

import anthropic
import openai
import pytest

from allowances import services as allowance_services
from allowances.ledger import verify
from gateway import sandbox
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after, the_record_after

pytestmark = pytest.mark.transactional

MODEL = "gpt-test"  # org A's catalog model served by its sandbox connection
MULTIPLIERS = (Decimal(1), Decimal(2), Decimal("0.5"))  # input, output, cached
PRICES = (Decimal(3), Decimal(15), Decimal("1.5"))  # per million tokens, set by the fixture below
PROMPT = [{"role": "user", "content": "Tell me something about tokens, please."}]
# Room for the whole sandbox reply (32 tokens); without it the hold would reserve the catalog's
# max_output_tokens (4,096 x2), more than the fixture account's 4,000 available tokens.
MAX_TOKENS = 64


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def sandboxed(org_a, gateway_url):
    """Org A's employee with the OpenAI and Anthropic SDKs pointed at the portal; gpt-test priced."""
    with scope(org_a.organization):
        allowance_services.catalog_model_update(
            catalog_model=org_a.catalog_model, actor=org_a.members["hr"].user, input_price_per_million=str(PRICES[0]),
            output_price_per_million=str(PRICES[1]), cached_price_per_million=str(PRICES[2]))
    openai_client = openai.OpenAI(api_key=org_a.api_key_secret, base_url=gateway_url, max_retries=0)
    anthropic_client = anthropic.Anthropic(api_key=org_a.api_key_secret, base_url=gateway_url.removesuffix("/v1"),
                                           max_retries=0)
    return org_a.members["employee"], openai_client, anthropic_client


def charged_for(input_tokens, output_tokens, cached_tokens=0):
    total = input_tokens * MULTIPLIERS[0] + output_tokens * MULTIPLIERS[1] + cached_tokens * MULTIPLIERS[2]
    return math.ceil(total)


def cost_of(input_tokens, output_tokens, cached_tokens=0):
    return (input_tokens * PRICES[0] + output_tokens * PRICES[1] + cached_tokens * PRICES[2]) / Decimal(1_000_000)


def is_sandbox_text(text):
    return bool(text) and all(word in sandbox.REPLY_WORDS for word in text.split(" "))


# -- chat ------------------------------------------------------------------------------------------


def test_same_prompt_gets_the_same_reply(sandboxed):
    _, client, _ = sandboxed
    first = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    second = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    assert is_sandbox_text(first.choices[0].message.content)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.model_dump() == second.usage.model_dump()
    assert first.choices[0].finish_reason == "stop"


def test_reply_is_charged_its_reported_usage_times_the_multipliers(sandboxed):
    member, client, _ = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    usage = reply.usage
    assert usage.prompt_tokens == sandbox.count_tokens(PROMPT[0]["content"]) + 3
    assert usage.completion_tokens == sandbox.count_tokens(reply.choices[0].message.content) > 0
    expected = charged_for(usage.prompt_tokens, usage.completion_tokens)
    assert balance(member) == (granted, held, used + expected)
    record = the_record_after(record_id)
    assert (record.status, record.endpoint, record.model) == ("ok", "chat", MODEL)
    assert (record.input_tokens, record.output_tokens, record.cached_tokens) == (
        usage.prompt_tokens, usage.completion_tokens, 0)
    assert record.charged_tokens == expected
    assert record.cost == cost_of(usage.prompt_tokens, usage.completion_tokens) > 0
    assert verify() == []


def test_max_tokens_cuts_the_reply_short(sandboxed):
    _, client, _ = sandboxed
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=3)
    assert reply.usage.completion_tokens <= 3
    assert reply.choices[0].finish_reason == "length"


def test_stream_gives_the_same_text_and_is_charged_its_usage(sandboxed):
    member, client, _ = sandboxed
    whole = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    granted, held, used = balance(member)
    record_id = last_record_id()
    stream = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    expected = charged_for(usage.prompt_tokens, usage.completion_tokens)
    assert balance(member) == (granted, held, used + expected)  # debited by the time the stream ended
    record = the_record_after(record_id)
    assert (record.status, record.charged_tokens) == ("ok", expected)
    assert record.cost == cost_of(usage.prompt_tokens, usage.completion_tokens)
    assert verify() == []


def test_stream_without_include_usage_hides_the_usage_chunk_but_is_still_charged(sandboxed):
    member, client, _ = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    record = the_record_after(record_id)
    assert record.status == "ok" and record.charged_tokens == charged_for(record.input_tokens, record.output_tokens) > 0
    assert balance(member) == (granted, held, used + record.charged_tokens)


# -- embeddings ------------------------------------------------------------------------------------


def test_embeddings_return_a_vector_per_input_and_are_charged_their_usage(sandboxed):
    member, client, _ = sandboxed
    inputs = ["The first text.", "A second, longer text to embed!"]
    granted, held, used = balance(member)
    record_id = last_record_id()
    result = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float")
    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) == 16 and all(isinstance(x, float) for x in item.embedding) for item in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    expected_tokens = sum(sandbox.count_tokens(text) for text in inputs)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (expected_tokens, expected_tokens)
    assert balance(member) == (granted, held, used + charged_for(expected_tokens, 0))
    record = the_record_after(record_id)
    assert (record.status, record.endpoint, record.input_tokens, record.output_tokens) == (
        "ok", "embeddings", expected_tokens, 0)
    assert record.charged_tokens == charged_for(expected_tokens, 0)
    assert record.cost == cost_of(expected_tokens, 0)
    again = client.embeddings.create(model=MODEL, input=inputs[0], encoding_format="float")
    assert again.data[0].embedding == result.data[0].embedding  # deterministic
    assert verify() == []


# -- the Anthropic SDK -----------------------------------------------------------------------------


def test_anthropic_messages_whole_and_streamed_are_charged_their_usage(sandboxed):
    member, _, client = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    message = client.messages.create(model=MODEL, max_tokens=50, messages=PROMPT)
    text = message.content[0].text
    assert is_sandbox_text(text)
    with client.messages.stream(model=MODEL, max_tokens=50, messages=PROMPT) as stream:
        assert "".join(stream.text_stream) == text
        final = stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        message.usage.input_tokens, message.usage.output_tokens)
    expected = charged_for(message.usage.input_tokens, message.usage.output_tokens)
    assert balance(member) == (granted, held, used + 2 * expected)
    records = records_after(record_id)
    assert [(r.status, r.endpoint, r.charged_tokens) for r in records] == [("ok", "messages", expected)] * 2
    assert verify() == []


# -- the records ---------------------------------------------------------------------------------


def test_every_usage_record_matches_its_tokens_and_cost(sandboxed):
    member, openai_client, anthropic_client = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    openai_client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS)
    openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Another one"}],
                                          max_tokens=5)
    list(openai_client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stream=True))
    openai_client.embeddings.create(model=MODEL, input="embed me", encoding_format="float")
    anthropic_client.messages.create(model=MODEL, max_tokens=20, messages=PROMPT)
    records = records_after(record_id)
    assert len(records) == 5
    for record in records:
        assert record.status == "ok"
        assert record.charged_tokens == charged_for(record.input_tokens, record.output_tokens, record.cached_tokens)
        assert record.cost == cost_of(record.input_tokens, record.output_tokens, record.cached_tokens)
    assert balance(member) == (granted, held, used + sum(record.charged_tokens for record in records))
    assert verify() == []
