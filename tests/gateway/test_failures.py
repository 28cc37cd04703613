"""When the provider or the client misbehaves, the gateway answers in the API's own shape, releases
the hold, charges only what was produced, and leaves a usage record saying what happened."""

import json
import math
import time

import httpx
import pytest

from allowances.ledger import verify
from allowances.models import LedgerEntry
from gateway import bounds, sandbox
from gateway import services as gateway_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.support.fake_upstream import FakeUpstream, ServerThread, free_port
from tests.gateway.records import last_record_id, records_after, the_record_after

pytestmark = pytest.mark.transactional

FIXTURE_HOLD = 1_000  # the hold the shared fixture leaves open on the employee's account
PROMPT = [{"role": "user", "content": "Hi"}]
APIS = {
    # endpoint: (path, body, family, input multiplier, output multiplier)
    "chat": ("/chat/completions", {"model": "fake-gpt", "messages": PROMPT}, "openai", 1, 2),
    "messages": ("/messages", {"model": "fake-claude", "max_tokens": 50, "messages": PROMPT}, "anthropic", 1, 3),
    "responses": ("/responses", {"model": "fake-gpt", "input": "Hi"}, "openai", 1, 2),
}


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def fake_upstream():
    """The shared fake provider, but one whose stalled streams do not hold up its shutdown for 10 s."""
    fake = FakeUpstream()
    with ServerThread(fake, timeout_graceful_shutdown=1) as thread:
        fake.port = thread.port
        yield fake


def call(metered, endpoint, *, stream=False, body=None, content=None, timeout=30):
    """POST to the gateway as the fixture employee; the whole answer (a stream is read to its end)."""
    path, default_body, *_ = APIS[endpoint]
    body = dict(default_body if body is None else body)
    if stream:
        body["stream"] = True
    return httpx.post(metered.url + path, headers={"Authorization": f"Bearer {metered.key}"},
                      content=json.dumps(body).encode() if content is None else content, timeout=timeout)


def input_estimate(endpoint):
    """The gateway's bound of the prompt (gateway.bounds) of the stream `call` sends."""
    _path, body, family, *_ = APIS[endpoint]
    return bounds.bound(endpoint, family, body | {"stream": True}, most_output=10**6).input_tokens


def assert_not_html(response, *, read=True):
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith(("application/json", "text/event-stream")), content_type
    if read:
        assert not response.text.lstrip().startswith("<")


def assert_error_shape(response, endpoint, status):
    """The error body of the endpoint's API: OpenAI's {"error": {...}} or Anthropic's {"type": "error", ...}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if APIS[endpoint][2] == "anthropic":
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def ledger_entries():
    with unscoped():
        return LedgerEntry.all_objects.count()


def sse_payloads(text):
    """The data of each server-sent event: parsed JSON, or the raw string (e.g. "[DONE]")."""
    payloads = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if data:
            try:
                payloads.append(json.loads(data))
            except ValueError:
                payloads.append(data)
    return payloads


def streamed_text_tokens(payloads):
    """Tokens of the text a client received, counted chunk by chunk as the gateway counts them."""
    tokens = 0
    for payload in payloads:
        if not isinstance(payload, dict):
            continue
        for choice in payload.get("choices") or []:
            tokens += sandbox.count_tokens((choice.get("delta") or {}).get("content") or "")
        if payload.get("type") == "content_block_delta":
            tokens += sandbox.count_tokens(payload["delta"].get("text") or "")
        if payload.get("type") == "response.output_text.delta":
            tokens += sandbox.count_tokens(payload["delta"])
    return tokens


def wait_for(condition, *, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def assert_nothing_charged(metered, before, record_id, status):
    """Balance back where it was (the fixture hold only), ledger consistent, one record with `status`."""
    assert balance(metered.member) == before
    assert before[1] == FIXTURE_HOLD
    record = the_record_after(record_id)
    assert (record.status, record.charged_tokens, record.cost) == (status, 0, 0)
    assert verify() == []
    return record


# -- the provider fails --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_provider_500_becomes_a_502_and_nothing_is_charged(metered, endpoint, stream):
    metered.upstream.behaviour.fail_status = 500
    before, record_id = balance(metered.member), last_record_id()
    response = call(metered, endpoint, stream=stream)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 502)
    assert error["type"] == "api_error"
    assert "nothing was charged" in error["message"]
    assert len(metered.upstream.requests) == 1
    record = assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)
    assert "500" in record.detail


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
@pytest.mark.parametrize("provider_status", [401, 403])
def test_provider_refusing_the_organizations_credentials_is_a_502_not_the_clients_401(metered, endpoint,
                                                                                       provider_status):
    metered.upstream.behaviour.fail_status = provider_status
    before, record_id = balance(metered.member), last_record_id()
    response = call(metered, endpoint)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 502)
    assert "credentials" in error["message"]
    assert "WWW-Authenticate" not in response.headers  # the client's own key was fine
    assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_provider_400_is_passed_through_and_nothing_is_charged(metered, endpoint, stream):
    metered.upstream.behaviour.fail_status = 400
    before, record_id = balance(metered.member), last_record_id()
    response = call(metered, endpoint, stream=stream)
    assert_not_html(response)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "fake failure", "type": "server_error"}}  # the provider's words
    assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_unreachable_provider_is_a_502_and_nothing_is_charged(metered, endpoint, stream):
    connection = metered.anthropic_connection if endpoint == "messages" else metered.openai_connection
    with scope(metered.org.organization):
        gateway_services.provider_connection_update(connection=connection, actor=metered.org.members["admin"].user,
                                                    base_url=f"http://127.0.0.1:{free_port()}/v1")
    before, record_id = balance(metered.member), last_record_id()
    response = call(metered, endpoint, stream=stream)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 502)
    assert "could not be reached" in error["message"]
    assert metered.upstream.requests == []
    assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)


class HtmlErrorPage:
    """A web server that is not the provider's API (a wrong base URL, a proxy's error page)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        page = b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>"
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"%d" % len(page))]})
        await send({"type": "http.response.body", "body": page})


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_provider_answering_an_html_page_still_gives_the_client_json(metered, endpoint):
    connection = metered.anthropic_connection if endpoint == "messages" else metered.openai_connection
    with ServerThread(HtmlErrorPage()) as html_server:
        with scope(metered.org.organization):
            gateway_services.provider_connection_update(connection=connection, actor=metered.org.members["admin"].user,
                                                        base_url=html_server.url + "/v1")
        before, record_id = balance(metered.member), last_record_id()
        response = call(metered, endpoint)
    assert_not_html(response)
    assert response.status_code >= 400
    assert_error_shape(response, endpoint, response.status_code)
    assert_nothing_charged(metered, before, record_id, UsageRecord.Status.UPSTREAM_ERROR)


# -- a stream that stops, or is stopped ----------------------------------------------------------


def test_stream_timing_out_ends_with_an_error_event_and_charges_what_was_produced(metered):
    metered.upstream.behaviour.stall_after_chunks = 3  # the role chunk, "Hello", " from"; then silence
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    started = time.monotonic()
    response = call(metered, "chat", stream=True)
    assert time.monotonic() - started < 15  # the connection's 2 s read time-out ended it
    assert_not_html(response)
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert "[DONE]" not in payloads
    assert payloads[-1]["error"]["type"] == "api_error"
    assert "stopped answering" in payloads[-1]["error"]["message"]
    produced = streamed_text_tokens(payloads)
    assert produced == 2
    expected = math.ceil(input_estimate("chat") * 1 + produced * 2)
    record = the_record_after(record_id)
    assert record.status == UsageRecord.Status.TIMEOUT
    assert (record.input_tokens, record.output_tokens) == (input_estimate("chat"), produced)
    assert record.charged_tokens == expected > 0
    assert balance(metered.member) == (granted, held, used + expected)
    assert held == FIXTURE_HOLD
    assert verify() == []


def test_responses_stream_timing_out_ends_with_an_error_event_and_charges_what_was_produced(metered):
    # created, in_progress, output_item.added, content_part.added, "Hello", " from"; then silence
    metered.upstream.behaviour.stall_after_chunks = 6
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    response = call(metered, "responses", stream=True)
    assert_not_html(response)
    payloads = sse_payloads(response.text)
    assert payloads[-1]["type"] == "error" and "stopped answering" in payloads[-1]["message"]
    assert payloads[-1]["sequence_number"] == payloads[-2]["sequence_number"] + 1
    assert not any(isinstance(p, dict) and p.get("type") == "response.completed" for p in payloads)
    produced = streamed_text_tokens(payloads)
    assert produced == 2
    record = the_record_after(record_id)
    assert (record.status, record.input_tokens, record.output_tokens) == (
        UsageRecord.Status.TIMEOUT, input_estimate("responses"), produced)
    assert record.charged_tokens == math.ceil(record.input_tokens * 1 + produced * 2)
    assert balance(metered.member) == (granted, held, used + record.charged_tokens)
    assert verify() == []


def test_anthropic_stream_timing_out_is_charged_for_all_the_text_it_produced(metered):
    # message_start (input 11, output 1 so far), content_block_start, "Hello", " from", " the"; then silence
    metered.upstream.behaviour.stall_after_chunks = 5
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    response = call(metered, "messages", stream=True)
    assert_not_html(response)
    payloads = sse_payloads(response.text)
    assert payloads[-1]["type"] == "error" and payloads[-1]["error"]["type"] == "api_error"
    assert not any(isinstance(p, dict) and p.get("type") == "message_stop" for p in payloads)
    produced = streamed_text_tokens(payloads)
    assert produced == 3
    record = the_record_after(record_id)
    assert record.status == UsageRecord.Status.TIMEOUT
    assert record.output_tokens >= produced, "three tokens of text reached the client but fewer were charged"
    assert record.charged_tokens == math.ceil(record.input_tokens * 1 + record.output_tokens * 3)
    assert balance(metered.member) == (granted, held, used + record.charged_tokens)
    assert verify() == []


def test_client_disconnecting_mid_stream_releases_the_hold_and_is_charged_for_what_was_produced(metered):
    metered.upstream.behaviour.chunk_delay = 0.2
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    body = dict(APIS["chat"][1], stream=True)
    received = []
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", metered.url + "/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {metered.key}"}) as response:
            assert response.status_code == 200
            assert_not_html(response, read=False)
            for line in response.iter_lines():
                if line.startswith("data:"):
                    received.append(json.loads(line[5:]))
                if len(received) == 2:  # the role chunk and "Hello"
                    break
        # leaving the block closes the half-read response: the client has gone
    assert streamed_text_tokens(received) == 1

    def settled():
        found = records_after(record_id)
        return found[0] if found and balance(metered.member)[1] == held else None

    record = wait_for(settled, seconds=10)
    assert record is not None, "the hold was not released within 10 s of the client leaving"
    assert record.status == UsageRecord.Status.CLIENT_DISCONNECT
    assert record.output_tokens >= 1 and record.input_tokens == input_estimate("chat")
    assert record.charged_tokens == record.input_tokens + 2 * record.output_tokens > 0
    assert balance(metered.member) == (granted, held, used + record.charged_tokens)
    assert held == FIXTURE_HOLD
    assert verify() == []


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_stream_ending_without_usage_is_charged_an_estimate_not_free(metered, endpoint):
    metered.upstream.behaviour.omit_usage = True
    _, _, input_multiplier, output_multiplier = APIS[endpoint][1:]
    granted, held, used = balance(metered.member)
    record_id = last_record_id()
    response = call(metered, endpoint, stream=True)
    assert response.status_code == 200
    assert_not_html(response)
    produced = streamed_text_tokens(sse_payloads(response.text))
    assert produced == sandbox.count_tokens("Hello from the fake provider ! ok") == 7
    record = the_record_after(record_id)
    assert record.status == UsageRecord.Status.NO_USAGE_REPORTED
    assert (record.input_tokens, record.output_tokens) == (input_estimate(endpoint), produced)
    expected = math.ceil(input_estimate(endpoint) * input_multiplier + produced * output_multiplier)
    assert record.charged_tokens == expected > 0
    assert balance(metered.member) == (granted, held, used + expected)
    assert verify() == []


# -- requests the gateway refuses before anything is held -----------------------------------------

BAD_REQUESTS = {
    "invalid json": b'{"model": "fake-gpt", ',
    "empty body": b"",
    "not utf-8": b"\xff\xfe{}",
    "a list": json.dumps([{"model": "fake-gpt"}]).encode(),
    "a string": b'"hello"',
    "missing model": {"messages": PROMPT, "max_tokens": 10},
    "model not a string": {"model": 42, "messages": PROMPT, "max_tokens": 10},
    "max_tokens negative": {"max_tokens": -5},
    "max_tokens zero": {"max_tokens": 0},
    "max_tokens a string": {"max_tokens": "10"},
    "max_tokens a fraction": {"max_tokens": 1.5},
    "max_tokens true": {"max_tokens": True},
}


@pytest.mark.parametrize("endpoint", ["chat", "messages"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_request_is_a_400_and_nothing_is_held_charged_or_forwarded(metered, endpoint, case):
    bad = BAD_REQUESTS[case]
    if isinstance(bad, bytes):
        content, body = bad, None
    elif "model" in bad or "messages" in bad:
        content, body = None, bad
    else:
        content, body = None, APIS[endpoint][1] | bad
    before, record_id, entries = balance(metered.member), last_record_id(), ledger_entries()
    response = call(metered, endpoint, body=body, content=content)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 400)
    assert error["type"] == "invalid_request_error"
    if case.startswith("max_tokens"):
        assert "max_tokens" in error["message"]
    if case.startswith(("missing model", "model")):
        assert "model" in error["message"]
    assert metered.upstream.requests == []
    assert balance(metered.member) == before
    assert ledger_entries() == entries
    assert records_after(record_id) == []
    assert verify() == []


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_body_over_the_size_limit_is_a_413_in_the_apis_shape_not_a_500(metered, endpoint, settings):
    settings.GATEWAY_MAX_BODY_BYTES = 2_000_000  # the gateway's own limit (32 MB by default)
    body = APIS[endpoint][1] | {"messages": [{"role": "user", "content": "x" * 3_000_000}]}
    before, entries = balance(metered.member), ledger_entries()
    response = call(metered, endpoint, body=body)
    assert_not_html(response)
    error = assert_error_shape(response, endpoint, 413)
    assert error["type"] == ("request_too_large" if endpoint == "messages" else "invalid_request_error")
    assert metered.upstream.requests == []
    assert balance(metered.member) == before and ledger_entries() == entries


def test_body_over_djangos_form_limit_is_still_forwarded(metered):
    """Prompts with images pass Django's 2.5 MB form limit; the gateway's own limit is what counts."""
    body = APIS["chat"][1] | {"messages": [{"role": "user", "content": "x" * 3_000_000}], "max_tokens": 1}
    response = call(metered, "chat", body=body)
    assert_not_html(response)
    assert response.status_code == 429  # forwarded to metering: the fixture balance cannot cover 1 MB of prompt
    assert "remaining balance" in response.json()["error"]["message"]
