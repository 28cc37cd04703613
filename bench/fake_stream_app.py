"""A fake provider that answers like a real model: an OpenAI-shaped streaming chat completion whose
first token comes after a delay, then the reply in chunks at a steady rate, then the usage chunk
(when `stream_options.include_usage` asks for it) and [DONE]. A request without `stream` is
answered at once, whole. For uvicorn in the long-stream benchmark (bench/streams.py).

Configured from the environment, so that every uvicorn worker reads the same:
FAKE_FIRST_TOKEN_MS (800), FAKE_REPLY_TOKENS (200), FAKE_TOKENS_PER_S (50), FAKE_CHUNK_TOKENS (5).
"""

import asyncio
import json
import os
import time

FIRST_TOKEN_SECONDS = int(os.environ.get("FAKE_FIRST_TOKEN_MS", "800")) / 1000
REPLY_TOKENS = int(os.environ.get("FAKE_REPLY_TOKENS", "200"))
TOKENS_PER_SECOND = float(os.environ.get("FAKE_TOKENS_PER_S", "50"))
CHUNK_TOKENS = int(os.environ.get("FAKE_CHUNK_TOKENS", "5"))
PROMPT_TOKENS = 24
CHUNKS = -(-REPLY_TOKENS // CHUNK_TOKENS)
CHUNK_SECONDS = CHUNK_TOKENS / TOKENS_PER_SECOND
CONTENT = " tok" * CHUNK_TOKENS  # a whitespace-separated word per token


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body or b"{}")
    model = request.get("model", "fake")
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": REPLY_TOKENS,
             "total_tokens": PROMPT_TOKENS + REPLY_TOKENS, "prompt_tokens_details": {"cached_tokens": 0}}
    base = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    if not request.get("stream"):
        payload = json.dumps(base | {"object": "chat.completion", "usage": usage, "choices": [{
            "index": 0, "message": {"role": "assistant", "content": CONTENT.strip()}, "finish_reason": "stop"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        return await send({"type": "http.response.body", "body": payload})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await asyncio.sleep(FIRST_TOKEN_SECONDS)
    head = _sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    chunk = _sse(base | {"choices": [{"index": 0, "delta": {"content": CONTENT}, "finish_reason": None}]})
    tail = _sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (request.get("stream_options") or {}).get("include_usage"):
        tail += _sse(base | {"choices": [], "usage": usage})
    tail += b"data: [DONE]\n\n"
    # Paced from the start, not chunk to chunk, so that a busy loop does not slow the whole reply down.
    started = time.monotonic()
    try:
        for number in range(CHUNKS):
            if number:
                await asyncio.sleep(max(started + number * CHUNK_SECONDS - time.monotonic(), 0))
            await send({"type": "http.response.body", "body": head + chunk if number == 0 else chunk,
                        "more_body": True})
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    except OSError:
        return  # the client went away
