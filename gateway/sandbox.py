"""The built-in sandbox provider: deterministic replies with real token counts and no network.

It lets the demo (and anyone trying the portal) call the gateway end to end offline, an agent's
tool loop included. It answers in the shapes of the real APIs (chat completions, messages, legacy
completions, embeddings, moderations; the Responses API is translated from its chat completions
by gateway.responses), with their stop reasons and the usage their streams carry:

- **Text**: words of a fixed sentence, starting at a place seeded by the prompt, as many as the
  output cap allows (`length` / `max_tokens` when it cut the reply short); a stop sequence that
  occurs in it ends it there.
- **Tool calls**: when the request offers tools and the last user turn names one of them (its
  name as a whole word; a namespaced tool's own name), or the tool choice requires one, the reply
  is a call of that tool. Its
  arguments follow the tool's JSON schema (its required properties; strings are the texts the
  user turn quotes in backticks, in order, else "sandbox"). After a tool result the reply is
  text, so a tool round trip ends.
- **JSON**: JSON mode replies `{"reply": "<text>"}`; structured output replies an instance of the
  schema, built like tool arguments.
- **n** choices, each seeded on its own.

Tokens are counted with a simple rule (words and punctuation marks), the same for prompt and
reply, so the metered numbers can be checked by hand; tool definitions count as their JSON text,
tool calls as their name and arguments, and an image as IMAGE_TOKENS. No reply is longer than
MAX_REPLY_TOKENS (what the gateway holds for a sandbox reply at most).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\w+|[^\w\s]")
REPLY_WORDS = ("This is the portal's sandbox provider: a deterministic reply, counted like a real one. "
               "Point the model at a real provider connection to get real answers.").split()
MAX_REPLY_TOKENS = 256  # per choice: tool arguments and JSON fit, the text reply is shorter
IMAGE_TOKENS = 85  # what a low-detail image counts at OpenAI
MESSAGE_TOKENS = 3  # a few tokens of framing per message, as real models count
_BACKTICKED = re.compile(r"`([^`\n]+)`")
# Keys whose values are structure, not text the model reads.
_STRUCTURAL = {"type", "role", "id", "call_id", "tool_call_id", "tool_use_id", "cache_control", "detail",
               "media_type", "index"}
_IMAGE_PARTS = ("image_url", "input_image", "image")  # a tuple: a client's "type" may be any JSON


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _truncated(text: str, budget: int) -> str:
    """The longest start of `text` that counts at most `budget` tokens."""
    if budget <= 0:
        return ""
    matches = list(_TOKEN.finditer(text))
    return text if len(matches) <= budget else text[:matches[budget - 1].end()]


def _counted(value) -> int:
    """Tokens of the text in a message, content part or list of them; an image counts IMAGE_TOKENS."""
    if isinstance(value, str):
        return count_tokens(value)
    if isinstance(value, list):
        return sum(_counted(item) for item in value)
    if isinstance(value, dict):
        if value.get("type") in _IMAGE_PARTS:
            return IMAGE_TOKENS
        return sum(_counted(item) for key, item in value.items() if key not in _STRUCTURAL)
    return 0


def _last_text(content) -> str:
    """The last text part of a content: a user turn's own words come after any reminders."""
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)] if (
        isinstance(content, list)) else []
    return texts[-1] if texts else ""


def _definition_tokens(value) -> int:
    """Tokens of tool definitions: every name and text in them, their schemas' property names too."""
    if isinstance(value, str):
        return count_tokens(value)
    if isinstance(value, list):
        return sum(_definition_tokens(item) for item in value)
    if isinstance(value, dict):
        return sum(count_tokens(key) + _definition_tokens(item) for key, item in value.items() if key != "type")
    return 0


def prompt_tokens(body: dict) -> int:
    """Input tokens of a chat completions or messages request: its messages, system prompt and tools."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return (_counted(messages) + _counted(body.get("system")) + MESSAGE_TOKENS * len(messages)
            + _definition_tokens(body.get("tools")))


# -- what the request asks for -----------------------------------------------------------------


@dataclass
class Tool:
    name: str
    schema: dict | None  # the arguments' JSON schema; None for a freeform (custom) tool


@dataclass
class Ask:
    """A request, whichever API it came in: what the sandbox's reply depends on."""

    seed: int
    last_user: str = ""  # the last user turn's text
    after_tool_result: bool = False
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None  # None: auto; "": any tool; "none": no tool; else a tool's name
    json: dict | bool | None = None  # a schema for structured output, True for JSON mode
    stop: list[str] = field(default_factory=list)
    choices: int = 1


def _seed(value) -> int:
    return int(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest(), 16)


def _stops(value) -> list[str]:
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [stop for stop in values if isinstance(stop, str) and stop]


def _chat_ask(body: dict) -> Ask:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    turns = [m for m in messages if m.get("role") not in ("system", "developer")]
    users = [m for m in turns if m.get("role") == "user"]
    tools = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "custom" and isinstance(tool.get("custom"), dict):
            tools.append(Tool(str(tool["custom"].get("name", "")), None))
        elif isinstance(tool.get("function"), dict):
            tools.append(Tool(str(tool["function"].get("name", "")), tool["function"].get("parameters") or {}))
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        named = choice.get("function") or choice.get("custom") or {}
        choice = named.get("name") if isinstance(named, dict) else None
    else:
        choice = {"required": "", "none": "none"}.get(choice) if isinstance(choice, str) else None
    answer = body.get("response_format") if isinstance(body.get("response_format"), dict) else {}
    schema = answer.get("json_schema") if isinstance(answer.get("json_schema"), dict) else {}
    wants = (schema.get("schema") or {}) if answer.get("type") == "json_schema" else (
        True if answer.get("type") == "json_object" else None)
    n = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
    return Ask(seed=_seed(body.get("messages")), last_user=_last_text(users[-1].get("content")) if users else "",
               after_tool_result=bool(turns) and turns[-1].get("role") in ("tool", "function"), tools=tools,
               tool_choice=choice, json=wants, stop=_stops(body.get("stop")), choices=max(n, 1))


def _messages_ask(body: dict) -> Ask:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    users = [m for m in messages if m.get("role") == "user"]
    last = users[-1].get("content") if users else ""
    after = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last)
    tools = [Tool(str(t.get("name", "")), t.get("input_schema") or {}) for t in body.get("tools") or []
             if isinstance(t, dict) and t.get("type") in (None, "custom")]
    choice = body.get("tool_choice") if isinstance(body.get("tool_choice"), dict) else {}
    kind = choice.get("type")
    choice = {"any": "", "none": "none", "tool": choice.get("name")}.get(kind) if isinstance(kind, str) else None
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    output_format = body.get("output_format") or config.get("format")  # the beta's field, and the current one
    wants = (output_format.get("schema") or {}) if isinstance(output_format, dict) and output_format.get(
        "type") == "json_schema" else None
    return Ask(seed=_seed(body.get("messages")), last_user="" if after else _last_text(last),
               after_tool_result=after, tools=tools, tool_choice=choice, json=wants,
               stop=_stops(body.get("stop_sequences")))


# -- the reply -----------------------------------------------------------------------------------


@dataclass
class Choice:
    text: str = ""
    call: Tool | None = None  # the tool called, with `arguments`
    arguments: str = ""  # JSON text of the arguments, or a freeform tool's input
    finish: str = "stop"  # "stop", "length", "tool_calls" or "stop_sequence"
    stop_sequence: str | None = None
    tokens: int = 0


def reply_words(seed: int, limit: int) -> list[str]:
    """The reply: as many words of the fixed text as `limit` tokens allow, from a place set by `seed`."""
    start = seed % len(REPLY_WORDS)
    words, tokens = [], 0
    for i in range(len(REPLY_WORDS)):
        word = REPLY_WORDS[(start + i) % len(REPLY_WORDS)]
        cost = count_tokens(word)
        if tokens + cost > limit:
            break
        words.append(word)
        tokens += cost
    return words


def _instance(schema, quoted: list[str], depth: int = 0):
    """A value that fits the JSON schema: its required properties, strings from `quoted` in turn."""
    if not isinstance(schema, dict) or depth > 6:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key) or [] if isinstance(o, dict) and o.get("type") != "null"]
        if options:
            return _instance(options[0], quoted, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [name for name in schema.get("required") or [] if name in properties]
        return {name: _instance(properties[name], quoted, depth + 1) for name in required}
    if kind == "array":
        return [_instance(schema.get("items") or {"type": "string"}, quoted, depth + 1)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1 if "exclusiveMinimum" in schema else 1)
        return low if isinstance(low, (int, float)) and not isinstance(low, bool) else 1
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return quoted.pop(0) if quoted else "sandbox"


def _called(ask: Ask) -> Tool | None:
    """The tool the reply calls, if any."""
    if not ask.tools or ask.tool_choice == "none":
        return None
    if ask.tool_choice:
        return next((tool for tool in ask.tools if tool.name == ask.tool_choice), None)
    if ask.tool_choice == "":
        return ask.tools[0]
    if ask.after_tool_result:
        return None
    for tool in ask.tools:
        # A tool in a namespace (the Responses API's, flattened to namespace__name) by its own name.
        name = tool.name.rsplit("__", 1)[-1]
        if name and re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", ask.last_user):
            return tool
    return None


def _text_choice(ask: Ask, seed: int, limit: int) -> Choice:
    if ask.json is not None:
        words = reply_words(seed, limit)
        value = _instance(ask.json, _BACKTICKED.findall(ask.last_user)) if isinstance(ask.json, dict) else {
            "reply": " ".join(words)}
        text = json.dumps(value)
        cut_short = False
    else:
        words = reply_words(seed, limit)
        text, cut_short = " ".join(words), len(words) < len(REPLY_WORDS)
        found = [(text.index(stop), stop) for stop in ask.stop if stop in text]
        if found:
            at, stop = min(found)
            return Choice(text=text[:at], finish="stop_sequence", stop_sequence=stop, tokens=count_tokens(text[:at]))
    tokens = count_tokens(text)
    if tokens > limit:
        text, cut_short = _truncated(text, limit), True
    return Choice(text=text, finish="length" if cut_short else "stop", tokens=count_tokens(text))


def choices(ask: Ask, limit: int) -> list[Choice]:
    """The reply's choices, none of them over `limit` (nor MAX_REPLY_TOKENS) tokens."""
    limit = min(limit, MAX_REPLY_TOKENS)
    made = []
    tool = _called(ask)
    for index in range(ask.choices):
        seed = ask.seed + index
        if tool is not None:
            arguments = (_BACKTICKED.findall(ask.last_user) or ["sandbox"])[0] if tool.schema is None else json.dumps(
                _instance(tool.schema, _BACKTICKED.findall(ask.last_user)) or {})
            tokens = count_tokens(tool.name) + count_tokens(arguments)
            if tokens <= limit:
                made.append(Choice(call=tool, arguments=arguments, finish="tool_calls", tokens=tokens))
                continue
        made.append(_text_choice(ask, seed, limit))
    return made


def _call_id(choice: Choice, index: int, prefix: str) -> str:
    return f"{prefix}{hashlib.sha256(f'{choice.call.name}{choice.arguments}{index}'.encode()).hexdigest()[:24]}"


# -- chat completions ----------------------------------------------------------------------------

_CHAT_FINISH = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


def _chat_usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _chat_tool_call(choice: Choice, index: int) -> dict:
    call_id = _call_id(choice, index, "call_")
    if choice.call.schema is None:
        return {"id": call_id, "type": "custom", "custom": {"name": choice.call.name, "input": choice.arguments}}
    return {"id": call_id, "type": "function", "function": {"name": choice.call.name, "arguments": choice.arguments}}


def chat_completion(body: dict, limit: int) -> dict:
    made = choices(_chat_ask(body), limit)
    prompt = prompt_tokens(body)
    rendered = []
    for index, choice in enumerate(made):
        message = {"role": "assistant", "content": choice.text if choice.call is None else None, "refusal": None}
        if choice.call is not None:
            message["tool_calls"] = [_chat_tool_call(choice, index)]
        rendered.append({"index": index, "message": message, "logprobs": None,
                         "finish_reason": _CHAT_FINISH[choice.finish]})
    return {
        "id": f"chatcmpl-sandbox-{int(time.time() * 1000)}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model"), "choices": rendered,
        "usage": _chat_usage(prompt, sum(choice.tokens for choice in made)),
    }


def _pieces(text: str) -> list[str]:
    """A text in the pieces a stream sends: a word (with the space before it) at a time; the pieces
    add up to the text, trailing spaces included."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)):]
    return pieces[:-1] + [pieces[-1] + tail] if pieces and tail else pieces or ([text] if text else [])


def chat_completion_chunks(body: dict, limit: int):
    """The stream of a chat completion: each choice's deltas, its finish, then the usage chunk (always)."""
    created, model, cid = int(time.time()), body.get("model"), f"chatcmpl-sandbox-{int(time.time() * 1000)}"
    made = choices(_chat_ask(body), limit)

    def chunk(index, delta, finish=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    for index, choice in enumerate(made):
        if choice.call is None:
            yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
            for piece in _pieces(choice.text):
                yield chunk(index, {"content": piece})
        else:
            call = _chat_tool_call(choice, index)
            if call["type"] == "custom":
                yield chunk(index, {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]})
            else:
                head = call | {"function": {"name": call["function"]["name"], "arguments": ""}}
                yield chunk(index, {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **head}]})
                for piece in _pieces(choice.arguments):
                    yield chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield chunk(index, {}, finish=_CHAT_FINISH[choice.finish])
    yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
           "usage": _chat_usage(prompt_tokens(body), sum(choice.tokens for choice in made))}


# -- Anthropic's messages ----------------------------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens", "tool_calls": "tool_use"}


def _message_usage(prompt: int, output: int) -> dict:
    return {"input_tokens": prompt, "output_tokens": output, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def _content_block(choice: Choice) -> dict:
    if choice.call is not None:
        arguments = json.loads(choice.arguments) if choice.call.schema is not None else {"input": choice.arguments}
        return {"type": "tool_use", "id": _call_id(choice, 0, "toolu_"), "name": choice.call.name, "input": arguments}
    return {"type": "text", "text": choice.text}


def message(body: dict, limit: int) -> dict:
    (choice,) = choices(_messages_ask(body), limit)
    return {
        "id": f"msg_sandbox_{int(time.time() * 1000)}", "type": "message", "role": "assistant",
        "model": body.get("model"), "content": [_content_block(choice)],
        "stop_reason": _STOP_REASONS[choice.finish], "stop_sequence": choice.stop_sequence,
        "usage": _message_usage(prompt_tokens(body), choice.tokens),
    }


def message_events(body: dict, limit: int):
    """Anthropic's streaming events: (event name, data); usage in message_start and message_delta."""
    whole = message(body, limit)
    block, prompt = whole["content"][0], whole["usage"]["input_tokens"]
    start = whole | {"content": [], "stop_reason": None, "stop_sequence": None, "usage": _message_usage(prompt, 1)}
    yield "message_start", {"type": "message_start", "message": start}
    if block["type"] == "text":
        yield "content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}
        for piece in _pieces(block["text"]):
            yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": piece}}
    else:
        yield "content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": block | {"input": {}}}
        for piece in _pieces(json.dumps(block["input"])):
            yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "input_json_delta", "partial_json": piece}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": whole["stop_reason"], "stop_sequence": whole["stop_sequence"]},
                            "usage": whole["usage"]}
    yield "message_stop", {"type": "message_stop"}


def count_message_tokens(body: dict) -> int:
    """What /v1/messages/count_tokens answers for a request to the sandbox."""
    return prompt_tokens(body)


# -- legacy completions, embeddings, moderations -------------------------------------------------------


def _prompts(value) -> list:
    """A completions prompt, or an embeddings input, as a list of prompts (strings or token arrays)."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    return list(value) if isinstance(value, list) else []


def _prompt_tokens(prompt) -> int:
    return count_tokens(prompt) if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list) else 0


def _completion_choices(body: dict, limit: int) -> tuple[list[Choice], int]:
    prompts = _prompts(body.get("prompt"))
    n = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
    made = []
    for prompt in prompts:
        ask = Ask(seed=_seed(prompt), stop=_stops(body.get("stop")), choices=max(n, 1))
        made += choices(ask, limit)
    return made, sum(_prompt_tokens(prompt) for prompt in prompts)


def completion(body: dict, limit: int) -> dict:
    made, prompt = _completion_choices(body, limit)
    return {
        "id": f"cmpl-sandbox-{int(time.time() * 1000)}", "object": "text_completion", "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"text": choice.text, "index": index, "logprobs": None,
                     "finish_reason": "length" if choice.finish == "length" else "stop"}
                    for index, choice in enumerate(made)],
        "usage": _chat_usage(prompt, sum(choice.tokens for choice in made)),
    }


def completion_chunks(body: dict, limit: int):
    whole = completion(body, limit)
    base = {key: whole[key] for key in ("id", "object", "created", "model")}
    for choice in whole["choices"]:
        for piece in _pieces(choice["text"]):
            yield base | {"choices": [{"text": piece, "index": choice["index"], "logprobs": None,
                                       "finish_reason": None}]}
        yield base | {"choices": [{"text": "", "index": choice["index"], "logprobs": None,
                                   "finish_reason": choice["finish_reason"]}]}
    yield base | {"choices": [], "usage": whole["usage"]}


def embeddings(body: dict) -> dict:
    data, tokens = [], 0
    for index, text in enumerate(_prompts(body.get("input"))):
        tokens += _prompt_tokens(text)
        text = text if isinstance(text, str) else " ".join(map(str, text))
        digest = hashlib.sha256(text.encode()).digest()
        data.append({"object": "embedding", "index": index, "embedding": [round(b / 255 - 0.5, 4) for b in digest[:16]]})
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


MODERATION_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                         "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
                         "sexual/minors", "violence", "violence/graphic")


def moderation(body: dict) -> dict:
    """Nothing is ever flagged. Like the real API, the reply reports no usage."""
    value = body.get("input")
    inputs = [value] if isinstance(value, str) or (isinstance(value, list) and value and isinstance(
        value[0], dict)) else list(value or [])
    return {"id": f"modr-sandbox-{int(time.time() * 1000)}", "model": body.get("model"), "results": [{
        "flagged": False, "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
        "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
        "category_applied_input_types": {category: ["text"] for category in MODERATION_CATEGORIES},
    } for _ in inputs]}
