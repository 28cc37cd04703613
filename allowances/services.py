"""Writes for allowances: catalog, policies, assignments, accounts and grants.

Balances only ever move through `allowances.ledger`. Every privileged action is audited.
Errors are `ValidationError`s keyed by field (or by CSV line for bulk grants).
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from allowances import ledger
from gateway.models import ProviderConnection
from allowances.aliases import WILDCARD
from allowances.models import (
    MAX_AUTO_APPROVED_REQUESTS,
    MAX_TOKENS,
    TEAM_POOL,
    Account,
    AllowancePolicy,
    CatalogModel,
    Grant,
    GrantBatch,
    LedgerEntry,
    ModelAlias,
    PolicyAssignment,
    Transfer,
    TransferSettings,
)
from allowances.periods import next_period_start, period_bounds, period_start_for, prorate, remaining_fraction
from allowances.selectors import assignment_in_force, members_governed_by, policy_in_force, transferable
from portal.audit import changes, log_action
from portal.models import Member, Organization, Team
from portal.tenancy import unscoped

Kind = ledger.Kind
MAX_CSV_BYTES = 2 * 1024 * 1024
MAX_BULK_ROWS = 5000


def _whole(value) -> int:
    """A whole number from a form or JSON value; 1.5, true and "1e3" are refused, not truncated."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    return int(str(value).strip().replace("_", ""))


def clean_tokens(value, *, field: str, allow_zero: bool = False) -> int:
    """A number of tokens from a form or JSON value, or a ValidationError on `field` that says why."""
    try:
        number = _whole(value)
    except (TypeError, ValueError):
        raise ValidationError({field: "Enter a whole number of tokens."}) from None
    if number < (0 if allow_zero else 1):
        raise ValidationError({field: "Enter a positive number of tokens." if not allow_zero else "Tokens cannot be negative."})
    if number > MAX_TOKENS:
        raise ValidationError({field: f"That is more than {MAX_TOKENS:,} tokens; check the number."})
    return number


# -- catalog -----------------------------------------------------------------------------------

CATALOG_FIELDS = ["model_id", "display_name", "connection", "upstream_model", "max_output_tokens", "input_multiplier",
                  "output_multiplier", "cached_multiplier", "input_price_per_million", "output_price_per_million",
                  "cached_price_per_million", "is_active", "economy_counterpart"]
_CATALOG_DECIMALS = CATALOG_FIELDS[5:11]


def _connection_of(organization: Organization, value) -> ProviderConnection | None:
    """The organization's provider connection named by an instance or an id; None if not theirs."""
    if isinstance(value, ProviderConnection):
        return value if value.organization_id == organization.pk else None
    try:
        pk = int(str(value))
    except (TypeError, ValueError):
        return None
    return ProviderConnection.objects.filter(organization=organization, pk=pk).first()


def _clean_catalog(organization: Organization, data: dict, *, exclude_pk=None) -> dict:
    errors = {}
    model_id = str(data.get("model_id", "")).strip()
    if not model_id:
        errors["model_id"] = "Enter the model id clients send."
    elif CatalogModel.objects.filter(organization=organization, model_id=model_id).exclude(pk=exclude_pk).exists():
        errors["model_id"] = f"{model_id} is already in the catalog."
    elif alias := ModelAlias.objects.filter(organization=organization, alias=model_id).select_related(
            "catalog_model").first():
        errors["model_id"] = (f"{model_id} is an alias of {alias.catalog_model.model_id}; remove the alias first "
                              "if this id should be a model of its own.")
    connection = _connection_of(organization, data.get("connection"))
    if connection is None:
        errors["connection"] = "Choose one of the organization's provider connections."
    try:
        max_output = int(str(data.get("max_output_tokens", 4096)).strip())
        if not 0 < max_output <= 1_000_000:
            raise ValueError
    except (TypeError, ValueError):
        errors["max_output_tokens"] = "A whole number of tokens from 1 to 1,000,000."
        max_output = None
    cleaned = {"model_id": model_id, "display_name": str(data.get("display_name") or model_id).strip(),
               "connection": connection, "upstream_model": str(data.get("upstream_model") or "").strip()[:100],
               "max_output_tokens": max_output, "is_active": bool(data.get("is_active", True))}
    for field in _CATALOG_DECIMALS:
        is_multiplier = "multiplier" in field
        places, ceiling = (3, 10_000) if is_multiplier else (4, 10**8)  # what the column holds
        try:
            value = Decimal(str(data.get(field, "1" if is_multiplier else "0")).strip())
        except InvalidOperation:
            errors[field] = "Enter a number."
            continue
        if not value.is_finite():
            errors[field] = "Enter a number."
        elif value < 0 or (value == 0 and field in ("input_multiplier", "output_multiplier")):
            errors[field] = "Must be positive." if is_multiplier else "Cannot be negative."
        elif value >= ceiling:
            errors[field] = f"Must be below {ceiling:,}."
        elif value != value.quantize(Decimal(1).scaleb(-places)):
            errors[field] = f"Use at most {places} decimal places."
        cleaned[field] = value
    cleaned["economy_counterpart"] = _clean_economy(organization, data.get("economy_counterpart"), model_id=model_id,
                                                    connection=connection, errors=errors)
    if errors:
        raise ValidationError(errors)
    return cleaned


def _clean_economy(organization: Organization, value, *, model_id: str, connection, errors: dict):
    """The economy counterpart named by an instance or an id: another active model of the
    organization, reachable in every API the premium model is (routing never changes the API a
    client speaks), and not routed on itself (one hop)."""
    if value in (None, ""):
        return None
    pk = value.pk if isinstance(value, CatalogModel) else value
    try:
        counterpart = CatalogModel.objects.filter(organization=organization, pk=int(str(pk))).select_related(
            "connection").first()
    except (TypeError, ValueError):
        counterpart = None
    if counterpart is None:
        errors["economy_counterpart"] = "Choose another model of the catalog."
    elif counterpart.model_id == model_id:
        errors["economy_counterpart"] = "A model cannot be its own economy counterpart."
    elif not counterpart.is_active:
        errors["economy_counterpart"] = f"{counterpart.model_id} is switched off."
    elif counterpart.economy_counterpart_id is not None:
        errors["economy_counterpart"] = (f"{counterpart.model_id} is routed to an economy model itself; choose a model "
                                         "without one (requests are routed once).")
    elif connection is not None and counterpart.connection.family not in ("any", connection.family):
        errors["economy_counterpart"] = (f"{counterpart.model_id} is served by an API of another kind "
                                         f"({counterpart.connection.get_kind_display()}): clients of this model could "
                                         "not read its replies.")
    return counterpart


@transaction.atomic
def catalog_model_create(*, organization: Organization, actor, **data) -> CatalogModel:
    entry = CatalogModel.objects.create(organization=organization, **_clean_catalog(organization, data))
    log_action(actor=actor, organization=organization, action="catalog_model.created", obj=entry,
               data={field: getattr(entry, field) for field in CATALOG_FIELDS})
    return entry


@transaction.atomic
def catalog_model_update(*, catalog_model: CatalogModel, actor, **data) -> CatalogModel:
    merged = {field: getattr(catalog_model, field) for field in CATALOG_FIELDS} | data
    cleaned = _clean_catalog(catalog_model.organization, merged, exclude_pk=catalog_model.pk)
    diff = changes(catalog_model, cleaned.keys(), cleaned)
    for field, value in cleaned.items():
        setattr(catalog_model, field, value)
    catalog_model.save()
    if diff:
        log_action(actor=actor, organization=catalog_model.organization, action="catalog_model.updated",
                   obj=catalog_model, data=diff)
    return catalog_model


# -- aliases -----------------------------------------------------------------------------------

MAX_ALIASES = 500
ALIAS_CHARACTERS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*\*?")


def _clean_alias(organization: Organization, alias, catalog_model) -> tuple[str, CatalogModel]:
    errors = {}
    alias = str(alias or "").strip()
    if not ALIAS_CHARACTERS.fullmatch(alias) or len(alias) > 100:
        errors["alias"] = ("An alias is a model id of up to 100 letters, digits and . _ : / @ + -, optionally "
                           f"ending in {WILDCARD} to cover every id that starts with it (e.g. claude-sonnet-*).")
    elif ModelAlias.objects.filter(organization=organization, alias=alias).exists():
        errors["alias"] = f"{alias} is already an alias."
    elif CatalogModel.objects.filter(organization=organization, model_id=alias).exists():
        errors["alias"] = f"{alias} is a catalog model of its own; requests for it already reach it."
    elif ModelAlias.objects.filter(organization=organization).count() >= MAX_ALIASES:
        errors["alias"] = f"At most {MAX_ALIASES} aliases per organization."
    if isinstance(catalog_model, CatalogModel):
        target = catalog_model if catalog_model.organization_id == organization.pk else None
    else:
        try:
            target = CatalogModel.objects.filter(organization=organization, pk=int(str(catalog_model))).first()
        except (TypeError, ValueError):
            target = None
    if target is None:
        errors["catalog_model"] = "Choose one of the organization's catalog models."
    if errors:
        raise ValidationError(errors)
    return alias, target


@transaction.atomic
def model_alias_create(*, organization: Organization, actor, alias: str, catalog_model) -> ModelAlias:
    """Map a model id that tools send (or every id with a prefix, `claude-sonnet-*`) onto a catalog model."""
    alias, target = _clean_alias(organization, alias, catalog_model)
    try:
        with transaction.atomic():
            entry = ModelAlias.objects.create(organization=organization, alias=alias, catalog_model=target,
                                              created_by=actor)
    except IntegrityError:  # the same alias added at the same moment
        raise ValidationError({"alias": f"{alias} is already an alias."}) from None
    log_action(actor=actor, organization=organization, action="model_alias.created", obj=entry,
               data={"alias": alias, "model": target.model_id})
    return entry


@transaction.atomic
def model_alias_delete(*, model_alias: ModelAlias, actor) -> None:
    log_action(actor=actor, organization=model_alias.organization, action="model_alias.deleted", obj=model_alias,
               data={"alias": model_alias.alias, "model": model_alias.catalog_model.model_id})
    model_alias.delete()


def aliases_seed(*, organization: Organization, actor, aliases: dict[str, str]) -> int:
    """Add the aliases (alias -> catalog model id) that are missing and whose model is in the catalog."""
    catalog_ids = dict(CatalogModel.objects.filter(organization=organization).values_list("model_id", "pk"))
    existing = set(ModelAlias.objects.filter(organization=organization).values_list("alias", flat=True))
    added = 0
    for alias, model_id in aliases.items():
        if alias not in existing and alias not in catalog_ids and model_id in catalog_ids:
            model_alias_create(organization=organization, actor=actor, alias=alias, catalog_model=catalog_ids[model_id])
            added += 1
    return added


def _target_members(*, organization: Organization, team: Team | None, member: Member | None) -> tuple[dict, list[Member]]:
    """Check a team-or-member target; return (errors by field, the active members it reaches)."""
    errors = {}
    if (team is None) == (member is None):
        errors["target"] = "Choose a team or a member (one of them)."
    for obj, field in ((team, "team"), (member, "member")):
        if obj is not None and obj.organization_id != organization.pk:
            errors[field] = "Choose one of this organization's."
    if member is not None and not member.is_active:
        errors["member"] = "This member is deactivated."
    if errors or member is not None:
        return errors, [member] if member is not None else []
    return errors, list(Member.objects.filter(organization=organization, team=team, is_active=True)
                        .select_related("organization"))


# -- policies ----------------------------------------------------------------------------------

POLICY_FIELDS = ["name", "monthly_tokens", "rollover_rule", "rollover_cap_tokens", "rollover_cap_percent",
                 "rollover_lifetime_periods", "overage_rule", "auto_approve_tokens", "auto_approve_requests",
                 "economy_below_percent"]


def _clean_policy(organization: Organization, data: dict, *, exclude_pk=None) -> dict:
    """Validate a policy's rules together; contradictions are named on the field that causes them."""
    errors: dict[str, str] = {}

    def field(name, check):
        try:
            return check()
        except ValidationError as error:
            errors.update(error.message_dict)
            return None

    name = str(data.get("name") or "").strip()
    if not name:
        errors["name"] = "Give the policy a name."
    elif AllowancePolicy.objects.filter(organization=organization, name__iexact=name).exclude(pk=exclude_pk).exists():
        errors["name"] = f"A policy called “{name}” already exists."
    monthly = field("monthly_tokens", lambda: clean_tokens(data.get("monthly_tokens"), field="monthly_tokens", allow_zero=True))

    rollover = data.get("rollover_rule") or AllowancePolicy.Rollover.NONE
    cap_tokens, cap_percent = data.get("rollover_cap_tokens"), data.get("rollover_cap_percent")
    cap_tokens = None if cap_tokens in (None, "") else cap_tokens
    cap_percent = None if cap_percent in (None, "") else cap_percent
    if rollover not in AllowancePolicy.Rollover.values:
        errors["rollover_rule"] = "Choose a rollover rule."
    if rollover == AllowancePolicy.Rollover.CAPPED_TOKENS:
        if cap_tokens is None:
            errors["rollover_cap_tokens"] = "A capped rollover needs the cap in tokens."
        else:
            cap_tokens = field("rollover_cap_tokens", lambda: clean_tokens(cap_tokens, field="rollover_cap_tokens"))
    elif cap_tokens is not None:
        errors["rollover_cap_tokens"] = "A cap in tokens only applies to the “up to a number of tokens” rule."
    if rollover == AllowancePolicy.Rollover.CAPPED_PERCENT:
        try:
            cap_percent = _whole(cap_percent)
            if not 1 <= cap_percent <= 100:
                raise ValueError
        except (TypeError, ValueError):
            errors["rollover_cap_percent"] = "A percentage cap is a whole number from 1 to 100."
    elif cap_percent is not None:
        errors["rollover_cap_percent"] = "A percentage cap only applies to the “up to a percentage” rule."
    try:
        lifetime = data.get("rollover_lifetime_periods")
        lifetime = 1 if lifetime in (None, "") else _whole(lifetime)  # not `or 1`: 0 is an error, not the default
        if not 1 <= lifetime <= 24:
            raise ValueError
    except (TypeError, ValueError):
        errors["rollover_lifetime_periods"] = "Rolled-over tokens live from 1 to 24 periods."
        lifetime = None
    if rollover == AllowancePolicy.Rollover.NONE and lifetime not in (None, 1):
        errors["rollover_lifetime_periods"] = "Nothing rolls over under this rule, so there is nothing to expire later."

    overage = data.get("overage_rule") or AllowancePolicy.Overage.HARD_STOP
    auto = data.get("auto_approve_tokens")
    auto = None if auto in (None, "") else auto
    auto_count = data.get("auto_approve_requests")
    auto_count = None if auto_count in (None, "") else auto_count
    if overage not in AllowancePolicy.Overage.values:
        errors["overage_rule"] = "Choose an overage rule."
    if overage == AllowancePolicy.Overage.AUTO_APPROVE:
        if auto is None:
            errors["auto_approve_tokens"] = "Auto-approval needs the number of tokens approved per period."
        else:
            auto = field("auto_approve_tokens", lambda: clean_tokens(auto, field="auto_approve_tokens"))
        if auto_count is None:
            errors["auto_approve_requests"] = "Auto-approval needs the number of requests approved per period."
        else:
            try:
                auto_count = _whole(auto_count)
                if not 1 <= auto_count <= MAX_AUTO_APPROVED_REQUESTS:
                    raise ValueError
            except (TypeError, ValueError):
                errors["auto_approve_requests"] = (f"A whole number of requests from 1 to "
                                                   f"{MAX_AUTO_APPROVED_REQUESTS:,}.")
    else:
        if auto is not None:
            errors["auto_approve_tokens"] = "An auto-approved amount only applies to the auto-approve rule."
        if auto_count is not None:
            errors["auto_approve_requests"] = "A number of auto-approved requests only applies to the auto-approve rule."
    economy = data.get("economy_below_percent")
    if economy in (None, ""):
        economy = None
    else:
        try:
            economy = _whole(economy)
            if not 1 <= economy <= 100:
                raise ValueError
        except (TypeError, ValueError):
            errors["economy_below_percent"] = "A whole percentage from 1 to 100, or empty to never route."
    if errors:
        raise ValidationError(errors)
    return {"name": name, "monthly_tokens": monthly, "rollover_rule": rollover, "rollover_cap_tokens": cap_tokens,
            "rollover_cap_percent": cap_percent, "rollover_lifetime_periods": lifetime, "overage_rule": overage,
            "auto_approve_tokens": auto, "auto_approve_requests": auto_count, "economy_below_percent": economy}


@transaction.atomic
def policy_create(*, organization: Organization, actor, **data) -> AllowancePolicy:
    policy = AllowancePolicy.objects.create(organization=organization, **_clean_policy(organization, data))
    log_action(actor=actor, organization=organization, action="policy.created", obj=policy,
               data={field: getattr(policy, field) for field in POLICY_FIELDS})
    return policy


@transaction.atomic
def policy_update(*, policy: AllowancePolicy, actor, immediately: bool = False, at: datetime | None = None,
                  **data) -> AllowancePolicy:
    """Change a policy. It governs the next period; with `immediately`, the members it governs now
    are topped up or down pro rata for the rest of the open period."""
    at = at or timezone.now()
    merged = {field: getattr(policy, field) for field in POLICY_FIELDS} | data
    cleaned = _clean_policy(policy.organization, merged, exclude_pk=policy.pk)
    diff = changes(policy, cleaned.keys(), cleaned)
    if not diff:
        return policy
    before = AllowancePolicy(**{field: getattr(policy, field) for field in POLICY_FIELDS})
    for field, value in cleaned.items():
        setattr(policy, field, value)
    policy.save()
    change_id = uuid.uuid4().hex[:12]
    if immediately:
        for member in members_governed_by(policy=policy, at=at):
            _apply_policy_change(member=member, old=before, new=policy, at=at, actor=actor,
                                 key=f"policy-change:{policy.pk}:{change_id}")
    log_action(actor=actor, organization=policy.organization, action="policy.updated", obj=policy,
               data={**diff, "applies": "immediately, pro rata" if immediately else "from the next period"})
    return policy


@transaction.atomic
def policy_assign(*, organization: Organization, actor, policy: AllowancePolicy, team: Team | None = None,
                  member: Member | None = None, immediately: bool = False, at: datetime | None = None) -> PolicyAssignment:
    """Assign a policy to a team or one member, from the next period or immediately (pro rata)."""
    at = at or timezone.now()
    errors, affected = _target_members(organization=organization, team=team, member=member)
    if policy.organization_id != organization.pk:
        errors["policy"] = "Choose one of this organization's."
    if errors:
        raise ValidationError(errors)
    if immediately:
        effective_from = at
    else:
        start = next_period_start(period_start_for(organization, at))
        effective_from = period_bounds(organization, start)[0]
    before = {m.pk: policy_in_force(member=m, at=at) for m in affected}
    # A later assignment for the same target and moment replaces the earlier one.
    PolicyAssignment.objects.filter(organization=organization, team=team, member=member,
                                    effective_from=effective_from).delete()
    assignment = PolicyAssignment.objects.create(organization=organization, policy=policy, team=team, member=member,
                                                 effective_from=effective_from, applied_immediately=immediately,
                                                 created_by=actor)
    if immediately:
        for m in affected:
            now_in_force = policy_in_force(member=m, at=at)
            if now_in_force is not None and now_in_force.pk == policy.pk:  # a member's own assignment wins
                _apply_policy_change(member=m, old=before[m.pk], new=policy, at=at, actor=actor,
                                     key=f"assignment:{assignment.pk}")
    log_action(actor=actor, organization=organization, action="policy.assigned", obj=assignment, data={
        "policy": policy.name, "team": team.name if team else None, "member": member.user.email if member else None,
        "effective_from": effective_from.isoformat(), "applies": "immediately, pro rata" if immediately else "from the next period",
    })
    return assignment


def _apply_policy_change(*, member: Member, old: AllowancePolicy | None, new: AllowancePolicy, at: datetime, actor,
                         key: str) -> None:
    """Top the open period up or down pro rata to the new policy, never below zero available."""
    account = Account.objects.filter(member=member).first()
    if account is None:
        account_open(member=member, at=at)  # opens with the new policy's pro rata grant
        return
    fraction = remaining_fraction(member.organization, at)
    delta = prorate(new.monthly_tokens, fraction) - prorate(old.monthly_tokens if old else 0, fraction)
    reason = f"Policy {new.name} applied immediately: {float(fraction):.0%} of the period left, pro rata"
    if delta > 0:
        ledger.post(account=account, kind=Kind.ADJUSTMENT, tokens=delta, idempotency_key=key, actor=actor,
                    reason=reason, reference=f"policy:{new.pk}")
    elif delta < 0:
        for _attempt in range(5):  # the balance may move under us; never cut below zero
            account.refresh_from_db(fields=["granted", "held", "used"])
            cut = min(-delta, max(account.available, 0))
            if cut == 0:
                break
            try:
                ledger.post(account=account, kind=Kind.ADJUSTMENT, tokens=-cut, guard="zero", idempotency_key=key,
                            actor=actor, reason=reason, reference=f"policy:{new.pk}")
                break
            except ledger.InsufficientTokens:
                continue


# -- accounts ----------------------------------------------------------------------------------


def account_open(*, member: Member, at: datetime | None = None) -> Account:
    """The member's account, opened on first need.

    It is granted the policy's monthly amount pro rata from when the policy first governed the
    member this period (the later of the period's start, the day they joined and the assignment),
    so a member who joins mid-month gets the rest of the month, and one whose account merely opens
    late gets the whole month.
    """
    existing = Account.objects.filter(member=member).first()
    if existing is not None:
        return existing
    at = at or timezone.now()
    organization = member.organization
    period = period_start_for(organization, at)
    assignment = assignment_in_force(member=member, at=at)
    policy = assignment.policy if assignment is not None else None
    try:
        with transaction.atomic():
            account = Account.objects.create(organization=organization, member=member, period_start=period)
            if policy is not None:
                since = max(period_bounds(organization, period)[0], member.joined_at, assignment.effective_from)
                fraction = remaining_fraction(organization, min(since, at))
                amount = prorate(policy.monthly_tokens, fraction)
                if amount:
                    pro_rata = "" if fraction == 1 else f", pro rata ({float(fraction):.0%} of the period left)"
                    ledger.post(account=account, kind=Kind.GRANT, tokens=amount, idempotency_key=f"grant:{period}",
                                reason=f"{policy.name}: monthly allowance{pro_rata}", reference=f"policy:{policy.pk}")
                    # post() moved the stored buckets in SQL; the caller gets the account as stored.
                    account.refresh_from_db(fields=["granted", "held", "used"])
    except IntegrityError:  # opened concurrently by another request
        return Account.objects.get(member=member)
    return account


def account_holds_release(*, member_ids, reason: str) -> int:
    """Release every open hold on these members' accounts, in whichever organizations; returns how
    many this call released. A request still in flight settles its usage all the same (see ledger.settle)."""
    released = 0
    with unscoped():
        holds = list(LedgerEntry.all_objects.filter(kind=Kind.HOLD, closed_by__isnull=True,
                                                    account__member_id__in=list(member_ids))
                     .values_list("organization_id", "pk"))
        for organization_id, hold_id in holds:
            posted = ledger.release(hold=ledger.hold_find(organization_id=organization_id, hold_id=hold_id),
                                    reason=reason)
            released += posted is not None and posted.created
    return released


# -- grants ------------------------------------------------------------------------------------


@transaction.atomic
def grant_create(*, organization: Organization, actor, tokens, reason: str, member: Member | None = None,
                 team: Team | None = None, idempotency_key: str = "", batch: GrantBatch | None = None) -> Grant:
    """A one-off bonus to a member or to every active member of a team. Safe to submit twice with one key."""
    errors, members = _target_members(organization=organization, team=team, member=member)
    try:
        tokens = clean_tokens(tokens, field="tokens")
    except ValidationError as error:
        errors.update(error.message_dict)
    reason = (reason or "").strip()
    if not reason:
        errors["reason"] = "Say why: the member sees the reason in their history."
    if team is not None and not members and "team" not in errors:
        errors["team"] = "This team has no active members."
    if errors:
        raise ValidationError(errors)
    key = idempotency_key or uuid.uuid4().hex
    existing = Grant.objects.filter(organization=organization, idempotency_key=key).first()
    if existing is not None:
        return existing
    grant = Grant.objects.create(organization=organization, tokens=tokens, reason=reason, member=member, team=team,
                                 batch=batch, created_by=actor, idempotency_key=key)
    for m in members:
        ledger.post(account=account_open(member=m), kind=Kind.BONUS, tokens=tokens, idempotency_key=f"bonus:{grant.pk}",
                    actor=actor, reason=reason, reference=f"grant:{grant.pk}")
    if batch is None:
        log_action(actor=actor, organization=organization, action="grant.created", obj=grant, data={
            "tokens": tokens, "reason": reason, "member": member.user.email if member else None,
            "team": team.name if team else None, "members": len(members)})
    return grant


@transaction.atomic
def grant_revoke(*, grant: Grant, actor) -> Grant:
    """Take back a grant that is still unused: every account must still have its tokens available."""
    grant = Grant.objects.select_for_update().get(pk=grant.pk)
    if grant.revoked_at is not None:
        raise ValidationError("This grant is already revoked.")
    entries = LedgerEntry.objects.filter(reference=f"grant:{grant.pk}", kind=Kind.BONUS).select_related(
        "account__member__user")
    for entry in entries:
        try:
            ledger.post(account=entry.account, kind=Kind.ADJUSTMENT, tokens=-entry.tokens, guard="zero",
                        idempotency_key=f"revoke:{grant.pk}", actor=actor, reason=f"Grant revoked: {grant.reason}",
                        reference=f"grant:{grant.pk}")
        except ledger.InsufficientTokens as error:
            raise ValidationError(
                f"{entry.account.member.user.email} has already used part of this grant "
                f"({max(error.available, 0):,} of {entry.tokens:,} tokens left), so it cannot be revoked."
            ) from None
    grant.revoked_at, grant.revoked_by = timezone.now(), actor
    grant.save(update_fields=["revoked_at", "revoked_by"])
    log_action(actor=actor, organization=grant.organization, action="grant.revoked", obj=grant,
               data={"tokens": grant.tokens, "reason": grant.reason})
    return grant


def _validate_bulk_rows(organization: Organization, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Check bulk grant rows ({line, email, tokens, reason}); return (valid rows, errors by line)."""
    emails = {str(row.get("email") or "").strip().lower() for row in rows}
    members = {
        email.lower(): member_id for member_id, email in Member.objects.filter(
            organization=organization, is_active=True, user__email__in=emails).values_list("pk", "user__email")
    }
    valid, errors = [], []
    for row in rows:
        line, problems = row["line"], []
        email = str(row.get("email") or "").strip().lower()
        try:
            validate_email(email)
            if email not in members:
                problems.append(f"{email} is not an active member of this organization")
        except ValidationError:
            problems.append(f"“{email}” is not an email address")
        try:
            tokens = clean_tokens(row.get("tokens"), field="tokens")
        except ValidationError as error:
            problems.append(f"tokens: {error.message_dict['tokens'][0]}")
            tokens = None
        reason = str(row.get("reason") or "").strip()
        if not reason:
            problems.append("reason is empty")
        elif len(reason) > 500:
            problems.append("reason is longer than 500 characters")
        if problems:
            errors.append({"line": line, "message": "; ".join(problems)})
        else:
            valid.append({"line": line, "email": email, "tokens": tokens, "reason": reason, "member_id": members[email]})
    return valid, errors


def _parse_csv(upload) -> list[dict]:
    if upload.size > MAX_CSV_BYTES:
        raise ValidationError({"file": f"The file is larger than {MAX_CSV_BYTES // 1024 // 1024} MB."})
    try:
        text = upload.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError({"file": "The file is not UTF-8 text; export it as CSV (UTF-8)."}) from None
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [name.strip().lower() for name in (reader.fieldnames or [])]
        missing = {"email", "tokens", "reason"} - set(header)
        if missing:
            raise ValidationError({"file": "The first line must name the columns email, tokens, reason "
                                           f"(missing: {', '.join(sorted(missing))})."})
        reader.fieldnames = header
        rows = []
        for row in reader:
            if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
                continue  # blank line
            rows.append({"line": reader.line_num, "email": row.get("email"), "tokens": row.get("tokens"),
                         "reason": row.get("reason")})
            if len(rows) > MAX_BULK_ROWS:
                raise ValidationError({"file": f"At most {MAX_BULK_ROWS:,} rows per file."})
    except csv.Error as error:
        raise ValidationError({"file": f"This is not a readable CSV file ({error})."}) from None
    if not rows:
        raise ValidationError({"file": "The file has no rows below the header."})
    return rows


@transaction.atomic
def grant_batch_preview(*, organization: Organization, actor, upload) -> GrantBatch:
    """Parse a CSV of bulk grants into a batch to preview; nothing is granted yet."""
    valid, errors = _validate_bulk_rows(organization, _parse_csv(upload))
    batch = GrantBatch.objects.create(organization=organization, filename=str(upload.name)[:200], rows=valid,
                                      errors=errors, created_by=actor)
    return batch


@transaction.atomic
def grant_batch_apply(*, batch: GrantBatch, actor) -> GrantBatch:
    """Grant every row of a previewed batch, or nothing if any row is wrong. Applying twice is a no-op."""
    batch = GrantBatch.objects.select_for_update().get(pk=batch.pk)
    if batch.status == GrantBatch.Status.APPLIED:
        return batch
    if batch.status != GrantBatch.Status.PREVIEW:
        raise ValidationError(f"This upload was {batch.get_status_display().lower()}.")
    if batch.errors:
        raise ValidationError(f"Fix the {len(batch.errors)} rows with errors and upload the file again; nothing was granted.")
    members = Member.objects.filter(organization=batch.organization).select_related("organization").in_bulk(
        [row["member_id"] for row in batch.rows])
    for row in batch.rows:
        member = members.get(row["member_id"])
        if member is None or not member.is_active:
            raise ValidationError(f"Line {row['line']}: {row['email']} is no longer an active member; nothing was granted.")
        grant_create(organization=batch.organization, actor=actor, tokens=row["tokens"], reason=row["reason"],
                     member=member, batch=batch, idempotency_key=f"batch:{batch.pk}:{row['line']}")
    batch.status, batch.applied_at = GrantBatch.Status.APPLIED, timezone.now()
    batch.save(update_fields=["status", "applied_at"])
    log_action(actor=actor, organization=batch.organization, action="grant_batch.applied", obj=batch,
               data={"rows": len(batch.rows), "tokens": batch.total_tokens, "filename": batch.filename})
    return batch


@transaction.atomic
def grant_bulk(*, organization: Organization, actor, rows: list[dict], idempotency_key: str = "") -> GrantBatch:
    """Bulk grants from the API: all rows are valid and granted, or a ValidationError names each bad row."""
    if idempotency_key:
        existing = GrantBatch.objects.filter(organization=organization, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    numbered = [{"line": index + 1, **row} for index, row in enumerate(rows)]
    valid, errors = _validate_bulk_rows(organization, numbered)
    if errors:
        raise ValidationError({"grants": [f"row {error['line']}: {error['message']}" for error in errors]})
    batch = GrantBatch.objects.create(organization=organization, filename="API request", rows=valid, created_by=actor,
                                      idempotency_key=idempotency_key or uuid.uuid4().hex)
    return grant_batch_apply(batch=batch, actor=actor)


# -- transfers -----------------------------------------------------------------------------------


@transaction.atomic
def transfer_settings_save(*, organization: Organization, actor, enabled: bool, same_team_only: bool,
                           max_per_period=None, team_pools: bool = False) -> TransferSettings:
    """The organization's rules for transfers between members and to team pools; a field error for
    a bad maximum."""
    maximum = None if max_per_period in (None, "") else clean_tokens(max_per_period, field="max_per_period")
    rules = TransferSettings.objects.select_for_update().filter(organization=organization).first()
    rules = rules or TransferSettings(organization=organization)
    cleaned = {"enabled": bool(enabled), "same_team_only": bool(same_team_only), "max_per_period": maximum,
               "team_pools": bool(team_pools)}
    diff = changes(rules, cleaned.keys(), cleaned)
    for field, value in cleaned.items():
        setattr(rules, field, value)
    rules.updated_at = timezone.now()
    rules.save()
    if diff:
        log_action(actor=actor, organization=organization, action="transfer_settings.updated", obj=rules, data=diff)
    return rules


def pool_open(*, team: Team, at: datetime | None = None) -> Account:
    """The team's pool, opened on first need (empty, in the organization's open period)."""
    existing = Account.objects.filter(team=team).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return Account.objects.create(organization=team.organization, team=team,
                                          period_start=period_start_for(team.organization, at or timezone.now()))
    except IntegrityError:  # opened concurrently
        return Account.objects.get(team=team)


def _transfer_receiver(organization: Organization, giver: Member, receiver, rules: TransferSettings) -> Member | None:
    """The member a transfer goes to, or None for the giver's team pool."""
    if receiver == TEAM_POOL:
        if not rules.team_pools:
            raise ValidationError({"receiver": "Team pools are switched off in this organization."})
        if giver.team_id is None:
            raise ValidationError({"receiver": "You are in no team, so there is no team pool to give to."})
        return None
    pk = receiver.pk if isinstance(receiver, Member) else receiver
    try:
        found = Member.objects.filter(organization=organization, is_active=True, pk=int(str(pk))).select_related(
            "user", "team").first()
    except (TypeError, ValueError):
        found = None
    if found is None:
        raise ValidationError({"receiver": "Choose an active member of the organization."})
    if found.pk == giver.pk:
        raise ValidationError({"receiver": "You cannot give tokens to yourself."})
    if rules.same_team_only and (giver.team_id is None or found.team_id != giver.team_id):
        raise ValidationError({"receiver": "Transfers go to members of your own team only in this organization."})
    return found


def transfer_create(*, giver: Member, receiver, tokens, actor, idempotency_key: str, note: str = "") -> Transfer:
    """Give part of `giver`'s unused base allowance to another member, or (`receiver` TEAM_POOL)
    to their team's pool: one transaction that locks both accounts (in id order, as every ledger
    write does) and posts the transfer_out and the transfer_in together, or nothing. Approved
    overage is never given: at most the balance beyond the overage it still holds
    (allowances.consumption). The same rules hold for both; a retry with the same key returns the
    first transfer."""
    organization = giver.organization
    key = str(idempotency_key or "").strip()[:100]
    if not key:
        raise ValidationError("A transfer needs an idempotency key (the form's token).")
    previous = Transfer.objects.filter(organization=organization, idempotency_key=key).first()
    if previous is not None:
        if previous.giver_id != giver.pk:
            raise ValidationError("This idempotency key was used for another member's transfer.")
        return previous
    rules = TransferSettings.objects.filter(organization=organization).first()
    if rules is None or not rules.enabled:
        raise ValidationError("Transfers are switched off in this organization; an administrator switches them on.")
    tokens = clean_tokens(tokens, field="tokens")
    receiver = _transfer_receiver(organization, giver, receiver, rules)
    note = str(note or "").strip()[:300]
    pool = pool_open(team=giver.team) if receiver is None else None
    accounts = [account_open(member=giver).pk, pool.pk if pool else account_open(member=receiver).pk]
    to = f"the pool of {giver.team.name}" if pool else receiver.user.email
    try:
        with transaction.atomic():
            ledger.lock(account_ids=accounts)
            given, taken = Account.objects.get(pk=accounts[0]), Account.objects.get(pk=accounts[1])
            if given.period_start != taken.period_start:
                raise ValidationError("The period is closing right now; try again in a minute.")
            room = transferable(account=given)
            if tokens > room:
                raise ValidationError({"tokens": (
                    f"You can give at most {max(room, 0):,} tokens now: what is left of your base allowance "
                    "(approved overage and tokens held by requests in flight cannot be given).")})
            if rules.max_per_period is not None:
                so_far = Transfer.objects.filter(organization=organization, giver=giver,
                                                 period_start=given.period_start).aggregate(
                    total=models.Sum("tokens"))["total"] or 0
                if so_far + tokens > rules.max_per_period:
                    raise ValidationError({"tokens": (
                        f"At most {rules.max_per_period:,} tokens may be given per period; you have given "
                        f"{so_far:,} this period, so {max(rules.max_per_period - so_far, 0):,} more at most.")})
            transfer = Transfer.objects.create(organization=organization, giver=giver, receiver=receiver,
                                               pool_team=giver.team if pool else None, tokens=tokens,
                                               period_start=given.period_start, note=note, idempotency_key=key,
                                               created_by=actor)
            reference = f"transfer:{transfer.pk}"
            ledger.post(account=given, kind=Kind.TRANSFER_OUT, tokens=tokens, guard="zero", actor=actor,
                        idempotency_key=reference, reference=reference, reason=f"given to {to}")
            ledger.post(account=taken, kind=Kind.TRANSFER_IN, tokens=tokens, actor=actor, idempotency_key=reference,
                        reference=reference, reason=f"received from {giver.user.email}")
            log_action(actor=actor, organization=organization, action="transfer.created", obj=transfer, data={
                "giver": giver.user.email, "receiver": receiver.user.email if receiver else None,
                "pool_team": giver.team.name if pool else None, "tokens": tokens,
                "period_start": given.period_start.isoformat(), "note": note})
    except IntegrityError:  # the same form submitted twice at once: the other submission made it
        return Transfer.objects.get(organization=organization, idempotency_key=key)
    return transfer
