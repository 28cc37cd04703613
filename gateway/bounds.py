"""What a gateway request may cost at most, and the shape it must have for that to be knowable.

The hold must cover the worst case whatever the client sends (DESIGN.md, invariant 2):

- **Output** is capped upstream: the forwarded request always carries the output cap that the
  hold covers (the client's own, or the catalog's default when it sent none), per choice.
- **Input** is bounded from above without a tokenizer: every token of a byte-level BPE tokenizer
  (OpenAI's, Anthropic's, and the open models behind OpenAI-compatible servers) stands for at least
  one byte of UTF-8, so the body's compact JSON (which also carries every message's role and
  framing, as quotes, keys and braces) has at least as many bytes as the prompt has tokens. What
  the providers add is bounded separately: a few tokens per message, an image's fixed count in
  place of its bytes, and Anthropic's tool-use system prompt.

Only content the bound can know is accepted: text, images, audio (whose tokens are fewer than
its data's bytes), tool calls and results, and the tools a client defines. Content stored
elsewhere (file ids, document URLs), documents whose pages count as images, and Anthropic's
server tools (whose results are billed as input) cannot be bounded before the request runs, so a
body with them, or with a shape the bound cannot rely on (messages that are not objects, content
that is neither text nor a list of parts), is refused with a 400 before anything is held.
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
ANTHROPIC_DEFINED_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
# The most one image can count, by family: OpenAI's most image-hungry model (gpt-4o-mini, high
# detail, 8 tiles: 2,833 + 8 x 5,667) and Anthropic's (images up to 2,576 px on the long edge at
# about 750 pixels a token). An image counts this instead of the bytes of its data.
IMAGE_TOKENS = {"openai": 48_169, "anthropic": 8_900}
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
MESSAGES_ROLES = {"user", "assistant"}
# The content parts each API may carry, and which of them are images.
PART_TYPES = {"openai": {"text", "image_url", "input_audio", "refusal"},
              "anthropic": {"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"}}
TOOL_RESULT_PART_TYPES = {"text", "image"}
UNBOUNDED_PARTS = {"file": "file inputs", "document": "documents", "input_file": "file inputs",
                   "search_result": "search results", "container_upload": "container uploads"}


@dataclass(frozen=True)
class Bound:
    input_tokens: int  # an upper bound of the prompt's tokens
    output_cap: int  # per choice: the most the provider may write, as the forwarded request says
    choices: int
    forward: dict  # fields to set on the forwarded request so that the provider keeps to the cap
    drop: tuple = ()  # fields to take out of the forwarded request (the cap field the provider ignores)


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message, param=param)


def _positive_int(body: dict, name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ceiling:
        raise _invalid(f"`{name}` must be a whole number from 1 to {ceiling:,}.", name)
    return value


def _parts(content, where: str, param: str, allowed: set[str]) -> list[dict]:
    """The content's parts (a string is text), each of a type the bound knows; else a 400."""
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise _invalid(f"{where} must be a string or a list of content parts (objects).", param)
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind in UNBOUNDED_PARTS:
            raise _invalid(f"{where}[{index}]: {UNBOUNDED_PARTS[kind]} are not supported through the gateway: their "
                           "tokens cannot be known before the request runs, so no hold could cover them.", param)
        if not isinstance(kind, str) or kind not in allowed:
            raise _invalid(f"{where}[{index}].type must be one of {', '.join(sorted(allowed))}.", param)
        if kind in ("text", "thinking") and not isinstance(part.get(kind), str):
            raise _invalid(f"{where}[{index}].{kind} must be a string.", param)
        if kind == "tool_result":
            _parts(part.get("content"), f"{where}[{index}].content", param, TOOL_RESULT_PART_TYPES)
    return content


def _image_data_bytes(part: dict, where: str, param: str) -> int | None:
    """The bytes of an image part's data (its URL or base64 source), or None if it is no image."""
    kind = part.get("type")
    if kind == "image_url":  # OpenAI: {"image_url": {"url": ...}} or {"image_url": "..."}
        image = part.get("image_url")
        data = image.get("url") if isinstance(image, dict) else image
    elif kind == "image":  # Anthropic: {"source": {"type": "base64", "data": ...} or {"type": "url", "url": ...}}
        source = part.get("source")
        data = (source.get("data") or source.get("url")) if isinstance(source, dict) else None
    else:
        return None
    if not isinstance(data, str):
        raise _invalid(f"{where}: an image needs its URL or base64 data as a string.", param)
    return len(data.encode())


def _images(parts: list[dict], where: str, param: str) -> tuple[int, int]:
    """(images, bytes of their data) among the parts, and inside Anthropic's tool results."""
    count = data = 0
    for part in parts:
        size = _image_data_bytes(part, where, param)
        if size is not None:
            count, data = count + 1, data + size
        elif part.get("type") == "tool_result" and isinstance(part.get("content"), list):
            inner = _images(part["content"], where, param)
            count, data = count + inner[0], data + inner[1]
    return count, data


def _messages(body: dict, roles: set[str]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list of messages.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"`messages[{index}]` must be an object with a role and content.", "messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in roles:
            raise _invalid(f"`messages[{index}].role` must be one of {', '.join(sorted(roles))}.", "messages")
    return messages


def _tools_prompt(body: dict, family: str) -> int:
    """The tokens the tools add beyond their own bytes; a 400 for tools that cannot be bounded."""
    tools = body.get("tools")
    if tools is None:
        return 0
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise _invalid("`tools` must be a list of tool definitions (objects).", "tools")
    if not tools:
        return 0
    extra = TOOL_PROMPT
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if family == "openai":
            if kind not in ("function", "custom"):
                raise _invalid(f"`tools[{index}].type` must be function or custom.", "tools")
        elif kind not in (None, "custom"):
            if not isinstance(kind, str) or not kind.startswith(ANTHROPIC_DEFINED_TOOLS):
                raise _invalid(f"`tools[{index}]` ({kind}) is a server tool, which the gateway does not support: its "
                               "results are billed as input that no hold could cover.", "tools")
            extra += ANTHROPIC_DEFINED_TOOL_PROMPT
    return extra


def _encoded_size(body: dict) -> int:
    try:
        return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())
    except UnicodeEncodeError:
        raise _invalid("The body contains text that is not valid Unicode (an unpaired surrogate).") from None
    except RecursionError:
        raise _invalid("The body is nested too deeply.") from None


def _embeddings_input(body: dict) -> None:
    value = body.get("input")
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
    raise _invalid("`input` must be a non-empty string, a list of strings, or a list of token arrays.", "input")


def bound(endpoint: str, family: str, body: dict, *, default_output: int, cap_field: str = "max_tokens") -> Bound:
    """The worst case of a request to `endpoint` (chat, embeddings, messages) in the API of `family`
    ("openai" or "anthropic"), or a GatewayError saying what is wrong with the body. A chat request
    is forwarded with its cap as `cap_field` alone (OpenAI's own API wants max_completion_tokens,
    which its reasoning models require; other servers know max_tokens): the client's cap, or
    `default_output` when it sent none."""
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise _invalid("`stream` must be true or false.", "stream")
    if endpoint == "embeddings":
        _embeddings_input(body)
        return Bound(input_tokens=_encoded_size(body) + REQUEST_FRAMING, output_cap=0, choices=1, forward={})
    images = data = 0
    allowed = PART_TYPES[family]
    if endpoint == "messages":
        messages = _messages(body, MESSAGES_ROLES)
        output = _positive_int(body, "max_tokens", MAX_OUTPUT_TOKENS)
        if output is None:
            raise _invalid("`max_tokens` is required.", "max_tokens")
        system = _parts(body.get("system"), "`system`", "system", {"text"})
        forward, drop, choices = {}, (), 1
    else:
        messages = _messages(body, CHAT_ROLES)
        system = []
        choices = _positive_int(body, "n", MAX_CHOICES) or 1
        asked = [value for value in (_positive_int(body, "max_completion_tokens", MAX_OUTPUT_TOKENS),
                                     _positive_int(body, "max_tokens", MAX_OUTPUT_TOKENS)) if value is not None]
        # A provider honours one of the two: the hold covers the larger, sent in the one it knows.
        output = max(asked) if asked else default_output
        forward = {cap_field: output}
        drop = tuple(name for name in ("max_tokens", "max_completion_tokens") if name != cap_field)
    for index, message in enumerate(messages):
        where = f"`messages[{index}].content`"
        count, size = _images(_parts(message.get("content"), where, "messages", allowed), where, "messages")
        images, data = images + count, data + size
    framing = REQUEST_FRAMING + MESSAGE_FRAMING * (len(messages) + len(system)) + _tools_prompt(body, family)
    input_tokens = _encoded_size(body) - data + images * IMAGE_TOKENS[family] + framing
    return Bound(input_tokens=input_tokens, output_cap=output, choices=choices, forward=forward, drop=drop)
