"""The directory's view of the organization (SCIM Users are its members, Groups its teams), and
the changes it provisions, made through the portal's own services so every rule and the audit log
apply as on the pages: creating, replacing, patching, deactivating and deleting members, and teams
with their members.

A member deleted by the directory is deactivated (losing what every leaver loses), never removed:
their ledger stays. A group deleted is emptied and no longer listed; the team stays, for its history.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from scim2_models import (
    UniquenessException,
    Email,
    Group,
    GroupMember,
    GroupMembership,
    InvalidValueException,
    Meta,
    MutabilityException,
    Name,
    NotFoundException,
    User,
)

from identity.models import DirectoryEntry, IdentityProvider
from identity.selectors import email_is_organizations
from portal import services as portal_services
from portal.audit import log_action
from portal.models import Member, Organization, Team, User as Account


# -- reading ---------------------------------------------------------------------------------------


def members(*, organization: Organization) -> QuerySet[Member]:
    """The members the directory sees: all but those it deleted."""
    return (Member.objects.filter(organization=organization).exclude(directory__deleted_at__isnull=False)
            .select_related("user", "team", "directory").order_by("pk"))


def teams(*, organization: Organization) -> QuerySet[Team]:
    return (Team.objects.filter(organization=organization).exclude(directory__deleted_at__isnull=False)
            .select_related("directory").order_by("pk"))


def _get(queryset, resource_id: str, what: str):
    found = queryset.filter(pk=int(resource_id)).first() if resource_id.isascii() and resource_id.isdigit() \
        and len(resource_id) <= 18 else None
    if found is None:
        raise NotFoundException(detail=f"No {what} {resource_id!r} in this organization.")
    return found


def member_get(*, organization: Organization, member_id: str) -> Member:
    return _get(members(organization=organization), member_id, "User")


def team_get(*, organization: Organization, team_id: str) -> Team:
    return _get(teams(organization=organization), team_id, "Group")


def _external_id(obj) -> str | None:
    try:
        return obj.directory.external_id or None
    except DirectoryEntry.DoesNotExist:
        return None


def user_resource(member: Member, *, base_url: str) -> User:
    user = member.user
    groups = [GroupMembership(value=str(member.team_id), display=member.team.name,
                              ref=f"{base_url}/Groups/{member.team_id}")] if member.team_id else None
    return User(id=str(member.pk), external_id=_external_id(member), user_name=user.email,
                name=Name(given_name=user.first_name or None, family_name=user.last_name or None,
                          formatted=user.get_full_name() or None),
                display_name=user.display_name, emails=[Email(value=user.email, type="work", primary=True)],
                active=member.is_active, groups=groups,
                meta=Meta(resource_type="User", created=member.joined_at, last_modified=member.joined_at,
                          location=f"{base_url}/Users/{member.pk}"))


def group_resource(team: Team, *, base_url: str) -> Group:
    in_team = members(organization=team.organization).filter(team=team)
    return Group(id=str(team.pk), external_id=_external_id(team), display_name=team.name,
                 members=[GroupMember(value=str(m.pk), display=m.user.email, ref=f"{base_url}/Users/{m.pk}",
                                      type="User") for m in in_team],
                 meta=Meta(resource_type="Group", created=team.created_at, last_modified=team.created_at,
                           location=f"{base_url}/Groups/{team.pk}"))


# -- writing ---------------------------------------------------------------------------------------


def _entry(obj, **kind) -> DirectoryEntry:
    entry, _created = DirectoryEntry.objects.get_or_create(organization=obj.organization, **kind)
    return entry


def _set_external_id(obj, external_id: str | None, *, actor_member: Member, via: str, **kind) -> None:
    entry = _entry(obj, **kind)
    external_id = (external_id or "")[:255]
    if entry.external_id != external_id:
        log_action(actor=actor_member.user, organization=obj.organization, action="directory.external_id_changed",
                   obj=obj, data={"external_id": [entry.external_id, external_id], "via": via})
        entry.external_id = external_id
        entry.save(update_fields=["external_id"])


def _service(call):
    """A portal service's ValidationError as the SCIM error it is."""
    try:
        return call()
    except ValidationError as error:
        raise InvalidValueException(detail=" ".join(error.messages)) from None


def _names(user: Account, resource: User, organization: Organization, *, actor_member: Member, via: str) -> None:
    """The directory names the person only where it vouches for their address."""
    if resource.name is None or not email_is_organizations(organization=organization, email=user.email):
        return
    first, last = (resource.name.given_name or "")[:150], (resource.name.family_name or "")[:150]
    if (first, last) != (user.first_name, user.last_name):
        log_action(actor=actor_member.user, organization=organization, action="directory.name_changed", obj=user,
                   data={"email": user.email, "first_name": [user.first_name, first],
                         "last_name": [user.last_name, last], "via": via})
        user.first_name, user.last_name = first, last
        user.save(update_fields=["first_name", "last_name"])


def _adopt(user: Account, email: str) -> None:
    """An account that exists with the address the directory provisions: the directory vouches for
    the address, so an account that never proved it is not kept with the password whoever made it
    chose (as django-allauth does when a login by email finds such an account)."""
    from allauth.account.models import EmailAddress

    address = EmailAddress.objects.filter(user=user, email__iexact=email).first()
    if address is not None and address.verified:
        return
    user.set_unusable_password()
    user.save(update_fields=["password"])
    portal_services.user_sessions_end(user=user)
    if address is None:
        primary = not EmailAddress.objects.filter(user=user).exists()
        EmailAddress.objects.create(user=user, email=email, verified=True, primary=primary)
    else:
        address.verified = True
        address.save(update_fields=["verified"])


@transaction.atomic
def user_create(*, organization: Organization, actor_member: Member, resource: User, via: str) -> Member:
    """Provision a person: their account (made for an address in a verified domain) and membership,
    with the identity provider's default role and team; a member the directory deleted comes back."""
    from allauth.account.models import EmailAddress

    email = (resource.user_name or "").strip().lower()
    if not email_is_organizations(organization=organization, email=email):
        raise InvalidValueException(detail=f"userName {email!r} is not an email address in a domain this "
                                           "organization has verified.")
    user = Account.objects.filter(email__iexact=email).first()
    member = Member.objects.filter(organization=organization, user=user).first() if user else None
    if member is not None:
        entry = _entry(member, member=member)
        if entry.deleted_at is None:
            raise UniquenessException(detail=f"A User with userName {email!r} exists.")
        entry.deleted_at = None
        entry.save(update_fields=["deleted_at"])
        log_action(actor=actor_member.user, organization=organization, action="member.provisioned", obj=member,
                   data={"email": email, "again": True, "via": via})
        return user_replace(member=member, actor_member=actor_member, resource=resource, via=via)
    if user is None:
        user = Account.objects.create_user(email=email, password=None)
        EmailAddress.objects.create(user=user, email=email, verified=True, primary=True)
    else:
        _adopt(user, email)
    provider = IdentityProvider.objects.filter(organization=organization).first()
    member = Member(organization=organization, user=user, team=provider.default_team if provider else None,
                    is_active=resource.active is not False)
    member.set_roles([provider.default_role if provider else "employee"])
    member.save()
    _names(user, resource, organization, actor_member=actor_member, via=via)
    _set_external_id(member, resource.external_id, actor_member=actor_member, via=via, member=member)
    log_action(actor=actor_member.user, organization=organization, action="member.provisioned", obj=member,
               data={"email": email, "roles": member.roles, "team": member.team, "active": member.is_active,
                     "via": via})
    return member


@transaction.atomic
def user_replace(*, member: Member, actor_member: Member, resource: User, via: str) -> Member:
    """The member as the directory now describes them (their address cannot change: it is their account)."""
    if resource.user_name is not None and resource.user_name.strip().lower() != member.user.email.lower():
        raise MutabilityException(detail="userName cannot change: it is the person's login to every organization.")
    _names(member.user, resource, member.organization, actor_member=actor_member, via=via)
    _set_external_id(member, resource.external_id, actor_member=actor_member, via=via, member=member)
    active = resource.active is not False
    if active != member.is_active:
        _service(lambda: portal_services.member_update(member=member, actor_member=actor_member, team=member.team,
                                                       is_active=active, via=via))
    return member


@transaction.atomic
def user_delete(*, member: Member, actor_member: Member, via: str) -> None:
    """Deprovision: deactivated, losing what every leaver loses (portal.services.member_access_end),
    no longer listed; the ledger stays."""
    if member.is_active:
        _service(lambda: portal_services.member_update(member=member, actor_member=actor_member, team=member.team,
                                                       is_active=False, via=via))
    else:  # deactivated before: the leaver rule again, for what it left (a key of an older rule)
        log_action(actor=actor_member.user, organization=member.organization, action="member.access_ended",
                   obj=member, data=portal_services.member_access_end(member=member, actor=actor_member.user)
                   | {"via": via})
    entry = _entry(member, member=member)
    entry.deleted_at = timezone.now()
    entry.save(update_fields=["deleted_at"])
    log_action(actor=actor_member.user, organization=member.organization, action="member.deprovisioned", obj=member,
               data={"email": member.user.email, "via": via})


def _member_ids(organization: Organization, group: Group) -> set[int]:
    wanted = set()
    for entry in group.members or []:
        value = entry.value or ""
        if not (value.isascii() and value.isdigit() and len(value) <= 18):
            raise InvalidValueException(detail=f"members: no User {value!r} in this organization.")
        wanted.add(int(value))
    found = set(members(organization=organization).filter(pk__in=wanted).values_list("pk", flat=True))
    if wanted - found:
        raise InvalidValueException(detail=f"members: no User {sorted(wanted - found)[0]!r} in this organization.")
    return wanted


def _move_members(*, team: Team, wanted: set[int], actor_member: Member, via: str) -> None:
    """Members join the team (leaving their previous one: a member is in one team) or leave it, as
    the pages move them (portal.services.member_update)."""
    joining, leaving = Q(pk__in=wanted) & ~Q(team=team), Q(team=team) & ~Q(pk__in=wanted)
    for member in members(organization=team.organization).filter(joining | leaving):
        target = team if member.pk in wanted else None
        _service(lambda m=member, t=target: portal_services.member_update(member=m, actor_member=actor_member,
                                                                          team=t, via=via))


@transaction.atomic
def group_create(*, organization: Organization, actor_member: Member, resource: Group, via: str) -> Team:
    name = (resource.display_name or "").strip()
    wanted = _member_ids(organization, resource)
    if Team.objects.filter(organization=organization, name__iexact=name).exists():
        raise UniquenessException(detail=f"A Group with displayName {name!r} exists.")
    team = _service(lambda: portal_services.team_create(organization=organization, actor=actor_member.user, name=name))
    _set_external_id(team, resource.external_id, actor_member=actor_member, via=via, team=team)
    _move_members(team=team, wanted=wanted, actor_member=actor_member, via=via)
    return team


@transaction.atomic
def group_replace(*, team: Team, actor_member: Member, resource: Group, via: str) -> Team:
    wanted = _member_ids(team.organization, resource)
    name = (resource.display_name or "").strip()
    if name != team.name:
        if Team.objects.filter(organization=team.organization, name__iexact=name).exclude(pk=team.pk).exists():
            raise UniquenessException(detail=f"A Group with displayName {name!r} exists.")
        _service(lambda: portal_services.team_update(team=team, actor=actor_member.user, name=name,
                                                     cost_centre=team.cost_centre))
    _set_external_id(team, resource.external_id, actor_member=actor_member, via=via, team=team)
    _move_members(team=team, wanted=wanted, actor_member=actor_member, via=via)
    return team


@transaction.atomic
def group_delete(*, team: Team, actor_member: Member, via: str) -> None:
    _move_members(team=team, wanted=set(), actor_member=actor_member, via=via)
    entry = _entry(team, team=team)
    entry.deleted_at = timezone.now()
    entry.save(update_fields=["deleted_at"])
    log_action(actor=actor_member.user, organization=team.organization, action="team.deprovisioned", obj=team,
               data={"name": team.name, "via": via})
