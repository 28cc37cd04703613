"""The built-in sandbox provider through the real gateway: deterministic replies, streams and
embeddings, each charged exactly its reported usage times the catalog model's multipliers."""

import json
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


# -- a faithful sandbox: tools, JSON, choices, stop reasons ---------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
NAMING = [{"role": "user", "content": "Use get_weather for `Paris`."}]


def test_a_named_tool_is_called_with_arguments_from_its_schema_and_its_result_ends_in_text(sandboxed):
    member, client, _ = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    reply = client.chat.completions.create(model=MODEL, messages=NAMING, tools=[WEATHER], max_tokens=MAX_TOKENS)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert reply.usage.completion_tokens == sandbox.count_tokens("get_weather" + call.function.arguments)
    # Tool definitions count toward the input.
    assert reply.usage.prompt_tokens > sandbox.prompt_tokens({"model": MODEL, "messages": NAMING})

    answer = NAMING + [choice.message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    final = client.chat.completions.create(model=MODEL, messages=answer, tools=[WEATHER], max_tokens=MAX_TOKENS)
    assert final.choices[0].finish_reason == "stop" and is_sandbox_text(final.choices[0].message.content)
    records = records_after(record_id)
    assert balance(member) == (granted, held, used + sum(r.charged_tokens for r in records))
    assert [r.charged_tokens for r in records] == [charged_for(r.input_tokens, r.output_tokens) for r in records]


def test_a_streamed_tool_call_assembles_into_the_same_call(sandboxed):
    _, client, _ = sandboxed
    whole = client.chat.completions.create(model=MODEL, messages=NAMING, tools=[WEATHER], max_tokens=MAX_TOKENS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=NAMING, tools=[WEATHER], max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    arguments = "".join(call.function.arguments or "" for chunk in chunks if chunk.choices
                        for call in chunk.choices[0].delta.tool_calls or [])
    assert arguments == whole.choices[0].message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("tool_choice, called", [
    ("none", None), ("auto", "get_weather"), ("required", "get_weather"),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time"),
])
def test_the_tool_choice_is_followed(sandboxed, tool_choice, called):
    _, client, _ = sandboxed
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    reply = client.chat.completions.create(model=MODEL, messages=NAMING, tools=[WEATHER, other],
                                           tool_choice=tool_choice, max_tokens=MAX_TOKENS)
    calls = reply.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ([called] if called else [])


def test_a_tool_the_turn_does_not_name_is_not_called(sandboxed):
    _, client, _ = sandboxed
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, tools=[WEATHER], max_tokens=MAX_TOKENS)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None


def test_json_mode_and_structured_output_are_valid_json(sandboxed):
    _, client, _ = sandboxed
    plain = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS,
                                           response_format={"type": "json_object"})
    assert is_sandbox_text(json.loads(plain.choices[0].message.content)["reply"])
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
        "type": "string"}}, "score": {"type": "number", "minimum": 3}, "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b"]}, "note": {"type": ["string", "null"]}},
        "required": ["name", "tags", "score", "ok", "kind"], "additionalProperties": False}
    structured = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe `Ada`."}], max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert json.loads(structured.choices[0].message.content) == {"name": "Ada", "tags": ["sandbox"], "score": 3,
                                                                 "ok": True, "kind": "a"}


def test_n_choices_are_each_written_and_all_counted(sandboxed):
    _, client, _ = sandboxed
    reply = client.chat.completions.create(model=MODEL, messages=PROMPT, n=3, max_tokens=MAX_TOKENS)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(is_sandbox_text(c.message.content) for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) == 3
    assert reply.usage.completion_tokens == sum(sandbox.count_tokens(c.message.content) for c in reply.choices)


def test_a_stop_sequence_ends_the_reply_with_each_apis_stop_reason(sandboxed):
    _, client, anthropic_client = sandboxed
    whole = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS).choices[0]
    stop = whole.message.content.split(" ")[3]
    cut = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == whole.message.content[
        :whole.message.content.index(stop)]
    message = anthropic_client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=PROMPT,
                                               stop_sequences=[stop])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert anthropic_client.messages.create(model=MODEL, max_tokens=2, messages=PROMPT).stop_reason == "max_tokens"


def test_an_image_counts_a_fixed_number_of_tokens(sandboxed):
    _, client, _ = sandboxed
    text = {"type": "text", "text": "What is in it?"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo" * 500}}
    without = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS,
                                             messages=[{"role": "user", "content": [text]}])
    with_image = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS,
                                                messages=[{"role": "user", "content": [text, image]}])
    assert with_image.usage.prompt_tokens - without.usage.prompt_tokens == sandbox.IMAGE_TOKENS


def test_anthropic_structured_output_and_a_forced_tool(sandboxed):
    _, _, client = sandboxed
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}},
                                               "required": ["q"]}}
    forced = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=PROMPT, tools=[tool],
                                    tool_choice={"type": "tool", "name": "lookup"})
    assert forced.stop_reason == "tool_use" and forced.content[0].input == {"q": "sandbox"}
    structured = client.messages.create(
        model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "Name `Bo`."}],
        extra_body={"output_format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}})
    assert json.loads(structured.content[0].text) == {"name": "Bo"}


# -- legacy completions and moderations --------------------------------------------------------------------


def test_legacy_completions_plain_and_streamed_are_charged_their_usage(sandboxed):
    member, client, _ = sandboxed
    granted, held, used = balance(member)
    record_id = last_record_id()
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, n=2)
    assert [c.finish_reason for c in whole.choices] == ["length", "length"]
    assert whole.usage.prompt_tokens == sandbox.count_tokens("Once upon a time")
    assert whole.usage.completion_tokens == sum(sandbox.count_tokens(c.text) for c in whole.choices) <= 10
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == sandbox.completion(
        {"prompt": "Once upon a time"}, 5)["choices"][0]["text"]
    records = records_after(record_id)
    assert [(r.endpoint, r.status) for r in records] == [("completions", "ok")] * 2
    assert records[0].charged_tokens == charged_for(whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert balance(member) == (granted, held, used + sum(r.charged_tokens for r in records))


def test_moderations_flag_nothing_and_are_charged_their_input_bound(sandboxed):
    from gateway import bounds

    member, client, _ = sandboxed
    record_id = last_record_id()
    result = client.moderations.create(model=MODEL, input=["first text", "second text"])
    assert [r.flagged for r in result.results] == [False, False]
    record = the_record_after(record_id)
    body = {"model": MODEL, "input": ["first text", "second text"]}
    assert (record.endpoint, record.status, record.output_tokens) == ("moderations", "ok", 0)
    assert record.input_tokens == bounds.bound("moderations", "openai", body, most_output=1).input_tokens
    assert "reports no usage" in record.detail
    assert verify() == []
