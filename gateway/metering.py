"""The gateway's database side: who is calling, what the model costs, the hold, and the settlement.

`begin` authenticates the key, checks its scopes, prices the worst case and takes the hold;
`finish` settles the hold with the usage the provider reported (or releases it) and writes the
usage record, in one transaction. Key identities and each organization's catalog are cached in
the shared cache and dropped the moment they change (apikeys.signals, gateway.signals).

The async views call `abegin` and `afinish`. On PostgreSQL, with the key and catalog cached, they
never leave the event loop: one cache read, then one ledger statement each (portal.async_db).
Everything rarer (a cache miss, a refusal, a retry, a hold already closed, SQLite) is `begin` or
`finish` in a worker thread, so the rules are written once.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from decimal import Decimal

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections, connection, transaction
from django.urls import reverse
from django.utils import timezone

from allowances import ledger
from allowances.models import CatalogModel
from apikeys.services import KeyIdentity, KeyRefused, admit, authenticate, presented, record_use, use_to_record
from apikeys.services import cache_key as identity_cache_key
from gateway import sandbox
from gateway.models import ProviderConnection, UsageRecord
from gateway.upstream import Usage
from portal import async_db
from portal.models import Organization
from portal.tenancy import scope, unscoped

CONFIG_TTL = 300
MILLION = Decimal(1_000_000)

# What each gateway endpoint is called in a key's scopes, and which provider API it speaks.
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings", "messages": "/v1/messages"}
ENDPOINT_FAMILY = {"chat": "openai", "embeddings": "openai", "messages": "anthropic"}


class GatewayError(Exception):
    """A refusal in the API's own words: HTTP status, error type (OpenAI-style) and message."""

    def __init__(self, status: int, kind: str, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.code, self.param = status, kind, message, code, param


@dataclass(frozen=True)
class ModelRoute:
    model_id: str
    provider_model: str
    is_active: bool
    family: str  # "openai", "anthropic" or "any" (sandbox)
    is_sandbox: bool
    base_url: str
    secret_ciphertext: str
    connect_timeout: int
    read_timeout: int
    connection_active: bool
    max_output_tokens: int
    multipliers: tuple[Decimal, Decimal, Decimal]  # input, output, cached
    prices: tuple[Decimal, Decimal, Decimal]  # per million tokens

    def weighted(self, usage: Usage) -> int:
        """The tokens counted against the allowance: the multiplied sum, rounded up."""
        (m_in, m_out, m_cached), denominator = self._integer_multipliers
        return -(-(usage.input * m_in + usage.output * m_out + usage.cached * m_cached) // denominator)

    @functools.cached_property
    def _integer_multipliers(self) -> tuple[tuple[int, int, int], int]:
        # The multipliers as whole numbers over one denominator: exact like Decimal arithmetic, and
        # a usage batch prices 1,000 events (Decimal was a fifth of validating one).
        ratios = [multiplier.as_integer_ratio() for multiplier in self.multipliers]
        denominator = math.lcm(*(d for _, d in ratios))
        return tuple(n * (denominator // d) for n, d in ratios), denominator

    def cost(self, usage: Usage) -> Decimal:
        p_in, p_out, p_cached = self.prices
        return (usage.input * p_in + usage.output * p_out + usage.cached * p_cached) / MILLION


@dataclass(frozen=True)
class OrgConfig:
    organization_id: int
    slug: str
    models: dict[str, ModelRoute]


def in_thread(function):
    # Not thread-sensitive: requests run their database work side by side in a pool of threads,
    # each with its own persistent connection, instead of queueing for one thread.
    return sync_to_async(function, thread_sensitive=False)


def config_cache_key(organization_id: int) -> str:
    return f"gateway:org:{organization_id}"


def _load_config(organization_id: int) -> OrgConfig:
    with unscoped():
        organization = Organization.objects.get(pk=organization_id)
        catalog = CatalogModel.all_objects.filter(organization_id=organization_id).select_related("connection")
        models = {}
        for entry in catalog:
            connection: ProviderConnection = entry.connection
            models[entry.model_id] = ModelRoute(
                model_id=entry.model_id, provider_model=entry.provider_model, is_active=entry.is_active,
                family=connection.family, is_sandbox=connection.is_sandbox, base_url=connection.base_url,
                secret_ciphertext=connection.secret_ciphertext, connect_timeout=connection.connect_timeout,
                read_timeout=connection.read_timeout, connection_active=connection.is_active,
                max_output_tokens=entry.max_output_tokens,
                multipliers=(entry.input_multiplier, entry.output_multiplier, entry.cached_multiplier),
                prices=(entry.input_price_per_million, entry.output_price_per_million,
                        entry.cached_price_per_million))
    return OrgConfig(organization_id=organization_id, slug=organization.slug, models=models)


def org_config(organization_id: int) -> OrgConfig:
    config = cache.get(config_cache_key(organization_id))
    if config is None:
        config = _load_config(organization_id)
        cache.set(config_cache_key(organization_id), config, timeout=CONFIG_TTL)
    return config


def invalidate_config(organization_id: int) -> None:
    """Drop the cached catalog now and again on commit (a request may read the old rows meanwhile)."""
    cache.delete(config_cache_key(organization_id))
    transaction.on_commit(lambda: cache.delete(config_cache_key(organization_id)))


def models_for(identity: KeyIdentity, config: OrgConfig) -> list[ModelRoute]:
    """The catalog models a key may call (for GET /v1/models)."""
    return [route for route in config.models.values()
            if route.is_active and route.connection_active
            and (not identity.model_ids or route.model_id in identity.model_ids)]


# -- a request -----------------------------------------------------------------------------------


@dataclass
class Begun:
    identity: KeyIdentity
    config: OrgConfig
    route: ModelRoute
    endpoint: str
    hold: ledger.Hold
    input_estimate: int
    request_id: str
    started: float
    stream: bool = False


def lookup(*, raw_key: str | None, ip: str | None, endpoint: str | None) -> tuple[KeyIdentity, OrgConfig]:
    """The key's identity and its organization's catalog; GatewayError if the key may not call `endpoint`."""
    _require_key(raw_key)
    try:
        identity = authenticate(raw_key, ip=ip)
    except KeyRefused as refused:
        raise _key_refused(refused) from None
    _check_endpoint(identity, endpoint)
    return identity, org_config(identity.organization_id)


_organization_of: dict[str, int] = {}  # a key's public id -> its organization, which never changes


async def _cached_lookup(*, raw_key: str | None, ip: str | None,
                         endpoint: str) -> tuple[KeyIdentity, OrgConfig] | None:
    """lookup() from the cache alone, without leaving the event loop; None when either is not cached.

    The identity is read from the cache on every request (a revocation drops it there); only its
    organization is remembered here, so that the catalog comes in the same round trip.
    """
    _require_key(raw_key)
    try:
        parts = presented(raw_key)
        wanted = [identity_cache_key(parts.public_id)]
        if parts.public_id in _organization_of:
            wanted.append(config_cache_key(_organization_of[parts.public_id]))
        found = await cache.aget_many(wanted)
        identity = found.get(wanted[0])
        if identity is None:
            return None
        now = admit(parts, identity, ip=ip)
    except KeyRefused as refused:
        raise _key_refused(refused) from None
    _check_endpoint(identity, endpoint)
    _organization_of[parts.public_id] = identity.organization_id
    config_key = config_cache_key(identity.organization_id)
    config = found.get(config_key) if config_key in wanted else (await cache.aget_many([config_key])).get(config_key)
    if config is None:
        return None
    if use_to_record(parts.public_id):
        await in_thread(record_use)(parts.public_id, identity.id, now)
    return identity, config


def _require_key(raw_key: str | None) -> None:
    if not raw_key:
        raise GatewayError(401, "authentication_error",
                           "No API key: send it as `Authorization: Bearer tap_...` or `x-api-key: tap_...`.",
                           code="missing_api_key")


def _key_refused(refused: KeyRefused) -> GatewayError:
    return GatewayError(401, "authentication_error", str(refused), code="invalid_api_key")


def _check_endpoint(identity: KeyIdentity, endpoint: str | None) -> None:
    if endpoint is not None and endpoint not in identity.endpoints:
        allowed = ", ".join(ENDPOINT_PATHS.get(e, e) for e in identity.endpoints) or "none"
        raise GatewayError(403, "permission_error",
                           f"This API key may not call {ENDPOINT_PATHS[endpoint]}; its endpoints are: {allowed}.",
                           code="endpoint_not_allowed")


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GatewayError(400, "invalid_request_error", f"`{name}` must be a positive whole number.", param=name)
    return value


def _route(identity: KeyIdentity, config: OrgConfig, endpoint: str, body: dict) -> ModelRoute:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "invalid_request_error", "`model` is required (a model id from GET /v1/models).",
                           param="model")
    route = config.models.get(model)
    if route is None or not route.is_active:
        raise GatewayError(404, "not_found_error",
                           f"The model `{model}` is not in your organization's catalog; GET /v1/models lists yours.",
                           code="model_not_found", param="model")
    if identity.model_ids and model not in identity.model_ids:
        raise GatewayError(403, "permission_error", f"This API key may not use the model `{model}`; it may use: "
                           f"{', '.join(identity.model_ids)}.", code="model_not_allowed", param="model")
    family = ENDPOINT_FAMILY[endpoint]
    if route.family not in ("any", family):
        right = "/v1/messages" if route.family == "anthropic" else "/v1/chat/completions"
        raise GatewayError(400, "invalid_request_error",
                           f"The model `{model}` is served by an {route.family.title()} provider: call {right}.",
                           param="model")
    if not route.connection_active:
        raise GatewayError(503, "api_error", f"The provider for `{model}` is switched off by your administrators.",
                           code="provider_disabled")
    return route


def estimate_input_tokens(endpoint: str, body: dict) -> int:
    """An upper-leaning guess of the prompt's tokens, from its size (about 3 bytes a token, and more
    than the words a tokenizer splits); the settlement uses the provider's own count."""
    if endpoint == "embeddings":
        text = json.dumps(body.get("input"), ensure_ascii=False)
    else:
        text = json.dumps([body.get("system"), body.get("messages"), body.get("tools")], ensure_ascii=False)
    return len(text.encode()) // 3 + 8


def _reserve(route: ModelRoute, endpoint: str, body: dict) -> tuple[int, int]:
    """The request's input estimate and the tokens to hold: its worst case."""
    if endpoint == "embeddings":
        max_output = 0
    else:
        max_output = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
        if endpoint == "messages" and max_output is None:
            raise GatewayError(400, "invalid_request_error", "`max_tokens` is required.", param="max_tokens")
        max_output = max_output or route.max_output_tokens
        if route.is_sandbox:
            max_output = min(max_output, sandbox.MAX_REPLY_TOKENS)  # its replies are never longer
        if endpoint == "chat":
            max_output *= _positive_int(body, "n") or 1  # every choice may be as long
    input_estimate = estimate_input_tokens(endpoint, body)
    return input_estimate, max(route.weighted(Usage(input=input_estimate, output=max_output)), 1)


def _reference(request_id: str) -> str:
    return f"request:{request_id}"[:100]


def _hold_args(identity: KeyIdentity, route: ModelRoute, reserve: int, request_id: str) -> dict:
    return {"account": ledger.AccountRef(pk=identity.account_id, organization_id=identity.organization_id),
            "tokens": reserve, "idempotency_key": request_id, "model": route.model_id,
            "reference": _reference(request_id), "api_key_id": identity.id, "spend_id": identity.spend_id}


def begin(*, raw_key: str | None, ip: str | None, endpoint: str, body: dict, request_id: str, started: float) -> Begun:
    close_old_connections()
    identity, config = lookup(raw_key=raw_key, ip=ip, endpoint=endpoint)
    route = _route(identity, config, endpoint, body)
    input_estimate, reserve = _reserve(route, endpoint, body)
    organization = Organization(pk=identity.organization_id, slug=config.slug)
    if identity.account_id is None:
        _refused(identity, organization, route, endpoint, request_id, started, "no allowance")
        raise GatewayError(429, "insufficient_quota", "You have no token allowance in this organization yet; "
                           f"ask your HR team. {_more_url(config)}", code="insufficient_quota")
    with scope(organization):
        try:
            hold = ledger.authorize(**_hold_args(identity, route, reserve, request_id))
        except (ledger.InsufficientTokens, ledger.KeyCapExceeded) as refusal:
            _refused(identity, organization, route, endpoint, request_id, started, str(refusal))
            raise GatewayError(429, "insufficient_quota", _refusal_message(refusal, config), code="insufficient_quota")
    return Begun(identity=identity, config=config, route=route, endpoint=endpoint, hold=hold,
                 input_estimate=input_estimate, request_id=request_id, started=started,
                 stream=bool(body.get("stream")))


async def abegin(*, raw_key: str | None, ip: str | None, endpoint: str, body: dict, request_id: str,
                 started: float) -> Begun:
    """begin() without leaving the event loop in the common case on PostgreSQL: the key and catalog
    come from the cache and the hold is one statement on an async connection. Anything else (a
    cache miss, a refusal, SQLite) is begin() itself in a thread; it is safe to call after a hold
    statement that posted nothing, as the hold's idempotency key is the request id."""
    request = {"raw_key": raw_key, "ip": ip, "endpoint": endpoint, "body": body, "request_id": request_id,
               "started": started}
    found = await _cached_lookup(raw_key=raw_key, ip=ip, endpoint=endpoint) if async_db.available() else None
    if found is None or found[0].account_id is None:
        return await in_thread(begin)(**request)
    identity, config = found
    route = _route(identity, config, endpoint, body)
    input_estimate, reserve = _reserve(route, endpoint, body)
    statement = ledger.hold_statement(**_hold_args(identity, route, reserve, request_id))
    entry_id = await _post(statement)
    if entry_id is None:
        return await in_thread(begin)(**request)
    return Begun(identity=identity, config=config, route=route, endpoint=endpoint,
                 hold=ledger.hold_made(statement, entry_id), input_estimate=input_estimate, request_id=request_id,
                 started=started, stream=bool(body.get("stream")))


async def _post(statement: ledger.Statement, with_entry: str = "", params: dict | None = None) -> int | None:
    """Run a ledger statement on an async connection: the new entry's id, or None if nothing was posted.

    A connection found dead (the server restarted since it was last used) is replaced once: running
    the statement again is safe, as a post that did commit posts nothing the second time (its
    idempotency key), and the caller's fallback then finds it.
    """
    for attempt in (1, 2):
        try:
            async with async_db.connection() as conn, conn.cursor() as cursor:
                await cursor.execute(statement.sql(with_entry), statement.params | (params or {}), prepare=True)
                row = await cursor.fetchone()
            return row[0] if row else None
        except psycopg.OperationalError:
            if attempt == 2:
                raise


def _more_url(config: OrgConfig) -> str:
    return f"Request more at {settings.PORTAL_BASE_URL}{reverse('dashboard', kwargs={'org_slug': config.slug})}"


def _refusal_message(refusal, config: OrgConfig) -> str:
    if isinstance(refusal, ledger.KeyCapExceeded):
        return (f"This request may use up to {refusal.requested:,} tokens, but this API key's own cap of "
                f"{refusal.cap:,} tokens per period has {max(refusal.cap - refusal.spent, 0):,} left. "
                "Use a key with a larger cap, or lower max_tokens.")
    remaining = max(refusal.available + refusal.overdraft_limit, 0)
    return (f"Token allowance exceeded: this request may use up to {refusal.requested:,} tokens and your remaining "
            f"balance is {remaining:,} tokens. Lower max_tokens, or ask for more. {_more_url(config)}")


def _refused(identity, organization, route, endpoint, request_id, started, detail) -> None:
    with scope(organization):
        UsageRecord.objects.create(
            organization=organization, member_id=identity.member_id, api_key_id=identity.id, model=route.model_id,
            endpoint=endpoint, status=UsageRecord.Status.REFUSED, request_id=request_id, detail=detail[:300],
            latency_ms=int((time.perf_counter() - started) * 1000))


def _outcome(begun: Begun, *, status: str, usage: Usage | None, produced_tokens: int, latency_ms: int,
             detail: str) -> tuple[Usage, dict]:
    """What the request consumed, and its usage record (a dict of `_RECORD_VALUES`' parameters).

    With no usage from the provider, a request that produced output (a stream cut short, or one
    that ended without its usage chunk) is charged its estimated input plus the text it produced:
    a fault to record, never free.
    """
    if usage is not None and status != UsageRecord.Status.OK:
        # Cut short: the output reported so far (Anthropic counts as it goes) may lag the text sent.
        usage = Usage(input=usage.input, output=max(usage.output, produced_tokens), cached=usage.cached)
    if usage is None:
        if status == UsageRecord.Status.OK:
            status = UsageRecord.Status.NO_USAGE_REPORTED
        usage = Usage(input=begun.input_estimate, output=produced_tokens) if (
            produced_tokens or status == UsageRecord.Status.NO_USAGE_REPORTED) else Usage()
    record = {"org": begun.identity.organization_id, "member": begun.identity.member_id,
              "api_key": begun.identity.id, "model": begun.route.model_id, "endpoint": begun.endpoint,
              "status": status, "input": usage.input, "output": usage.output, "cached": usage.cached,
              "charged": begun.route.weighted(usage), "cost": begun.route.cost(usage),
              "latency": min(latency_ms, 2**31 - 1), "request_id": begun.request_id, "detail": detail[:300],
              "at": timezone.now()}
    return usage, record


def _consumed(usage: Usage, record: dict) -> bool:
    return bool(record["charged"] or usage.input or usage.output or usage.cached)


def _release_reason(record: dict) -> str:
    return f"{record['status']}: nothing consumed"


def finish(begun: Begun, *, status: str, usage: Usage | None, produced_tokens: int = 0, latency_ms: int,
           detail: str = "") -> int:
    """Settle the hold with what the request consumed (or release it) and record the request, in
    one transaction; returns the tokens charged."""
    close_old_connections()
    usage, record = _outcome(begun, status=status, usage=usage, produced_tokens=produced_tokens,
                             latency_ms=latency_ms, detail=detail)
    organization = Organization(pk=begun.identity.organization_id, slug=begun.config.slug)
    with scope(organization), transaction.atomic():
        if _consumed(usage, record):
            posted = ledger.settle(hold=begun.hold, used_tokens=record["charged"],
                                   reference=_reference(begun.request_id))
        else:
            posted = ledger.release(hold=begun.hold, reason=_release_reason(record))
        if posted is None or posted.created:  # a finish run again records its request once
            _insert_record(record)
    return record["charged"]


async def afinish(begun: Begun, *, status: str, usage: Usage | None, produced_tokens: int = 0, latency_ms: int,
                  detail: str = "") -> int:
    """finish() in one statement on an async connection (PostgreSQL): the post that closes the hold,
    and the usage record written by the same statement only if that post was made. Nothing posted
    (the hold already closed, e.g. released after its time-to-live) leaves nothing written, and
    finish() itself, in a thread, does it all and says why."""
    outcome = {"status": status, "usage": usage, "produced_tokens": produced_tokens, "latency_ms": latency_ms,
               "detail": detail}
    if not async_db.available():
        return await in_thread(finish)(begun, **outcome)
    usage, record = _outcome(begun, **outcome)
    if _consumed(usage, record):
        statement = ledger.settle_statement(hold=begun.hold, used_tokens=record["charged"],
                                            reference=_reference(begun.request_id))
    else:
        statement = ledger.release_statement(hold=begun.hold, reason=_release_reason(record))
    # org, api_key and model name the same things in the ledger's parameters and the record's.
    if await _post(statement, _RECORD_WITH_ENTRY, record) is None:
        return await in_thread(finish)(begun, **outcome)
    return record["charged"]


_RECORD_INSERT = (f"INSERT INTO {UsageRecord._meta.db_table} (organization_id, member_id, api_key_id, model, "
                  "endpoint, source, status, input_tokens, output_tokens, cached_tokens, charged_tokens, cost, "
                  "latency_ms, request_id, idempotency_key, detail, occurred_at)")
_RECORD_VALUES = ("%(org)s, %(member)s, %(api_key)s, %(model)s, %(endpoint)s, 'gateway', %(status)s, %(input)s, "
                  "%(output)s, %(cached)s, %(charged)s, %(cost)s, %(latency)s, %(request_id)s, '', %(detail)s, "
                  "%(at)s")
_RECORD_SQL = f"{_RECORD_INSERT} VALUES ({_RECORD_VALUES})"
_RECORD_WITH_ENTRY = f", record AS ({_RECORD_INSERT} SELECT {_RECORD_VALUES} FROM entry)"


def _insert_record(record: dict) -> None:
    """One usage record, written by hand with a prepared plan on PostgreSQL (the ORM's insert cost
    as much as the ledger statement on this hot path)."""
    if connection.vendor == "postgresql":
        with psycopg.Cursor(connection.connection) as cursor:
            cursor.execute(_RECORD_SQL, record, prepare=True)
        return
    with connection.cursor() as cursor:
        cursor.execute(_RECORD_SQL, record | {"at": connection.ops.adapt_datetimefield_value(record["at"]),
                                              "cost": connection.ops.adapt_decimalfield_value(record["cost"])})


def sandbox_limit(begun: Begun, body: dict) -> int:
    return (body.get("max_completion_tokens") or body.get("max_tokens") or begun.route.max_output_tokens)
