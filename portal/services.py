"""Writes for organizations, teams, members and invitations.

Each function is keyword-only, checks the rules the database cannot, writes in one transaction
and records the privileged action in the audit log. Errors are `ValidationError`s keyed by field.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from portal.audit import changes, log_action
from portal.links import public_url
from portal.models import Invitation, Member, Organization, Team, User, hash_token
from portal.tenancy import ROLES, scope

INVITATION_LIFETIME = timedelta(days=14)
# The session of a login through an organization's identity provider names that organization.
SIGNED_IN_THROUGH = "portal_signed_in_through"
RESERVED_SLUGS = {"new", "admin", "api", "static", "accounts", "invitations", "orgs"}


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    if base in RESERVED_SLUGS:
        base = f"{base}-org"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


@transaction.atomic
def organization_create(*, name: str, owner: User, time_zone: str = "UTC", currency: str = "USD") -> Organization:
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the organization a name."})
    organization = Organization(name=name, slug=_unique_slug(name), time_zone=time_zone, currency=currency)
    organization.full_clean()
    organization.save()
    with scope(organization):
        member = Member.objects.create(organization=organization, user=owner, is_owner=True, is_employee=True)
        log_action(actor=owner, organization=organization, action="organization.created", obj=organization,
                   data={"name": name, "owner": owner.email})
        log_action(actor=owner, organization=organization, action="member.added", obj=member, data={"roles": member.roles})
    return organization


@transaction.atomic
def organization_update(*, organization: Organization, actor: User, name: str, time_zone: str, currency: str,
                        leaver_allowance: str | None = None) -> Organization:
    new = {"name": name.strip(), "time_zone": time_zone, "currency": currency,
           "leaver_allowance": leaver_allowance or organization.leaver_allowance}
    diff = changes(organization, new.keys(), new)
    for field, value in new.items():
        setattr(organization, field, value)
    try:
        organization.full_clean()
    except ValidationError:
        organization.refresh_from_db()  # leave the caller's object as stored
        raise
    organization.save()
    if diff:
        log_action(actor=actor, organization=organization, action="organization.updated", obj=organization, data=diff)
    return organization


def _validate_team_name(*, organization: Organization, name: str, exclude_pk=None) -> str:
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the team a name."})
    clash = Team.objects.filter(organization=organization, name__iexact=name)
    if exclude_pk:
        clash = clash.exclude(pk=exclude_pk)
    if clash.exists():
        raise ValidationError({"name": f"A team called “{name}” already exists."})
    return name


@transaction.atomic
def team_create(*, organization: Organization, actor: User, name: str, cost_centre: str = "") -> Team:
    name = _validate_team_name(organization=organization, name=name)
    team = Team.objects.create(organization=organization, name=name, cost_centre=cost_centre.strip())
    log_action(actor=actor, organization=organization, action="team.created", obj=team,
               data={"name": team.name, "cost_centre": team.cost_centre})
    return team


@transaction.atomic
def team_update(*, team: Team, actor: User, name: str, cost_centre: str = "") -> Team:
    new = {"name": _validate_team_name(organization=team.organization, name=name, exclude_pk=team.pk),
           "cost_centre": cost_centre.strip()}
    diff = changes(team, new.keys(), new)
    for field, value in new.items():
        setattr(team, field, value)
    team.save()
    if diff:
        log_action(actor=actor, organization=team.organization, action="team.updated", obj=team, data=diff)
    return team


def grantable_roles(actor_member: Member) -> frozenset[str]:
    """The roles a member may hand out: their own (with what they imply), plus employee for HR."""
    roles = set(actor_member.effective_roles)
    if roles & {"hr", "admin", "owner"}:
        roles.add("employee")
    return frozenset(roles)


def _validate_roles(*, actor_member: Member, roles, previous=()) -> list[str]:
    roles = [role for role in ROLES if role in set(roles)]
    if not roles:
        raise ValidationError({"roles": "Choose at least one role."})
    allowed = grantable_roles(actor_member)
    touched = set(roles) ^ set(previous)
    refused = sorted(touched - allowed)
    if refused:
        raise ValidationError({"roles": f"You cannot grant or remove these roles: {', '.join(refused)}."})
    return roles


def _active_owner_count(organization: Organization) -> int:
    return Member.objects.filter(organization=organization, is_owner=True, is_active=True).count()


@transaction.atomic
def member_update(*, member: Member, actor_member: Member, team: Team | None, roles=None, is_active: bool | None = None,
                  via: str = "") -> Member:
    """Change a member's team, roles or active state. The last active owner cannot be removed; a
    member deactivated loses their access at once (member_access_end). `via` says for the audit log
    how the actor acted (e.g. through the directory's SCIM token)."""
    # Lock the organization's owner rows so two admins cannot demote the last two owners at once.
    list(Member.objects.select_for_update().filter(organization=member.organization, is_owner=True))
    new: dict = {"team": team}
    if team is not None and team.organization_id != member.organization_id:
        raise ValidationError({"team": "Choose a team of this organization."})
    if roles is not None and set(roles) != set(member.roles):
        if not actor_member.has_any_role(["admin"]):
            raise ValidationError({"roles": "Only admins and owners change a member's roles."})
        roles = _validate_roles(actor_member=actor_member, roles=roles, previous=member.roles)
    else:
        roles = None
    if is_active is not None:
        new["is_active"] = is_active
        if member.pk == actor_member.pk and not is_active:
            raise ValidationError({"is_active": "You cannot deactivate yourself."})
        if is_active != member.is_active and not member.effective_roles <= grantable_roles(actor_member):
            raise ValidationError({"is_active": "Only someone who holds all of this member's roles can (de)activate them."})
    losing_owner = member.is_owner and member.is_active and (
        (roles is not None and "owner" not in roles) or is_active is False
    )
    if losing_owner and _active_owner_count(member.organization) <= 1:
        raise ValidationError({"is_active" if is_active is False else "roles": "An organization needs at least one active owner."})

    diff = changes(member, new.keys(), new)
    if roles is not None and roles != member.roles:
        diff["roles"] = [member.roles, roles]
        member.set_roles(roles)
    for field, value in new.items():
        setattr(member, field, value)
    member.save()
    if diff:
        deactivated = diff.get("is_active") == [True, False]
        via_data = {"via": via} if via else {}
        log_action(actor=actor_member.user, organization=member.organization,
                   action="member.deactivated" if deactivated else "member.updated", obj=member, data=diff | via_data)
        if deactivated:
            log_action(actor=actor_member.user, organization=member.organization, action="member.access_ended",
                       obj=member, data=member_access_end(member=member, actor=actor_member.user) | via_data)
    return member


def member_access_end(*, member: Member, actor: User | None) -> dict:
    """What a member's deactivation ends at once, wherever it was made (the members page, the REST
    API, the directory): their sessions with access to this organization, their API keys (refused
    from the next request: the saved member drops the keys' cached identities, apikeys.signals), and
    their open holds (released through the ledger). Their ledger stays; the allowance left on their
    account follows the organization's rule for leavers: it stays for HR, or is forfeited.
    Returns what it did, for the audit log."""
    from allowances import ledger
    from allowances.models import Account
    from allowances.services import account_holds_release

    organization = member.organization
    ended = {
        "sessions_ended": user_sessions_end(user=member.user, organization=organization),
        "holds_released": account_holds_release(member_ids=[member.pk], reason="the member was deactivated"),
    }
    account = Account.objects.filter(member=member).first()
    if organization.leaver_allowance == Organization.LeaverAllowance.FORFEIT and account is not None:
        key = f"leaver:{uuid.uuid4().hex}"
        for _attempt in range(5):  # a request in flight may still settle usage: never cut below zero
            account.refresh_from_db(fields=["granted", "held", "used"])
            if account.available <= 0:
                break
            try:
                ledger.post(account=account, kind=ledger.Kind.ADJUSTMENT, tokens=-account.available, guard="zero",
                            idempotency_key=key, actor=actor, reason="Forfeited: the member was deactivated",
                            reference=f"member:{member.pk}")
            except ledger.InsufficientTokens:
                continue
            ended["tokens_forfeited"] = account.available
            break
    return ended


def _invitation_url(token: str) -> str:
    return public_url(reverse("invitation_accept", kwargs={"token": token}))


@transaction.atomic
def invitation_create(*, organization: Organization, actor_member: Member, email: str, roles, team: Team | None = None):
    """Invite someone by email. Returns (invitation, token); the token is only ever in the email."""
    email = email.strip().lower()
    roles = _validate_roles(actor_member=actor_member, roles=roles)
    if team is not None and team.organization_id != organization.pk:
        raise ValidationError({"team": "Choose a team of this organization."})
    if Member.objects.filter(organization=organization, user__email__iexact=email, is_active=True).exists():
        raise ValidationError({"email": f"{email} is already a member of {organization.name}."})
    if Invitation.objects.filter(organization=organization, email__iexact=email, accepted_at__isnull=True,
                                 revoked_at__isnull=True, expires_at__gt=timezone.now()).exists():
        raise ValidationError({"email": f"{email} already has an open invitation; revoke it to send a new one."})
    # An expired open invitation would block the new one through the partial unique constraint.
    Invitation.objects.filter(organization=organization, email__iexact=email, accepted_at__isnull=True,
                              revoked_at__isnull=True).update(revoked_at=timezone.now())

    token = secrets.token_urlsafe(32)
    invitation = Invitation(organization=organization, email=email, team=team, token_hash=hash_token(token),
                            invited_by=actor_member.user, expires_at=timezone.now() + INVITATION_LIFETIME)
    invitation.set_roles(roles)
    invitation.save()
    log_action(actor=actor_member.user, organization=organization, action="invitation.created", obj=invitation,
               data={"email": email, "roles": roles, "team": team})
    url = _invitation_url(token)
    transaction.on_commit(lambda: send_mail(
        subject=f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}You are invited to {organization.name}",
        message=(f"{actor_member.user.display_name} invited you to join {organization.name} on the token allowance "
                 f"portal as {', '.join(roles)}.\n\nAccept the invitation: {url}\n\n"
                 f"The link is valid for {INVITATION_LIFETIME.days} days."),
        from_email=None,
        recipient_list=[email],
    ))
    return invitation, token


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: User) -> Invitation:
    if invitation.status != "open":
        raise ValidationError(f"This invitation is already {invitation.status}.")
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    log_action(actor=actor, organization=invitation.organization, action="invitation.revoked", obj=invitation,
               data={"email": invitation.email})
    return invitation


@transaction.atomic
def invitation_accept(*, invitation: Invitation, user: User) -> Member:
    """Join the invitation's organization as `user`, whose email must be the invited one."""
    invitation = Invitation.all_objects.select_for_update().get(pk=invitation.pk)
    if invitation.status != "open":
        raise ValidationError(f"This invitation is {invitation.status}.")
    if user.email.lower() != invitation.email.lower():
        raise ValidationError(f"This invitation was sent to another email address than {user.email}.")
    organization = invitation.organization
    with scope(organization):
        member = Member.objects.filter(organization=organization, user=user).first()
        if member is not None and member.is_active:
            raise ValidationError(f"You are already a member of {organization.name}.")
        if member is None:
            member = Member(organization=organization, user=user)
        member.set_roles(invitation.roles)
        member.team = invitation.team
        member.is_active = True
        try:
            member.save()
        except IntegrityError as error:  # a concurrent accept of the same membership
            raise ValidationError(f"You are already a member of {organization.name}.") from error
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        log_action(actor=user, organization=organization, action="invitation.accepted", obj=invitation,
                   data={"email": invitation.email, "roles": invitation.roles, "team": invitation.team})
    return member


def user_create_from_invitation(*, invitation: Invitation, password: str, first_name: str = "", last_name: str = "") -> User:
    """Create the account for an invited person. The invitation link proves the email address."""
    from allauth.account.models import EmailAddress

    if User.objects.filter(email__iexact=invitation.email).exists():
        raise ValidationError({"email": "An account with this email exists; log in to accept the invitation."})
    user = User.objects.create_user(email=invitation.email, password=password, first_name=first_name, last_name=last_name)
    EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
    return user


def _sessions_end(user_ids, *, ends=lambda data: True) -> int:
    """Delete the live sessions logged in as one of `user_ids` whose data `ends`; returns how many.

    Sessions are stored in the database (Django's default engine) and are not indexed by user, so
    each live one is read; this runs when an account, a membership or a login rule changes, which
    is rare.
    """
    user_ids = {str(pk) for pk in user_ids}
    theirs = [session.pk for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator()
              if (data := session.get_decoded()).get(SESSION_KEY) in user_ids and ends(data)]
    Session.objects.filter(pk__in=theirs).delete()
    return len(theirs)


def user_sessions_end(*, user: User, organization: Organization | None = None) -> int:
    """Log `user` out everywhere: delete every session logged in as them; returns how many. With an
    `organization`, only the sessions that have access to it alone: those signed in through its
    identity provider, and every one when the user is an active member of no other organization."""
    if organization is None or not Member.all_objects.filter(user=user, is_active=True).exclude(
            organization=organization).exists():
        return _sessions_end([user.pk])
    return _sessions_end([user.pk], ends=lambda data: data.get(SIGNED_IN_THROUGH) == organization.pk)


def organization_password_sessions_end(*, organization: Organization, except_member: Member | None) -> int:
    """End the sessions of the organization's active members that were not signed in through its
    identity provider (it now requires single sign-on), but for `except_member`'s (break-glass)."""
    members = Member.all_objects.filter(organization=organization, is_active=True)
    if except_member is not None:
        members = members.exclude(pk=except_member.pk)
    return _sessions_end(members.values_list("user_id", flat=True),
                         ends=lambda data: data.get(SIGNED_IN_THROUGH) != organization.pk)
