"""Reads for company identity: which identity provider an email address logs in with, whether a
session may use an organization (single sign-on required), an organization's identity settings.

Login happens before any organization is known, so the look-ups by email address and by provider
are deliberately unscoped: they read only what a login needs.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db.models import Q, QuerySet

from identity.models import EmailDomain, IdentityProvider, ScimToken
from portal.models import Member, Organization, User
from portal.tenancy import unscoped


def email_domain_of(email: str) -> str:
    return (email or "").rpartition("@")[2].strip().lower()


def verified_organization_for(email: str) -> Organization | None:
    """The organization that has verified the domain of `email`, if one has."""
    domain = email_domain_of(email)
    if not domain:
        return None
    with unscoped():
        found = EmailDomain.objects.filter(domain__iexact=domain, verified_at__isnull=False).select_related(
            "organization").first()
    return found.organization if found else None


def provider_for_email(email: str) -> IdentityProvider | None:
    """The identity provider an address logs in with: that of the organization that verified its domain."""
    organization = verified_organization_for(email)
    if organization is None:
        return None
    with unscoped():
        return IdentityProvider.objects.select_related("organization").filter(organization=organization).first()


def provider_by_id(provider_id: str) -> IdentityProvider | None:
    """The identity provider with this django-allauth provider id (`<slug>-<kind>`), or None."""
    slug, _dash, kind = provider_id.rpartition("-")
    with unscoped():
        return IdentityProvider.objects.select_related("organization").filter(
            organization__slug=slug, kind=kind).first()


def providers(*, kind: str | None = None, slug: str | None = None) -> list[IdentityProvider]:
    with unscoped():
        found = IdentityProvider.objects.select_related("organization")
        if kind:
            found = found.filter(kind=kind)
        if slug:
            found = found.filter(organization__slug=slug)
        return list(found)


def email_is_organizations(*, organization: Organization, email: str) -> bool:
    """Whether `email` is in a domain `organization` has verified: only then may its identity
    provider or directory vouch for the address (link, create or provision an account with it)."""
    try:
        validate_email(email)  # one address: "x@y@a.example" is not one of a.example's
    except ValidationError:
        return False
    verified = verified_organization_for(email)
    return verified is not None and verified.pk == organization.pk


def email_link_refusal(*, user: User, organization: Organization) -> str | None:
    """Why an identity provider of `organization` may not take over `user`'s existing account by
    the email address it asserts, or None. An organization's admins choose its identity provider, so
    its assertion is trusted only for an account that has nothing beyond an ordinary membership of
    that one organization: not platform staff, not an owner or admin anywhere, not a member of any
    other organization. Those link from their own logged-in session (a "connect" login)."""
    if user.is_staff or user.is_superuser:
        return "This account is a platform administrator's."
    with unscoped():
        memberships = Member.objects.filter(user=user)
        if memberships.exclude(organization=organization).exists():
            return "This account is a member of another organization too."
        if memberships.filter(Q(is_owner=True) | Q(is_admin=True)).exists():
            return "This account is an owner or an admin."
    return None


def organization_session_refusal(*, member: Member, signed_in_through: int | None) -> str | None:
    """Why a session may not use `member`'s organization, or None: the organization requires single
    sign-on and the session was not signed in through its identity provider (`signed_in_through`,
    the organization a login through an identity provider names), unless `member` is its break-glass
    owner, still an active owner. The one rule of "single sign-on required", checked wherever a
    session acts in an organization (pages and the REST API); API keys are not sessions."""
    organization = member.organization
    if signed_in_through == organization.pk:
        return None
    with unscoped():
        provider = IdentityProvider.objects.filter(organization=organization, sso_required=True).first()
    if provider is None:
        return None
    if provider.break_glass_member_id == member.pk and member.is_owner and member.is_active:
        return None
    return (f"{organization.name} requires single sign-on: continue with your company account ({provider.name}) "
            "to use it.")


def identity_provider_of(*, organization: Organization) -> IdentityProvider | None:
    """The organization's identity provider; read also before a session may enter its scope."""
    with unscoped():
        return IdentityProvider.objects.select_related("organization").filter(organization=organization).first()


def email_domain_list(*, organization: Organization) -> QuerySet[EmailDomain]:
    return EmailDomain.objects.filter(organization=organization).order_by("domain")


def email_domain_get(*, organization: Organization, email_domain_id: int) -> EmailDomain:
    from django.shortcuts import get_object_or_404

    return get_object_or_404(EmailDomain.objects.filter(organization=organization), pk=email_domain_id)


def scim_token_list(*, organization: Organization) -> QuerySet[ScimToken]:
    return ScimToken.objects.filter(organization=organization).select_related("created_by__user")


def scim_token_get(*, organization: Organization, scim_token_id: int) -> ScimToken:
    from django.shortcuts import get_object_or_404

    return get_object_or_404(ScimToken.objects.filter(organization=organization), pk=scim_token_id)
