"""What a gateway request may cost at most, and the shape it must have for that to be knowable.

The hold must cover the worst case whatever the client sends (DESIGN.md, invariant 2):

- **Output** is capped upstream: the forwarded request always carries the output cap that the
  hold covers, per choice. That cap is the most the model can write (the catalog's maximum
  output for it): a client asking for more (coding agents send 32,000 to 128,000 on every call)
  is sent that maximum instead, so concurrent requests do not refuse each other on reserves no
  reply could use.
- **Input** is bounded from above without a tokenizer: every token of a byte-level BPE tokenizer
  (OpenAI's, Anthropic's, and the open models behind OpenAI-compatible servers) stands for at least
  one byte of UTF-8, so the body's compact JSON (which also carries every message's role and
  framing, as quotes, keys and braces) has at least as many bytes as the prompt has tokens. What
  the providers add is bounded separately: a few tokens per message or input item, an image's
  fixed count in place of its bytes, and Anthropic's tool-use system prompt.

What the provider would add that is not in the body cannot be bounded beforehand, so it is
refused with a 400 before anything is held: files named by id or URL, stored prompts and
conversations, tools that run at the provider and feed their results back as input (web search,
file search, code execution, remote MCP). So is a body whose shape the bound cannot rely on
(messages that are not objects, content that is neither text nor a list of known parts, a tool
that is not a client tool, a `stream` that is not a boolean). A Responses
request continuing a stored response (`previous_response_id`) says so in its Bound; the caller
adds what that response counted (gateway.metering).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.errors import GatewayError

MAX_CHOICES = 128  # OpenAI's own limit for `n`
MAX_OUTPUT_TOKENS = 10_000_000  # per choice: no model writes more; more is a typo, and would overflow a hold
# Tokens the providers add around the prompt: the reply's priming, a chat template's header, and
# each message's start and role.
REQUEST_FRAMING = 64
MESSAGE_FRAMING = 8
# The prompt a provider or a chat template adds when tools are given (Anthropic's tool-use system
# prompt is up to 346 tokens, its docs say); each of Anthropic's own client tools (bash, text
# editor, computer use, memory) adds its own instructions on top.
TOOL_PROMPT = 600
ANTHROPIC_DEFINED_TOOL_PROMPT = 1_000
# The most one image can count, by family: OpenAI's most image-hungry model (gpt-4o-mini, high
# detail, 8 tiles: 2,833 + 8 x 5,667) and Anthropic's (images up to 2,576 px on the long edge at
# about 750 pixels a token). An image counts this instead of the bytes of its data.
IMAGE_TOKENS = {"openai": 48_169, "anthropic": 8_900}
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Anthropic's messages: user and assistant turns, and system messages between them (as Claude Code sends).
MESSAGES_ROLES = {"user", "assistant", "system"}
RESPONSES_ROLES = {"user", "assistant", "system", "developer"}
COMPLETIONS_DEFAULT_OUTPUT = 16  # what OpenAI writes for a completion that names no max_tokens
# Tools the client runs itself: what they return comes back in a later request's body. Any other
# Responses tool type runs at the provider (web search, file search, code interpreter, MCP, ...).
RESPONSES_CLIENT_TOOLS = {"function", "custom", "namespace", "computer_use_preview", "computer", "local_shell",
                          "shell", "apply_patch"}
# Anthropic's server tools (their results are input the body does not hold); its other typed tools
# (bash_, text_editor_, computer_, memory_, tool_search_tool_) run on the client or search the body.
ANTHROPIC_SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_")
CHAT_TOOLS = {"function", "custom"}
# The content parts chat completions and Anthropic's messages may carry: what the bound knows how to
# count (text and documents by their bytes, images by their family's most).
PART_TYPES = {"openai": {"text", "image_url", "input_audio", "file", "refusal"},
              "anthropic": {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}}


@dataclass(frozen=True)
class Bound:
    input_tokens: int  # an upper bound of the prompt's tokens
    output_cap: int  # per choice: the most the provider may write, as the forwarded request says
    choices: int
    forward: dict  # fields to set on the forwarded request so that the provider keeps to the cap
    previous_response_id: str | None = None  # its counted tokens must be added to input_tokens
    drop: tuple = ()  # fields to take out of the forwarded request (a cap field the provider ignores)


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message, param=param)


def _unboundable(what: str, param: str | None = None) -> GatewayError:
    return _invalid(f"{what} cannot be sent through the portal: what it adds to the request is not in the request, "
                    "so the gateway cannot hold its cost beforehand.", param)


def _positive_int(body: dict, name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ceiling:
        raise _invalid(f"`{name}` must be a whole number from 1 to {ceiling:,}.", name)
    return value


TEXT_PARTS = ("text", "input_text", "output_text", "summary_text")  # content parts that carry a `text`


def _parts(content, where: str, param: str, allowed: set[str] | None = None) -> list:
    """The content's parts: a string is one text part; a list must hold objects (of the `allowed`
    types, when given; a text part's text is a string)."""
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise _invalid(f"{where} must be a string or a list of content parts (objects).", param)
    for index, part in enumerate(content):
        kind = part.get("type")
        if allowed is not None and (not isinstance(kind, str) or kind not in allowed):
            raise _invalid(f"{where}[{index}].type must be one of {', '.join(sorted(allowed))}.", param)
        if kind in TEXT_PARTS and not isinstance(part.get("text"), str):
            raise _invalid(f"{where}[{index}].text must be a string.", param)
        if kind == "refusal" and not isinstance(part.get("refusal"), str):
            raise _invalid(f"{where}[{index}].refusal must be a string.", param)
    return content


def _image_data_bytes(part: dict, param: str) -> int | None:
    """The bytes of an image part's data (its URL or base64 source), or None if it is no image.
    Files that the provider would fetch by id or URL are refused: their size is not in the body."""
    kind = part.get("type")
    if kind == "image_url":  # OpenAI chat: {"image_url": {"url": ...}} or {"image_url": "..."}
        image = part.get("image_url")
        data = image.get("url") if isinstance(image, dict) else image
        if not isinstance(data, str):
            raise _invalid("An image_url part needs its URL (or data URL) as a string.", param)
    elif kind == "input_image":  # Responses: {"image_url": "...", "detail": ...} or {"file_id": ...}
        data = part.get("image_url")
    elif kind == "image":  # Anthropic: {"source": {"type": "base64", "data": ...} or {"type": "url", "url": ...}}
        source = part.get("source")
        data = (source.get("data") or source.get("url")) if isinstance(source, dict) else None
    else:
        if kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_id"):
            raise _unboundable("A file named by its id", param)
        if kind == "input_file" and (part.get("file_id") or part.get("file_url")):
            raise _unboundable("A file named by its id or URL", param)
        if kind == "document" and isinstance(part.get("source"), dict) and part["source"].get("type") in (
                "url", "file"):
            raise _unboundable("A document named by its URL or file id", param)
        return None
    return len(data.encode()) if isinstance(data, str) else 0


def _images(parts: list, param: str) -> tuple[int, int]:
    """(images, bytes of their data) among the parts, and inside tool results' content."""
    count = data = 0
    for part in parts:
        size = _image_data_bytes(part, param)
        if size is not None:
            count, data = count + 1, data + size
        else:
            inner = part.get("content") if part.get("type") == "tool_result" else part.get("output") if part.get(
                "type") in ("function_call_output", "custom_tool_call_output") else None
            if isinstance(inner, list):
                found = _images([p for p in inner if isinstance(p, dict)], param)
                count, data = count + found[0], data + found[1]
    return count, data


def _messages(body: dict, roles: set[str]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list of messages.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"`messages[{index}]` must be an object with a role and content.", "messages")
        if not isinstance(message.get("role"), str) or message["role"] not in roles:
            raise _invalid(f"`messages[{index}].role` must be one of {', '.join(sorted(roles))}.", "messages")
    return messages


def _encoded_size(body: dict) -> int:
    try:
        return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError:
        raise _invalid("The body contains text that is not valid Unicode (an unpaired surrogate).") from None
    except RecursionError:
        raise _invalid("The body is nested too deeply.") from None


def _text_or_tokens(value, name: str, what: str) -> None:
    """A non-empty string, list of strings, list of token ids, or list of token id lists."""
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return
        if all(isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
               for item in value):
            return
    raise _invalid(f"`{name}` must be {what}.", name)


def _cap(body: dict, fields: tuple[str, ...], most: int, default: int, cap_field: str) -> tuple[int, dict]:
    """The output cap the hold covers and the fields that make it explicit upstream.

    A provider honours one of the fields the client sent: each is clamped to the model's most, and
    the hold covers the larger. With none, `default` is held and sent as `cap_field`."""
    asked = {name: value for name in fields
             if (value := _positive_int(body, name, MAX_OUTPUT_TOKENS)) is not None}
    if not asked:
        output = min(default, most)
        return output, {cap_field: output}
    forward = {name: min(value, most) for name, value in asked.items()}
    return max(forward.values()), forward


def _tools_prompt(body: dict, family: str) -> int:
    """The tokens the tools of a chat or messages request add beyond their own bytes; a 400 for a
    tool the bound cannot know."""
    tools = body.get("tools")
    if tools is None:
        return 0
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise _invalid("`tools` must be a list of tool definitions (objects).", "tools")
    extra = TOOL_PROMPT if tools else 0
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if family == "openai":
            if not isinstance(kind, str) or kind not in CHAT_TOOLS:
                raise _invalid(f"`tools[{index}].type` must be one of {', '.join(sorted(CHAT_TOOLS))}.", "tools")
        elif isinstance(kind, str) and kind.startswith(ANTHROPIC_SERVER_TOOLS):
            raise _unboundable(f"The server tool `{kind}` (it runs at the provider, and its results count as input)",
                               "tools")
        elif kind not in (None, "custom"):
            extra += ANTHROPIC_DEFINED_TOOL_PROMPT  # bash, text editor, computer use, ...: their own instructions
    return extra


def _responses_tools(tools, param: str) -> None:
    """Every tool, also inside namespaces, must be one the client runs."""
    if not isinstance(tools, list):
        raise _invalid(f"`{param}` must be a list.", param)
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str) or kind not in RESPONSES_CLIENT_TOOLS:
            raise _unboundable(f"The tool type `{kind}` (it runs at the provider, and its results count as input)"
                               if isinstance(kind, str) else "A tool without a type", param)
        if kind == "namespace":
            _responses_tools(tool.get("tools") or [], param)


def _responses_input(body: dict) -> tuple[int, int, int, bool]:
    """(items, images, bytes of image data, whether an item adds tools) of a Responses request's
    input, checked."""
    if body.get("instructions") is not None and not isinstance(body.get("instructions"), str):
        raise _invalid("`instructions` must be a string.", "instructions")
    value = body.get("input")
    if isinstance(value, str):
        return 1, 0, 0, False
    if not isinstance(value, list) or not value:
        raise _invalid("`input` must be a string or a non-empty list of input items.", "input")
    images = data = 0
    adds_tools = False
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise _invalid(f"`input[{index}]` must be an object (an input item).", "input")
        kind = item.get("type", "message")
        if kind == "message":
            if not isinstance(item.get("role"), str) or item["role"] not in RESPONSES_ROLES:
                raise _invalid(f"`input[{index}].role` must be one of {', '.join(sorted(RESPONSES_ROLES))}.", "input")
            found = _images(_parts(item.get("content"), f"`input[{index}].content`", "input"), "input")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            found = _images(_parts(item.get("output"), f"`input[{index}].output`", "input"), "input")
        elif kind == "item_reference":
            raise _unboundable("An input item stored at the provider (`item_reference`)", "input")
        elif kind == "additional_tools":
            _responses_tools(item.get("tools") or [], "input")
            adds_tools, found = adds_tools or bool(item.get("tools")), (0, 0)
        else:
            found = (0, 0)  # function calls, reasoning items and the like: all of them in the body
        images, data = images + found[0], data + found[1]
    return len(value), images, data, adds_tools


def _responses(body: dict, most_output: int, image_tokens: int) -> Bound:
    for name, what in (("conversation", "A stored conversation"), ("prompt", "A stored prompt template")):
        if body.get(name) is not None:
            raise _unboundable(what, name)
    if body.get("background"):
        raise _invalid("Background responses are not available through the portal: the gateway meters a response "
                       "while it is produced. Send the request without `background` (streamed, if it is long).",
                       "background")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous or len(previous) > 100):
        raise _invalid("`previous_response_id` must be the id of an earlier response.", "previous_response_id")
    items, images, data, adds_tools = _responses_input(body)
    _responses_tools(body.get("tools") or [], "tools")
    output, forward = _cap(body, ("max_output_tokens",), most_output, most_output, "max_output_tokens")
    input_tokens = (_encoded_size(body) - data + images * image_tokens + REQUEST_FRAMING
                    + MESSAGE_FRAMING * (items + 1)  # the instructions are one more message
                    + (TOOL_PROMPT if body.get("tools") or adds_tools else 0))
    return Bound(input_tokens=input_tokens, output_cap=output, choices=1, forward=forward,
                 previous_response_id=previous)


def _completions(body: dict, most_output: int) -> Bound:
    _text_or_tokens(body.get("prompt"), "prompt", "a non-empty string, a list of strings, or a list of token arrays")
    prompt = body["prompt"]
    prompts = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
    # n replies per prompt; best_of candidates are all written (and billed), n of them returned.
    choices = prompts * max(_positive_int(body, "n", MAX_CHOICES) or 1,
                            _positive_int(body, "best_of", MAX_CHOICES) or 1)
    output, forward = _cap(body, ("max_tokens",), most_output, COMPLETIONS_DEFAULT_OUTPUT, "max_tokens")
    return Bound(input_tokens=_encoded_size(body) + REQUEST_FRAMING + MESSAGE_FRAMING * prompts,
                 output_cap=output, choices=choices, forward=forward)


def _moderations(body: dict, image_tokens: int) -> Bound:
    value = body.get("input")
    images = data = 0
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        images, data = _images(value, "input")  # text and image_url parts
    elif not (isinstance(value, str) and value) and not (
            isinstance(value, list) and value and all(isinstance(item, str) for item in value)):
        raise _invalid("`input` must be a non-empty string, a list of strings, or a list of text and image parts.",
                       "input")
    return Bound(input_tokens=_encoded_size(body) - data + images * image_tokens + REQUEST_FRAMING,
                 output_cap=0, choices=1, forward={})


def bound(endpoint: str, family: str, body: dict, *, most_output: int, cap_field: str = "max_tokens",
          image_tokens: int | None = None) -> Bound:
    """The worst case of a request to `endpoint` (chat, responses, completions, embeddings,
    moderations, messages) in the API of `family` ("openai" or "anthropic"), or a GatewayError
    saying what is wrong with the body. `most_output` is the most the model writes in a reply: the
    output cap is the client's, clamped to it, or it when the client names none (sent as
    `cap_field` on chat completions: OpenAI's own API wants max_completion_tokens, which its
    reasoning models require; other servers know max_tokens). An image counts `image_tokens`: the
    most the model counts for one (by default the family's most, IMAGE_TOKENS)."""
    image_tokens = IMAGE_TOKENS[family] if image_tokens is None else image_tokens
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise _invalid("`stream` must be true or false.", "stream")
    if endpoint == "embeddings":
        _text_or_tokens(body.get("input"), "input", "a non-empty string, a list of strings, or a list of token arrays")
        return Bound(input_tokens=_encoded_size(body) + REQUEST_FRAMING, output_cap=0, choices=1, forward={})
    if endpoint == "moderations":
        return _moderations(body, image_tokens)
    if endpoint == "completions":
        return _completions(body, most_output)
    if endpoint == "responses":
        return _responses(body, most_output, image_tokens)
    images = data = 0
    if endpoint == "messages":
        messages = _messages(body, MESSAGES_ROLES)
        if body.get("max_tokens") is None:
            raise _invalid("`max_tokens` is required.", "max_tokens")
        output, forward = _cap(body, ("max_tokens",), most_output, most_output, "max_tokens")
        thinking = body.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if isinstance(budget, int) and not isinstance(budget, bool) and budget >= output:
            # Anthropic wants the thinking budget below max_tokens: keep it there after the clamp.
            forward["thinking"] = thinking | {"budget_tokens": max(output - 1, 1)}
        if body.get("mcp_servers"):
            raise _unboundable("Remote MCP servers (their results count as input)", "mcp_servers")
        for block in _parts(body.get("system"), "`system`", "system", {"text"}):
            count, size = _images([block], "system")
            images, data = images + count, data + size
        choices, drop = 1, ()
    else:
        messages = _messages(body, CHAT_ROLES)
        choices = _positive_int(body, "n", MAX_CHOICES) or 1
        output, _asked = _cap(body, ("max_completion_tokens", "max_tokens"), most_output, most_output, cap_field)
        # Sent in the one field the provider honours, the other taken out.
        forward = {cap_field: output}
        drop = tuple(name for name in ("max_completion_tokens", "max_tokens") if name != cap_field)
        if body.get("web_search_options") is not None:
            raise _unboundable("Web search (its results count as input)", "web_search_options")
    allowed = PART_TYPES[family]
    for index, message in enumerate(messages):
        parts = _parts(message.get("content"), f"`messages[{index}].content`", "messages", allowed)
        for part in parts:
            if part.get("type") == "tool_result":
                _parts(part.get("content"), f"`messages[{index}]` tool result", "messages", {"text", "image", "document"})
        count, size = _images(parts, "messages")
        images, data = images + count, data + size
    framing = REQUEST_FRAMING + MESSAGE_FRAMING * len(messages) + _tools_prompt(body, family)
    input_tokens = _encoded_size(body) - data + images * image_tokens + framing
    return Bound(input_tokens=input_tokens, output_cap=output, choices=choices, forward=forward, drop=drop)
