"""Minting, rotating, revoking and checking API keys. Every write is audited; no secret is logged."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from allowances.models import MAX_TOKENS, Account, CatalogModel, KeySpend
from allowances.selectors import policy_in_force
from apikeys import secrets
from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, MAX_ROTATION_GRACE_HOURS, ApiKey
from portal.audit import log_action
from portal.links import public_url
from portal.models import Member
from portal import shared_cache
from portal.tenancy import unscoped

MAX_CIDRS = 20
MAX_KEY_LIFETIME = timedelta(days=3652)
LAST_USED_RESOLUTION = timedelta(minutes=1)  # how often last_used_at is written, at most

log = logging.getLogger(__name__)


class KeyRefused(Exception):
    """A presented key cannot be used; the message says why, without revealing anything secret."""


class KeyPaused(KeyRefused):
    """The key is paused by a spend-velocity breaker until its owner or an admin resumes it."""


def _clean(*, member: Member, name, model_ids, endpoints, token_cap, expires_at, allowed_cidrs,
           economy_routing=True) -> dict:
    errors = {}
    name = (name or "").strip()
    if not name:
        errors["name"] = "Name the key after the tool that will use it."
    endpoints = sorted(set(endpoints or []))
    if not endpoints:
        errors["endpoints"] = "Choose at least one endpoint."
    elif set(endpoints) - ENDPOINTS.keys():
        errors["endpoints"] = f"Unknown endpoints: {', '.join(sorted(set(endpoints) - ENDPOINTS.keys()))}."
    elif any(not member.has_any_role(ENDPOINT_ROLES[e]) for e in endpoints if e in ENDPOINT_ROLES):
        errors["endpoints"] = "Only administrators may create keys that report usage for the organization."
    model_ids = sorted(set(model_ids or []))
    offered = set(CatalogModel.objects.filter(organization=member.organization, is_active=True)
                  .values_list("model_id", flat=True))
    if set(model_ids) - offered:
        errors["model_ids"] = f"Not in the catalog: {', '.join(sorted(set(model_ids) - offered))}."
    if token_cap not in (None, ""):
        try:
            token_cap = int(str(token_cap).strip())
            if token_cap <= 0 or token_cap > MAX_TOKENS:
                raise ValueError
        except (TypeError, ValueError):
            errors["token_cap"] = "A cap is a positive whole number of tokens."
        else:
            # The owner's allowance: their policy's period, or what they hold now (bonus grants
            # without a policy), whichever is more. A key cannot promise more than that.
            policy = policy_in_force(member=member)
            account = Account.objects.filter(member=member).first()
            allowance = max(policy.monthly_tokens if policy else 0,
                            (account.available + account.overdraft_limit) if account else 0)
            if token_cap > allowance:
                errors["token_cap"] = (f"A key's cap cannot exceed your own allowance of {allowance:,} tokens "
                                       "per period.")
    else:
        token_cap = None
    if expires_at is not None and expires_at <= timezone.now():
        errors["expires_at"] = "The expiry must be in the future."
    elif expires_at is not None and expires_at > timezone.now() + MAX_KEY_LIFETIME:
        # Also keeps the time storable: 9999-12-31 in a zone west of UTC is past year 9999 in UTC.
        errors["expires_at"] = "The expiry must be within ten years."
    networks = []
    for text in allowed_cidrs or []:
        try:
            networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except ValueError:
            errors["allowed_cidrs"] = f"“{text}” is not an IP range (write e.g. 203.0.113.0/24 or 2001:db8::/32)."
    if len(networks) > MAX_CIDRS:
        errors["allowed_cidrs"] = f"At most {MAX_CIDRS} ranges."
    if errors:
        raise ValidationError(errors)
    return {"name": name, "model_ids": model_ids, "endpoints": endpoints, "token_cap": token_cap,
            "expires_at": expires_at, "allowed_cidrs": networks, "economy_routing": economy_routing is not False}


def _settings_for_audit(key: ApiKey) -> dict:
    return {"name": key.name, "key": f"{key.display_prefix}…{key.last_four}", "models": key.model_ids or "all allowed",
            "endpoints": key.endpoints, "token_cap": key.token_cap, "allowed_cidrs": key.allowed_cidrs,
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
            "economy_routing": key.economy_routing}


def _mint(*, member: Member, actor, settings: dict, spend: KeySpend | None = None) -> tuple[ApiKey, str]:
    secret, parts = secrets.new_key()
    if spend is None:
        spend = KeySpend.objects.create(organization=member.organization, token_cap=settings["token_cap"])
    key = ApiKey.objects.create(organization=member.organization, member=member, public_id=parts.public_id,
                                secret_hash=secrets.hash_secret(parts.secret), last_four=secret[-4:],
                                created_by=actor, spend=spend, **settings)
    return key, secret


@transaction.atomic
def api_key_create(*, member: Member, actor, name: str, endpoints, model_ids=(), token_cap=None,
                   expires_at: datetime | None = None, allowed_cidrs=(), economy_routing: bool = True,
                   form_token: str = "") -> tuple[ApiKey, str]:
    """Mint a key for `member`. Returns the key and its secret, which is never available again.

    A form submitted twice (a reload of the page that showed the secret) does not mint a second key.
    """
    previous = ApiKey.objects.filter(member=member, form_token=form_token).first() if form_token else None
    if previous is not None:
        raise ValidationError(f"This form already created the key “{previous.name}”; its secret was shown once. "
                              "Revoke it and create a new key if you did not copy it.")
    settings = _clean(member=member, name=name, model_ids=model_ids, endpoints=endpoints, token_cap=token_cap,
                      expires_at=expires_at, allowed_cidrs=allowed_cidrs,
                      economy_routing=economy_routing) | {"form_token": form_token}
    try:
        with transaction.atomic():
            key, secret = _mint(member=member, actor=actor, settings=settings)
    except IntegrityError:  # the same form submitted twice at once: the other submission minted it
        raise ValidationError("This form was already submitted; its key was created once.") from None
    log_action(actor=actor, organization=member.organization, action="api_key.created", obj=key,
               data=_settings_for_audit(key))
    return key, secret


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor) -> ApiKey:
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at is not None:
        raise ValidationError("This key is already revoked.")
    key.revoked_at, key.revoked_by = timezone.now(), actor
    key.save(update_fields=["revoked_at", "revoked_by"])
    log_action(actor=actor, organization=key.organization, action="api_key.revoked", obj=key,
               data={"key": f"{key.display_prefix}…{key.last_four}", "owner": key.member.user.email})
    return key


@transaction.atomic
def api_key_rotate(*, key: ApiKey, actor, grace_hours: int = 0) -> tuple[ApiKey, str]:
    """Issue a new secret with the same scopes; the old one keeps working for the grace period."""
    key = ApiKey.objects.select_for_update().get(pk=key.pk)
    if key.refusal() is not None or key.rotated_to_id is not None:
        raise ValidationError("Only a key in use can be rotated.")
    if not 0 <= grace_hours <= MAX_ROTATION_GRACE_HOURS:
        raise ValidationError({"grace_hours": f"The grace period is 0 to {MAX_ROTATION_GRACE_HOURS} hours."})
    settings = {field: getattr(key, field) for field in
                ("name", "model_ids", "endpoints", "token_cap", "expires_at", "allowed_cidrs",
                 "economy_routing")}  # not the form token
    # The successor shares the spend counter: rotating never resets the key's cap.
    new_key, secret = _mint(member=key.member, actor=actor, settings=settings, spend=key.spend)
    key.rotated_to, key.works_until = new_key, timezone.now() + timedelta(hours=grace_hours)
    key.save(update_fields=["rotated_to", "works_until"])
    log_action(actor=actor, organization=key.organization, action="api_key.rotated", obj=new_key, data={
        "old": f"{key.display_prefix}…{key.last_four}", "new": f"{new_key.display_prefix}…{new_key.last_four}",
        "old_works_until": key.works_until.isoformat()})
    return new_key, secret


# -- authentication ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyIdentity:
    """What a request authenticated by a key may do: the cached, secret-free view of the key."""

    id: int
    organization_id: int
    member_id: int
    secret_hash: str
    endpoints: tuple
    model_ids: tuple
    allowed_cidrs: tuple
    token_cap: int | None
    refusal_at: datetime | None  # the first moment the key stops working (expiry or end of grace)
    refused: str | None  # revoked, the member deactivated or the owner's user account disabled
    account_id: int | None = None  # the owner's allowance account, once one is open
    spend_id: int | None = None  # the key's spend counter (its cap), shared across rotations
    public_id: str = ""
    economy_routing: bool = True  # the key may be routed to economy models (it did not opt out)
    economy_below_percent: int | None = None  # the owner's policy: route below this % left (None: never)
    paused: str | None = None  # why a spend-velocity breaker paused the key, and how to resume it
    normal_hour_tokens: int | None = None  # the owner's normal hour (gateway.SpendNormal), for the breaker
    pool_account_id: int | None = None  # the owner's team pool, drawn on after their own balance (pools on)


def cache_key(public_id: str) -> str:
    return f"apikey:{public_id}"


IDENTITY_TTL = 300  # seconds; every change to a key or its owner drops the cached identity at once
NORMAL_MIN_HOURS = 5  # a member's normal hour counts for the breaker once it comes from this many hours


def identity_load(public_id: str) -> KeyIdentity | None:
    """The key's identity from the database, cached for the next requests (None: no such key)."""
    token = shared_cache.token(cache_key(public_id))
    identity = _load(public_id)
    if identity is not None:
        shared_cache.set(cache_key(public_id), identity, timeout=IDENTITY_TTL, token=token)
    return identity


def _load(public_id: str) -> KeyIdentity | None:
    with unscoped():
        key = ApiKey.objects.select_related("member__user", "paused_by", "organization").filter(
            public_id=public_id).first()
    if key is None:
        return None
    ends = [moment for moment in (key.expires_at, key.works_until) if moment is not None]
    refused = ("this API key was revoked" if key.revoked_at
               else "the key's owner is no longer an active member" if not key.member.is_active
               else "the key owner's user account is disabled" if not key.member.user.is_active
               else None)
    return KeyIdentity(id=key.pk, organization_id=key.organization_id, member_id=key.member_id,
                       secret_hash=key.secret_hash, endpoints=tuple(key.endpoints), model_ids=tuple(key.model_ids),
                       allowed_cidrs=tuple(key.allowed_cidrs), token_cap=key.token_cap,
                       refusal_at=min(ends) if ends else None, refused=refused,
                       account_id=Account.all_objects.filter(member_id=key.member_id).values_list("id", flat=True).first(),
                       spend_id=key.spend_id, public_id=key.public_id, economy_routing=key.economy_routing,
                       economy_below_percent=_economy_below_percent(key.member), paused=_paused(key),
                       normal_hour_tokens=_normal_hour(key.member_id), pool_account_id=_pool_of(key.member))


def _pool_of(member: Member) -> int | None:
    from allowances.selectors import pool_account_id

    with unscoped():
        return pool_account_id(member=member)


def _paused(key: ApiKey) -> str | None:
    if key.paused_at is None:
        return None
    from django.conf import settings
    from django.urls import reverse

    keys_page = settings.PORTAL_BASE_URL + reverse("key_list", kwargs={"org_slug": key.organization.slug})
    what = key.paused_by.description if key.paused_by is not None else "a spend-velocity breaker tripped"
    return (f"API key paused by the spend-velocity breaker: {what}. Nothing more is sent with it until it is "
            f"resumed: its owner can resume it at {keys_page} (after checking what runs with it), or an "
            "administrator can.")


def _normal_hour(member_id: int) -> int | None:
    from gateway.models import SpendNormal

    with unscoped():
        return SpendNormal.objects.filter(member_id=member_id, active_hours__gte=NORMAL_MIN_HOURS).values_list(
            "p95_hour_tokens", flat=True).first()


def _economy_below_percent(member: Member) -> int | None:
    with unscoped():  # the member's own and their team's assignments only
        policy = policy_in_force(member=member)
    return policy.economy_below_percent if policy is not None else None


def presented(raw_key: str) -> secrets.ParsedKey:
    """The parts of a presented key, or KeyRefused: malformed keys never reach a cache or the database."""
    try:
        return secrets.parse(raw_key.strip())
    except secrets.MalformedKey as error:
        raise KeyRefused(f"Invalid API key: {error}.") from None


def admit(parts: secrets.ParsedKey, identity: KeyIdentity, *, ip: str | None) -> datetime:
    """Check a presented key against its identity (the secret, revocation, expiry, IP ranges);
    KeyRefused saying why, or the moment it was admitted."""
    if not secrets.secret_matches(parts.secret, identity.secret_hash):
        raise KeyRefused("Invalid API key: no such key.")
    now = timezone.now()
    if identity.refused:
        raise KeyRefused(f"API key refused: {identity.refused}.")
    if identity.refusal_at is not None and identity.refusal_at <= now:
        raise KeyRefused("API key refused: it has expired or was rotated out.")
    if identity.allowed_cidrs:
        try:
            address = ipaddress.ip_address(ip or "")
        except ValueError:
            address = None
        if address is None or not any(address in ipaddress.ip_network(net) for net in identity.allowed_cidrs):
            raise KeyRefused(f"API key refused: requests from {ip} are outside the key's allowed IP ranges.")
    if identity.paused:
        raise KeyPaused(identity.paused)
    return now


_recorded_here: dict[str, float] = {}  # public id -> when this process last recorded a use (monotonic)


def use_to_record(public_id: str) -> bool:
    """Whether this process last recorded a use of the key over a minute ago (no cache round trip)."""
    return time.monotonic() - _recorded_here.get(public_id, float("-inf")) >= LAST_USED_RESOLUTION.total_seconds()


def record_use(public_id: str, key_id: int, now: datetime) -> None:
    """Write last_used_at at most once a minute per key.

    The cross-process throttle has a cache key of its own: the cached identity is only ever written
    from the database, so a revocation can never be overwritten by a stale copy.
    """
    _recorded_here[public_id] = time.monotonic()
    try:
        first = cache.add(f"apikey-used:{public_id}", 1, timeout=int(LAST_USED_RESOLUTION.total_seconds()))
    except redis.RedisError:
        first = True  # the cache is down: this process's own once a minute is throttle enough
    if first:
        with unscoped():
            ApiKey.objects.filter(pk=key_id).update(last_used_at=now)


def invalidate(public_ids) -> None:
    """Drop cached identities now and again once the change commits: a request that read the old
    row while the change was in flight must not leave it cached."""
    keys = [cache_key(public_id) for public_id in public_ids]
    if keys:
        shared_cache.delete_many(keys)
        transaction.on_commit(lambda: shared_cache.delete_many(keys))


# -- reminders -----------------------------------------------------------------------------------

EXPIRY_REMINDER_AHEAD = timedelta(days=7)


def send_expiry_reminders(*, at: datetime | None = None) -> int:
    """Email the owners of keys that expire within a week, once per key; returns how many."""
    from django.conf import settings
    from django.core.mail import send_mail
    from django.urls import reverse

    at = at or timezone.now()
    with unscoped():
        due = list(ApiKey.objects.filter(expires_at__gt=at, expires_at__lte=at + EXPIRY_REMINDER_AHEAD,
                                         revoked_at=None, rotated_to=None, expiry_reminded_at=None,
                                         member__is_active=True).select_related("member__user", "organization"))
    sent = 0
    for key in due:
        with unscoped():
            # Claimed by this update or by a concurrent run, never both: one email per key.
            if not ApiKey.objects.filter(pk=key.pk, expiry_reminded_at=None).update(expiry_reminded_at=at):
                continue
        keys_page = public_url(reverse("key_list", kwargs={"org_slug": key.organization.slug}))
        try:
            send_mail(subject=f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Your API key “{key.name}” expires soon",
                      message=(f"Your API key “{key.name}” ({key.display_prefix}…{key.last_four}) in "
                               f"{key.organization.name} stops working on {key.expires_at:%Y-%m-%d %H:%M} UTC.\n\n"
                               f"Create a new key before then: {keys_page}\n"),
                      from_email=None, recipient_list=[key.member.user.email])
        except Exception:
            # Not sent: give the claim back so that the next hourly run tries again, and go on
            # with the other owners.
            log.exception("expiry reminder for key %s not sent", key.pk)
            with unscoped():
                ApiKey.objects.filter(pk=key.pk, expiry_reminded_at=at).update(expiry_reminded_at=None)
            continue
        sent += 1
    return sent
