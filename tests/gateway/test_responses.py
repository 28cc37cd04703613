"""The Responses API (/v1/responses) through the official openai SDK: plain and streamed, with a
function tool round trip, on the sandbox, on a provider that has the API (forwarded natively) and
on one with chat completions only (translated both ways). Each is debited exactly by the usage
reported, and leaves a usage record with the response's id."""

import json
import math

import httpx
import openai
import pytest

from allowances import ledger
from allowances import services as allowance_services
from allowances.ledger import verify
from gateway import bounds, sandbox
from portal.tenancy import scope
from tests.allowances.helpers import balance
from tests.gateway.records import last_record_id, records_after, the_record_after
from tests.gateway.test_concurrency import set_available

pytestmark = pytest.mark.transactional

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
ASK = "Use get_weather for `Paris`, please."


def client_of(metered, **options):
    return openai.OpenAI(api_key=metered.key, base_url=metered.url, max_retries=0, **options)


def charged(input_tokens, output_tokens, cached=0, multipliers=(1, 2, 0.5)):
    return math.ceil(input_tokens * multipliers[0] + output_tokens * multipliers[1] + cached * multipliers[2])


def round_trip(client, model, *, stream):
    """A function tool round trip: the model calls get_weather, the client answers, the model replies.
    Returns (first response, final response)."""
    def create(**arguments):
        if not stream:
            return client.responses.create(model=model, **arguments)
        with client.responses.stream(model=model, **arguments) as events:
            for _ in events:
                pass
            return events.get_final_response()

    first = create(input=ASK, tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1, first.output
    answer = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"celsius": 21}'}
    history = [{"role": "user", "content": ASK}, *[item.model_dump(exclude_none=True) for item in first.output], answer]
    return first, create(input=history, tools=[WEATHER])


# -- the sandbox -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_sandbox_function_tool_round_trip_is_debited_by_its_reported_usage(metered, stream):
    set_available(metered.org, metered.member, 20_000)
    granted, held, used = balance(metered.member)
    record_id = last_record_id()

    first, final = round_trip(client_of(metered), "gpt-test", stream=stream)

    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert first.status == "completed" and first.usage.output_tokens == sandbox.count_tokens(
        "get_weather" + call.arguments)
    assert final.status == "completed" and final.output_text and all(
        word in sandbox.REPLY_WORDS for word in final.output_text.split(" "))
    records = records_after(record_id)
    assert [(r.endpoint, r.status, r.model) for r in records] == [("responses", "ok", "gpt-test")] * 2
    for record, response in zip(records, (first, final)):
        assert (record.input_tokens, record.output_tokens) == (response.usage.input_tokens,
                                                               response.usage.output_tokens)
        assert record.charged_tokens == charged(record.input_tokens, record.output_tokens)
        assert record.response_id == response.id
    assert balance(metered.member) == (granted, held, used + sum(r.charged_tokens for r in records))
    assert verify() == []


def test_sandbox_stream_events_come_in_the_order_the_sdk_expects(metered):
    with client_of(metered).responses.stream(model="gpt-test", input="Hello there") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert final.usage.input_tokens == sandbox.count_tokens("Hello there") + sandbox.MESSAGE_TOKENS
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


def test_sandbox_structured_output_is_valid_json_of_the_schema(metered):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    response = client_of(metered).responses.create(
        model="gpt-test", input="Plan a trip to `Lyon`.",
        text={"format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}})
    assert json.loads(response.output_text) == {"city": "Lyon", "days": 1}


def test_a_reply_cut_at_max_output_tokens_is_incomplete(metered):
    response = client_of(metered).responses.create(model="gpt-test", input="Hello", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens <= 3


# -- a provider with the Responses API: forwarded natively ------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_native_responses_are_forwarded_and_debited_by_the_usage_reported(metered, stream):
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 40, 9
    metered.upstream.behaviour.cached_tokens = 10
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    client = client_of(metered)
    if stream:
        with client.responses.stream(model="fake-gpt", input="Hi", max_output_tokens=64_000) as events:
            text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
            response = events.get_final_response()
        assert text == "Hello from the fake provider ! ok"
    else:
        response = client.responses.create(model="fake-gpt", input="Hi", max_output_tokens=64_000)
    assert response.output_text == "Hello from the fake provider ! ok"
    assert response.usage.input_tokens == 50 and response.usage.input_tokens_details.cached_tokens == 10
    forwarded = metered.upstream.requests[-1]
    assert forwarded["path"] == "/v1/responses"
    # The model's name at the provider, and the cap clamped to the catalog's most for it, made explicit.
    assert forwarded["body"]["model"] == "upstream-gpt" and forwarded["body"]["max_output_tokens"] == 100
    record = the_record_after(record_id)
    assert (record.endpoint, record.status, record.input_tokens, record.cached_tokens, record.output_tokens) == (
        "responses", "ok", 40, 10, 9)
    assert record.charged_tokens == charged(40, 9, 10) and record.response_id == "resp_fake"
    assert balance(metered.member) == (granted, held, used + record.charged_tokens)
    assert verify() == []


def test_native_function_tool_round_trip(metered):
    metered.upstream.behaviour.tool_call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    client = client_of(metered)
    first = client.responses.create(model="fake-gpt", input=ASK, tools=[WEATHER])
    (call,) = first.output
    assert (call.type, call.name, call.call_id) == ("function_call", "get_weather", "call_fake")
    metered.upstream.behaviour.tool_call = None
    final = client.responses.create(model="fake-gpt", tools=[WEATHER], input=[
        {"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}])
    assert final.output_text == "Hello from the fake provider ! ok"
    assert metered.upstream.requests[-1]["body"]["input"][-1] == {"type": "function_call_output",
                                                                  "call_id": "call_fake", "output": "21 C"}


def test_previous_response_id_holds_what_the_earlier_response_counted(metered):
    """The provider counts a stored conversation as input again: the hold must cover it."""
    metered.upstream.behaviour.input_tokens, metered.upstream.behaviour.output_tokens = 2_900, 8
    client = client_of(metered)
    first = client.responses.create(model="fake-gpt", input="many words " * 300, max_output_tokens=10)
    metered.upstream.behaviour.input_tokens = 2_950
    body = {"model": "fake-gpt", "input": "And then?", "previous_response_id": first.id, "max_output_tokens": 10}
    hold = bounds.bound("responses", "openai", body, most_output=100).input_tokens + 2_900 + 8 + 2 * 10
    set_available(metered.org, metered.member, hold - 1)  # one token short of it
    before, record_id = balance(metered.member), last_record_id()
    with pytest.raises(openai.RateLimitError) as raised:
        client.responses.create(**body)
    assert f"may use up to {hold:,} tokens" in raised.value.message
    assert balance(metered.member) == before and len(metered.upstream.requests) == 1
    with scope(metered.org.organization):
        ledger.post(account=metered.org.account, kind="bonus", tokens=1, idempotency_key="test:one-more")
    assert client.responses.create(**body).usage.input_tokens == 2_950
    assert [r.uncharged_tokens for r in records_after(record_id)] == [0, 0]  # refused, then held enough


def test_previous_response_id_must_name_a_response_of_this_member(metered, org_b):
    client = client_of(metered)
    record_id = last_record_id()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="fake-gpt", input="Hi", previous_response_id="resp_made_elsewhere")
    assert raised.value.body["param"] == "previous_response_id" and "made through the portal" in raised.value.message
    assert records_after(record_id) == [] and metered.upstream.requests == []


def test_a_stored_response_is_retrieved_from_the_provider_that_made_it(metered):
    client = client_of(metered)
    made = client.responses.create(model="fake-gpt", input="Hi")
    again = client.responses.retrieve(made.id)
    assert (again.id, again.output_text) == (made.id, "Hello from the fake provider ! ok")
    assert client.responses.input_items.list(made.id).data == []
    client.responses.delete(made.id)
    assert [(r["method"], r["path"]) for r in metered.upstream.requests[1:]] == [
        ("GET", f"/v1/responses/{made.id}"), ("GET", f"/v1/responses/{made.id}/input_items"),
        ("DELETE", f"/v1/responses/{made.id}")]
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.retrieve("resp_never_made")
    assert raised.value.body["code"] == "response_not_found"


def test_another_members_response_is_not_found(metered, org_a):
    made = client_of(metered).responses.create(model="fake-gpt", input="Hi")
    from apikeys import services as api_key_services

    approver = org_a.members["approver"]
    with scope(org_a.organization):
        _key, secret = api_key_services.api_key_create(member=approver, actor=approver.user, name="other",
                                                       endpoints=["responses"])
    other = openai.OpenAI(api_key=secret, base_url=metered.url, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    assert len(metered.upstream.requests) == 1


# -- a provider with chat completions only: translated -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_chat_only_provider_round_trip_through_the_translation(metered, chat_only, stream):
    chat_only.behaviour.input_tokens, chat_only.behaviour.output_tokens = 30, 12
    chat_only.behaviour.tool_call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    client = client_of(metered)

    def create(**arguments):
        if not stream:
            return client.responses.create(model="fake-chat", **arguments)
        with client.responses.stream(model="fake-chat", **arguments) as events:
            for _ in events:
                pass
            return events.get_final_response()

    first = create(input=ASK, instructions="Be brief.", tools=[WEATHER], max_output_tokens=50_000)
    (call,) = first.output
    assert (call.type, call.name, json.loads(call.arguments), call.call_id) == (
        "function_call", "get_weather", {"city": "Paris"}, "call_fake")
    chat_only.behaviour.tool_call = None
    final = create(input=[{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
                          {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}],
                   tools=[WEATHER])
    assert final.output_text == "Hello from the fake provider ! ok" and final.status == "completed"
    assert final.usage.input_tokens == 30 and final.usage.output_tokens == 12

    first_sent, final_sent = (request["body"] for request in chat_only.requests)
    assert [request["path"] for request in chat_only.requests] == ["/v1/chat/completions"] * 2
    assert first_sent["model"] == "upstream-chat" and first_sent["max_tokens"] == 100  # clamped, explicit
    assert first_sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    assert first_sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["parameters"], "description": WEATHER["description"],
        "strict": True}}]
    assert final_sent["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_fake", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_fake", "content": "21 C"}]
    if stream:
        assert first_sent["stream_options"] == {"include_usage": True}
    records = records_after(record_id)
    assert [(r.endpoint, r.status, r.input_tokens, r.output_tokens) for r in records] == [
        ("responses", "ok", 30, 12)] * 2
    assert balance(metered.member) == (granted, held, used + 2 * charged(30, 12))
    assert verify() == []


def test_translated_responses_cannot_be_continued_or_retrieved(metered, chat_only):
    client = client_of(metered)
    made = client.responses.create(model="fake-chat", input="Hi")
    before = balance(metered.member)
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="fake-chat", input="More", previous_response_id=made.id)
    assert "send the whole conversation" in raised.value.message
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.retrieve(made.id)
    assert raised.value.body["code"] == "response_not_stored"
    assert balance(metered.member) == before and len(chat_only.requests) == 1


# -- what cannot be done, answered at once -------------------------------------------------------------------


@pytest.mark.parametrize("changes, param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_what_cannot_be_bounded_or_is_malformed_is_a_400_and_changes_nothing(metered, changes, param):
    before, record_id = balance(metered.member), last_record_id()
    response = httpx.post(metered.url + "/responses", headers={"Authorization": f"Bearer {metered.key}"},
                          json={"model": "fake-gpt", "input": "Hi"} | changes, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert balance(metered.member) == before and records_after(record_id) == []
    assert metered.upstream.requests == []


def test_an_anthropic_model_on_v1_responses_is_a_400_naming_v1_messages(metered):
    with pytest.raises(openai.BadRequestError) as raised:
        client_of(metered).responses.create(model="fake-claude", input="Hi")
    assert "/v1/messages" in raised.value.message and metered.upstream.requests == []


def test_a_key_may_call_responses_only_with_its_scope(metered):
    from apikeys import services as api_key_services

    with scope(metered.org.organization):
        _key, secret = api_key_services.api_key_create(member=metered.member, actor=metered.member.user,
                                                       name="chat only", endpoints=["chat"])
    with pytest.raises(openai.PermissionDeniedError) as raised:
        openai.OpenAI(api_key=secret, base_url=metered.url, max_retries=0).responses.create(model="fake-gpt",
                                                                                          input="Hi")
    assert raised.value.body["code"] == "endpoint_not_allowed" and "/v1/responses" in raised.value.message


def test_the_websocket_mode_is_refused_at_once_with_json(metered):
    import websockets.sync.client
    from websockets.exceptions import InvalidStatus

    url = metered.url.replace("http://", "ws://") + "/responses"
    with pytest.raises(InvalidStatus) as raised:
        websockets.sync.client.connect(url, additional_headers={"Authorization": f"Bearer {metered.key}"},
                                       open_timeout=10)
    answer = raised.value.response
    assert answer.status_code == 400
    assert "WebSocket" in json.loads(answer.body)["error"]["message"]


def test_input_tokens_are_counted_free_natively_or_by_the_sandbox(metered, chat_only):
    record_id, before = last_record_id(), balance(metered.member)
    client = client_of(metered)
    metered.upstream.behaviour.input_tokens = 77
    assert client.responses.input_tokens.count(model="fake-gpt", input="Hi").input_tokens == 77
    assert metered.upstream.requests[-1]["path"] == "/v1/responses/input_tokens"
    counted = client.responses.input_tokens.count(model="gpt-test", input="Count these words")
    assert counted.input_tokens == sandbox.count_tokens("Count these words") + sandbox.MESSAGE_TOKENS
    assert client.responses.input_tokens.count(model="fake-chat", input="Hi").input_tokens == 1 + 3
    assert chat_only.requests == []
    assert records_after(record_id) == [] and balance(metered.member) == before


def test_an_openai_compatible_server_with_the_responses_api_gets_it_natively(metered, chat_only, client):
    """An admin ticks the box on the connection's page; from the next request on, /v1/responses is
    forwarded as it is instead of translated."""
    from gateway.models import ProviderConnection

    with scope(metered.org.organization):
        connection = ProviderConnection.objects.get(name="Fake compatible")
    client.force_login(metered.org.members["admin"].user, backend="django.contrib.auth.backends.ModelBackend")
    page = client.post(f"/o/{metered.org.slug}/providers/{connection.pk}/", {
        "name": connection.name, "kind": "openai_compatible", "base_url": connection.base_url,
        "connect_timeout": 2, "read_timeout": 2, "responses_api": "on", "is_active": "on"})
    assert page.status_code == 302, page.content.decode()[:2000]
    chat_only.behaviour.chat_only = False
    response = client_of(metered).responses.create(model="fake-chat", input="Hi")
    assert response.id == "resp_fake" and chat_only.requests[-1]["path"] == "/v1/responses"
    assert "Responses API" in client.get(f"/o/{metered.org.slug}/providers/").content.decode()
