"""What a review of the tools' paths found: a translated request is held for the chat body its
provider reads, not only for the body the client sent; a number JSON cannot carry is a 400 before
anything is held; malformed content parts and tools are 400s naming them; a chat provider's usage
is read by the one rule metering charges by."""

import json

import httpx
import pytest

from allowances.ledger import verify
from gateway import bounds, responses, sandbox
from tests.gateway.records import last_record_id, records_after
from tests.gateway.test_concurrency import set_available

pytestmark = pytest.mark.transactional


def post(metered, path, body):
    return httpx.post(metered.url + path, json=body, timeout=30, headers={"Authorization": f"Bearer {metered.key}"})


def test_a_translated_request_is_held_for_the_chat_body_its_provider_reads(metered):
    """A namespace with a long name prefixes it to each of its 200 tool names in the chat body: the
    sandbox counts that body, so the hold must have covered it (nothing left uncharged)."""
    set_available(metered.org, metered.member, 2_000_000)
    body = {"model": "gpt-test", "input": "hi", "max_output_tokens": 16,
            "tools": [{"type": "namespace", "name": "-" * 2000,
                       "tools": [{"type": "function", "name": f"f{i}", "parameters": {"type": "object"}}
                                 for i in range(200)]}]}
    worst = bounds.bound("responses", "openai", body, most_output=16, image_tokens=sandbox.IMAGE_TOKENS)
    chat, _ = responses.to_chat(body, cap_field="max_tokens", output_cap=16)
    assert sandbox.prompt_tokens(chat) > worst.input_tokens  # the client's body alone would not cover it
    record_id = last_record_id()
    response = post(metered, "/responses", body)
    assert response.status_code == 200, response.text
    (record,) = records_after(record_id)
    assert (record.status, record.uncharged_tokens) == ("ok", 0)
    assert record.input_tokens == sandbox.prompt_tokens(chat)
    assert verify() == []


@pytest.mark.parametrize("path, body", [
    ("/responses", {"model": "gpt-test", "input": "hi", "temperature": 1e999}),
    ("/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "top_p": -1e400}),
], ids=["responses", "chat"])
def test_a_number_json_cannot_carry_is_a_400_before_anything_is_held(metered, path, body):
    """1e999 is valid JSON that parses to infinity: no provider takes it and no answer could echo it."""
    record_id = last_record_id()
    response = httpx.post(metered.url + path, content=json.dumps(body).replace("Infinity", "1e999").encode(),
                          timeout=30, headers={"Authorization": f"Bearer {metered.key}",
                                               "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"] == "The body must be a JSON object."
    assert records_after(record_id) == []
    assert verify() == []


@pytest.mark.parametrize("content", [
    [{"type": "summary_text", "text": 5}],
    [{"type": "refusal", "refusal": 5}],
], ids=["summary-text", "refusal"])
def test_a_content_part_with_a_text_that_is_no_string_is_a_400(metered, content):
    body = {"model": "gpt-test", "input": [{"type": "message", "role": "assistant", "content": content}]}
    response = post(metered, "/responses", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input", response.text


def test_a_tool_output_part_with_a_text_that_is_no_string_is_a_400(metered):
    body = {"model": "gpt-test", "input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": 5}]}]}
    for path in ("/responses", "/responses/input_tokens"):
        response = post(metered, path, body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["message"] == "`input[1].output`[0].text must be a string."


def test_a_chat_tool_whose_type_is_no_string_is_a_400(metered):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": []}]}
    response = post(metered, "/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools", response.text


def test_odd_usage_details_from_a_chat_provider_read_as_metering_reads_them():
    """The translated response's usage comes from the rule metering charges by: counts it refuses
    make no usage (a fault recorded), and details it does not charge are read leniently."""
    assert responses._usage({"prompt_tokens": 10, "completion_tokens": 4, "completion_tokens_details": "x"}) == {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}
    assert responses._usage({"prompt_tokens": "10", "completion_tokens": 4}) is None
