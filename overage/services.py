"""Writes for overage requests: asking (and editing, cancelling), deciding one or several, the
organization's cap, the teams an approver approves for, and the requester's notices.

Every move of a request out of pending locks the requester's account row first (the lock the
ledger, the gateway and the period close take), then moves the request with one UPDATE of the
row where it is still pending; an approval then posts the overage grant keyed by the request.
So a double click, a retried call, two approvers at once, a cancel racing an approval, or the
close lapsing it, end with one decision and at most one grant. Approvals that count against the
organization's cap also lock its settings row, one approval at a time per organization, so
concurrent approvals cannot pass the cap together.

Errors: ValidationError by field for bad input and for rules the input breaks (the cap, the
policy); PermissionDenied for who may not; OverageConflict when the request is no longer in a
state to do it (a decided or cancelled request, a period being closed), or approvals are frozen
(a settlement past due beyond the grace period: billing.selectors.approvals_frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from allowances import ledger
from allowances.models import Account, AllowancePolicy, CatalogModel
from allowances.periods import period_start_for
from allowances.selectors import policy_in_force
from allowances.services import account_open, clean_tokens
from billing.selectors import approvals_frozen
from overage import selectors
from overage.models import ApproverTeam, OverageRequest, OverageSettings
from portal.audit import log_action
from portal.models import Member, Organization, Team

State = OverageRequest.State
REASON_LENGTH, NOTE_LENGTH, PROJECT_LENGTH, MODEL_LENGTH, KEY_LENGTH = 1000, 1000, 200, 100, 100
DECISIONS = ("approve", "reject")


class OverageConflict(Exception):
    """The request is not in a state for this any more (HTTP 409)."""

    def __init__(self, message: str, *, overage_request: OverageRequest | None = None):
        super().__init__(message)
        self.overage_request = overage_request


# -- asking ------------------------------------------------------------------------------------------------


def _clean_ask(organization: Organization, *, tokens, reason, model, project) -> dict:
    errors = {}
    try:
        tokens = clean_tokens(tokens, field="tokens")
    except ValidationError as error:
        errors.update(error.message_dict)
    reason = str(reason or "").strip()
    if not reason:
        errors["reason"] = "Say what the tokens are for: the approver decides on it."
    elif len(reason) > REASON_LENGTH:
        errors["reason"] = f"At most {REASON_LENGTH:,} characters."
    model = str(model or "").strip()
    if model and (len(model) > MODEL_LENGTH or not CatalogModel.objects.filter(
            organization=organization, model_id=model, is_active=True).exists()):
        errors["model"] = "Choose one of the organization's models, or none."
    project = str(project or "").strip()
    if len(project) > PROJECT_LENGTH:
        errors["project"] = f"At most {PROJECT_LENGTH} characters."
    if errors:
        raise ValidationError(errors)
    return {"tokens": tokens, "reason": reason, "model": model, "project": project}


def policy_refusal(*, member: Member, policy: AllowancePolicy | None) -> str | None:
    """Why the member's policy lets them ask for no overage, and whom to ask instead; None if it does."""
    if policy is not None and policy.allows_overage:
        return None
    ask = ", ".join(selectors.whom_to_ask(organization=member.organization)) or "your HR team"
    if policy is None:
        return f"No allowance policy governs you yet, so there is no overage to ask for: ask {ask} for tokens."
    return (f"Your policy {policy.name} stops at the allowance: it does not allow overage. Ask {ask} "
            "for a bonus grant if you need more tokens this month.")


def _locked_account(member: Member, *, at: datetime) -> Account:
    """The member's account, its row locked for this transaction, in the period open now."""
    account = account_open(member=member, at=at)
    ledger.lock(account_ids=[account.pk])
    account = Account.objects.get(pk=account.pk)
    if account.period_start != period_start_for(member.organization, at):
        raise OverageConflict("Last month is still being closed for your allowance: try again in a few minutes.")
    return account


@transaction.atomic
def overage_request_create(*, member: Member, actor, tokens, reason: str, model: str = "", project: str = "",
                           idempotency_key: str = "", at: datetime | None = None) -> tuple[OverageRequest, bool]:
    """Ask for more tokens for the open period. Under an auto_approve policy the request is
    approved at once while it fits the policy's tokens and requests per period (and the
    organization's cap); otherwise it waits for an approver. Returns (request, created): a retry
    with the same idempotency key finds the first one."""
    at = at or timezone.now()
    organization = member.organization
    if actor is not None and actor.pk != member.user_id:
        raise PermissionDenied("Members ask for overage for themselves.")
    idempotency_key = str(idempotency_key or "")
    if len(idempotency_key) > KEY_LENGTH:
        raise ValidationError({"Idempotency-Key": f"At most {KEY_LENGTH} characters."})
    if idempotency_key:
        existing = OverageRequest.objects.filter(member=member, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
    cleaned = _clean_ask(organization, tokens=tokens, reason=reason, model=model, project=project)
    policy = policy_in_force(member=member, at=at)
    refusal = policy_refusal(member=member, policy=policy)
    if refusal:
        raise ValidationError(refusal)
    account = _locked_account(member, at=at)
    if idempotency_key:  # a retry that waited for the first one's lock finds it now
        existing = OverageRequest.objects.filter(member=member, idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
    pending = selectors.pending_request(member=member)
    if pending is not None:
        raise OverageConflict(f"You already have a pending request (#{pending.pk}, {pending.tokens:,} tokens): "
                              "change that one or cancel it first.", overage_request=pending)
    try:
        with transaction.atomic():
            overage_request = OverageRequest.objects.create(
                organization=organization, member=member, period_start=account.period_start,
                idempotency_key=idempotency_key, created_at=at, **cleaned)
    except IntegrityError:  # the same key or a second pending request, committed meanwhile
        existing = OverageRequest.objects.filter(member=member, idempotency_key=idempotency_key).first()
        if idempotency_key and existing is not None:
            return existing, False
        raise OverageConflict("You already have a pending request: change that one or cancel it first.") from None
    log_action(actor=actor, organization=organization, action="overage_request.created", obj=overage_request,
               data=cleaned | {"period": account.period_start})
    _approve_at_once_or_queue(overage_request, account=account, policy=policy, at=at)
    return _fresh(overage_request), True


@transaction.atomic
def overage_request_update(*, overage_request: OverageRequest, actor_member: Member, tokens, reason: str,
                           model: str = "", project: str = "", at: datetime | None = None) -> OverageRequest:
    """Change a pending request (its requester only)."""
    at = at or timezone.now()
    if overage_request.member_id != actor_member.pk:
        raise PermissionDenied("Only the requester can change a request.")
    cleaned = _clean_ask(actor_member.organization, tokens=tokens, reason=reason, model=model, project=project)
    account = _locked_account(actor_member, at=at)
    current = _fresh(overage_request)
    if not current.is_pending:
        raise OverageConflict(_no_longer_pending(current), overage_request=current)
    OverageRequest.objects.filter(pk=current.pk, state=State.PENDING).update(**cleaned)
    log_action(actor=actor_member.user, organization=actor_member.organization, action="overage_request.updated",
               obj=current, data={name: [getattr(current, name), value] for name, value in cleaned.items()
                                  if getattr(current, name) != value})
    _approve_at_once_or_queue(_fresh(current), account=account, policy=policy_in_force(member=actor_member, at=at),
                              at=at, announce=False)
    return _fresh(current)


def _approve_at_once_or_queue(overage_request: OverageRequest, *, account: Account, policy, at: datetime,
                              announce: bool = True) -> None:
    fits = selectors.auto_approval_fits(policy=policy, member=overage_request.member,
                                        period=account.period_start, tokens=overage_request.tokens)
    if fits and approvals_frozen(organization=overage_request.organization, at=at):
        fits = False  # it waits for an approver, who may approve it once the settlement is paid
    if fits:
        try:
            _check_cap(overage_request.organization, period=account.period_start, tokens=overage_request.tokens)
        except ValidationError:
            fits = False  # the organization's cap is for an approver to weigh
    if not fits:
        if announce:
            transaction.on_commit(lambda: _tasks().notify_approvers.delay(overage_request.pk))
        return
    note = (f"Approved at once: {policy.name} approves up to {policy.auto_approve_tokens:,} tokens in "
            f"{policy.auto_approve_requests:,} requests a month without an approver.")
    _approve(overage_request, account=account, tokens=overage_request.tokens, decided_by=None, note=note,
             auto=True, at=at)
    log_action(actor=None, organization=overage_request.organization, action="overage_request.auto_approved",
               obj=overage_request, data={"tokens": overage_request.tokens, "policy": policy.name})
    transaction.on_commit(lambda: _tasks().notify_decision.delay(overage_request.pk))


@transaction.atomic
def overage_request_cancel(*, overage_request: OverageRequest, actor_member: Member,
                           at: datetime | None = None) -> tuple[OverageRequest, bool]:
    """Withdraw a pending request (its requester only); cancelling it again changes nothing."""
    at = at or timezone.now()
    if overage_request.member_id != actor_member.pk:
        raise PermissionDenied("Only the requester can cancel a request.")
    ledger.lock(account_ids=[account_open(member=actor_member, at=at).pk])
    current = _fresh(overage_request)
    if current.state == State.CANCELLED:
        return current, False
    if not current.is_pending:
        raise OverageConflict(_no_longer_pending(current), overage_request=current)
    _end(current, state=State.CANCELLED, decided_by=actor_member.user, note="", at=at)
    log_action(actor=actor_member.user, organization=actor_member.organization, action="overage_request.cancelled",
               obj=current, data={"tokens": current.tokens})
    return _fresh(current), True


# -- deciding ----------------------------------------------------------------------------------------------


def _clean_decision(overage_request: OverageRequest, *, decision, tokens, note) -> tuple[str, int | None, str]:
    errors = {}
    if decision not in DECISIONS:
        errors["decision"] = "Approve or reject."
    note = str(note or "").strip()
    if len(note) > NOTE_LENGTH:
        errors["note"] = f"At most {NOTE_LENGTH:,} characters."
    if tokens in (None, ""):
        tokens = None
    elif decision == "reject":
        errors["tokens"] = "A rejection grants no tokens: leave the amount empty."
    else:
        try:
            tokens = clean_tokens(tokens, field="tokens")
        except ValidationError as error:
            errors.update(error.message_dict)
        else:
            if tokens > overage_request.tokens:
                errors["tokens"] = (f"At most the {overage_request.tokens:,} tokens asked for; approve those in full "
                                    "or part of them.")
    if errors:
        raise ValidationError(errors)
    return decision, tokens, note


def _same_decision(current: OverageRequest, *, decided_by, decision: str, tokens: int | None) -> bool:
    """Whether a decided request is what this decision would have made it (a retry of it)."""
    if current.decided_by_id != getattr(decided_by, "pk", None):
        return False
    if decision == "reject":
        return current.state == State.REJECTED
    return current.is_approved and current.approved_tokens == (tokens or current.tokens)


@transaction.atomic
def overage_request_decide(*, overage_request: OverageRequest, actor_member: Member, decision: str,
                           tokens=None, note: str = "", asked_tokens: int | None = None,
                           at: datetime | None = None) -> tuple[OverageRequest, bool]:
    """Approve a pending request in full (no `tokens`) or in part (`tokens` fewer than asked), or
    reject it, with an optional note. `asked_tokens` is the amount the approver decided on: if the
    requester has changed it since, nothing is decided (OverageConflict). Returns (request,
    decided): the same decision retried by the same approver returns the request as it decided it;
    any other decision of a decided request is an OverageConflict."""
    at = at or timezone.now()
    decision, tokens, note = _clean_decision(overage_request, decision=decision, tokens=tokens, note=note)
    refusal = selectors.may_decide(member=actor_member, overage_request=overage_request)
    if refusal:
        raise PermissionDenied(refusal)
    ledger.lock(account_ids=[account_open(member=overage_request.member, at=at).pk])
    current = _fresh(overage_request)
    if not current.is_pending:
        if _same_decision(current, decided_by=actor_member.user, decision=decision, tokens=tokens):
            return current, False
        raise OverageConflict(_no_longer_pending(current), overage_request=current)
    if asked_tokens is not None and asked_tokens != current.tokens:
        raise OverageConflict(f"The request was changed to {current.tokens:,} tokens after you opened it (it asked "
                              f"for {asked_tokens:,}): look at it again.", overage_request=current)
    # Checked again against the request as it is now: the requester may have lowered it meanwhile.
    decision, tokens, note = _clean_decision(current, decision=decision, tokens=tokens, note=note)
    account = Account.objects.get(member=current.member)
    if current.period_start != account.period_start or current.period_start != period_start_for(
            current.organization, at):
        raise OverageConflict(f"This request was for {current.period_start:%B %Y}, which has ended: it lapses with "
                              "that month's close.", overage_request=current)
    if decision == "approve":
        tokens = tokens or current.tokens
        _check_not_frozen(current.organization, at=at, overage_request=current)
        _check_cap(current.organization, period=current.period_start, tokens=tokens)
        _approve(current, account=account, tokens=tokens, decided_by=actor_member.user, note=note, auto=False, at=at)
    else:
        _end(current, state=State.REJECTED, decided_by=actor_member.user, note=note, at=at)
    decided = _fresh(current)
    log_action(actor=actor_member.user, organization=current.organization,
               action=f"overage_request.{decided.state}", obj=decided,
               data={"tokens": decided.tokens, "approved_tokens": decided.approved_tokens, "note": note,
                     "requester": current.member.user.email})
    transaction.on_commit(lambda: _tasks().notify_decision.delay(current.pk))
    return decided, True


@dataclass
class BatchOutcome:
    approved: list = field(default_factory=list)
    refused: list = field(default_factory=list)  # (request, why)


def overage_requests_approve(*, overage_requests, actor_member: Member, note: str = "",
                             asked_tokens: dict[int, int] | None = None, at: datetime | None = None) -> BatchOutcome:
    """Approve several requests in full, oldest first, each in its own transaction: what one
    cannot take (the cap reached, decided or changed meanwhile) is refused with the reason, the
    others go ahead. `asked_tokens`: request id -> the amount the approver saw."""
    outcome = BatchOutcome()
    for overage_request in sorted(overage_requests, key=lambda r: (r.created_at, r.pk)):
        try:
            decided, _ = overage_request_decide(overage_request=overage_request, actor_member=actor_member,
                                                decision="approve", note=note, at=at,
                                                asked_tokens=(asked_tokens or {}).get(overage_request.pk))
        except ValidationError as error:
            outcome.refused.append((overage_request, " ".join(error.messages)))
        except (PermissionDenied, OverageConflict) as error:
            outcome.refused.append((overage_request, str(error)))
        else:
            outcome.approved.append(decided)
    return outcome


def _check_not_frozen(organization: Organization, *, at: datetime, overage_request: OverageRequest) -> None:
    """No approval while a settlement is past due beyond the grace period (billing's rule)."""
    frozen = approvals_frozen(organization=organization, at=at)
    if frozen:
        raise OverageConflict(frozen, overage_request=overage_request)


def _check_cap(organization: Organization, *, period, tokens: int) -> None:
    """Refuse an approval the organization's cap cannot take; the settings row stays locked until
    the approval commits, so approvals check the cap one at a time."""
    OverageSettings.objects.get_or_create(organization=organization)
    cap = OverageSettings.objects.select_for_update().get(organization=organization).cap_tokens
    if cap is None:
        return
    room = max(cap - selectors.approved_in_period(organization=organization, period=period), 0)
    if tokens > room:
        raise ValidationError({"tokens": f"The organization's cap of {cap:,} approved overage tokens a month has "
                                         f"{room:,} tokens left for {period:%B %Y}."})


def _approve(overage_request: OverageRequest, *, account: Account, tokens: int, decided_by, note: str, auto: bool,
             at: datetime) -> None:
    state = State.APPROVED if tokens == overage_request.tokens else State.PARTIALLY_APPROVED
    _move(overage_request, state=state, approved_tokens=tokens, decided_by=decided_by, decided_at=at,
          decision_note=note, auto_approved=auto)
    part = "" if state == State.APPROVED else f" in part ({tokens:,} of {overage_request.tokens:,} tokens)"
    ledger.post(account=account, kind=ledger.Kind.OVERAGE_GRANT, tokens=tokens,
                idempotency_key=overage_request.ledger_key, actor=decided_by,
                reason=f"Overage request #{overage_request.pk} approved{part}" + (f": {note}" if note else ""),
                reference=overage_request.ledger_key)


def _end(overage_request: OverageRequest, *, state: str, decided_by, note: str, at: datetime) -> None:
    _move(overage_request, state=state, decided_by=decided_by, decided_at=at, decision_note=note)


def _move(overage_request: OverageRequest, **changes) -> None:
    if OverageRequest.objects.filter(pk=overage_request.pk, state=State.PENDING).update(**changes) != 1:
        raise OverageConflict(_no_longer_pending(_fresh(overage_request)))


def _no_longer_pending(current: OverageRequest) -> str:
    who = f" by {current.decided_by.email}" if current.decided_by_id and current.state != State.CANCELLED else ""
    when = f" on {timezone.localtime(current.decided_at):%b %-d, %H:%M}" if current.decided_at else ""
    return f"This request is no longer pending: it was {current.get_state_display().lower()}{who}{when}."


def _fresh(overage_request: OverageRequest) -> OverageRequest:
    return OverageRequest.objects.select_related("member__user", "member__team", "member__organization",
                                                 "decided_by").get(pk=overage_request.pk)


def _tasks():
    from overage import tasks  # the tasks module imports these services

    return tasks


# -- notices, settings, approvers' teams ---------------------------------------------------------------------


def overage_notices_dismiss(*, member: Member) -> int:
    """The requester has read the decisions shown on their dashboard."""
    return OverageRequest.objects.filter(organization=member.organization, member=member, notice_seen_at__isnull=True,
                                         decided_at__isnull=False).update(notice_seen_at=timezone.now())


@transaction.atomic
def overage_settings_update(*, organization: Organization, actor, cap_tokens) -> OverageSettings:
    """The organization's cap on approved overage tokens per period (empty: no cap)."""
    cap = None if cap_tokens in (None, "") else clean_tokens(cap_tokens, field="cap_tokens", allow_zero=True)
    OverageSettings.objects.get_or_create(organization=organization)
    row = OverageSettings.objects.select_for_update().get(organization=organization)
    if row.cap_tokens != cap:
        log_action(actor=actor, organization=organization, action="overage_settings.updated", obj=row,
                   data={"cap_tokens": [row.cap_tokens, cap]})
        row.cap_tokens = cap
        row.save(update_fields=["cap_tokens"])
    return row


@transaction.atomic
def approver_teams_set(*, organization: Organization, actor, approver: Member, teams) -> list[Team]:
    """The teams an approver approves for (none: every team)."""
    teams = list(teams)
    errors = {}
    if approver.organization_id != organization.pk:
        errors["approver"] = "Choose one of this organization's members."
    elif not approver.has_any_role(["approver"]) or approver.has_any_role(["admin"]):
        errors["approver"] = "Only approvers can be limited to teams (admins decide for every team)."
    if any(team.organization_id != organization.pk for team in teams):
        errors["teams"] = "Choose this organization's teams."
    if errors:
        raise ValidationError(errors)
    before = sorted(ApproverTeam.objects.filter(member=approver).values_list("team__name", flat=True))
    ApproverTeam.objects.filter(member=approver).exclude(team__in=teams).delete()
    for team in teams:
        ApproverTeam.objects.get_or_create(organization=organization, member=approver, team=team)
    after = sorted(team.name for team in teams)
    if before != after:
        log_action(actor=actor, organization=organization, action="approver_teams.updated", obj=approver,
                   data={"approver": approver.user.email, "teams": [before, after]})
    return teams
