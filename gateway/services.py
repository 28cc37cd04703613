"""Writes for the gateway: provider connections (audited; secrets never are), and usage and holds
reported by an organization's own gateway through the REST API."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import URLValidator
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from allowances import ledger
from allowances.models import MAX_TOKENS, Account, LedgerEntry
from allowances.selectors import pool_account_id
from apikeys.models import ApiKey
from apikeys.services import invalidate as invalidate_keys
from gateway import alarms, breaker, crypto, destinations
from gateway.metering import org_config
from gateway.models import BreakerSettings, BreakerTrip, ProviderConnection, SpendNormal, UsageRecord
from gateway.upstream import Usage
from portal.audit import changes, log_action
from portal.forms import FIRST_DAY
from portal.models import Member, Organization
from portal.tenancy import scope, unscoped

log = logging.getLogger(__name__)
CONNECTION_FIELDS = ["name", "kind", "base_url", "connect_timeout", "read_timeout", "responses_api", "is_active"]


def _clean_connection(organization: Organization, data: dict, *, exclude_pk=None) -> dict:
    errors = {}
    name = str(data.get("name") or "").strip()
    if not name:
        errors["name"] = "Name the connection."
    elif ProviderConnection.objects.filter(organization=organization, name=name).exclude(pk=exclude_pk).exists():
        errors["name"] = f"There is already a connection named {name}."
    kind = data.get("kind")
    if kind not in ProviderConnection.Kind.values:
        errors["kind"] = "Choose a kind of provider."
    base_url = str(data.get("base_url") or "").strip().rstrip("/")
    if kind == ProviderConnection.Kind.SANDBOX:
        base_url = ""
    elif not base_url:
        errors["base_url"] = "Enter the provider's API address, e.g. https://api.openai.com/v1."
    else:
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError:
            errors["base_url"] = "Enter an http(s) address."
        else:
            refused = destinations.url_refusal(base_url)
            if refused:
                errors["base_url"] = (f"Provider addresses must be public: {refused}. A self-hosted server on an "
                                      "internal network must first be allowed by the platform's operator.")
    cleaned = {"name": name, "kind": kind, "base_url": base_url, "is_active": bool(data.get("is_active", True)),
               # Only an OpenAI-compatible server may or may not have it (OpenAI's own API always has).
               "responses_api": kind == ProviderConnection.Kind.OPENAI_COMPATIBLE and bool(data.get("responses_api"))}
    for field, ceiling in (("connect_timeout", 60), ("read_timeout", 3600)):
        try:
            value = int(str(data.get(field)).strip())
            if not 0 < value <= ceiling:
                raise ValueError
        except (TypeError, ValueError):
            errors[field] = f"Whole seconds from 1 to {ceiling}."
            continue
        cleaned[field] = value
    if errors:
        raise ValidationError(errors)
    return cleaned


def _set_secret(connection: ProviderConnection, secret: str | None) -> bool:
    """Store a new secret (None keeps the current one, "" clears it). True when it changed."""
    if secret is None:
        return False
    secret = secret.strip()
    connection.secret_ciphertext = crypto.encrypt(secret)
    connection.secret_last_four = secret[-4:] if len(secret) >= 12 else ""
    return True


@transaction.atomic
def provider_connection_create(*, organization: Organization, actor, secret: str = "", **data) -> ProviderConnection:
    connection = ProviderConnection(organization=organization, **_clean_connection(organization, data))
    _set_secret(connection, secret)
    connection.save()
    log_action(actor=actor, organization=organization, action="provider_connection.created", obj=connection,
               data={field: getattr(connection, field) for field in CONNECTION_FIELDS}
               | {"secret": "set" if secret else "none"})
    return connection


@transaction.atomic
def provider_connection_update(*, connection: ProviderConnection, actor, secret: str | None = None,
                               **data) -> ProviderConnection:
    merged = {field: getattr(connection, field) for field in CONNECTION_FIELDS} | data
    cleaned = _clean_connection(connection.organization, merged, exclude_pk=connection.pk)
    diff = changes(connection, cleaned.keys(), cleaned)
    for field, value in cleaned.items():
        setattr(connection, field, value)
    if _set_secret(connection, secret):
        diff["secret"] = "replaced" if secret else "cleared"
    connection.save()
    if diff:
        log_action(actor=actor, organization=connection.organization, action="provider_connection.updated",
                   obj=connection, data=diff)
    return connection


# -- usage from an organization's own gateway -------------------------------------------------------

MAX_EVENTS = 1000
# An event's idempotency key; the ledger entry's own key adds a prefix within its 200 characters.
MAX_EVENT_KEY = 150
MAX_EVENT_TOKENS = 10**9  # per kind in one event: more is a typo, not a request
# The first moment an event may name: the pages' first day (older is a typo, and a year before 1
# in a zone east of UTC is a time PostgreSQL stores but can no longer read back).
EARLIEST_EVENT = datetime.combine(FIRST_DAY, time.min, tzinfo=dt_timezone.utc)


@dataclass
class _Event:
    index: int
    key: str
    member_id: int
    account_id: int
    api_key_id: int | None
    spend_id: int | None
    model: str
    usage: Usage
    charged: int
    cost: Decimal
    occurred_at: datetime


def _public_id(value) -> str:
    """The public id of a key named as `tap_<id>` (or the id alone): 12 characters."""
    return str(value).removeprefix("tap_")[:12]


def _storable(value) -> bool:
    """Text that PostgreSQL can store and the JSON answer can repeat: no NUL character and no
    unpaired surrogate (both parse from JSON escapes)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _whole(value, name: str, errors: dict, *, required: bool = False) -> int:
    if value is None and not required:
        return 0
    if type(value) is float and value.is_integer():
        value = int(value)  # 5.0 is an integer to JSON Schema, as the API's schema says
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EVENT_TOKENS:
        errors[name] = f"A whole number of tokens from 0 to {MAX_EVENT_TOKENS:,}."
        return 0
    return value


def _clean_event(raw, index: int, *, config, members: dict, keys: dict, accounts: dict, now: datetime):
    """(_Event, None) or (None, {field: message}) for one event of a batch."""
    if not isinstance(raw, dict):
        return None, {"event": "Each event is a JSON object."}
    errors: dict = {}
    key = raw.get("idempotency_key")
    if not isinstance(key, str) or not 0 < len(key.strip()) <= MAX_EVENT_KEY:
        errors["idempotency_key"] = (f"Required: a string of 1 to {MAX_EVENT_KEY} characters that identifies "
                                     "this event.")
    elif not _storable(key):
        errors["idempotency_key"] = "Must not contain NUL characters or unpaired surrogates."
    route = config.models.get(raw.get("model")) if isinstance(raw.get("model"), str) else None
    if route is None:
        errors["model"] = "Not a model of this organization's catalog."
    usage = Usage(input=_whole(raw.get("input_tokens"), "input_tokens", errors, required=True),
                  output=_whole(raw.get("output_tokens"), "output_tokens", errors),
                  cached=_whole(raw.get("cached_tokens"), "cached_tokens", errors))
    member_id = api_key_id = spend_id = None
    if ("api_key" in raw) == ("member" in raw):
        errors["member"] = "Name the member (email) or the API key (tap_<id>), one of them."
    elif "api_key" in raw:
        found = keys.get(_public_id(raw["api_key"]))
        if found is None:
            errors["api_key"] = "No API key with this id in the organization."
        else:
            api_key_id, member_id, spend_id = found
    else:
        member_id = members.get(str(raw["member"]).strip().lower())
        if member_id is None:
            errors["member"] = "No member with this email in the organization."
    occurred_at = now
    if raw.get("timestamp") is not None:
        try:
            parsed = parse_datetime(raw["timestamp"]) if isinstance(raw["timestamp"], str) else None
        except ValueError:  # well formed but impossible, e.g. February 30
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            errors["timestamp"] = "An ISO 8601 time with its offset, e.g. 2026-11-23T10:00:00Z."
        elif parsed > now + timedelta(minutes=5):
            errors["timestamp"] = "In the future."
        elif parsed < EARLIEST_EVENT:
            errors["timestamp"] = f"Before {EARLIEST_EVENT:%Y-%m-%d}: not a time usage happened."
        else:
            occurred_at = parsed
    if member_id is not None and member_id not in accounts and not errors:
        errors["member"] = "This member has no allowance account yet."
    if errors:
        return None, errors
    return _Event(index=index, key=key.strip(), member_id=member_id, account_id=accounts[member_id],
                  api_key_id=api_key_id, spend_id=spend_id, model=route.model_id, usage=usage,
                  charged=route.weighted(usage), cost=route.cost(usage), occurred_at=occurred_at), None


def usage_ingest(*, organization: Organization, actor, events: list) -> list[dict]:
    """Record a batch of usage that happened elsewhere; one answer per event, in order.

    Each event is counted once whatever the retries: its idempotency key is unique per
    organization. Usage is a fact, so it is recorded even beyond the balance. Good events are
    applied even when others in the batch are rejected.
    """
    if not isinstance(events, list) or not events:
        raise ValidationError({"events": "A non-empty list of usage events."})
    if len(events) > MAX_EVENTS:
        raise ValidationError({"events": f"At most {MAX_EVENTS} events per batch; this one has {len(events)}."})
    config = org_config(organization.pk)
    # Values the database could not even compare are left out of the look-ups (their events are
    # answered "no member" or "no API key").
    emails = {str(e["member"]).strip().lower() for e in events
              if isinstance(e, dict) and "member" in e and _storable(str(e["member"]))}
    key_ids = {_public_id(e["api_key"]) for e in events
               if isinstance(e, dict) and "api_key" in e and _storable(str(e["api_key"]))}
    members = dict(Member.objects.filter(organization=organization, user__email__in=emails)
                   .values_list("user__email", "pk")) if emails else {}
    members = {email.lower(): pk for email, pk in members.items()}
    keys = {public_id: (pk, member_id, spend_id) for public_id, pk, member_id, spend_id in
            ApiKey.objects.filter(organization=organization, public_id__in=key_ids)
            .values_list("public_id", "pk", "member_id", "spend_id")} if key_ids else {}
    member_ids = set(members.values()) | {member_id for _, member_id, _ in keys.values()}
    accounts = dict(Account.objects.filter(organization=organization, member_id__in=member_ids)
                    .values_list("member_id", "pk"))
    now = timezone.now()
    answers, good, seen = [], [], set()
    for index, raw in enumerate(events):
        event, errors = _clean_event(raw, index, config=config, members=members, keys=keys, accounts=accounts, now=now)
        if event is not None and event.key in seen:
            event, errors = None, None
            answers.append({"index": index, "idempotency_key": raw["idempotency_key"], "status": "duplicate"})
            continue
        if event is None:
            given = raw.get("idempotency_key") if isinstance(raw, dict) else None
            answers.append({"index": index, "idempotency_key": given if _storable(given) else None,
                            "status": "rejected", "errors": errors})
            continue
        seen.add(event.key)
        good.append(event)
        answers.append({"index": index, "idempotency_key": event.key, "status": "recorded",
                        "charged_tokens": event.charged})
    recorded = _apply_usage(organization, actor, good) if good else set()
    for answer in answers:
        if answer["status"] == "recorded" and answer["idempotency_key"] not in recorded:
            answer["status"] = "duplicate"  # an earlier batch recorded it
            del answer["charged_tokens"]
    return answers


_ACCOUNT, _RECORD = Account._meta.db_table, UsageRecord._meta.db_table
# One statement for a whole batch: the usage records that are new (idempotency key not yet seen in
# the organization), and through the ledger's set of posts a usage entry for each, moving the
# accounts and key spend counters. The events arrive as one JSON document: psycopg renders a
# Python list as an array literal element by element, which for 11 columns of 1,000 events cost
# more than the statement's own work.
_INGEST_SQL = f"""
WITH ev AS (
    SELECT * FROM ROWS FROM (json_to_recordset(%(events)s::json) AS (
        key text, member_id bigint, api_key_id bigint, model text, input bigint, output bigint, cached bigint,
        charged bigint, cost numeric, at timestamptz, account_id bigint)) WITH ORDINALITY AS t(
        key, member_id, api_key_id, model, input, output, cached, charged, cost, at, account_id, position)),
rec AS (
    INSERT INTO {_RECORD} (organization_id, member_id, api_key_id, model, endpoint, source, status, input_tokens,
                           output_tokens, cached_tokens, charged_tokens, cost, latency_ms, request_id,
                           idempotency_key, detail, occurred_at)
    SELECT %(org)s, member_id, api_key_id, model, 'ingest', 'ingest', 'ok', input, output, cached, charged, cost, 0,
           '', key, '', at FROM ev ORDER BY position
    ON CONFLICT DO NOTHING RETURNING idempotency_key),
usage_entries AS (
    SELECT ev.position, ev.account_id, '{LedgerEntry.Kind.USAGE}' AS kind, ev.charged AS tokens, a.period_start,
           'ingest:' || ev.key AS idempotency_key, '' AS reason, 'usage ingest' AS reference, ev.model,
           %(actor)s::bigint AS actor_id, ev.api_key_id
    FROM ev JOIN rec ON rec.idempotency_key = ev.key JOIN {_ACCOUNT} a ON a.id = ev.account_id),
{ledger.post_set_sql("usage_entries", order_by="e.position", keyed=True)}
SELECT idempotency_key FROM rec"""


@transaction.atomic
def _apply_usage(organization: Organization, actor, events: list[_Event]) -> set[str]:
    """Apply the batch; the idempotency keys that were new (the others were recorded before)."""
    rows = [{"key": e.key, "member_id": e.member_id, "api_key_id": e.api_key_id, "model": e.model,
             "input": e.usage.input, "output": e.usage.output, "cached": e.usage.cached, "charged": e.charged,
             "cost": str(e.cost), "at": e.occurred_at.isoformat(), "account_id": e.account_id}  # exact as text
            for e in events]
    ledger.lock(account_ids=[e.account_id for e in events], spend_ids=[e.spend_id for e in events if e.spend_id])
    recorded = ledger.post_set(_INGEST_SQL, {"actor": getattr(actor, "pk", None), "events": json.dumps(rows)},
                               organization_id=organization.pk)
    return {row[0] for row in recorded}


# -- holds for an organization's own gateway ------------------------------------------------------------


def _member_of(organization: Organization, *, member_email=None, api_key=None):
    """(member_id, account, api_key_id, spend_id) named by an email or a key id, or ValidationError."""
    if (member_email is None) == (api_key is None):
        raise ValidationError({"member": "Name the member (email) or the API key (tap_<id>), one of them."})
    api_key_id = spend_id = None
    if api_key is not None:
        key = ApiKey.objects.filter(organization=organization, public_id=_public_id(api_key)).select_related(
            "member__user").first()
        if key is None:
            raise ValidationError({"api_key": "No API key with this id in the organization."})
        refusal = key.refusal() or (None if key.member.is_active and key.member.user.is_active
                                    else "its owner is no longer an active member")
        if refusal:  # a hold for a key that may not be used would let it spend
            raise ValidationError({"api_key": f"This API key cannot be used: {refusal}."})
        api_key_id, member_id, spend_id = key.pk, key.member_id, key.spend_id
    else:
        member_id = Member.objects.filter(organization=organization, user__email__iexact=str(member_email).strip(),
                                          is_active=True).values_list("pk", flat=True).first()
        if member_id is None:
            raise ValidationError({"member": "No active member with this email in the organization."})
    account = Account.objects.filter(organization=organization, member_id=member_id).first()
    if account is None:
        raise ValidationError({"member": "This member has no allowance account yet."})
    return member_id, account, api_key_id, spend_id


def hold_authorize(*, organization: Organization, actor, model: str, input_tokens: int, max_output_tokens: int,
                   idempotency_key: str, member_email=None, api_key=None, ttl_seconds: int | None = None) -> ledger.Hold:
    """Reserve the worst case of a request about to run elsewhere (ledger.InsufficientTokens or
    KeyCapExceeded if it does not fit). Retrying with the same idempotency key returns the same hold."""
    route = org_config(organization.pk).models.get(model)
    if route is None:
        raise ValidationError({"model": "Not a model of this organization's catalog."})
    member_id, account, api_key_id, spend_id = _member_of(organization, member_email=member_email, api_key=api_key)
    tokens = max(route.weighted(Usage(input=input_tokens, output=max_output_tokens)), 1)
    ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else ledger.HOLD_TTL
    # The team pool covers what the member's own base allowance does not, as in the gateway.
    pool = pool_account_id(member=Member.objects.get(pk=member_id))
    return ledger.authorize(account=account, tokens=tokens, idempotency_key=f"api:{idempotency_key}", ttl=ttl,
                            model=model, reference="authorize API", actor=actor, api_key_id=api_key_id,
                            spend_id=spend_id, pool_account_id=pool)


def hold_settle(*, organization: Organization, actor, hold_id: int, input_tokens: int, output_tokens: int,
                cached_tokens: int = 0) -> tuple[int, bool]:
    """Settle a hold taken with hold_authorize: (tokens charged, whether this call settled it).

    A retry answers with the first settlement and records nothing more."""
    hold = ledger.hold_find(organization_id=organization.pk, hold_id=hold_id)
    if hold is None:
        raise ValidationError({"hold_id": "No hold with this id in the organization."})
    route = org_config(organization.pk).models.get(hold.model)
    usage = Usage(input=input_tokens, output=output_tokens, cached=cached_tokens)
    counted = route.weighted(usage) if route else input_tokens + output_tokens + cached_tokens
    charged = min(counted, hold.tokens)  # what the hold does not cover is a fault, never a debit past the limit
    with transaction.atomic():
        posted = ledger.settle(hold=hold, used_tokens=charged, reference="settle API")
        if not posted.created:
            return ledger.settled_tokens(hold=hold), False
        charged = ledger.settled_tokens(hold=hold)  # over both parts of a hold the team pool covers in part
        record = UsageRecord.objects.create(
            organization=organization,
            member_id=Account.objects.values_list("member_id", flat=True).get(pk=hold.account_id),
            api_key_id=hold.api_key_id, model=hold.model, endpoint="ingest", source=UsageRecord.Source.INGEST,
            status=UsageRecord.Status.OK, input_tokens=usage.input, output_tokens=usage.output,
            cached_tokens=usage.cached, charged_tokens=charged, uncharged_tokens=counted - charged,
            cost=route.cost(usage) if route else 0,
            request_id=f"hold:{hold_id}")  # once per hold: the ledger's settle is the idempotent step
        if record.uncharged_tokens:
            alarms.uncharged_usage(organization_id=organization.pk, record={
                "request_id": record.request_id, "member": record.member_id, "model": record.model,
                "charged": charged, "uncharged": record.uncharged_tokens})
    return charged, True


# -- the spend-velocity breaker ------------------------------------------------------------------

BREAKER_FIELDS = [*BreakerSettings.LIMITS, "member_normal_multiple"]
MAX_BREAKER_MULTIPLE = 1000
NORMAL_DAYS = 7


def breaker_settings_get(*, organization: Organization) -> BreakerSettings:
    return (BreakerSettings.objects.filter(organization=organization).first()
            or BreakerSettings(organization=organization))


@transaction.atomic
def breaker_settings_save(*, organization: Organization, actor, **data) -> BreakerSettings:
    """Set the organization's breaker limits (empty: off); a field error for each bad value."""
    errors, cleaned = {}, {}
    for field in BREAKER_FIELDS:
        value = data.get(field)
        if value in (None, ""):
            cleaned[field] = None
            continue
        try:
            number = int(str(value).strip().replace("_", "")) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if field == "member_normal_multiple":
            if number is None or not 2 <= number <= MAX_BREAKER_MULTIPLE:
                errors[field] = f"A whole number from 2 to {MAX_BREAKER_MULTIPLE:,}, or empty for no relative limit."
        elif number is None or not 1 <= number <= MAX_TOKENS:
            errors[field] = f"A whole number of tokens from 1 to {MAX_TOKENS:,}, or empty for no limit."
        cleaned[field] = number
    if errors:
        raise ValidationError(errors)
    settings_row = BreakerSettings.objects.select_for_update().filter(organization=organization).first()
    if settings_row is None:
        settings_row = BreakerSettings(organization=organization)
    diff = changes(settings_row, cleaned.keys(), cleaned)
    for field, value in cleaned.items():
        setattr(settings_row, field, value)
    settings_row.updated_at = timezone.now()
    settings_row.save()
    if diff:
        log_action(actor=actor, organization=organization, action="breaker.settings_updated", obj=settings_row,
                   data=diff)
    return settings_row


def _scope_keys(organization_id: int, exceeded) -> QuerySet[ApiKey]:
    keys = ApiKey.objects.filter(organization_id=organization_id, paused_at=None, revoked_at=None)
    if exceeded.scope == BreakerTrip.Scope.KEY:
        return keys.filter(pk=exceeded.subject_id)
    if exceeded.scope == BreakerTrip.Scope.MEMBER:
        return keys.filter(member_id=exceeded.subject_id)
    return keys.filter(breaker_exempt=False)


def breaker_trip(*, organization_id: int, exceeded) -> BreakerTrip | None:
    """Pause what a breaker's rate went over (gateway.breaker.Exceeded): the key, every key of the
    member, or every non-exempt key of the organization; audit it and email the members whose keys
    it paused and the admins. Once, however many requests saw the same rate at once: the keys
    still unpaused are locked and claimed here, and a trip that finds none has nothing to do."""
    with unscoped():
        organization = Organization.objects.get(pk=organization_id)
    with scope(organization), transaction.atomic():
        keys = list(_scope_keys(organization_id, exceeded).select_for_update().order_by("pk"))
        if not keys:
            return None
        trip = BreakerTrip.objects.create(
            organization=organization, scope=exceeded.scope, window=exceeded.window, rate=exceeded.rate,
            limit=exceeded.limit, limit_kind=exceeded.limit_kind,
            api_key_id=exceeded.subject_id if exceeded.scope == BreakerTrip.Scope.KEY else None,
            member_id=(exceeded.subject_id if exceeded.scope == BreakerTrip.Scope.MEMBER
                       else keys[0].member_id if exceeded.scope == BreakerTrip.Scope.KEY else None))
        ApiKey.objects.filter(pk__in=[key.pk for key in keys]).update(paused_at=trip.tripped_at, paused_by=trip)
        invalidate_keys([key.public_id for key in keys])
        log_action(actor=None, organization=organization, action="breaker.tripped", obj=trip, data={
            "scope": trip.scope, "window": trip.window, "rate": trip.rate, "limit": trip.limit,
            "limit_kind": trip.limit_kind, "keys_paused": [f"{key.display_prefix}…{key.last_four}" for key in keys]})
        member_ids = sorted({key.member_id for key in keys})
        transaction.on_commit(lambda: _breaker_email(organization, trip, member_ids))
    log.warning("breaker tripped in organization %s: %s", organization_id, trip.description)
    return trip


def _breaker_email(organization: Organization, trip: BreakerTrip, member_ids: list[int]) -> None:
    with unscoped():
        owners = list(Member.objects.filter(pk__in=member_ids).values_list("user__email", flat=True))
        admins = list(Member.objects.filter(Q(is_owner=True) | Q(is_admin=True), organization=organization,
                                            is_active=True).values_list("user__email", flat=True))
    keys_page = settings.PORTAL_BASE_URL + reverse("key_list", kwargs={"org_slug": organization.slug})
    breaker_page = settings.PORTAL_BASE_URL + reverse("breaker_settings", kwargs={"org_slug": organization.slug})
    subject = f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Spend-velocity breaker tripped: API keys paused"
    body = (f"In {organization.name}, the {trip.get_scope_display().lower()} spend-velocity breaker tripped at "
            f"{trip.tripped_at:%Y-%m-%d %H:%M} UTC: {trip.description}. The keys it paused are refused until they "
            "are resumed, so a runaway loop stops spending.\n\n")
    if owners:
        send_mail(subject=subject, from_email=None, recipient_list=owners, fail_silently=True, message=body + (
            "Check what runs with your keys, then resume them at " + keys_page +
            (" (after a password check)." if trip.scope == BreakerTrip.Scope.KEY else
             "; an administrator resumes keys paused for the member or the organization.") + "\n"))
    if admins:
        send_mail(subject=subject, from_email=None, recipient_list=admins, fail_silently=True,
                  message=body + f"Administrators resume it at {breaker_page}.\n")


@transaction.atomic
def breaker_resume(*, trip: BreakerTrip, actor) -> int:
    """Resume the keys a trip paused (its rates start from nothing again); how many. Once."""
    trip = BreakerTrip.objects.select_for_update().get(pk=trip.pk)
    if trip.resumed_at is not None:
        raise ValidationError("This breaker was already resumed.")
    keys = list(ApiKey.objects.filter(paused_by=trip, paused_at__isnull=False).select_for_update())
    ApiKey.objects.filter(pk__in=[key.pk for key in keys]).update(paused_at=None, paused_by=None)
    trip.resumed_at, trip.resumed_by = timezone.now(), actor
    trip.save(update_fields=["resumed_at", "resumed_by"])
    invalidate_keys([key.public_id for key in keys])
    subjects = {(trip.scope, trip.api_key_id or trip.member_id or trip.organization_id)}
    subjects |= {("key", key.pk) for key in keys} | {("member", key.member_id) for key in keys}

    def forget():
        for scope_name, subject_id in subjects:
            breaker.forget(scope=scope_name, subject_id=subject_id)

    transaction.on_commit(forget)
    log_action(actor=actor, organization=trip.organization, action="breaker.resumed", obj=trip, data={
        "scope": trip.scope, "keys_resumed": [f"{key.display_prefix}…{key.last_four}" for key in keys]})
    return len(keys)


def breaker_trips(*, organization: Organization) -> QuerySet[BreakerTrip]:
    return BreakerTrip.objects.filter(organization=organization).select_related("api_key", "member__user",
                                                                               "resumed_by")


@transaction.atomic
def api_key_breaker_exempt_set(*, key: ApiKey, actor, exempt: bool) -> ApiKey:
    """Exempt a key from the organization-wide breaker (admins: a production service's key)."""
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.breaker_exempt != bool(exempt):
        key.breaker_exempt = bool(exempt)
        key.save(update_fields=["breaker_exempt"])
        log_action(actor=actor, organization=key.organization, action="api_key.breaker_exempt_set", obj=key,
                   data={"key": f"{key.display_prefix}…{key.last_four}", "exempt": key.breaker_exempt})
    return key


def spend_normals_refresh(*, now: datetime | None = None) -> int:
    """Every member's normal hour (SpendNormal): the 95th percentile of their charged tokens per
    hour over the hours of the last NORMAL_DAYS days in which they used any, one statement for
    all organizations. Members without usage keep no row. Returns how many rows it wrote."""
    now = now or timezone.now()
    table, records = SpendNormal._meta.db_table, UsageRecord._meta.db_table
    sql = f"""
        WITH hours AS (
            SELECT organization_id, member_id, date_trunc('hour', occurred_at) AS hour, SUM(charged_tokens) AS tokens
            FROM {records} WHERE occurred_at >= %(since)s AND occurred_at < %(now)s AND charged_tokens > 0
            GROUP BY organization_id, member_id, date_trunc('hour', occurred_at)),
        normals AS (
            SELECT organization_id, member_id,
                   percentile_disc(0.95) WITHIN GROUP (ORDER BY tokens) AS p95, COUNT(*) AS active_hours
            FROM hours GROUP BY organization_id, member_id),
        gone AS (DELETE FROM {table} t WHERE NOT EXISTS (
            SELECT 1 FROM normals n WHERE n.member_id = t.member_id))
        INSERT INTO {table} (organization_id, member_id, p95_hour_tokens, active_hours, computed_at)
        SELECT organization_id, member_id, p95, active_hours, %(now)s FROM normals
        ON CONFLICT (member_id) DO UPDATE SET p95_hour_tokens = EXCLUDED.p95_hour_tokens,
            active_hours = EXCLUDED.active_hours, computed_at = EXCLUDED.computed_at"""
    with connection.cursor() as cursor:
        cursor.execute(sql, {"since": now - timedelta(days=NORMAL_DAYS), "now": now})
        return cursor.rowcount
