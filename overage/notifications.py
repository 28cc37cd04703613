"""Emails about overage requests: the decision to the requester, each new request to the
approvers who may decide it, and each approver's daily digest of their pending queue.

Each function loads what it needs by id and works in the organization's scope, as the tasks
that call it do. The digest is recorded per approver and day first, so a rerun sends nothing twice.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, time
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from overage import selectors
from overage.models import ApproverDigest, OverageRequest
from portal.links import public_url
from portal.models import Organization
from portal.tenancy import scope, unscoped

DIGEST_HOUR = 8  # the approvers' morning, in the organization's zone
DIGEST_LENGTH = 50  # requests listed in one digest, oldest first
State = OverageRequest.State


def _url(organization: Organization, name: str, **kwargs) -> str:
    return public_url(reverse(name, kwargs={"org_slug": organization.slug, **kwargs}))


def _subject(text: str) -> str:
    return f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}{text}"


def _request(overage_request_id: int) -> OverageRequest | None:
    with unscoped():
        return (OverageRequest.all_objects.select_related("organization", "member__user", "member__team", "decided_by")
                .filter(pk=overage_request_id).first())


def decision_sent(*, overage_request_id: int) -> int:
    overage_request = _request(overage_request_id)
    if overage_request is None or overage_request.is_pending:
        return 0
    organization = overage_request.organization
    with scope(organization):
        if overage_request.is_approved:
            what = (f"approved: {overage_request.approved_tokens:,} tokens were added to your allowance"
                    + ("" if overage_request.state == State.APPROVED
                       else f" (of the {overage_request.tokens:,} you asked for)")
                    + ". They are yours to use until this month closes; what is left then lapses.")
        else:
            what = f"{overage_request.get_state_display().lower()}: no tokens were added."
        who = ("by your policy, at once" if overage_request.auto_approved
               else f"by {overage_request.decided_by.display_name}" if overage_request.decided_by else "")
        note = f"\n\nNote: {overage_request.decision_note}" if overage_request.decision_note else ""
        send_mail(
            subject=_subject(f"Your request for {overage_request.tokens:,} tokens was "
                             f"{overage_request.get_state_display().lower()}"),
            message=(f"In {organization.name}, your request #{overage_request.pk} for {overage_request.tokens:,} tokens "
                     f"(“{overage_request.reason}”) was {what}\nDecided {who}.{note}\n\n"
                     f"Your requests: {_url(organization, 'overage_request_list')}\n"),
            from_email=None, recipient_list=[overage_request.member.user.email])
    return 1


def new_request_sent(*, overage_request_id: int) -> int:
    overage_request = _request(overage_request_id)
    if overage_request is None or not overage_request.is_pending:
        return 0
    organization = overage_request.organization
    with scope(organization):
        recipients = selectors.approvers_to_tell(overage_request=overage_request)
        requester = overage_request.member
        for approver in recipients:
            send_mail(
                subject=_subject(f"{requester.user.email} asks for {overage_request.tokens:,} more tokens"),
                message=(f"In {organization.name}, {requester.user.display_name}"
                         + (f" (team {requester.team.name})" if requester.team else "")
                         + f" asks for {overage_request.tokens:,} tokens"
                         + (f" of {overage_request.model}" if overage_request.model else "")
                         + f": “{overage_request.reason}”.\n\nDecide: "
                         + _url(organization, "approval_detail", overage_request_id=overage_request.pk) + "\n"),
                from_email=None, recipient_list=[approver.user.email])
    return len(recipients)


def pending_digests_sent(*, at: datetime | None = None) -> int:
    """Send today's digest to every approver with pending requests whose morning has come."""
    at = at or timezone.now()
    with unscoped():
        organizations = list(Organization.objects.filter(
            pk__in=OverageRequest.all_objects.filter(state=State.PENDING).values("organization_id")))
    sent = 0
    for organization in organizations:
        local = at.astimezone(ZoneInfo(organization.time_zone))
        if local.time() < time(DIGEST_HOUR):
            continue
        with scope(organization):
            members = selectors.tellable_members(organization=organization)
            queues = defaultdict(list)
            for overage_request in selectors.pending_requests(organization=organization):
                for approver in selectors.approvers_to_tell(overage_request=overage_request, members=members):
                    queues[approver].append(overage_request)
            for approver, queue in queues.items():
                if _digest_sent(organization, approver, queue[:DIGEST_LENGTH], day=local.date()):
                    sent += 1
    return sent


def _digest_sent(organization: Organization, approver, queue: list[OverageRequest], *, day) -> bool:
    """Record today's digest and send it, or neither: a failed send is tried again next hour."""
    try:
        with transaction.atomic():
            ApproverDigest.objects.create(organization=organization, member=approver, day=day, pending=len(queue))
            _send_digest(organization, approver, queue)
    except IntegrityError:  # sent today already (or by a concurrent run)
        return False
    return True


def _send_digest(organization: Organization, approver, queue: list[OverageRequest]) -> None:
    zone = ZoneInfo(organization.time_zone)
    lines = [f"- #{r.pk} {r.member.user.email}: {r.tokens:,} tokens, asked {r.created_at.astimezone(zone):%b %-d} "
             f"(“{r.reason[:80]}”)" for r in queue]
    send_mail(
        subject=_subject(f"{len(queue)} overage request{'s' if len(queue) != 1 else ''} waiting for you"),
        message=(f"Still pending in {organization.name}, oldest first:\n\n" + "\n".join(lines)
                 + f"\n\nYour queue: {_url(organization, 'approval_queue')}\n"),
        from_email=None, recipient_list=[approver.user.email])
