"""The built-in sandbox provider: deterministic replies with real token counts and no network.

It lets the demo (and anyone trying the portal) call the gateway end to end offline. Tokens are
counted with a simple rule (words and punctuation marks), the same rule for prompt and reply, so
the metered numbers can be checked by hand.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

_TOKEN = re.compile(r"\w+|[^\w\s]")
REPLY_WORDS = ("This is the portal's sandbox provider: a deterministic reply, counted like a real one. "
               "Point the model at a real provider connection to get real answers.").split()


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


MAX_REPLY_TOKENS = count_tokens(" ".join(REPLY_WORDS))


def _text_of(content) -> str:
    """The text of an OpenAI or Anthropic message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def prompt_tokens(body: dict) -> int:
    messages = body.get("messages") or []
    text = " ".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    system = body.get("system")
    if system:
        text += " " + _text_of(system)
    return count_tokens(text) + 3 * len(messages)  # a few tokens of framing per message, as real models count


def reply_words(body: dict, limit: int) -> list[str]:
    """The reply: as many words of the fixed text as `limit` tokens allow, seeded by the prompt."""
    seed = int(hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True, default=str).encode()).hexdigest(), 16)
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


def chat_completion(body: dict, limit: int) -> dict:
    words = reply_words(body, limit)
    text = " ".join(words)
    prompt, completion = prompt_tokens(body), count_tokens(text)
    return {
        "id": f"chatcmpl-sandbox-{int(time.time() * 1000)}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop" if completion < limit else "length"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def chat_completion_chunks(body: dict, limit: int):
    """The stream of a chat completion: one chunk per word, then the usage chunk (always)."""
    created, model, cid = int(time.time()), body.get("model"), f"chatcmpl-sandbox-{int(time.time() * 1000)}"
    words = reply_words(body, limit)

    def chunk(delta, finish=None, usage=None):
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            data["usage"] = usage
        return data

    yield chunk({"role": "assistant", "content": ""})
    for i, word in enumerate(words):
        yield chunk({"content": word if i == 0 else " " + word})
    completion = count_tokens(" ".join(words))
    yield chunk({}, finish="stop" if completion < limit else "length")
    prompt = prompt_tokens(body)
    yield chunk(None, usage={"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion})


def embeddings(body: dict) -> dict:
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    data, tokens = [], 0
    for index, text in enumerate(inputs):
        text = text if isinstance(text, str) else " ".join(map(str, text))
        tokens += count_tokens(text)
        digest = hashlib.sha256(text.encode()).digest()
        data.append({"object": "embedding", "index": index, "embedding": [round(b / 255 - 0.5, 4) for b in digest[:16]]})
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def message(body: dict, limit: int) -> dict:
    words = reply_words(body, limit)
    text = " ".join(words)
    output = count_tokens(text)
    return {
        "id": f"msg_sandbox_{int(time.time() * 1000)}", "type": "message", "role": "assistant",
        "model": body.get("model"), "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn" if output < limit else "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens(body), "output_tokens": output},
    }


def message_events(body: dict, limit: int):
    """Anthropic's streaming events: (event name, data)."""
    words = reply_words(body, limit)
    output = count_tokens(" ".join(words))
    start = message(body, 0)
    start["content"], start["usage"] = [], {"input_tokens": prompt_tokens(body), "output_tokens": 0}
    yield "message_start", {"type": "message_start", "message": start}
    yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    for i, word in enumerate(words):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": "end_turn" if output < limit else "max_tokens", "stop_sequence": None},
                            "usage": {"output_tokens": output}}
    yield "message_stop", {"type": "message_stop"}
