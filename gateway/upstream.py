"""Talking to providers: one pooled async HTTP client per event loop, and reading usage from replies.

The gateway passes a provider's bytes through as they arrive. For streams it reads each
server-sent event as it goes by, to find the usage the provider reports (OpenAI's last chunk
when `stream_options.include_usage` is set, which the gateway always asks for; Anthropic's
`message_start` and `message_delta`) and to count the text produced, so that a stream cut short
is still charged for what it produced.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

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
        connector = aiohttp.TCPConnector(limit=200, ttl_dns_cache=300, resolver=_PermittedResolver(),
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


class StreamReader:
    """Splits a provider's server-sent events, remembers the usage they report and the text they carry."""

    def __init__(self, family: str, *, pass_usage_chunk: bool):
        self.family = family
        self.pass_usage_chunk = pass_usage_chunk
        self.usage: Usage | None = None
        self.produced_text_tokens = 0
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The complete events in `data` (with what came before), each to send on or not."""
        self._buffer += data.replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            if self._read(block):
                out.append(block + b"\n\n")
        return out

    @staticmethod
    def is_final(block: bytes) -> bool:
        """The event that tells a client the stream is complete."""
        return block.startswith(b"data: [DONE]") or block.startswith(b"event: message_stop")

    def _read(self, block: bytes) -> bool:
        payload = b"".join(line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:"))
        if not payload or payload == b"[DONE]":
            return True
        try:
            event = json.loads(payload)
        except ValueError:
            return True
        if not isinstance(event, dict):
            return True
        if self.family == "anthropic":
            self._read_anthropic(event)
            return True
        if isinstance(event.get("usage"), dict):
            self.usage = Usage.from_openai(event["usage"])
            if not event.get("choices"):
                return self.pass_usage_chunk  # the chunk the gateway asked for, not the client
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                self.produced_text_tokens += sandbox.count_tokens(content)
        return True

    def _read_anthropic(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            reported = message.get("usage") if isinstance(message, dict) else None
            if isinstance(reported, dict) and reported:  # a start without usage leaves it unknown, not zero
                self.usage = Usage.from_anthropic(reported)
        elif kind == "message_delta" and isinstance(event.get("usage"), dict):
            # Its counts are cumulative: the output so far, and the input and cache again (they grow
            # when the provider's own tools add input).
            reported = Usage.from_anthropic(event["usage"])
            if reported is None:
                self.usage = None  # malformed: no usage this stream can be trusted for
                return
            known = self.usage or Usage()
            self.usage = Usage(input=max(known.input, reported.input), output=reported.output,
                               cached=max(known.cached, reported.cached))
        elif kind == "content_block_delta":
            delta = event.get("delta")
            text = delta.get("text") if isinstance(delta, dict) else None
            if isinstance(text, str):
                self.produced_text_tokens += sandbox.count_tokens(text)


def provider_headers(family: str, secret: str) -> dict:
    if family == "anthropic":
        return {"x-api-key": secret, "anthropic-version": "2023-06-01", "content-type": "application/json"}
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
