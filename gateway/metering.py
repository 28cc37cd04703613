"""The gateway's database side: who is calling, what the model costs, the hold, and the settlement.

`begin` authenticates the key, checks its scopes, bounds the request's worst case
(gateway.bounds) and takes the hold; `finish` settles the hold with the usage the provider
reported (or releases it) and writes the usage record in the same statement. Both run on the
event loop: one shared-cache read for the key's identity and its organization's catalog, then one
ledger statement each on the loop's connection pool (portal.async_db), committed together with the
statements of other requests in flight (gateway.batching). What is rare (a cache miss,
a refusal, a retry, a hold closed before it was settled) calls the ledger's own functions in a
worker thread; they say why a statement posted nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from urllib.parse import urlencode

import django.db
import psycopg
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from allowances import ledger
from allowances.aliases import AliasTable
from allowances.models import CatalogModel, ModelAlias
from allowances.pricing import Pricing
from apikeys.authentication import ApiKeyAuthentication
from apikeys.services import KeyIdentity, KeyPaused, KeyRefused
from gateway import alarms, batching, bounds, breaker, sandbox
from gateway.apis import ENDPOINTS, SCOPE_PATHS
from gateway.errors import GatewayError
from gateway.models import BreakerSettings, ProviderConnection, UsageRecord
from gateway.upstream import Usage
from portal import async_db, shared_cache
from portal.async_db import in_thread
from portal.links import public_url
from portal.models import Organization
from portal.tenancy import scope, unscoped

log = logging.getLogger(__name__)
CONFIG_TTL = 300
# The database gone away (restarted, failed over): on the loop's pool or in Django's own connections.
DATABASE_ERRORS = (psycopg.OperationalError, django.db.OperationalError, django.db.InterfaceError)
SETTLE_RETRY_SECONDS = 120  # a settlement waits this long for the database to come back
# While a request runs its hold's expiry is moved on, so the sweeper never releases the hold of a
# stream that outlives the time-to-live; a request that never finished stops being kept after a day.
HOLD_TTL = ledger.HOLD_TTL
HOLD_RENEW_SECONDS = HOLD_TTL.total_seconds() / 3
HOLD_KEPT_AT_MOST = timedelta(days=1)



@dataclass(frozen=True)
class ModelRoute:
    model_id: str
    provider_model: str
    is_active: bool
    kind: str  # the provider connection's kind
    family: str  # "openai", "anthropic" or "any" (sandbox)
    is_sandbox: bool
    has_responses_api: bool  # else /v1/responses is translated into the provider's chat completions
    base_url: str
    secret_ciphertext: str
    connect_timeout: int
    read_timeout: int
    connection_active: bool
    max_output_tokens: int
    pricing: Pricing
    economy_id: str | None = None  # the economy counterpart's model id (budget-aware routing)

    def weighted(self, usage: Usage) -> int:
        return self.pricing.weighted(usage.input, usage.output, usage.cached)

    def cost(self, usage: Usage):
        return self.pricing.cost(usage.input, usage.output, usage.cached)


@dataclass(frozen=True)
class OrgConfig:
    organization_id: int
    slug: str
    models: dict[str, ModelRoute]
    aliases: AliasTable
    breaker: breaker.Limits | None = None  # the spend-velocity limits, if any is set

    def resolve(self, requested: str) -> ModelRoute | None:
        """The catalog model a requested id names, directly or through an alias (allowances.aliases)."""
        model_id = self.aliases.resolve(requested, self.models)
        return self.models.get(model_id) if model_id is not None else None


def config_cache_key(organization_id: int) -> str:
    return f"gateway:org:{organization_id}"


def _load_config(organization_id: int) -> OrgConfig:
    with unscoped():
        organization = Organization.objects.get(pk=organization_id)
        catalog = CatalogModel.all_objects.filter(organization_id=organization_id).select_related(
            "connection", "economy_counterpart")
        models = {}
        for entry in catalog:
            provider: ProviderConnection = entry.connection
            models[entry.model_id] = ModelRoute(
                model_id=entry.model_id, provider_model=entry.provider_model, is_active=entry.is_active,
                kind=provider.kind, family=provider.family, is_sandbox=provider.is_sandbox,
                has_responses_api=provider.has_responses_api, base_url=provider.base_url,
                secret_ciphertext=provider.secret_ciphertext,
                connect_timeout=provider.connect_timeout, read_timeout=provider.read_timeout,
                connection_active=provider.is_active, max_output_tokens=entry.max_output_tokens,
                pricing=entry.pricing,
                economy_id=entry.economy_counterpart.model_id if entry.economy_counterpart else None)
        aliases = AliasTable(ModelAlias.all_objects.filter(organization_id=organization_id)
                             .values_list("alias", "catalog_model__model_id"))
        limits = BreakerSettings.all_objects.filter(organization_id=organization_id).values(
            *BreakerSettings.LIMITS, "member_normal_multiple").first()
    limits = breaker.Limits(**limits) if limits and any(value is not None for value in limits.values()) else None
    return OrgConfig(organization_id=organization_id, slug=organization.slug, models=models, aliases=aliases,
                     breaker=limits)


def org_config(organization_id: int) -> OrgConfig:
    config = shared_cache.get(config_cache_key(organization_id))
    if config is None:
        token = shared_cache.token(config_cache_key(organization_id))
        config = _load_config(organization_id)
        shared_cache.set(config_cache_key(organization_id), config, timeout=CONFIG_TTL, token=token)
    return config


def invalidate_config(organization_id: int) -> None:
    """Drop the cached catalog now and again on commit (a request may read the old rows meanwhile)."""
    shared_cache.delete_many([config_cache_key(organization_id)])
    transaction.on_commit(lambda: shared_cache.delete_many([config_cache_key(organization_id)]))


def _usable(identity: KeyIdentity, route: ModelRoute | None) -> bool:
    return (route is not None and route.is_active and route.connection_active
            and (not identity.model_ids or route.model_id in identity.model_ids))


def models_for(identity: KeyIdentity, config: OrgConfig) -> dict[str, ModelRoute]:
    """The model ids a key may call, with the catalog model each names (for GET /v1/models): its
    catalog models, and the exact aliases of those."""
    usable = {model_id: route for model_id, route in config.models.items() if _usable(identity, route)}
    return usable | {alias: usable[target] for alias, target in config.aliases.exact.items() if target in usable}


def model_for(identity: KeyIdentity, config: OrgConfig, requested: str) -> ModelRoute | None:
    """The catalog model `requested` names, if this key may call it (GET /v1/models/{id})."""
    route = config.resolve(requested)
    return route if _usable(identity, route) else None


# -- a request -----------------------------------------------------------------------------------


@dataclass
class Begun:
    identity: KeyIdentity
    config: OrgConfig
    route: ModelRoute
    endpoint: str
    requested_model: str  # what the client asked for: the route's model id, or an alias of it
    hold: ledger.Hold
    input_bound: int
    output_cap: int  # per choice: what the provider may write, as the forwarded request says
    forward: dict  # set on the forwarded request: the output cap the hold covers
    drop: tuple  # taken out of the forwarded request (a cap field the provider would not honour)
    request_id: str
    started: float
    stream: bool = False
    plan: object = None  # what begin's `plan` made of the request before it was held
    routed_from: str = ""  # the catalog model asked for, when routing sent the request to `route` instead
    keeper: asyncio.Task | None = None  # moves the hold's expiry on while the request runs


_organization_of: dict[str, int] = {}  # a key's public id -> its organization, which never changes


async def lookup(*, raw_key: str | None, ip: str | None, endpoint: str | None) -> tuple[KeyIdentity, OrgConfig]:
    """The key's identity and its organization's catalog (one cache round trip once both are cached);
    GatewayError if the key is refused or may not call `endpoint`."""
    if not raw_key:
        raise GatewayError(401, "authentication_error",
                           "No API key: send it as `Authorization: Bearer tap_...` or `x-api-key: tap_...`.",
                           code="missing_api_key")

    def also_cached(public_id: str) -> list[str]:
        # The catalog comes in the same round trip once this process knows the key's organization.
        known = _organization_of.get(public_id)
        return [config_cache_key(known)] if known is not None else []

    try:
        identity, found = await ApiKeyAuthentication.aidentify(raw_key, ip=ip, cached=also_cached)
    except KeyPaused as paused:
        raise GatewayError(429, "rate_limit_error", str(paused), code="breaker_tripped") from None
    except KeyRefused as refused:
        raise GatewayError(401, "authentication_error", str(refused), code="invalid_api_key") from None
    if endpoint is not None and ENDPOINTS[endpoint].scope not in identity.endpoints:
        allowed = ", ".join(SCOPE_PATHS.get(e, e) for e in identity.endpoints) or "none"
        raise GatewayError(403, "permission_error",
                           f"This API key may not call {ENDPOINTS[endpoint].path}; its endpoints are: {allowed}.",
                           code="endpoint_not_allowed")
    config = found.get(config_cache_key(identity.organization_id))
    if config is None:
        _organization_of[identity.public_id] = identity.organization_id
        config = await in_thread(org_config)(identity.organization_id)
    return identity, config


def route_of(identity: KeyIdentity, config: OrgConfig, endpoint: str, body: dict, *,
             any_family: bool = False) -> ModelRoute:
    """The catalog model the request names (directly or through an alias) and may use on `endpoint`
    (whatever API its provider speaks, with `any_family`: counting tokens works for every model)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "invalid_request_error", "`model` is required (a model id from GET /v1/models).",
                           param="model")
    route = config.resolve(model)
    if route is None or not route.is_active:
        raise GatewayError(404, "not_found_error",
                           f"The model `{model}` is not in your organization's catalog; GET /v1/models lists yours.",
                           code="model_not_found", param="model")
    if identity.model_ids and route.model_id not in identity.model_ids:
        named = model if model == route.model_id else f"{model}` (an alias of `{route.model_id}`)"
        raise GatewayError(403, "permission_error", f"This API key may not use the model `{named}`; it may use: "
                           f"{', '.join(identity.model_ids)}.", code="model_not_allowed", param="model")
    family = ENDPOINTS[endpoint].family
    if route.family not in ("any", family) and not any_family:
        right = "/v1/messages" if route.family == "anthropic" else "/v1/chat/completions or /v1/responses"
        raise GatewayError(400, "invalid_request_error",
                           f"The model `{model}` is served by an {route.family.title()} provider: call {right}.",
                           param="model")
    if not route.connection_active:
        raise GatewayError(503, "api_error", f"The provider for `{model}` is switched off by your administrators.",
                           code="provider_disabled")
    return route


def most_output(route: ModelRoute) -> int:
    """The most the model writes in one reply: the catalog's maximum (the sandbox writes less)."""
    return min(route.max_output_tokens, sandbox.MAX_REPLY_TOKENS) if route.is_sandbox else route.max_output_tokens


def cap_field(route: ModelRoute) -> str:
    """Where chat completions carry the output cap: OpenAI's own API wants max_completion_tokens."""
    return "max_completion_tokens" if route.kind == ProviderConnection.Kind.OPENAI else "max_tokens"


def _bound(route: ModelRoute, endpoint: str, body: dict) -> bounds.Bound:
    return bounds.bound(endpoint, ENDPOINTS[endpoint].family, body, most_output=most_output(route),
                        cap_field=cap_field(route), image_tokens=sandbox.IMAGE_TOKENS if route.is_sandbox else None)


def _covering_translation(route: ModelRoute, worst: bounds.Bound, *, chat: dict) -> bounds.Bound:
    """A translated request's provider reads the chat body it is sent, which can be larger than the
    request the client sent (namespaces prefixed to tool names, parameters given to freeform
    tools): the hold covers the larger of the two."""
    sent = _bound(route, "chat", chat)
    return replace(worst, input_tokens=max(worst.input_tokens, sent.input_tokens))


def _planned(route: ModelRoute, worst: bounds.Bound, plan) -> tuple[bounds.Bound, object]:
    """The request's plan on `route` (see begin), and its worst case covering what the plan sends."""
    planned = plan(route, worst) if plan is not None else None
    if planned is not None:
        worst = _covering_translation(route, worst, chat=planned[0])
    return worst, planned


def _reserve(route: ModelRoute, worst: bounds.Bound) -> int:
    """The tokens to hold for a request's worst case."""
    return max(route.weighted(Usage(input=worst.input_tokens, output=worst.output_cap * worst.choices)), 1)


def _responses_of(identity: KeyIdentity, response_id: str):
    """The usage record of a Responses API response the key's member made through the gateway."""
    with unscoped():
        return UsageRecord.all_objects.filter(organization_id=identity.organization_id, member_id=identity.member_id,
                                              endpoint="responses", response_id=response_id).order_by("-id")


def response_model(identity: KeyIdentity, response_id: str) -> str | None:
    """The catalog model id of a response the key's member made through the gateway, or None."""
    return _responses_of(identity, response_id).values_list("model", flat=True).first()


def _continued(identity: KeyIdentity, route: ModelRoute, worst: bounds.Bound) -> bounds.Bound:
    """The bound of a request that continues a stored response: the provider counts that response's
    whole conversation (its input, cached input and output) as input again."""
    if not route.has_responses_api:
        raise GatewayError(400, "invalid_request_error", (
            f"The model `{route.model_id}` is served by a provider without stored responses, so "
            "`previous_response_id` cannot be used with it: send the whole conversation as `input`."),
                           param="previous_response_id")
    earlier = _responses_of(identity, worst.previous_response_id).values_list(
        "input_tokens", "cached_tokens", "output_tokens").first()
    if earlier is None:
        raise GatewayError(400, "invalid_request_error", (
            f"No response `{worst.previous_response_id}` was made through the portal by you, so what it adds to "
            "this request cannot be held: send the whole conversation as `input` instead."),
                           param="previous_response_id")
    return bounds.Bound(input_tokens=worst.input_tokens + sum(earlier), output_cap=worst.output_cap,
                        choices=worst.choices, forward=worst.forward)


def _reference(request_id: str) -> str:
    return f"request:{request_id}"[:100]


def _hold_args(identity: KeyIdentity, route: ModelRoute, reserve: int, request_id: str,
               economy: Economy | None) -> dict:
    return {"account": ledger.AccountRef(pk=identity.account_id, organization_id=identity.organization_id),
            "tokens": reserve, "idempotency_key": request_id, "model": route.model_id, "ttl": HOLD_TTL,
            "reference": _reference(request_id), "api_key_id": identity.id, "spend_id": identity.spend_id,
            "economy": ledger.Economy(tokens=economy.reserve, model=economy.route.model_id,
                                      below_percent=identity.economy_below_percent) if economy else None,
            "pool_account_id": identity.pool_account_id}


@dataclass(frozen=True)
class Economy:
    """The economy counterpart a request may be routed to, bounded and planned like the request."""

    route: ModelRoute
    worst: bounds.Bound
    reserve: int
    plan: object


def _economy(identity: KeyIdentity, config: OrgConfig, route: ModelRoute, endpoint: str, body: dict,
             worst: bounds.Bound, plan) -> Economy | None:
    """Where budget-aware routing may send this request: the model's economy counterpart, if the
    member's policy routes, the key has not opted out, the key may use it and it speaks the
    endpoint's API (a client only ever gets a reply it can read). The ledger decides whether it
    does (ledger.Economy), on the locked account. A continued response stays with its provider."""
    if (identity.economy_below_percent is None or not identity.economy_routing or route.economy_id is None
            or worst.previous_response_id is not None):
        return None
    economy = config.models.get(route.economy_id)
    if (not _usable(identity, economy) or economy.family not in ("any", ENDPOINTS[endpoint].family)
            or economy.model_id == route.model_id):
        return None
    try:
        bound, planned = _planned(economy, _bound(economy, endpoint, body), plan)
        return Economy(route=economy, worst=bound, reserve=_reserve(economy, bound), plan=planned)
    except GatewayError:
        return None  # the economy model cannot take this request as it is: no routing


async def begin(*, raw_key: str | None, ip: str | None, endpoint: str, body: dict, request_id: str,
                started: float, plan=None) -> Begun:
    """Authenticate, check and hold the request's worst case; GatewayError if it may not go ahead.

    `plan(route, bound)`, if given, is called before anything is held (it may refuse the request
    with a GatewayError); what it returns is the Begun's `plan`: None, or a translation
    `(chat body, how to answer)` whose chat body the hold covers as well."""
    try:
        return await _begin(raw_key=raw_key, ip=ip, endpoint=endpoint, body=body, request_id=request_id,
                            started=started, plan=plan)
    except DATABASE_ERRORS as error:
        log.warning("request %s refused, the database is unavailable: %s", request_id, error)
        raise database_unavailable() from None


def database_unavailable() -> GatewayError:
    return GatewayError(503, "api_error", "The portal's database is unavailable for a moment; nothing was charged. "
                        "Try again shortly.", code="database_unavailable")


async def _begin(*, raw_key, ip, endpoint, body, request_id, started, plan) -> Begun:
    identity, config = await lookup(raw_key=raw_key, ip=ip, endpoint=endpoint)
    route = route_of(identity, config, endpoint, body)
    worst = _bound(route, endpoint, body)
    if worst.previous_response_id is not None:
        worst = await in_thread(_continued)(identity, route, worst)
    worst, planned = _planned(route, worst, plan)
    reserve = _reserve(route, worst)
    requested = body["model"]
    refusal = {"identity": identity, "config": config, "route": route, "endpoint": endpoint,
               "requested": requested, "request_id": request_id, "started": started}
    if identity.account_id is None:
        await in_thread(_refused)(detail="no allowance", **refusal)
        raise GatewayError(429, "insufficient_quota", "You have no token allowance in this organization yet; "
                           f"ask your HR team. {_more_url(config)}", code="insufficient_quota")
    economy = _economy(identity, config, route, endpoint, body, worst, plan)
    args = _hold_args(identity, route, reserve, request_id, economy)
    statement = ledger.hold_statement(**args)
    row = await _run(statement, orphan=_released_if_orphaned(statement))
    # Nothing posted: a retry of this request (its hold exists) or a refusal; the ledger says which.
    hold = ledger.hold_made(statement, *row) if row is not None else await in_thread(_authorize)(args, refusal)
    routed_from = ""
    if economy is not None and hold.model == economy.route.model_id:
        routed_from, route, worst, planned = route.model_id, economy.route, economy.worst, economy.plan
    begun = Begun(identity=identity, config=config, route=route, endpoint=endpoint, requested_model=requested,
                  hold=hold, input_bound=worst.input_tokens, output_cap=worst.output_cap, forward=worst.forward,
                  drop=worst.drop, request_id=request_id, started=started,
                  stream=endpoint != "embeddings" and body.get("stream") is True, plan=planned,
                  routed_from=routed_from)
    begun.keeper = asyncio.create_task(_keep(hold))
    return begun


async def _keep(hold: ledger.Hold) -> None:
    """Move the hold's expiry on every HOLD_RENEW_SECONDS until finish() cancels this."""
    deadline = time.monotonic() + HOLD_KEPT_AT_MOST.total_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(HOLD_RENEW_SECONDS)
        sql, params = ledger.hold_extension(hold=hold, ttl=HOLD_TTL)
        try:
            async with (await async_db.pool()).connection() as conn:
                await conn.execute(sql, params)
        except DATABASE_ERRORS as error:  # tried again at the next turn; the hold has TTL to spare
            log.warning("could not extend hold %s: %s", hold.id, error)


def _authorize(args: dict, refusal: dict) -> ledger.Hold:
    with scope(Organization(pk=refusal["identity"].organization_id, slug=refusal["config"].slug)):
        try:
            return ledger.authorize(**args)
        except (ledger.InsufficientTokens, ledger.KeyCapExceeded) as refused:
            _refused(detail=str(refused), **refusal)
            raise GatewayError(429, "insufficient_quota", _refusal_message(refused, refusal["config"], args["model"]),
                               code="insufficient_quota") from None


async def _run(statement: ledger.Statement, with_entry: str = "", params: dict | None = None, *,
               orphan=None) -> tuple | None:
    """Run a ledger statement on the loop's pool, with the statements of other requests that come at
    the same time (gateway.batching): the row of the new entry (its id; a routed hold's model too),
    or None if nothing was posted. `orphan(row)`: the statement that undoes the post if this
    request is cancelled before it has the row."""
    return await batching.run(batching.post_of(statement, with_entry, params), orphan=orphan)


def _released_if_orphaned(statement: ledger.Statement):
    """For a hold's statement: the release of the hold it made, for a request that is gone."""
    def release(row: tuple) -> batching.Post:
        hold = ledger.hold_made(statement, *row)
        return batching.post_of(ledger.release_statement(hold=hold, reason="the request was cancelled"))

    return release


def _more_url(config: OrgConfig, *, tokens: int | None = None, model: str = "") -> str:
    """The overage request form, filled in with what the refused request was short of."""
    query = urlencode({name: value for name, value in (("tokens", tokens), ("model", model)) if value})
    path = reverse("overage_request_new", kwargs={"org_slug": config.slug})
    return f"Request more at {public_url(path)}{'?' + query if query else ''}"


def _refusal_message(refusal, config: OrgConfig, model: str = "") -> str:
    if isinstance(refusal, ledger.KeyCapExceeded):
        return (f"This request may use up to {refusal.requested:,} tokens, but this API key's own cap of "
                f"{refusal.cap:,} tokens per period has {max(refusal.cap - refusal.spent, 0):,} left. "
                "Use a key with a larger cap, or lower max_tokens.")
    remaining = max(refusal.available + refusal.overdraft_limit, 0)
    return (f"Token allowance exceeded: this request may use up to {refusal.requested:,} tokens and your remaining "
            f"balance is {remaining:,} tokens. Lower max_tokens, or ask for more. "
            f"{_more_url(config, tokens=refusal.requested - remaining, model=model)}")


def _refused(*, identity, config, route, endpoint, requested, request_id, started, detail) -> None:
    with scope(Organization(pk=identity.organization_id, slug=config.slug)):
        UsageRecord.objects.create(
            organization_id=identity.organization_id, member_id=identity.member_id, api_key_id=identity.id,
            model=route.model_id, requested_model=_requested(route, requested), endpoint=endpoint,
            status=UsageRecord.Status.REFUSED, request_id=request_id,
            detail=detail[:300], latency_ms=int((time.perf_counter() - started) * 1000))


def _requested(route: ModelRoute, requested: str) -> str:
    """The id the client sent, for the record: kept when it was an alias ("" when it is the model's own)."""
    return "" if requested == route.model_id else requested[:100]


def _outcome(begun: Begun, *, status: str, usage: Usage | None, produced_tokens: int, latency_ms: int,
             detail: str, response_id: str = "") -> tuple[Usage, dict]:
    """What the request consumed, and its usage record (a dict of `_RECORD_VALUES`' parameters).

    With no usage from the provider, a request that produced output (a stream cut short, or one
    that ended without its usage chunk) is charged its input bound plus the text it produced:
    a fault to record, never free. What the hold does not cover is never charged: it is recorded
    as uncharged, a fault that admins are told about.
    """
    if usage is not None and status != UsageRecord.Status.OK:
        # Cut short: the output reported so far (Anthropic counts as it goes) may lag the text sent.
        usage = Usage(input=usage.input, output=max(usage.output, produced_tokens), cached=usage.cached)
    if usage is None:
        if status == UsageRecord.Status.OK:
            status = UsageRecord.Status.NO_USAGE_REPORTED
        usage = Usage(input=begun.input_bound, output=produced_tokens) if (
            produced_tokens or status == UsageRecord.Status.NO_USAGE_REPORTED) else Usage()
    counted = begun.route.weighted(usage)
    charged = min(counted, begun.hold.tokens)
    if counted > charged:
        detail = (f"the provider reported {counted:,} tokens, {counted - charged:,} more than the hold covered; "
                  f"they were not charged. {detail}").strip()
    record = {"org": begun.identity.organization_id, "member": begun.identity.member_id,
              "api_key": begun.identity.id, "model": begun.route.model_id,
              "requested": _requested(begun.route, begun.requested_model), "routed_from": begun.routed_from,
              "endpoint": begun.endpoint,
              "status": status, "input": usage.input, "output": usage.output, "cached": usage.cached,
              "charged": charged, "uncharged": counted - charged, "cost": begun.route.cost(usage),
              "latency": min(latency_ms, 2**31 - 1), "request_id": begun.request_id, "detail": detail[:300],
              "response_id": response_id[:100], "at": timezone.now()}
    return usage, record


def _consumed(usage: Usage, record: dict) -> bool:
    return bool(record["charged"] or usage.input or usage.output or usage.cached)


async def finish(begun: Begun, *, status: str, usage: Usage | None, produced_tokens: int = 0, latency_ms: int,
                 detail: str = "", response_id: str = "") -> int:
    """Settle the hold with what the request consumed (or release it) and record the request; returns
    the tokens charged. One statement: the post that closes the hold, and the usage record written
    by the same statement only if that post was made. When it posts nothing (a finish run again, or
    a hold released after its time-to-live) the ledger's own settle or release says why.

    With the database away, it is tried again until it is back (for SETTLE_RETRY_SECONDS): every
    step is idempotent, so a settlement that did commit before its answer was lost is not repeated.
    """
    if begun.keeper is not None:
        begun.keeper.cancel()
    usage, record = _outcome(begun, status=status, usage=usage, produced_tokens=produced_tokens,
                             latency_ms=latency_ms, detail=detail, response_id=response_id)
    deadline, pause = time.monotonic() + SETTLE_RETRY_SECONDS, 0.25
    while True:
        try:
            return await _settle(begun, usage, record)
        except DATABASE_ERRORS as error:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("settling request %s waits for the database: %s", begun.request_id, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5)


async def _settle(begun: Begun, usage: Usage, record: dict) -> int:
    if _consumed(usage, record):
        statement = ledger.settle_statement(hold=begun.hold, used_tokens=record["charged"],
                                            reference=_reference(begun.request_id))
    else:
        statement = ledger.release_statement(hold=begun.hold, reason=f"{record['status']}: nothing consumed")
    # org, api_key and model name the same things in the ledger's parameters and the record's.
    if await _run(statement, _RECORD_WITH_ENTRY, record) is None:
        record, recorded = await in_thread(_finish_closed)(begun, usage, record)
    else:
        recorded = True
    if recorded and record["uncharged"]:
        await in_thread(alarms.uncharged_usage)(organization_id=record["org"], record=record)
    if recorded and record["charged"] and begun.config.breaker is not None:
        await _count_spend(begun, record["charged"])
    return record["charged"]


async def _count_spend(begun: Begun, charged: int) -> None:
    """The breaker's rates move by what was charged (gateway.breaker); a limit passed pauses keys."""
    identity = begun.identity
    try:
        exceeded = await breaker.record(
            subjects={"key": identity.id, "member": identity.member_id, "organization": identity.organization_id},
            limits=begun.config.breaker, tokens=charged, normal_hour=identity.normal_hour_tokens)
        if exceeded is not None:
            from gateway.services import breaker_trip  # the services import this module

            await in_thread(breaker_trip)(organization_id=identity.organization_id, exceeded=exceeded)
    except Exception:  # the request is settled; the breaker must never fail it
        log.exception("spend-velocity breaker failed after request %s", begun.request_id)


def _finish_closed(begun: Begun, usage: Usage, record: dict) -> tuple[dict, bool]:
    """finish() for a hold closed before: a retry records nothing more; usage after the sweeper
    released the hold is charged as far as the allowance's limit allows, the rest recorded as
    uncharged; a request that consumed nothing is recorded once whoever released its hold. The
    record, and whether this call wrote it."""
    with scope(Organization(pk=begun.identity.organization_id, slug=begun.config.slug)), transaction.atomic():
        if _consumed(usage, record):
            posted = ledger.settle(hold=begun.hold, used_tokens=record["charged"],
                                   reference=_reference(begun.request_id))
            charged = ledger.settled_tokens(hold=begun.hold)
            record = record | {"charged": charged, "uncharged": record["uncharged"] + record["charged"] - charged}
        else:
            posted = ledger.release(hold=begun.hold, reason=f"{record['status']}: nothing consumed")
        # Bounded in time to use the (organization, occurred at) index: no request runs for a day.
        recorded = (posted is not None and posted.created) or not UsageRecord.objects.filter(
            request_id=begun.request_id, occurred_at__gte=record["at"] - timedelta(days=1)).exists()
        if recorded:
            with connection.cursor() as cursor:
                cursor.execute(_RECORD_SQL, record)
    return record, recorded


_RECORD_INSERT = (f"INSERT INTO {UsageRecord._meta.db_table} (organization_id, member_id, api_key_id, model, "
                  "requested_model, routed_from, endpoint, source, status, input_tokens, output_tokens, cached_tokens, "
                  "charged_tokens, uncharged_tokens, cost, latency_ms, request_id, response_id, idempotency_key, "
                  "detail, occurred_at)")
_RECORD_VALUES = ("%(org)s, %(member)s, %(api_key)s, %(model)s, %(requested)s, %(routed_from)s, %(endpoint)s, 'gateway', %(status)s, "
                  "%(input)s, %(output)s, %(cached)s, %(charged)s, %(uncharged)s, %(cost)s, %(latency)s, "
                  "%(request_id)s, %(response_id)s, '', %(detail)s, %(at)s")
_RECORD_SQL = f"{_RECORD_INSERT} VALUES ({_RECORD_VALUES})"
_RECORD_WITH_ENTRY = f", record AS ({_RECORD_INSERT} SELECT {_RECORD_VALUES} FROM entry)"
