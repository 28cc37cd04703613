"""API keys are authenticated here and nowhere else: for the REST API (DRF calls `authenticate`) and
for the gateway (`aidentify`, on its event loop). Both parse the presented key, find its identity
in the shared cache (or load and cache it) and admit it against that identity, with the same code."""

from __future__ import annotations

from datetime import datetime

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed

from apikeys import secrets
from apikeys.services import (
    KeyIdentity,
    KeyRefused,
    admit,
    cache_key,
    identity_load,
    presented,
    record_use,
    use_to_record,
)
from portal import shared_cache
from portal.async_db import in_thread
from portal.models import Member


def presented_key(headers) -> str | None:
    """A key from `Authorization: Bearer ...` or `x-api-key` (what the OpenAI and Anthropic SDKs send)."""
    header = headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return headers.get("X-Api-Key") or None


def _admitted(parts: secrets.ParsedKey, identity: KeyIdentity | None, ip: str | None) -> tuple[KeyIdentity, datetime]:
    if identity is None:
        raise KeyRefused("Invalid API key: no such key.")
    return identity, admit(parts, identity, ip=ip)


class ApiKeyAuthentication(BaseAuthentication):
    """A member's API key as `Authorization: Bearer tap_...` or `x-api-key: tap_...`."""

    def authenticate(self, request):
        raw_key = presented_key(request.headers)
        if raw_key is None:
            return None  # not a key request: the next authentication class decides
        try:
            identity = self.identify(raw_key, ip=request.META.get("REMOTE_ADDR"))
        except KeyRefused as refused:
            raise AuthenticationFailed(str(refused)) from None
        owner = Member.all_objects.select_related("user").filter(pk=identity.member_id, is_active=True).first()
        if owner is None:
            raise AuthenticationFailed("API key refused: the key's owner is no longer an active member.")
        return owner.user, identity

    def authenticate_header(self, request):
        return "Bearer"

    @staticmethod
    def identify(raw_key: str, *, ip: str | None) -> KeyIdentity:
        """The identity of a presented key, or KeyRefused saying why."""
        parts = presented(raw_key)
        identity = shared_cache.get(cache_key(parts.public_id)) or identity_load(parts.public_id)
        identity, now = _admitted(parts, identity, ip)
        if use_to_record(parts.public_id):
            record_use(parts.public_id, identity.id, now)
        return identity

    @staticmethod
    async def aidentify(raw_key: str, *, ip: str | None, cached=lambda public_id: []) -> tuple[KeyIdentity, dict]:
        """identify() on the event loop: the identity, and the shared-cache entries `cached(public id)`
        names, read in the same round trip (the gateway's catalog). Only a cache miss or a use to
        record takes a thread."""
        parts = presented(raw_key)
        wanted = [cache_key(parts.public_id), *cached(parts.public_id)]
        found = await shared_cache.aget_many(wanted)
        identity = found.pop(wanted[0], None) or await in_thread(identity_load)(parts.public_id)
        identity, now = _admitted(parts, identity, ip)
        if use_to_record(parts.public_id):
            await in_thread(record_use)(parts.public_id, identity.id, now)
        return identity, found


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "A member's API key (tap_...), also accepted as x-api-key."}
