"""Anthropic's paths through the official anthropic SDK: token counting (forwarded to Anthropic
providers, estimated for others, never charged), streamed messages with tools (the sandbox's and a
provider's), the headers and query that Claude Code sends passed on, and every /v1/messages... path
answering in Anthropic's error shape."""

import json
import math

import anthropic
import httpx
import pytest

from allowances.ledger import verify
from gateway import sandbox
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after

pytestmark = pytest.mark.transactional

READ = {"name": "Read", "description": "Reads a file from the local filesystem.",
        "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"},
                                                          "limit": {"type": "integer", "exclusiveMinimum": 0}},
                         "required": ["file_path"], "additionalProperties": False}}
ASK = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"},
                                    {"type": "text", "text": "Read `/tmp/notes.txt` and summarise it."}]}]


def client_of(metered, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=metered.key, base_url=metered.url.removesuffix("/v1"), max_retries=0, **options)


def assert_anthropic_error(response, status, kind):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}
    return body["error"]["message"]


# -- counting tokens ---------------------------------------------------------------------------------


def test_count_tokens_is_forwarded_to_an_anthropic_provider_with_its_headers_and_never_charged(metered):
    metered.upstream.behaviour.input_tokens = 1_234
    before, record_id = balance(metered.member), last_record_id()
    counted = client_of(metered).messages.count_tokens(model="fake-claude", messages=ASK, tools=[READ],
                                                       extra_headers={"anthropic-beta": "token-counting-2024-11-01"})
    assert counted.input_tokens == 1_234
    sent = metered.upstream.requests[-1]
    assert sent["path"] == "/v1/messages/count_tokens" and sent["body"]["tools"] == [READ]
    assert sent["headers"]["x-api-key"] == "sk-ant-fake-secret-5678"
    assert sent["headers"]["anthropic-beta"] == "token-counting-2024-11-01"
    assert balance(metered.member) == before and records_after(record_id) == []


def test_count_tokens_for_other_models_is_the_sandboxs_count(metered):
    client = client_of(metered)
    exact = client.messages.count_tokens(model="gpt-test", system="Be brief.", messages=ASK, tools=[READ])
    assert exact.input_tokens == sandbox.count_message_tokens({"system": "Be brief.", "messages": ASK,
                                                               "tools": [READ]})
    assert exact.input_tokens > sandbox.count_message_tokens({"messages": ASK})  # tools count
    # An OpenAI model: estimated the same way, and its provider is not asked.
    assert client.messages.count_tokens(model="fake-gpt", messages=ASK).input_tokens == sandbox.count_message_tokens(
        {"messages": ASK})
    assert metered.upstream.requests == []


def test_count_tokens_errors_are_in_anthropics_shape(metered):
    url = metered.url + "/messages/count_tokens"
    assert "API key" in assert_anthropic_error(httpx.post(url, json={"model": "fake-claude", "messages": ASK}),
                                               401, "authentication_error")
    headers = {"x-api-key": metered.key}
    assert_anthropic_error(httpx.post(url, headers=headers, json={"model": "nope", "messages": ASK}), 404,
                           "not_found_error")
    assert_anthropic_error(httpx.post(url, headers=headers, json={"model": "fake-claude", "messages": "x"}), 400,
                           "invalid_request_error")
    assert_anthropic_error(httpx.get(url, headers=headers), 405, "invalid_request_error")


# -- streamed messages with tools -------------------------------------------------------------------------


def test_sandbox_streamed_tool_use_round_trip_is_debited_by_the_usage_its_events_carry(metered):
    client = client_of(metered)
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    with client.messages.stream(model="gpt-test", max_tokens=128_000, tools=[READ], messages=ASK) as stream:
        events = [event.type for event in stream]
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert (call.type, call.name, call.input) == ("tool_use", "Read", {"file_path": "/tmp/notes.txt"})
    assert "input_json" in events and events[-1] == "message_stop"
    assert first.usage.output_tokens == sandbox.count_tokens("Read" + json.dumps(call.input))

    history = ASK + [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                   "content": "Notes: buy milk."}]}]
    with client.messages.stream(model="gpt-test", max_tokens=128_000, tools=[READ], messages=history) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    records = records_after(record_id)
    assert [(r.status, r.endpoint) for r in records] == [("ok", "messages")] * 2
    for record, message in zip(records, (first, final)):
        assert (record.input_tokens, record.output_tokens) == (message.usage.input_tokens, message.usage.output_tokens)
        assert record.charged_tokens == math.ceil(record.input_tokens + 2 * record.output_tokens)
    assert balance(metered.member) == (granted, held, used + sum(r.charged_tokens for r in records))
    assert verify() == []


def test_a_providers_streamed_tool_use_passes_through_and_is_debited(metered):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 25, 6
    metered.upstream.behaviour.tool_call = {"name": "Read", "arguments": '{"file_path": "/tmp/notes.txt"}'}
    granted, held, used = balance(metered.member)
    with client_of(metered).messages.stream(model="fake-claude", max_tokens=128_000, tools=[READ],
                                            messages=ASK) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use" and message.content[0].input == {"file_path": "/tmp/notes.txt"}
    assert metered.upstream.requests[-1]["body"]["max_tokens"] == 100  # Claude Code's 128,000, clamped
    assert balance(metered.member) == (granted, held, used + 25 + 3 * 6)


def test_claude_codes_headers_query_and_system_turns_reach_the_provider(metered):
    """Claude Code calls /v1/messages?beta=true with anthropic-beta features and system messages
    between the turns."""
    client = client_of(metered)
    messages = ASK + [{"role": "system", "content": [{"type": "text", "text": "# Environment\nlinux"}]}]
    response = httpx.post(metered.url + "/messages?beta=true", timeout=30, headers={
        "x-api-key": metered.key, "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
        json={"model": "fake-claude", "max_tokens": 1_000, "messages": messages})
    assert response.status_code == 200, response.text
    sent = metered.upstream.requests[-1]
    assert sent["path"] == "/v1/messages" and sent["query"] == "beta=true"
    assert sent["headers"]["anthropic-beta"] == "claude-code-20250219,interleaved-thinking-2025-05-14"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["messages"][-1]["role"] == "system"
    # The same through the sandbox.
    reply = client.messages.create(model="gpt-test", max_tokens=1_000, messages=messages)
    assert reply.content[0].type == "text" and reply.usage.input_tokens == sandbox.count_message_tokens(
        {"messages": messages})


def test_server_tools_are_refused_before_anything_is_held(metered):
    before, record_id = balance(metered.member), last_record_id()
    with pytest.raises(anthropic.BadRequestError) as raised:
        client_of(metered).messages.create(model="fake-claude", max_tokens=100, messages=ASK, tools=[
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "web_search_20250305" in raised.value.body["error"]["message"]
    assert balance(metered.member) == before and records_after(record_id) == [] and metered.upstream.requests == []


# -- every /v1/messages... path in Anthropic's shape --------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/messages/frobnicate"), ("POST", "/v1/messages/batches"), ("GET", "/v1/messages/batches/msgbatch_1"),
    ("GET", "/v1/messages"), ("DELETE", "/v1/messages/count_tokens"),
])
def test_every_messages_path_answers_in_anthropics_shape(metered, method, path):
    response = httpx.request(method, metered.url.removesuffix("/v1") + path, json={} if method == "POST" else None,
                             headers={"x-api-key": metered.key, "anthropic-version": "2023-06-01"}, timeout=30)
    message = assert_anthropic_error(response, 404 if "/messages/" in path and "count_tokens" not in path else 405,
                                     "not_found_error" if response.status_code == 404 else "invalid_request_error")
    if path.startswith("/v1/messages/batches"):
        assert "batches are not available" in message


def test_the_sdk_raises_not_found_with_anthropics_body_for_an_unknown_messages_path(metered):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client_of(metered).post("/v1/messages/frobnicate", body={"x": 1}, cast_to=httpx.Response)
    assert raised.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "No gateway endpoint at /v1/messages/frobnicate."}}
