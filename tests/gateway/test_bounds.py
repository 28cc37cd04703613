"""The worst case the gateway holds for a request (gateway.bounds): a true upper bound of what any
byte-level tokenizer can count for its prompt, the output cap it forwards, and a clear 400 for a
body whose shape the bound cannot rely on."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import bounds, sandbox
from gateway.errors import GatewayError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
MESSAGES = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}


def bound(endpoint, body, family=None, most_output=100_000, **kwargs):
    family = family or ("anthropic" if endpoint == "messages" else "openai")
    return bounds.bound(endpoint, family, body, most_output=most_output, **kwargs)


def refused(endpoint, body) -> GatewayError:
    with pytest.raises(GatewayError) as raised:
        bound(endpoint, body)
    assert raised.value.status == 400 and raised.value.kind == "invalid_request_error"
    return raised.value


def text_bytes(value) -> int:
    """UTF-8 bytes of every string in a prompt: a byte-level tokenizer counts at most one token each."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(text_bytes(item) for item in value.values())
    return 0


# -- malformed bodies ----------------------------------------------------------------------------

@pytest.mark.parametrize("messages, param", [
    (None, "messages"), ([], "messages"), ("Hi", "messages"), ({"role": "user"}, "messages"),
    ([0] * 4000, "messages"),  # the finding: bare numbers counted as tiny messages
    ([{"content": "no role"}], "messages"), ([{"role": "robot", "content": "x"}], "messages"),
    ([{"role": "user", "content": 7}], "messages"), ([{"role": "user", "content": [1, 2]}], "messages"),
    ([{"role": "user", "content": {"text": "x"}}], "messages"),
])
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_messages_that_are_not_messages_are_refused(endpoint, messages, param):
    body = (CHAT if endpoint == "chat" else MESSAGES) | {"messages": messages}
    if messages is None:
        del body["messages"]
    assert refused(endpoint, body).param == param


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 129), ("n", "2"), ("n", True), ("n", 1.5), ("n", 10_000_000_000_000_000_000),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", bounds.MAX_OUTPUT_TOKENS + 1), ("max_tokens", "10"),
    ("max_completion_tokens", 10**30), ("tools", {"name": "x"}),
])
def test_out_of_range_numbers_and_wrong_types_are_refused_naming_the_field(field, value):
    assert refused("chat", CHAT | {field: value}).param == field


def test_an_anthropic_request_needs_its_max_tokens():
    assert refused("messages", {"model": "m", "messages": MESSAGES["messages"]}).param == "max_tokens"


@pytest.mark.parametrize("value", [None, "", [], [1, "a"], [[]], [True], {"text": "x"}, 5])
def test_embeddings_input_must_be_text_or_token_arrays(value):
    assert refused("embeddings", {"model": "m", "input": value}).param == "input"


def test_an_unpaired_surrogate_is_refused_not_a_500():
    error = refused("chat", CHAT | {"messages": [{"role": "user", "content": "bad \ud800 text"}]})
    assert "surrogate" in error.message


def test_a_body_nested_past_what_can_be_measured_is_refused_not_a_500():
    nested: dict = {}
    for _ in range(100_000):
        nested = {"x": nested}
    error = refused("chat", CHAT | {"tools": [{"type": "function", "function": {"parameters": nested}}]})
    assert "nested" in error.message


# -- the bound -----------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)  # emoji, CJK, combining marks
contents = st.one_of(texts, st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), min_size=1, max_size=3))
chat_messages = st.lists(st.builds(lambda role, content: {"role": role, "content": content},
                                   st.sampled_from(["system", "user", "assistant"]), contents),
                         min_size=1, max_size=40)
tools = st.lists(st.builds(lambda name, about: {"type": "function", "function": {
    "name": name, "description": about, "parameters": {"type": "object", "properties": {about: {"type": "string"}}}}},
    st.text("abcdefgh_", min_size=1, max_size=20), texts), max_size=4)


@given(messages=chat_messages, tool_list=tools, endpoint=st.sampled_from(["chat", "messages"]))
def test_the_input_bound_is_at_least_a_token_per_byte_of_every_text_plus_framing(messages, tool_list, endpoint):
    if endpoint == "messages":
        messages = [m | {"role": "assistant" if m["role"] == "assistant" else "user"} for m in messages]
        body = {"model": "m", "max_tokens": 5, "system": "Be brief.", "messages": messages}
    else:
        body = {"model": "m", "messages": messages}
    if tool_list:
        body["tools"] = tool_list
    worst = bound(endpoint, body).input_tokens
    # A byte-level tokenizer's worst case (one token per byte), with each message's and the reply's framing.
    assert worst >= text_bytes(body) + bounds.MESSAGE_FRAMING * len(messages) + bounds.REQUEST_FRAMING
    assert worst >= sandbox.prompt_tokens(body)  # the sandbox's own, exact count


@given(inputs=st.one_of(texts.filter(bool), st.lists(texts, min_size=1, max_size=20),
                        st.lists(st.integers(0, 200_000), min_size=1, max_size=500),
                        st.lists(st.lists(st.integers(0, 200_000), min_size=1, max_size=50), min_size=1, max_size=5)))
def test_the_embeddings_bound_covers_every_byte_and_every_token_of_a_token_array(inputs):
    worst = bound("embeddings", {"model": "m", "input": inputs}).input_tokens
    flat = inputs if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], list) else sum(inputs, [])
    tokens = len(flat) if isinstance(flat, list) and flat and isinstance(flat[0], int) else text_bytes(flat)
    assert worst >= tokens


@pytest.mark.parametrize("endpoint, part", [
    ("chat", {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
    ("chat", {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000, "detail": "high"}}),
    ("messages", {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}),
    ("messages", {"type": "tool_result", "tool_use_id": "t1", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}),
])
def test_an_image_counts_its_familys_most_not_the_bytes_of_its_data(endpoint, part):
    family = "anthropic" if endpoint == "messages" else "openai"
    base = CHAT if endpoint == "chat" else MESSAGES
    with_image = base | {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]}
    without = base | {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}]}
    added = bound(endpoint, with_image).input_tokens - bound(endpoint, without).input_tokens
    # The image's own count, plus the bytes of its part's keys (not of its data, 100 kB in one case).
    assert bounds.IMAGE_TOKENS[family] <= added <= bounds.IMAGE_TOKENS[family] + 200


def test_anthropic_tools_add_its_tool_use_system_prompt():
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
    with_tools = bound("messages", MESSAGES | {"tools": [tool]}).input_tokens
    assert with_tools >= bound("messages", MESSAGES).input_tokens + bounds.TOOL_PROMPT + len(json.dumps(tool)) // 2


# -- the output cap ------------------------------------------------------------------------------

def test_with_no_cap_the_models_most_is_held_and_forwarded_in_the_field_the_provider_knows():
    assert bound("chat", CHAT, most_output=321).forward == {"max_tokens": 321}
    openai_own = bound("chat", CHAT, most_output=321, cap_field="max_completion_tokens")
    assert (openai_own.output_cap, openai_own.forward) == (321, {"max_completion_tokens": 321})
    responses = bound("responses", {"model": "m", "input": "Hi"}, most_output=321)
    assert (responses.output_cap, responses.forward) == (321, {"max_output_tokens": 321})
    # Legacy completions write 16 tokens when asked for no more (OpenAI's default): that is held and sent.
    legacy = bound("completions", {"model": "m", "prompt": "Hi"}, most_output=321)
    assert (legacy.output_cap, legacy.forward) == (16, {"max_tokens": 16})


def test_a_clients_own_cap_below_the_models_most_is_held_and_sent_as_it_is():
    assert (bound("chat", CHAT | {"max_tokens": 7}).output_cap, bound("chat", CHAT | {"max_tokens": 7}).forward) == (
        7, {"max_tokens": 7})
    both = bound("chat", CHAT | {"max_tokens": 7, "max_completion_tokens": 900})
    # whichever the provider honours is covered: the larger is held and sent in the field it knows
    assert (both.output_cap, both.forward, both.drop) == (900, {"max_tokens": 900}, ("max_completion_tokens",))
    assert bound("messages", MESSAGES | {"max_tokens": 55}).output_cap == 55


@pytest.mark.parametrize("endpoint, body, field", [
    ("chat", CHAT | {"max_tokens": 64_000}, "max_tokens"),
    ("chat", CHAT | {"max_completion_tokens": 64_000}, "max_completion_tokens"),
    ("messages", MESSAGES | {"max_tokens": 128_000}, "max_tokens"),
    ("responses", {"model": "m", "input": "Hi", "max_output_tokens": 64_000}, "max_output_tokens"),
    ("completions", {"model": "m", "prompt": "Hi", "max_tokens": 64_000}, "max_tokens"),
])
def test_a_cap_beyond_the_models_most_is_clamped_to_it_and_the_clamp_is_forwarded(endpoint, body, field):
    """Coding agents ask for 32,000 to 128,000 on every call; a model that writes at most 8,192
    can never use more: that is what is held, and what the provider is told."""
    worst = bound(endpoint, body, most_output=8_192)
    sent_as = "max_tokens" if endpoint == "chat" else field  # chat: the provider's own field (here max_tokens)
    assert worst.output_cap == 8_192 and worst.forward[sent_as] == 8_192


def test_a_thinking_budget_stays_below_the_clamped_max_tokens():
    body = MESSAGES | {"max_tokens": 64_000, "thinking": {"type": "enabled", "budget_tokens": 32_000}}
    worst = bound("messages", body, most_output=8_192)
    assert worst.forward == {"max_tokens": 8_192, "thinking": {"type": "enabled", "budget_tokens": 8_191}}
    kept = bound("messages", body | {"thinking": {"type": "enabled", "budget_tokens": 4_000}}, most_output=8_192)
    assert "thinking" not in kept.forward


def test_every_choice_is_covered():
    worst = bound("chat", CHAT | {"max_tokens": 10, "n": 128})
    assert (worst.output_cap, worst.choices) == (10, 128)
    # Legacy completions: n per prompt, and best_of candidates are all written (and billed).
    legacy = bound("completions", {"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2, "best_of": 4})
    assert (legacy.output_cap, legacy.choices) == (10, 12)


# -- content the bound cannot know -------------------------------------------------------------------

@pytest.mark.parametrize("endpoint, part", [
    ("chat", {"type": "file", "file": {"file_id": "file-abc"}}),
    ("messages", {"type": "document", "source": {"type": "url", "url": "https://example.com/100-pages.pdf"}}),
])
def test_content_stored_elsewhere_is_refused(endpoint, part):
    base = CHAT if endpoint == "chat" else MESSAGES
    error = refused(endpoint, base | {"messages": [{"role": "user", "content": [part]}]})
    assert "cannot be sent through the portal" in error.message


@pytest.mark.parametrize("endpoint, part", [
    ("chat", {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}),
    ("chat", {"type": "text", "text": 1}),
    ("chat", {"type": "image_url", "image_url": {"url": 5}}),
    ("messages", {"type": "text"}),
    ("messages", {"type": "search_result", "source": "x", "title": "y", "content": []}),
    ("messages", {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_use"}]}),
])
def test_unknown_or_malformed_parts_are_refused(endpoint, part):
    base = CHAT if endpoint == "chat" else MESSAGES
    refused(endpoint, base | {"messages": [{"role": "user", "content": [part]}]})


def test_a_role_that_is_not_a_string_is_refused_not_a_500():
    assert refused("chat", CHAT | {"messages": [{"role": ["user"], "content": "hi"}]}).param == "messages"


@pytest.mark.parametrize("tool", [{"type": "web_search_20250305", "name": "web_search"},
                                  {"type": "code_execution_20250522", "name": "code_execution"}])
def test_anthropic_server_tools_are_refused(tool):
    assert "server tool" in refused("messages", MESSAGES | {"tools": [tool]}).message


def test_anthropics_own_client_tools_add_their_instructions():
    bash = {"type": "bash_20250124", "name": "bash"}
    with_bash = bound("messages", MESSAGES | {"tools": [bash]}).input_tokens
    assert with_bash >= bound("messages", MESSAGES).input_tokens + bounds.TOOL_PROMPT + \
        bounds.ANTHROPIC_DEFINED_TOOL_PROMPT


def test_openai_tools_are_functions_or_custom_tools():
    refused("chat", CHAT | {"tools": [{"type": "web_search_preview"}]})
    refused("chat", CHAT | {"tools": ["get_weather"]})


@pytest.mark.parametrize("value", ["false", 1, None])
def test_stream_must_be_a_boolean(value):
    if value is None:
        assert bound("chat", CHAT | {"stream": None}).output_cap  # absent or null: not a stream
    else:
        assert refused("chat", CHAT | {"stream": value}).param == "stream"


def test_the_cap_is_always_forwarded_in_the_field_the_provider_knows_and_only_there():
    compatible = bound("chat", CHAT | {"max_completion_tokens": 5}, cap_field="max_tokens")
    assert (compatible.forward, compatible.drop) == ({"max_tokens": 5}, ("max_completion_tokens",))
    openai = bound("chat", CHAT | {"max_tokens": 9}, cap_field="max_completion_tokens")
    assert (openai.forward, openai.drop) == ({"max_completion_tokens": 9}, ("max_tokens",))
