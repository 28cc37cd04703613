"""Reads for organizations, members, invitations and the audit log.

Selectors take the organization as a required keyword. A row that belongs to another
organization is answered exactly like a row that does not exist.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from portal.models import AuditLogEntry, Invitation, Member, Organization, Team, User, hash_token
from portal.tenancy import unscoped


def _text(value: str) -> str:
    """A filter string from a query parameter: PostgreSQL refuses NUL characters (a 500), and no stored text has one."""
    return value.replace("\x00", "")


def memberships_for_user(user: User) -> list[Member]:
    """The active memberships of one user, across organizations (for the organization switcher)."""
    if not user.is_authenticated:
        return []
    with unscoped():
        return list(
            Member.objects.filter(user=user, is_active=True).select_related("organization").order_by("organization__name")
        )


def member_list(*, organization: Organization, team_id: int | None = None, search: str = "") -> QuerySet[Member]:
    members = Member.objects.filter(organization=organization).select_related("user", "team")
    if team_id:
        members = members.filter(team_id=team_id)
    search = _text(search).strip()
    if search:
        members = members.filter(user__email__icontains=search)
    return members.order_by("-is_active", "user__email")


def member_get(*, organization: Organization, member_id: int) -> Member:
    return get_object_or_404(Member.objects.filter(organization=organization).select_related("user", "team"), pk=member_id)


def team_list(*, organization: Organization) -> QuerySet[Team]:
    return Team.objects.filter(organization=organization).order_by("name")


def team_get(*, organization: Organization, team_id: int) -> Team:
    return get_object_or_404(Team.objects.filter(organization=organization), pk=team_id)


def invitation_list(*, organization: Organization) -> QuerySet[Invitation]:
    return Invitation.objects.filter(organization=organization).select_related("team", "invited_by")


def invitation_get(*, organization: Organization, invitation_id: int) -> Invitation:
    return get_object_or_404(Invitation.objects.filter(organization=organization), pk=invitation_id)


def invitation_by_token(token: str) -> Invitation | None:
    """The invitation a link carries, whatever organization it is for (the token is the proof)."""
    with unscoped():
        return Invitation.objects.select_related("organization", "team").filter(token_hash=hash_token(token)).first()


def audit_log(
    *,
    organization: Organization,
    action: str = "",
    actor_email: str = "",
    object_type: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[AuditLogEntry]:
    entries = AuditLogEntry.objects.filter(organization=organization)
    action, actor_email, object_type = _text(action), _text(actor_email), _text(object_type)
    if action:
        entries = entries.filter(action__startswith=action)
    if actor_email:
        entries = entries.filter(actor_email__icontains=actor_email.strip())
    if object_type:
        entries = entries.filter(object_type=object_type)
    if since:
        entries = entries.filter(created_at__gte=since)
    if until:
        entries = entries.filter(created_at__lt=until)
    return entries.order_by("-created_at", "-id")


def audit_actions(*, organization: Organization) -> list[str]:
    return list(
        AuditLogEntry.objects.filter(organization=organization).order_by("action").values_list("action", flat=True).distinct()
    )
