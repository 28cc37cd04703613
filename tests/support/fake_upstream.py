"""A small OpenAI- and Anthropic-compatible provider on loopback, for tests and benchmarks.

It answers like the real APIs (shapes, server-sent events, usage) with numbers the caller sets:
chat completions, the Responses API (and its stored responses), legacy completions, embeddings,
moderations, messages and token counting. It can misbehave on request: fail with a status, stall
mid-stream, send a stream without its usage, or lack the Responses API (as many OpenAI-compatible
servers do). OpenAI's usage chunk comes only when the request asks for it, as with the real API.
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
    # Reply with a call of this tool instead of text: {"name": ..., "arguments": "<JSON text>"}.
    tool_call: dict | None = None
    chat_only: bool = False  # no /responses (an OpenAI-compatible server of chat completions only)
    # Send no stream's first chunk until this many streams are open here at once.
    streams_together: int | None = None


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
    turns = request.get("messages") or (request.get("input") if isinstance(request.get("input"), list) else [])
    prompt = sum(_text_bytes(request.get(name)) for name in ("messages", "system", "tools", "input", "instructions",
                                                             "prompt"))
    images = sum(json.dumps(turns).count(kind) for kind in ('"image_url"', '"type": "image"', '"input_image"'))
    cap = (request.get("max_completion_tokens") or request.get("max_tokens") or request.get("max_output_tokens")
           or behaviour.uncapped_output)
    prompts = len(request["prompt"]) if isinstance(request.get("prompt"), list) and request["prompt"] and not (
        isinstance(request["prompt"][0], int)) else 1
    choices = prompts * max(request.get("n") or 1, request.get("best_of") or 1)
    return prompt + 4 * len(turns) + 3 + 85 * images, cap * choices + behaviour.beyond_cap


class FakeUpstream:
    def __init__(self):
        self.behaviour = Behaviour()
        self.requests: list[dict] = []  # what arrived: path, headers, body
        self.server: uvicorn.Server | None = None
        self.port = 0
        self.disconnects = 0
        self.streaming = 0  # streams open now
        self.most_streaming = 0  # the most open at once

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
        path, method = scope["path"], scope.get("method", "POST")
        self.requests.append({"path": path, "method": method, "query": scope.get("query_string", b"").decode(),
                              "headers": headers, "body": request})
        b = self.behaviour
        if b.worst_case:
            most_in, most_out = worst_case_usage(request, b)
            b = replace(b, input_tokens=most_in, output_tokens=most_out, cached_tokens=0)
        if b.fail_status:
            return await self._json(send, b.fail_status, {"error": {"message": "fake failure", "type": "server_error"}})
        if "/responses" in path and b.chat_only:
            return await self._json(send, 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
        if path.endswith("/embeddings"):
            return await self._json(send, 200, {"object": "list", "model": request.get("model"), "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": b.input_tokens, "total_tokens": b.input_tokens}})
        if path.endswith("/moderations"):  # the real API reports no usage here
            return await self._json(send, 200, {"id": "modr-fake", "model": request.get("model"), "results": [
                {"flagged": False, "categories": {"hate": False}, "category_scores": {"hate": 0.0}}]})
        if path.endswith("/messages/count_tokens") or path.endswith("/responses/input_tokens"):
            return await self._json(send, 200, {"input_tokens": b.input_tokens} | (
                {"object": "response.input_tokens"} if "responses" in path else {}))
        if "/responses/" in path:  # a stored response: GET, DELETE, its input items
            response_id = path.split("/responses/", 1)[1].split("/")[0]
            if method == "DELETE":
                return await self._json(send, 200, {"id": response_id, "object": "response.deleted", "deleted": True})
            if path.endswith("/input_items"):
                return await self._json(send, 200, {"object": "list", "data": [], "has_more": False})
            return await self._json(send, 200, self._response(request, b, response_id=response_id))
        wire = ("messages" if path.endswith("/messages") else "responses" if path.endswith("/responses")
                else "chat" if path.endswith("/chat/completions") else "completions")
        if request.get("stream"):
            return await self._stream(send, request, wire, receive, b)
        text = " ".join(b.words)
        if wire == "messages":
            usage = {"input_tokens": b.input_tokens, "output_tokens": b.output_tokens,
                     "cache_read_input_tokens": b.cached_tokens}
            content = [{"type": "text", "text": text}] if b.tool_call is None else [{
                "type": "tool_use", "id": "toolu_fake", "name": b.tool_call["name"],
                "input": json.loads(b.tool_call["arguments"])}]
            return await self._json(send, 200, {"id": "msg_fake", "type": "message", "role": "assistant",
                                                "model": request.get("model"), "content": content,
                                                "stop_reason": "end_turn" if b.tool_call is None else "tool_use",
                                                "stop_sequence": None, "usage": usage})
        if wire == "responses":
            return await self._json(send, 200, self._response(request, b))
        usage = self._openai_usage(b)
        if wire == "completions":
            return await self._json(send, 200, {
                "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": request.get("model"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}], "usage": usage})
        message = {"role": "assistant", "content": text} if b.tool_call is None else {
            "role": "assistant", "content": None, "tool_calls": [{"id": "call_fake", "type": "function",
                                                                  "function": b.tool_call}]}
        return await self._json(send, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": request.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "stop" if b.tool_call is None else "tool_calls"}],
            "usage": usage})

    @staticmethod
    def _openai_usage(b: Behaviour) -> dict:
        return {"prompt_tokens": b.input_tokens + b.cached_tokens, "completion_tokens": b.output_tokens,
                "total_tokens": b.input_tokens + b.cached_tokens + b.output_tokens,
                "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}

    @staticmethod
    def _responses_usage(b: Behaviour) -> dict:
        return {"input_tokens": b.input_tokens + b.cached_tokens, "input_tokens_details": {
            "cached_tokens": b.cached_tokens}, "output_tokens": b.output_tokens, "output_tokens_details": {
            "reasoning_tokens": 0}, "total_tokens": b.input_tokens + b.cached_tokens + b.output_tokens}

    def _output_item(self, b: Behaviour) -> dict:
        if b.tool_call is not None:
            return {"type": "function_call", "id": "fc_fake", "call_id": "call_fake", "status": "completed",
                    **b.tool_call}
        return {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant", "content": [
            {"type": "output_text", "text": " ".join(b.words), "annotations": []}]}

    def _response(self, request: dict, b: Behaviour, *, response_id: str = "resp_fake", status="completed",
                  output=None, usage=True) -> dict:
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status,
                "model": request.get("model"), "output": [self._output_item(b)] if output is None else output,
                "usage": self._responses_usage(b) if usage else None, "error": None, "incomplete_details": None,
                "tools": request.get("tools") or [], "parallel_tool_calls": True, "text": {"format": {"type": "text"}}}

    async def _json(self, send, status, data):
        payload = json.dumps(data).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _stream(self, send, request, wire, receive, b):
        self.streaming += 1
        self.most_streaming = max(self.most_streaming, self.streaming)
        try:
            await self._stream_events(send, request, wire, b)
        finally:
            self.streaming -= 1

    async def _stream_events(self, send, request, wire, b):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        while b.streams_together is not None and self.most_streaming < b.streams_together:
            await asyncio.sleep(0.01)
        events = list({"messages": self._anthropic_events, "responses": self._responses_events,
                       "chat": self._openai_events, "completions": self._completion_events}[wire](request, b))
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
        if b.tool_call is not None:
            yield chunk(base | {"choices": [{"index": 0, "delta": {"tool_calls": [{
                "index": 0, "id": "call_fake", "type": "function", "function": {
                    "name": b.tool_call["name"], "arguments": ""}}]}, "finish_reason": None}]})
            yield chunk(base | {"choices": [{"index": 0, "delta": {"tool_calls": [{
                "index": 0, "function": {"arguments": b.tool_call["arguments"]}}]}, "finish_reason": None}]})
        else:
            for i, word in enumerate(b.words):
                yield chunk(base | {"choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                                                 "finish_reason": None}]})
        yield chunk(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop" if b.tool_call is None
                                         else "tool_calls"}]})
        if (request.get("stream_options") or {}).get("include_usage") and not b.omit_usage:
            yield chunk(base | {"choices": [], "usage": {
                "prompt_tokens": b.input_tokens + b.cached_tokens, "completion_tokens": b.output_tokens,
                "total_tokens": b.input_tokens + b.cached_tokens + b.output_tokens,
                "prompt_tokens_details": {"cached_tokens": b.cached_tokens}}})
        yield b"data: [DONE]\n\n"

    def _completion_events(self, request, b):
        base = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                "model": request.get("model")}
        for i, word in enumerate(b.words):
            yield f"data: {json.dumps(base | {'choices': [{'text': word if i == 0 else ' ' + word, 'index': 0}]})}\n\n".encode()
        yield f"data: {json.dumps(base | {'choices': [{'text': '', 'index': 0, 'finish_reason': 'stop'}]})}\n\n".encode()
        if (request.get("stream_options") or {}).get("include_usage") and not b.omit_usage:
            yield f"data: {json.dumps(base | {'choices': [], 'usage': self._openai_usage(b)})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _responses_events(self, request, b):
        sequence = iter(range(10_000))

        def event(kind, **fields):
            data = {"type": kind, "sequence_number": next(sequence), **fields}
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

        started = self._response(request, b, status="in_progress", output=[], usage=False)
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        item = self._output_item(b)
        if item["type"] == "function_call":
            yield event("response.output_item.added", output_index=0, item=item | {"arguments": "",
                                                                                  "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=0,
                        delta=item["arguments"])
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                        arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=0, item=item | {"status": "in_progress",
                                                                                  "content": []})
            yield event("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})
            for i, word in enumerate(b.words):
                yield event("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                            delta=word if i == 0 else " " + word, logprobs=[])
            yield event("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                        text=" ".join(b.words), logprobs=[])
            yield event("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                        part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        yield event("response.completed", response=self._response(request, b, usage=not b.omit_usage))

    def _anthropic_events(self, request, b):
        model = request.get("model")

        def event(name, data):
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        usage = {} if b.omit_usage else {"input_tokens": b.input_tokens, "output_tokens": 1,
                                         "cache_read_input_tokens": b.cached_tokens}
        yield event("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}})
        if b.tool_call is not None:
            yield event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_fake", "name": b.tool_call["name"], "input": {}}})
            yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": b.tool_call["arguments"]}})
        else:
            yield event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
            for i, word in enumerate(b.words):
                yield event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                    "type": "text_delta", "text": word if i == 0 else " " + word}})
        yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn" if b.tool_call is None else "tool_use",
                                                    "stop_sequence": None}}
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
