"""No input makes a 500: bodies built from the shapes each endpoint takes, with any JSON in any
place, sent to the live gateway (the sandbox's model, and a chat-completions-only provider through
the Responses translation). Each answer is a success or a precise 4xx in the endpoint's own error
shape, and the ledger stays whole."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allowances.ledger import verify
from tests.gateway.test_concurrency import set_available

pytestmark = pytest.mark.transactional

anything = st.recursive(st.none() | st.booleans() | st.integers(-2, 10**7) | st.floats(allow_nan=False, allow_infinity=False)
                        | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["type", "role", "content", "text", "name", "tools",
                                                           "arguments", "call_id", "output", "image_url", "input",
                                                           "parameters", "namespace", "format", "schema"]),
                                          inner, max_size=4), max_leaves=10)
part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image", "input_file",
                                                       "text", "image_url", "tool_result", "tool_use", "refusal"])},
                             optional={"text": anything, "image_url": anything, "file_id": anything,
                                       "content": anything, "input": anything})
item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "custom_tool_call",
                             "custom_tool_call_output", "reasoning", "additional_tools", "item_reference", "nope"]),
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | anything,
    "content": anything | st.lists(part, max_size=3), "name": anything, "arguments": anything,
    "call_id": anything, "output": anything | st.lists(part, max_size=2), "input": anything,
    "tools": anything, "namespace": anything})
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "custom", "namespace", "web_search",
                                                       "web_search_20250305", "bash_20250124"]) | anything},
                             optional={"name": anything, "parameters": anything, "input_schema": anything,
                                       "tools": anything, "function": anything, "format": anything})
common = {"model": st.sampled_from(["gpt-test", "gpt-test-2025", "fake-chat", "nope"]) | anything,
          "stream": st.booleans() | anything, "tools": st.lists(tool, max_size=3) | anything,
          "tool_choice": anything, "temperature": anything, "stop": anything, "n": anything}
BODIES = {
    "/responses": st.fixed_dictionaries({"input": st.lists(item, max_size=4) | anything}, optional=common | {
        "instructions": anything, "max_output_tokens": anything, "text": anything, "previous_response_id": anything,
        "background": anything, "reasoning": anything}),
    "/responses/input_tokens": st.fixed_dictionaries({"input": st.lists(item, max_size=3) | anything},
                                                     optional=common),
    "/messages": st.fixed_dictionaries({"messages": st.lists(item, max_size=3) | anything}, optional=common | {
        "max_tokens": anything, "system": anything, "thinking": anything, "stop_sequences": anything,
        "output_format": anything, "mcp_servers": anything}),
    "/messages/count_tokens": st.fixed_dictionaries({"messages": st.lists(item, max_size=3) | anything},
                                                    optional=common | {"system": anything}),
    "/chat/completions": st.fixed_dictionaries({"messages": st.lists(item, max_size=3) | anything}, optional=common | {
        "max_tokens": anything, "response_format": anything, "web_search_options": anything}),
    "/completions": st.fixed_dictionaries({"prompt": anything}, optional=common | {"max_tokens": anything,
                                                                                   "best_of": anything}),
    "/moderations": st.fixed_dictionaries({"input": anything | st.lists(part, max_size=2)}, optional=common),
}


@pytest.fixture
def fuzzing(metered, chat_only):
    set_available(metered.org, metered.member, 5_000_000)
    return metered


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(sorted(BODIES)), data=st.data())
def test_no_body_makes_a_500(fuzzing, path, data):
    body = data.draw(BODIES[path])
    response = httpx.post(fuzzing.url + path, json=body, timeout=30,
                          headers={"Authorization": f"Bearer {fuzzing.key}", "anthropic-version": "2023-06-01"})
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (body, response.text)
    assert response.status_code in (200, 400, 403, 404, 413, 429), (body, response.text)
    if response.status_code >= 400:
        error = response.json()
        if path.startswith("/messages"):
            assert error["type"] == "error" and set(error["error"]) == {"type", "message"}, error
        else:
            assert set(error["error"]) == {"message", "type", "param", "code"}, error
    assert verify() == []
