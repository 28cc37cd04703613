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

A body whose shape the bound cannot rely on (messages that are not objects, content that is
neither text nor a list of parts) is refused with a 400 before anything is held.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.errors import GatewayError

MAX_CHOICES = 128  # OpenAI's own limit for `n`
MAX_OUTPUT_TOKENS = 10_000_000  # per choice: no model writes more; more is a typo, and would overflow a hold
# Tokens the providers add around the prompt: the reply's priming, and each message's start and role.
REQUEST_FRAMING = 16
MESSAGE_FRAMING = 8
# Anthropic prepends a tool-use system prompt of up to 346 tokens when tools are given (its docs).
ANTHROPIC_TOOL_PROMPT = 600
# The most one image can count, by family: OpenAI's most image-hungry model (gpt-4o-mini, high
# detail, 8 tiles: 2,833 + 8 x 5,667) and Anthropic's (images up to 2,576 px on the long edge at
# about 750 pixels a token). An image counts this instead of the bytes of its data.
IMAGE_TOKENS = {"openai": 48_169, "anthropic": 8_900}
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
MESSAGES_ROLES = {"user", "assistant"}


@dataclass(frozen=True)
class Bound:
    input_tokens: int  # an upper bound of the prompt's tokens
    output_cap: int  # per choice: the most the provider may write, as the forwarded request says
    choices: int
    forward: dict  # fields to set on the forwarded request so that the provider keeps to the cap


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", message, param=param)


def _positive_int(body: dict, name: str, ceiling: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= ceiling:
        raise _invalid(f"`{name}` must be a whole number from 1 to {ceiling:,}.", name)
    return value


def _parts(content, where: str, param: str) -> list:
    """The content's parts: a string is one text part; a list must hold objects."""
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise _invalid(f"{where} must be a string or a list of content parts (objects).", param)
    return content


def _image_data_bytes(part: dict) -> int | None:
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
    return len(data.encode()) if isinstance(data, str) else 0


def _images(parts: list) -> tuple[int, int]:
    """(images, bytes of their data) among the parts, and inside Anthropic's tool results."""
    count = data = 0
    for part in parts:
        size = _image_data_bytes(part)
        if size is not None:
            count, data = count + 1, data + size
        elif part.get("type") == "tool_result" and isinstance(part.get("content"), list):
            inner = _images([p for p in part["content"] if isinstance(p, dict)])
            count, data = count + inner[0], data + inner[1]
    return count, data


def _messages(body: dict, roles: set[str]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list of messages.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"`messages[{index}]` must be an object with a role and content.", "messages")
        if message.get("role") not in roles:
            raise _invalid(f"`messages[{index}].role` must be one of {', '.join(sorted(roles))}.", "messages")
    return messages


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
    ("openai" or "anthropic"), or a GatewayError saying what is wrong with the body. With no output
    cap in a chat request, `default_output` is held and sent as `cap_field` (OpenAI's own API wants
    max_completion_tokens, which its reasoning models require; other servers know max_tokens)."""
    if endpoint == "embeddings":
        _embeddings_input(body)
        return Bound(input_tokens=_encoded_size(body) + REQUEST_FRAMING, output_cap=0, choices=1, forward={})
    images = data = 0
    if endpoint == "messages":
        messages = _messages(body, MESSAGES_ROLES)
        output = _positive_int(body, "max_tokens", MAX_OUTPUT_TOKENS)
        if output is None:
            raise _invalid("`max_tokens` is required.", "max_tokens")
        for block in _parts(body.get("system"), "`system`", "system"):
            count, size = _images([block])
            images, data = images + count, data + size
        forward, choices = {}, 1
    else:
        messages = _messages(body, CHAT_ROLES)
        choices = _positive_int(body, "n", MAX_CHOICES) or 1
        asked = [value for value in (_positive_int(body, "max_completion_tokens", MAX_OUTPUT_TOKENS),
                                     _positive_int(body, "max_tokens", MAX_OUTPUT_TOKENS)) if value is not None]
        # A provider honours one of the two: the hold covers the larger.
        output = max(asked) if asked else default_output
        forward = {} if asked else {cap_field: output}
    for index, message in enumerate(messages):
        count, size = _images(_parts(message.get("content"), f"`messages[{index}].content`", "messages"))
        images, data = images + count, data + size
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _invalid("`tools` must be a list.", "tools")
    framing = REQUEST_FRAMING + MESSAGE_FRAMING * len(messages)
    if tools and family == "anthropic":
        framing += ANTHROPIC_TOOL_PROMPT
    input_tokens = _encoded_size(body) - data + images * IMAGE_TOKENS[family] + framing
    return Bound(input_tokens=input_tokens, output_cap=output, choices=choices, forward=forward)
