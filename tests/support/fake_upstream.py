"""A small OpenAI- and Anthropic-compatible provider on loopback, for tests and benchmarks.

It answers like the real APIs (shapes, server-sent events, usage) with numbers the caller sets,
and can misbehave on request: fail with a status, stall mid-stream, or send a stream without its
usage. OpenAI's usage chunk comes only when the request asks for it, as with the real API.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field, replace

import uvicorn


@dataclass
class Behaviour:
    input_tokens: int = 11
    output_tokens: int = 7
    cached_tokens: int = 0
    fail_status: int | None = None  # answer this status with an error body
    stall_after_chunks: int | None = None  # stop sending (but keep the connection) after this many chunks
    chunk_delay: float = 0.0  # seconds between stream chunks
    omit_usage: bool = False  # a stream that never reports its usage
    words: list[str] = field(default_factory=lambda: ["Hello", "from", "the", "fake", "provider", "!", "ok"])
    # Report the most a real provider could for the request, instead of the numbers above: a token
    # per byte of every text in the prompt (what a byte-level tokenizer cannot exceed) plus framing,
    # and every choice written up to the output cap the request carries.
    worst_case: bool = False
    # With worst_case: report this many output tokens beyond the cap (a provider that ignores it).
    beyond_cap: int = 0
    # With worst_case, a request with no output cap gets a reply this long (real models write on).
    uncapped_output: int = 20_000


def _text_bytes(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a token of a token array (embeddings)
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(item) for key, item in value.items() if key not in ("type", "role", "source",
                                                                                   "image_url"))
    return 0


def worst_case_usage(request: dict, behaviour: Behaviour) -> tuple[int, int]:
    """(input, output) tokens: the most a provider could count for `request`."""
    messages = request.get("messages") or []
    prompt = sum(_text_bytes(request.get(name)) for name in ("messages", "system", "tools", "input"))
    images = json.dumps(messages).count('"image_url"') + json.dumps(messages).count('"type": "image"')
    cap = request.get("max_completion_tokens") or request.get("max_tokens") or behaviour.uncapped_output
    return prompt + 4 * len(messages) + 3 + 85 * images, cap * (request.get("n") or 1) + behaviour.beyond_cap


class FakeUpstream:
    def __init__(self):
        self.behaviour = Behaviour()
        self.requests: list[dict] = []  # what arrived: path, headers, body
        self.server: uvicorn.Server | None = None
        self.port = 0
        self.disconnects = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body or b"{}")
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": request})
        b = self.behaviour
        if b.worst_case:
            most_in, most_out = worst_case_usage(request, b)
            b = replace(b, input_tokens=most_in, output_tokens=most_out, cached_tokens=0)
        if b.fail_status:
            return await self._json(send, b.fail_status, {"error": {"message": "fake failure", "type": "server_error"}})
        path = scope["path"]
        if path.endswith("/embeddings"):
            return await self._json(send, 200, {"object": "list", "model": request.get("model"), "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": b.input_tokens, "total_tokens": b.input_tokens}})
        anthropic = path.endswith("/messages")
        if request.get("stream"):
            return await self._stream(send, request, anthropic, receive, b)
        text = " ".join(b.words)
        if anthropic:
            usage = {"input_tokens": b.input_tokens, "output_tokens": b.output_tokens,
                     "cache_read_input_tokens": b.cached_tokens}
            return await self._json(send, 200, {"id": "msg_fake", "type": "message", "role": "assistant",
                                                "model": request.get("model"), "content": [{"type": "text", "text": text}],
                                                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage})
        usage = {"prompt_tokens": b.input_tokens + b.cached_tokens, "completion_tokens": b.output_tokens,
                 "total_tokens": b.input_tokens + b.cached_tokens + b.output_tokens,
                 "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}
        return await self._json(send, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": request.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage})

    async def _json(self, send, status, data):
        payload = json.dumps(data).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _stream(self, send, request, anthropic, receive, b):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        events = list(self._anthropic_events(request, b) if anthropic else self._openai_events(request, b))
        for index, event in enumerate(events):
            if b.stall_after_chunks is not None and index >= b.stall_after_chunks:
                await asyncio.sleep(3600)  # hang: the gateway's read time-out must end this
            try:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            except OSError:
                self.disconnects += 1
                return
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _openai_events(self, request, b):
        model = request.get("model")

        def chunk(data):
            return f"data: {json.dumps(data)}\n\n".encode()

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        yield chunk(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i, word in enumerate(b.words):
            yield chunk(base | {"choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                             "finish_reason": None}]})
        yield chunk(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (request.get("stream_options") or {}).get("include_usage") and not b.omit_usage:
            yield chunk(base | {"choices": [], "usage": {
                "prompt_tokens": b.input_tokens + b.cached_tokens, "completion_tokens": b.output_tokens,
                "total_tokens": b.input_tokens + b.cached_tokens + b.output_tokens,
                "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}})
        yield b"data: [DONE]\n\n"

    def _anthropic_events(self, request, b):
        model = request.get("model")

        def event(name, data):
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        usage = {} if b.omit_usage else {"input_tokens": b.input_tokens, "output_tokens": 1,
                                         "cache_read_input_tokens": b.cached_tokens}
        yield event("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}})
        yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
        for i, word in enumerate(b.words):
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "text_delta", "text": word if i == 0 else " " + word}})
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if not b.omit_usage:
            delta["usage"] = {"output_tokens": b.output_tokens}
        yield event("message_delta", delta)
        yield event("message_stop", {"type": "message_stop"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """An ASGI app served by uvicorn in a background thread on a free loopback port, started and
    shut down through its lifespan (the portal's closes its pools there)."""

    def __init__(self, app, *, port: int | None = None, **config):
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
