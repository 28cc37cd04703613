"""Talking to providers: one pooled async HTTP client per event loop, and reading usage from replies.

The gateway passes a provider's bytes through as they arrive. For streams it reads each
server-sent event as it goes by, to find the usage the provider reports (OpenAI's last chunk
when `stream_options.include_usage` is set, which the gateway always asks for on chat and legacy
completions; Anthropic's `message_start` and `message_delta`; the Responses API's
`response.completed`) and to count the text produced (text, tool arguments, reasoning), so that
a stream cut short is still charged for what it produced.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from django.conf import settings

from gateway import destinations, sandbox

_sessions: dict[int, aiohttp.ClientSession] = {}
# What a provider call can raise: no answer in time (connect or between bytes), or a broken connection.
UpstreamTimeout = asyncio.TimeoutError
UpstreamError = aiohttp.ClientError


class UpstreamRefused(UpstreamError):
    """The gateway stopped a provider call itself; `client_message` tells the caller why."""

    client_message: str


class ProviderAddressRefused(UpstreamRefused):
    """The provider's address is internal (gateway.destinations): nothing was sent to it."""

    client_message = ("The provider connection points at an internal network address, which the gateway does not "
                      "connect to; nothing was charged. An administrator must correct its base URL.")


class ProviderRedirected(UpstreamRefused):
    """The provider answered with a redirect, which is never followed (it could lead anywhere)."""

    client_message = ("The provider answered with a redirect, which the gateway does not follow; nothing was "
                      "charged. An administrator should check the provider connection's base URL.")


class _PermittedResolver(AbstractResolver):
    """The system's resolver (getaddrinfo, as the save-time check resolves), with the addresses the
    gateway may not connect to dropped. A name that resolved to a public address when its connection
    was saved and resolves only to internal ones now (DNS rebinding) is refused here, with one clear
    error: refusing each address at the socket instead would make aiohttp fail with an obscure one."""

    def __init__(self):
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        permitted = [result for result in found if destinations.refusal(result["host"]) is None]
        if not permitted:
            raise ProviderAddressRefused(destinations.name_refusal(host, [result["host"] for result in found]))
        return permitted

    async def close(self) -> None:
        await self._resolver.close()


def _permitted_socket(addr_info: aiohttp.AddrInfoType) -> socket.socket:
    """Every socket the gateway opens, checked against its address: aiohttp does not ask the
    resolver about a URL whose host is an IP address, and this also covers resolved names."""
    family, kind, proto, _, address = addr_info
    reason = destinations.refusal(address[0])
    if reason:
        raise ProviderAddressRefused(reason)
    return socket.socket(family=family, type=kind, proto=proto)


async def _refuse_redirects(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType,
                            ) -> aiohttp.ClientResponse:
    """A 3xx answer ends the call before aiohttp could follow it (middlewares run for each hop)."""
    response = await handler(request)
    if 300 <= response.status < 400:
        location = response.headers.get("Location", "")
        response.close()
        raise ProviderRedirected(f"the provider answered {response.status} (to {location[:150]!r}); "
                                 "redirects are not followed")
    return response


def session() -> aiohttp.ClientSession:
    """The pooled HTTP client of the running event loop (a pool cannot be shared across loops)."""
    loop = asyncio.get_running_loop()
    found = _sessions.get(id(loop))
    if found is None or found.closed:
        connector = aiohttp.TCPConnector(limit=settings.GATEWAY_PROVIDER_CONNECTIONS, ttl_dns_cache=300, resolver=_PermittedResolver(),
                                         socket_factory=_permitted_socket)
        found = _sessions[id(loop)] = aiohttp.ClientSession(connector=connector, raise_for_status=False,
                                                            middlewares=(_refuse_redirects,))
    return found


@dataclass
class Usage:
    input: int = 0  # uncached input tokens
    output: int = 0
    cached: int = 0  # input tokens read from the provider's cache

    @classmethod
    def from_openai(cls, usage: dict) -> Usage | None:
        """OpenAI's usage object; None when it is not one (counts that are not whole numbers)."""
        try:
            details = usage.get("prompt_tokens_details") or {}
            cached = _count(details.get("cached_tokens") if isinstance(details, dict) else None)
            prompt = _count(usage.get("prompt_tokens"))
            return cls(input=max(prompt - cached, 0), output=_count(usage.get("completion_tokens")), cached=cached)
        except ValueError:
            return None

    @classmethod
    def from_responses(cls, usage: dict) -> Usage | None:
        """The Responses API's usage object; None when it is not one."""
        try:
            details = usage.get("input_tokens_details") or {}
            cached = _count(details.get("cached_tokens") if isinstance(details, dict) else None)
            return cls(input=max(_count(usage.get("input_tokens")) - cached, 0),
                       output=_count(usage.get("output_tokens")), cached=cached)
        except ValueError:
            return None

    @classmethod
    def from_anthropic(cls, usage: dict) -> Usage | None:
        """Anthropic's usage object; None when it is not one."""
        try:
            return cls(input=_count(usage.get("input_tokens")) + _count(usage.get("cache_creation_input_tokens")),
                       output=_count(usage.get("output_tokens")), cached=_count(usage.get("cache_read_input_tokens")))
        except ValueError:
            return None


MAX_REPORTED_TOKENS = 10**12  # a provider's count beyond this is garbage, not usage


def _count(value) -> int:
    """A token count from a provider's usage: absent is zero; anything but a whole number is refused,
    so that a malformed report is treated as no report (a fault to record) rather than trusted."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
        raise ValueError(f"not a token count: {value!r}")
    return value


# The events that tell a client a stream is complete, by the wire format it is in.
_FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def usage_of(wire: str, data) -> Usage | None:
    """The usage a provider's whole (not streamed) reply reports, in the wire format of `wire`."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    if wire == "messages":
        return Usage.from_anthropic(usage)
    return Usage.from_responses(usage) if wire == "responses" else Usage.from_openai(usage)


class StreamReader:
    """Splits a provider's server-sent events, remembers the usage they report and the text they carry.

    `wire` is the stream's format: "chat" or "completions" (OpenAI's chunks, ended by [DONE]),
    "messages" (Anthropic's events, ended by message_stop) or "responses" (the Responses API's
    events, ended by response.completed, .incomplete or .failed)."""

    def __init__(self, wire: str, *, pass_usage_chunk: bool = True):
        self.wire = wire
        self.pass_usage_chunk = pass_usage_chunk
        self.usage: Usage | None = None
        self.produced_text_tokens = 0
        self.response_id = ""  # the Responses API's id of the response being streamed
        self.sequence_number = -1  # the last Responses event's
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The complete events in `data` (with what came before) to send on, each with whether it is
        the one that tells the client the stream is complete."""
        self._buffer += data.replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            send, final = self._read(block)
            if send:
                out.append((block + b"\n\n", final))
        return out

    def _read(self, block: bytes) -> tuple[bool, bool]:
        payload = b"".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
        if payload == b"[DONE]":
            return True, True
        try:
            event = json.loads(payload) if payload else None
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return True, block.startswith(b"event: message_stop")
        if self.wire == "messages":
            self._read_anthropic(event)
            return True, event.get("type") == "message_stop"
        if self.wire == "responses":
            return True, self._read_responses(event)
        if isinstance(event.get("usage"), dict):
            self.usage = Usage.from_openai(event["usage"])
            if not event.get("choices"):
                return self.pass_usage_chunk, False  # the chunk the gateway asked for, not the client
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            texts = [delta.get("content"), delta.get("reasoning_content"), choice.get("text")]
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                function = call.get("function") if isinstance(call, dict) else None
                texts.append(function.get("arguments") if isinstance(function, dict) else None)
            self.produced_text_tokens += sum(sandbox.count_tokens(t) for t in texts if isinstance(t, str))
        return True, False

    def _read_responses(self, event: dict) -> bool:
        kind = event.get("type")
        if isinstance(event.get("sequence_number"), int):
            self.sequence_number = event["sequence_number"]
        response = event.get("response") if isinstance(event.get("response"), dict) else {}
        if kind == "response.created" and isinstance(response.get("id"), str):
            self.response_id = response["id"]
        if isinstance(kind, str) and kind.endswith(".delta") and isinstance(event.get("delta"), str) and (
                "audio" not in kind):
            self.produced_text_tokens += sandbox.count_tokens(event["delta"])
        if kind in _FINAL_EVENTS:
            if isinstance(response.get("usage"), dict):
                self.usage = Usage.from_responses(response["usage"])
            return True
        return False

    def _read_anthropic(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            reported = message.get("usage") if isinstance(message, dict) else None
            if isinstance(reported, dict) and reported:  # a start without usage leaves it unknown, not zero
                self.usage = Usage.from_anthropic(reported)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            # Its counts are cumulative: the output so far, and (in the current API) the input and
            # cache again, which grow when the provider's own tools add input.
            reported = Usage.from_anthropic(event["usage"])
            if reported is None:
                self.usage = None  # malformed: no usage this stream can be trusted for
                return
            known = self.usage or Usage()
            self.usage = Usage(input=max(known.input, reported.input), output=reported.output,
                               cached=max(known.cached, reported.cached))
        elif kind == "content_block_delta":
            delta = event.get("delta")
            for name in ("text", "partial_json", "thinking"):
                if isinstance(delta, dict) and isinstance(delta.get(name), str):
                    self.produced_text_tokens += sandbox.count_tokens(delta[name])


ANTHROPIC_VERSION = "2023-06-01"


def provider_headers(family: str, secret: str, client_headers=None) -> dict:
    """What a provider call carries: the organization's secret, and for Anthropic the API version
    and beta features the client asked for (its SDK and Claude Code send them)."""
    if family == "anthropic":
        client_headers = client_headers or {}
        headers = {"x-api-key": secret, "content-type": "application/json",
                   "anthropic-version": client_headers.get("anthropic-version") or ANTHROPIC_VERSION}
        if client_headers.get("anthropic-beta"):
            headers["anthropic-beta"] = client_headers["anthropic-beta"]
        return headers
    headers = {"content-type": "application/json"}
    if secret:
        headers["authorization"] = f"Bearer {secret}"
    return headers


def timeouts(connect: int, read: int) -> aiohttp.ClientTimeout:
    """No limit on the whole answer (a long stream is fine), only on connecting and between bytes."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


async def close_session() -> None:
    """Close the running loop's client, for a server that shuts its loop down (tests run several)."""
    found = _sessions.pop(id(asyncio.get_running_loop()), None)
    if found is not None:
        await found.close()
