"""The sandbox's promises and the Responses translation's, as properties (no server): a reply never
longer than its cap (what the gateway holds for it), a stream that says what the whole reply says,
a prompt never counted above the gateway's bound, and a translated stream that ends in the same
response as the translated whole reply."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import bounds, responses, sandbox

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60) | st.sampled_from(
    ["Use lookup for `x`.", "Call `a b` with ask_me", "🙂" * 10, "漢字 `y` lookup"])
names = st.sampled_from(["lookup", "ask_me", "get_weather", "exec", "Read"])
leaf = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 2}, {"type": "number"},
                        {"type": "boolean"}, {"enum": ["a", "b"]}, {"type": ["string", "null"]}, {"const": 7}])
schemas = st.recursive(leaf, lambda inner: st.one_of(
    st.builds(lambda props, required: {"type": "object", "properties": props,
                                       "required": [k for k in props if k in required]},
              st.dictionaries(st.text("abcdefgh", min_size=1, max_size=8), inner, max_size=5),
              st.sets(st.text("abcdefgh", min_size=1, max_size=8), max_size=5)),
    st.builds(lambda items: {"type": "array", "items": items}, inner),
    st.builds(lambda options: {"anyOf": options}, st.lists(inner, min_size=1, max_size=3))), max_leaves=12)
chat_tools = st.lists(st.one_of(
    st.builds(lambda name, schema: {"type": "function", "function": {"name": name, "parameters": schema}}, names,
              schemas),
    st.builds(lambda name: {"type": "custom", "custom": {"name": name}}, names)), max_size=3)
image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 200}}


@st.composite
def chat_bodies(draw):
    messages = draw(st.lists(st.builds(lambda role, text, with_image: {"role": role, "content": [
        {"type": "text", "text": text}] + ([image] if with_image else [])}, st.sampled_from(["user", "assistant"]),
        texts, st.booleans()), min_size=1, max_size=4))
    body = {"model": "m", "messages": messages, "n": draw(st.integers(1, 3))}
    if tools := draw(chat_tools):
        body["tools"] = tools
        body["tool_choice"] = draw(st.sampled_from(["auto", "none", "required"]))
    if draw(st.booleans()):
        body["response_format"] = draw(st.sampled_from([{"type": "json_object"}])) if draw(st.booleans()) else {
            "type": "json_schema", "json_schema": {"name": "x", "schema": draw(schemas)}}
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(st.sampled_from(["a", "the", ".", "sandbox"]), max_size=2))
    return body


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(body=chat_bodies(), limit=st.integers(1, 400))
def test_no_choice_is_longer_than_its_cap_and_the_stream_says_what_the_whole_reply_says(body, limit):
    whole = sandbox.chat_completion(body, limit)
    cap = min(limit, sandbox.MAX_REPLY_TOKENS)
    for choice in whole["choices"]:
        message = choice["message"]
        written = message["content"] or "".join(
            (call.get("function") or {}).get("name", "") + (call.get("function") or {}).get("arguments", "")
            or call["custom"]["name"] + call["custom"]["input"] for call in message.get("tool_calls") or [])
        assert sandbox.count_tokens(written) <= cap
        if choice["finish_reason"] == "tool_calls" and "function" in message["tool_calls"][0]:
            json.loads(message["tool_calls"][0]["function"]["arguments"])  # valid JSON
    assert whole["usage"]["completion_tokens"] <= cap * len(whole["choices"])
    chunks = list(sandbox.chat_completion_chunks(body, limit))
    assert chunks[-1]["usage"] == whole["usage"]
    for index, choice in enumerate(whole["choices"]):
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]
                           if c["choices"][0]["index"] == index)
        assert streamed == (choice["message"]["content"] or "")
    # The prompt is never counted above what the gateway holds for it.
    worst = bounds.bound("chat", "openai", body, most_output=limit, image_tokens=sandbox.IMAGE_TOKENS)
    assert whole["usage"]["prompt_tokens"] <= worst.input_tokens


response_tools = st.lists(st.one_of(
    st.builds(lambda name, schema: {"type": "function", "name": name, "parameters": schema}, names, schemas),
    st.builds(lambda name: {"type": "custom", "name": name}, names),
    st.builds(lambda name, inner: {"type": "namespace", "name": name, "tools": [inner]}, st.sampled_from(["ns", "x"]),
              st.builds(lambda name: {"type": "function", "name": name, "parameters": {"type": "object"}}, names))),
    max_size=3)
items = st.lists(st.one_of(
    st.builds(lambda role, text: {"role": role, "content": text}, st.sampled_from(["user", "system", "developer"]),
              texts),
    st.builds(lambda text: {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text},
                                                                          {"type": "input_image",
                                                                           "image_url": "https://x/y.png"}]}, texts),
    st.builds(lambda text: {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                               "text": text}]}, texts),
    st.builds(lambda name, args: {"type": "function_call", "call_id": "c1", "name": name, "arguments": args},
              names, texts),
    st.builds(lambda name, text: {"type": "custom_tool_call", "call_id": "c2", "name": name, "input": text},
              names, texts),
    st.builds(lambda text: {"type": "function_call_output", "call_id": "c1", "output": text}, texts),
    st.builds(lambda text: {"type": "custom_tool_call_output", "call_id": "c2", "output": [
        {"type": "input_text", "text": text}]}, texts),
    st.builds(lambda text: {"type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}, texts),
    st.builds(lambda tools: {"type": "additional_tools", "role": "developer", "tools": tools}, response_tools),
), min_size=1, max_size=6)


@st.composite
def response_bodies(draw):
    body = {"model": "m", "input": draw(st.one_of(texts.filter(bool), items))}
    if draw(st.booleans()):
        body["instructions"] = draw(texts)
    if tools := draw(response_tools):
        body["tools"] = tools
    return body


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(body=response_bodies(), limit=st.integers(1, 300))
def test_a_translated_request_is_never_counted_above_its_bound_and_its_stream_ends_as_its_whole_reply(body, limit):
    worst = bounds.bound("responses", "openai", body, most_output=limit, image_tokens=sandbox.IMAGE_TOKENS)
    chat, translation = responses.to_chat(body, cap_field="max_tokens", output_cap=worst.output_cap)
    assert sandbox.prompt_tokens(chat) <= worst.input_tokens
    whole = translation.from_chat(sandbox.chat_completion(chat, worst.output_cap))

    streamed = responses.to_chat(body | {"stream": True}, cap_field="max_tokens", output_cap=worst.output_cap)[1]
    translator = streamed.stream()
    blocks = translator.start()
    for chunk in sandbox.chat_completion_chunks(chat, worst.output_cap):
        blocks += translator.feed(f"data: {json.dumps(chunk)}".encode())
    blocks += translator.close()
    events = [json.loads(block.split(b"data: ", 1)[1]) for block in blocks]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert events[-1]["type"] == f"response.{whole['status']}"
    strip = lambda output: [{k: v for k, v in item.items() if k != "id"} for item in output]  # noqa: E731
    assert strip(final["output"]) == strip(whole["output"]) and final["usage"] == whole["usage"]
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert sorted(added) == sorted(done) == list(range(len(final["output"])))
