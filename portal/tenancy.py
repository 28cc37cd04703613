"""The tenancy core: which organization the running code works for, enforced in one place.

Every tenant-owned model inherits `TenantModel`. Its default manager returns only the rows of the
active organization and raises `ScopeError` when no organization is active, so a view, task or
command that forgets to filter fails closed instead of leaking another company's rows. Saving a
row of another organization while a scope is active raises too.

The scope is activated by `activate` for the member a request acts as: by `TenancyMiddleware`
for pages under `/o/<slug>/`, and by every API view once DRF has authenticated the caller
(portal.api.views.OrganizationAPIView); by tasks and commands with `scope(org)`; and it is
deliberately lifted with `unscoped()` only where code works across tenants (platform admin,
period close over all organizations, a user's list of their own memberships).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from functools import wraps
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from django.utils import timezone

_UNSCOPED = object()
_active_scope: contextvars.ContextVar = contextvars.ContextVar("portal_tenant_scope", default=None)


class ScopeError(RuntimeError):
    """A tenant-owned model was used with no organization active."""


@contextmanager
def scope(organization):
    """Run the block for one organization: tenant queries see only its rows."""
    if organization is None:
        raise ScopeError("scope() needs an organization")
    token = _active_scope.set(organization)
    try:
        yield organization
    finally:
        _active_scope.reset(token)


@contextmanager
def unscoped():
    """Run the block across all organizations. Use only where that is the point."""
    token = _active_scope.set(_UNSCOPED)
    try:
        yield
    finally:
        _active_scope.reset(token)


def current_organization():
    active = _active_scope.get()
    return None if active is _UNSCOPED else active


def _refuse_other_organization(organization_id, what: str) -> None:
    active = _active_scope.get()
    if active is not None and active is not _UNSCOPED and organization_id != active.pk:
        raise ScopeError(f"refusing to {what} of another organization")


class TenantQuerySet(models.QuerySet):
    """Writes that skip Model.save() get the same guard: no row moves to or lands in another org."""

    def update(self, **kwargs):
        for field in ("organization", "organization_id"):
            if field in kwargs:
                value = kwargs[field]
                _refuse_other_organization(getattr(value, "pk", value), f"move {self.model.__name__} rows to a scope")
        return super().update(**kwargs)

    def bulk_create(self, objs, *args, **kwargs):
        objs = list(objs)
        for obj in objs:
            _refuse_other_organization(obj.organization_id, f"create a {self.model.__name__}")
        return super().bulk_create(objs, *args, **kwargs)


class TenantManager(models.Manager.from_queryset(TenantQuerySet)):
    def get_queryset(self):
        queryset = super().get_queryset()
        active = _active_scope.get()
        if active is _UNSCOPED:
            return queryset
        if active is None:
            raise ScopeError(
                f"{self.model.__name__} was queried outside an organization scope; "
                "use portal.tenancy.scope(org) or go through request.organization"
            )
        return queryset.filter(organization=active)


class TenantModel(models.Model):
    """A row that belongs to exactly one organization."""

    organization = models.ForeignKey("portal.Organization", on_delete=models.CASCADE, related_name="+")

    objects = TenantManager()
    # Explicit escape hatch for cross-tenant work (jobs over all orgs, platform admin).
    all_objects = models.Manager()

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        _refuse_other_organization(self.organization_id, f"save a {type(self).__name__}")
        super().save(*args, **kwargs)


# -- roles -----------------------------------------------------------------------------------

ROLES = ("owner", "admin", "hr", "approver", "employee")
# A role includes the ones it implies: the owner can do what an admin can, an admin what HR and
# approvers can. Every member has their own dashboard whatever their roles.
IMPLIED_ROLES = {
    "owner": {"owner", "admin", "hr", "approver"},
    "admin": {"admin", "hr", "approver"},
    "hr": {"hr"},
    "approver": {"approver"},
    "employee": {"employee"},
}


def effective_roles(roles) -> frozenset[str]:
    result: set[str] = set()
    for role in roles:
        result |= IMPLIED_ROLES[role]
    return frozenset(result)


def require_roles(*roles: str):
    """Declare which roles may use an organization view; others get 403."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {unknown}")

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            member = getattr(request, "member", None)
            if member is None or not member.has_any_role(roles):
                raise PermissionDenied("Your role in this organization does not allow this page.")
            return view(request, *args, **kwargs)

        wrapped.required_roles = frozenset(roles)
        return wrapped

    return decorator


# -- request scope ---------------------------------------------------------------------------


def _is_api_path(path: str) -> bool:
    # The REST API and the directory's SCIM API answer in JSON, also when no route matches (the
    # gateway's /v1/ never comes here); their callers are authenticated by the APIs' own classes.
    return path.startswith(("/api/", "/scim/"))


def member_for(*, slug: str | None, user=None, key=None):
    """The active member acting in the organization of `slug` (None: the key's organization) by an
    API key's identity or a signed-in user; None for anyone who is not one, and for an organization
    that does not exist (not yours answers like missing)."""
    from portal.models import Member

    members = Member.all_objects.select_related("organization", "user", "team").filter(is_active=True)
    if slug is not None:
        members = members.filter(organization__slug=slug)
    if key is not None:
        return members.filter(pk=key.member_id, organization_id=key.organization_id).first()
    if user is None or not user.is_authenticated:
        return None
    return members.filter(user=user).first()


def session_refusal(request, member) -> str | None:
    """Why the request's session may not act as `member` (their organization requires single
    sign-on, identity.selectors.organization_session_refusal), or None."""
    from identity.selectors import organization_session_refusal  # the identity app builds on this module
    from portal.services import SIGNED_IN_THROUGH

    session = getattr(request, "session", None)  # none: signed in through no identity provider
    signed_in_through = session.get(SIGNED_IN_THROUGH) if session is not None else None
    return organization_session_refusal(member=member, signed_in_through=signed_in_through)


def activate(request, member) -> None:
    """Act for `member` from here on: the request's organization and member, the organization's
    scope and its time zone (the zone its periods are counted in). For code that runs in a context
    of its own, which ends with it (the middleware's `with`, an API view's dispatch)."""
    request.organization, request.member = member.organization, member
    _active_scope.set(member.organization)
    timezone.activate(ZoneInfo(member.organization.time_zone))


class TenancyMiddleware:
    """Resolve the organization of the URL and, for pages, the signed-in member; keep the scope active.

    The scope stays active while the response renders. A user who is not an active member of the
    organization gets the same 404 as for an organization that does not exist; a session the
    organization refuses (it requires single sign-on) gets the page that offers it. API requests are
    authenticated by the API's own classes (a key or the session); the API view activates the
    scope once it knows the caller is a member (portal.api.views.OrganizationAPIView).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.organization = request.member = None
        try:
            match = resolve(request.path_info)
        except Resolver404:
            if _is_api_path(request.path_info):
                # API clients get JSON for every error, also for a path no route matches
                # (e.g. a non-integer id): Django's own 404 page is HTML.
                return JsonResponse({"detail": "Not found."}, status=404)
            return self.get_response(request)

        if match.app_name == "admin" or match.namespace == "admin":
            # Platform staff work across tenants; Django's admin itself requires is_staff.
            with unscoped():
                return self.get_response(request)

        slug = match.kwargs.get("org_slug")
        if slug is None:
            return self.get_response(request)
        if _is_api_path(request.path_info):
            # Who calls is known once the API has authenticated the key or the session: it looks
            # up the member there (no query before a malformed key is refused).
            request.organization_slug = slug
            return self.get_response(request)
        member = member_for(slug=slug, user=request.user)
        if member is None:
            if not request.user.is_authenticated:
                from django.contrib.auth.views import redirect_to_login  # needs the app registry

                return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
            raise Http404("No such organization.")
        refusal = session_refusal(request, member)
        if refusal is not None:  # fail closed: the way in is the organization's single sign-on
            from identity.views import sso_required

            return sso_required(request, member=member, reason=refusal)
        return contextvars.copy_context().run(self._as_member, request, member)

    def _as_member(self, request, member):
        activate(request, member)
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        # Views read the organization from request.organization, never from the URL.
        view_kwargs.pop("org_slug", None)
