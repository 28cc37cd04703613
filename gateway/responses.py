"""The Responses API on providers that have only chat completions (OpenAI-compatible servers
without /responses, and the sandbox): a request is translated into a chat completion, and the
reply (whole, or streamed chunk by chunk) back into a response, so that a key works the same
whatever provider its model sits on.

- Input: `instructions` and system or developer messages become system messages; user and
  assistant messages keep their text and images; function calls (and custom tool calls, whose
  freeform input travels as a function's single `input` argument) become the assistant's tool
  calls, their outputs tool messages; reasoning items are dropped (a chat server cannot read
  them). Tools, also those in namespaces and in `additional_tools` input items (Codex CLI), become
  chat functions (`namespace__name`), the tool choice and structured output their chat forms.
- Output: the chat reply's text becomes a message item, its tool calls function (or custom)
  tool calls, its usage the response's; a reply cut at the output cap is `incomplete`.

Nothing is stored: `previous_response_id` needs a provider with the Responses API (see
gateway.metering), and what cannot be said in chat completions is a 400 naming it.
"""

from __future__ import annotations

import json
import time
import uuid

from gateway.bounds import TEXT_PARTS
from gateway.errors import GatewayError
from gateway.upstream import Usage

NAMESPACE_SEPARATOR = "__"
_FREEFORM_PARAMETERS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
_PASSED = ("temperature", "top_p", "user", "parallel_tool_calls")


def _untranslatable(what: str, param: str = "input") -> GatewayError:
    return GatewayError(400, "invalid_request_error", (
        f"{what} cannot be sent to this model's provider: it has chat completions only, and the gateway "
        "translates the Responses API into them."), param=param)


def _text(content) -> str:
    """The text of a content (a string, or parts with text), e.g. a tool's output."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or part.get("refusal") or "" for part in content if isinstance(part, dict))
    return "" if content is None else json.dumps(content)


def _chat_part(part: dict, index: int):
    kind = part.get("type")
    if kind in TEXT_PARTS or kind == "refusal":
        return {"type": "text", "text": part.get("text") or part.get("refusal") or ""}
    if kind == "input_image":
        if not part.get("image_url"):
            raise _untranslatable(f"`input[{index}]`: an image named by its file id")
        image = {"url": part["image_url"]}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and part.get("file_data"):
        return {"type": "file", "file": {k: part[k] for k in ("file_data", "filename") if part.get(k)}}
    raise _untranslatable(f"`input[{index}]`: a content part of type `{kind}`")


def _chat_content(content, role: str, index: int):
    if isinstance(content, str):
        return content
    parts = [_chat_part(part, index) for part in content or []]
    if role in ("system", "assistant") or all(part["type"] == "text" for part in parts):
        return "".join(part.get("text", "") for part in parts)  # what every chat server takes
    return parts


class _Tools:
    """The request's tools as chat functions, and how to read a call of one back."""

    def __init__(self):
        self.functions: list[dict] = []
        self.called: dict[str, tuple[str, str | None, bool]] = {}  # chat name -> (name, namespace, freeform)

    def add(self, tools, namespace: str | None = None, param: str = "tools") -> None:
        for tool in tools or []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "namespace":
                self.add(tool.get("tools"), tool.get("name") or namespace, param)
                continue
            if kind not in ("function", "custom") or not isinstance(tool.get("name"), str):
                raise _untranslatable(f"A tool of type `{kind}`", param)
            name = f"{namespace}{NAMESPACE_SEPARATOR}{tool['name']}" if namespace else tool["name"]
            if name in self.called:
                continue  # the same tool again (a replayed `additional_tools` item)
            freeform = kind == "custom"
            function = {"name": name, "parameters": _FREEFORM_PARAMETERS if freeform else (
                tool.get("parameters") or {"type": "object", "properties": {}})}
            if tool.get("description"):
                function["description"] = tool["description"]
            if tool.get("strict") is True:
                function["strict"] = True
            self.functions.append({"type": "function", "function": function})
            self.called[name] = (tool["name"], namespace, freeform)

    def chat_name(self, name: str, namespace: str | None) -> str:
        return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def _tool_choice(choice, tools: _Tools):
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and choice.get("name"):
        return {"type": "function", "function": {"name": tools.chat_name(choice["name"], choice.get("namespace"))}}
    return None  # allowed tools, hosted tool choices: left to the model


def _response_format(text) -> dict | None:
    answer = text.get("format") if isinstance(text, dict) and isinstance(text.get("format"), dict) else {}
    if answer.get("type") == "json_object":
        return {"type": "json_object"}
    if answer.get("type") == "json_schema":
        schema = {k: answer[k] for k in ("name", "schema", "strict", "description") if k in answer}
        schema.setdefault("name", "response")
        return {"type": "json_schema", "json_schema": schema}
    return None


def _messages(body: dict, tools: _Tools) -> list[dict]:
    messages: list[dict] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"] if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item["role"], item["role"])
            messages.append({"role": role, "content": _chat_content(item.get("content"), role, index)})
        elif kind in ("function_call", "custom_tool_call"):
            custom = kind == "custom_tool_call"
            name = tools.chat_name(str(item.get("name") or ""), item.get("namespace"))
            arguments = json.dumps({"input": item.get("input") or ""}) if custom else item.get("arguments") or "{}"
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"))})
        elif kind == "additional_tools":
            tools.add(item.get("tools"), param="input")
        elif kind != "reasoning":
            raise _untranslatable(f"`input[{index}]`: an input item of type `{kind}`")
    return messages


def to_chat(body: dict, *, cap_field: str, output_cap: int) -> tuple[dict, Translation]:
    """The chat completion to ask for instead of the response `body` asks for, and how to answer."""
    tools = _Tools()
    tools.add(body.get("tools"))
    chat = {"model": body.get("model"), "messages": _messages(body, tools), cap_field: output_cap}
    if tools.functions:
        chat["tools"] = tools.functions
        if (choice := _tool_choice(body.get("tool_choice"), tools)) is not None:
            chat["tool_choice"] = choice
    if (answer := _response_format(body.get("text"))) is not None:
        chat["response_format"] = answer
    chat |= {name: body[name] for name in _PASSED if body.get(name) is not None and (
        name != "parallel_tool_calls" or tools.functions)}
    if body.get("stream"):
        chat |= {"stream": True, "stream_options": {"include_usage": True}}
    return chat, Translation(body, tools, output_cap)


def _usage(chat_usage) -> dict | None:
    """The response's usage from the chat reply's, read by the rule metering charges it by."""
    usage = Usage.from_openai(chat_usage) if isinstance(chat_usage, dict) else None
    if usage is None:
        return None
    details = chat_usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    prompt = usage.input + usage.cached
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": usage.cached},
            "output_tokens": usage.output,
            "output_tokens_details": {"reasoning_tokens": reasoning if type(reasoning) is int else 0},
            "total_tokens": prompt + usage.output}


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


class Translation:
    """What a translated request needs to be answered as a response."""

    def __init__(self, body: dict, tools: _Tools, output_cap: int):
        self.body, self.tools, self.output_cap = body, tools, output_cap
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())

    def item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.id[5:]}_{index}"

    def response(self, *, status: str, output: list, usage: dict | None, model=None, finish: str | None = None) -> dict:
        body = self.body
        incomplete = {"reason": "max_output_tokens" if finish == "length" else "content_filter"} if (
            status == "incomplete") else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": None, "incomplete_details": incomplete,
            "instructions": body.get("instructions"), "max_output_tokens": self.output_cap,
            "model": model or body.get("model"), "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": body.get("temperature", 1.0), "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
            "user": body.get("user"), "metadata": body.get("metadata") or {},
        }

    def call_item(self, index: int, call_id: str, chat_name: str, arguments: str, status: str) -> dict:
        name, namespace, freeform = self.tools.called.get(chat_name, (chat_name, None, False))
        if freeform:
            try:
                value = json.loads(arguments).get("input")
            except (ValueError, AttributeError):
                value = None
            item = {"type": "custom_tool_call", "id": self.item_id("ctc", index), "call_id": call_id, "name": name,
                    "input": value if isinstance(value, str) else arguments}
        else:
            item = {"type": "function_call", "id": self.item_id("fc", index), "call_id": call_id, "name": name,
                    "arguments": arguments, "status": status}
        if namespace:
            item["namespace"] = namespace
        return item

    def message_item(self, index: int, text: str, status: str) -> dict:
        return {"type": "message", "id": self.item_id("msg", index), "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def from_chat(self, reply: dict) -> dict:
        """The response for a whole chat completion."""
        choices = reply.get("choices") if isinstance(reply, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        finish = choice.get("finish_reason")
        output = []
        text = message.get("content")
        if isinstance(text, str) and text:
            output.append(self.message_item(len(output), text, "completed"))
        if message.get("refusal"):
            output.append({"type": "message", "id": self.item_id("msg", len(output)), "status": "completed",
                           "role": "assistant", "content": [{"type": "refusal", "refusal": message["refusal"]}]})
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if not isinstance(call, dict):
                continue
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            output.append(self.call_item(len(output), call.get("id") or "", function.get("name") or "",
                                         function.get("arguments") or "", "completed"))
        status = "incomplete" if finish in ("length", "content_filter") else "completed"
        return self.response(status=status, output=output, usage=_usage(reply.get("usage")), model=reply.get("model"),
                             finish=finish)

    def stream(self) -> StreamTranslator:
        return StreamTranslator(self)


class StreamTranslator:
    """Chat completion chunks in, the Responses API's events out."""

    def __init__(self, translation: Translation):
        self.t = translation
        self.sequence = 0
        self.output: list[dict] = []  # finished items, by output index
        self.text_index: int | None = None  # the open message item
        self.text = ""
        self.calls: dict[int, dict] = {}  # chat tool call index -> {output_index, id, name, arguments}
        self.finish: str | None = None
        self.usage = None
        self.model = None

    def _event(self, kind: str, **fields) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(event)

    def start(self) -> list[bytes]:
        response = self.t.response(status="in_progress", output=[], usage=None)
        return [self._event("response.created", response=response), self._event("response.in_progress",
                                                                                 response=response)]

    def _next_index(self) -> int:
        return len(self.output) + (self.text_index is not None) + len(self.calls)

    def _close_text(self) -> list[bytes]:
        if self.text_index is None:
            return []
        index, item = self.text_index, self.t.message_item(self.text_index, self.text, "completed")
        part = item["content"][0]
        self.output.append(item)
        self.text_index = None
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=self.text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def feed(self, block: bytes) -> list[bytes]:
        """Events for one chat chunk (an SSE block)."""
        payload = b"".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
        try:
            chunk = json.loads(payload) if payload and payload != b"[DONE]" else None
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            return []
        self.model = chunk.get("model") or self.model
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        out = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # a response has one reply
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._text_delta(delta["content"])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict):
                    out += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _text_delta(self, text: str) -> list[bytes]:
        out = []
        if self.text_index is None:
            self.text_index, self.text = self._next_index(), ""
            item = self.t.message_item(self.text_index, "", "in_progress")
            item["content"] = []
            out += [self._event("response.output_item.added", output_index=self.text_index, item=item),
                    self._event("response.content_part.added", item_id=item["id"], output_index=self.text_index,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                       "logprobs": []})]
        self.text += text
        return out + [self._event("response.output_text.delta", item_id=self.t.item_id("msg", self.text_index),
                                  output_index=self.text_index, content_index=0, delta=text, logprobs=[])]

    def _call_delta(self, call: dict) -> list[bytes]:
        out = []
        index = call.get("index") if isinstance(call.get("index"), int) else 0
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        open_call = self.calls.get(index)
        if open_call is None:
            out += self._close_text()
            open_call = self.calls[index] = {"output_index": self._next_index(), "id": call.get("id") or "",
                                             "name": function.get("name") or "", "arguments": ""}
            item = self.t.call_item(open_call["output_index"], open_call["id"], open_call["name"], "", "in_progress")
            open_call["freeform"] = item["type"] == "custom_tool_call"
            out.append(self._event("response.output_item.added", output_index=open_call["output_index"],
                                   item=item | ({"input": ""} if open_call["freeform"] else {})))
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            open_call["arguments"] += piece
            if not open_call["freeform"]:  # a freeform input is sent whole once its JSON is complete
                item_id = self.t.item_id("fc", open_call["output_index"])
                out.append(self._event("response.function_call_arguments.delta", item_id=item_id,
                                       output_index=open_call["output_index"], delta=piece))
        return out

    def close(self) -> list[bytes]:
        """The events that end the stream: the open items done, then response.completed (or
        .incomplete) with the usage."""
        out = self._close_text()
        for call in self.calls.values():
            item = self.t.call_item(call["output_index"], call["id"], call["name"], call["arguments"], "completed")
            if call["freeform"]:
                out += [self._event("response.custom_tool_call_input.delta", item_id=item["id"],
                                    output_index=call["output_index"], delta=item["input"]),
                        self._event("response.custom_tool_call_input.done", item_id=item["id"],
                                    output_index=call["output_index"], input=item["input"])]
            else:
                out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                       output_index=call["output_index"], name=item["name"],
                                       arguments=call["arguments"]))
            out.append(self._event("response.output_item.done", output_index=call["output_index"], item=item))
            self.output.append(item)
        self.calls = {}
        self.output.sort(key=lambda item: int(item["id"].rsplit("_", 1)[1]))
        status = "incomplete" if self.finish in ("length", "content_filter") else "completed"
        response = self.t.response(status=status, output=self.output, usage=_usage(self.usage),
                                   model=self.model, finish=self.finish)
        return out + [self._event(f"response.{status}", response=response)]

    def error(self, message: str) -> list[bytes]:
        return [self._event("error", code="api_error", message=message, param=None)]
