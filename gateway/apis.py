"""The provider APIs the gateway speaks, one row per endpoint: its path, the key scope that allows
it, whose API it is (the error shape, and which providers serve it) and the provider's path.

The scopes are those of apikeys.models.ENDPOINTS (a test holds the two together).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    name: str  # as usage records and the bounds know it
    path: str  # the gateway's own path
    scope: str  # the key scope that allows it
    family: str  # "openai" or "anthropic": whose API, so whose error shape and which providers
    upstream: str  # the path at the provider, after its base URL
    metered: bool = True  # counting endpoints are free: no hold, no usage record


ENDPOINTS = {e.name: e for e in (
    Endpoint("chat", "/v1/chat/completions", "chat", "openai", "/chat/completions"),
    Endpoint("responses", "/v1/responses", "responses", "openai", "/responses"),
    Endpoint("input_tokens", "/v1/responses/input_tokens", "responses", "openai", "/responses/input_tokens",
             metered=False),
    Endpoint("completions", "/v1/completions", "completions", "openai", "/completions"),
    Endpoint("embeddings", "/v1/embeddings", "embeddings", "openai", "/embeddings"),
    Endpoint("moderations", "/v1/moderations", "moderations", "openai", "/moderations"),
    Endpoint("messages", "/v1/messages", "messages", "anthropic", "/messages"),
    Endpoint("count_tokens", "/v1/messages/count_tokens", "messages", "anthropic", "/messages/count_tokens",
             metered=False),
)}
SCOPE_PATHS = {e.scope: e.path for e in reversed(ENDPOINTS.values())}  # a scope's main path, for messages
