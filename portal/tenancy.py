"""The tenancy core: which organization the running code works for, enforced in one place.

Every tenant-owned model inherits `TenantModel`. Its default manager returns only the rows of the
active organization and raises `ScopeError` when no organization is active, so a view, task or
command that forgets to filter fails closed instead of leaking another company's rows. Saving a
row of another organization while a scope is active raises too.

The scope is activated by `TenancyMiddleware` for every URL that carries `org_slug`
(`/o/<slug>/...` and `/api/v1/o/<slug>/...`), by tasks and commands with `scope(org)`, and is
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
    # The REST API and the gateway answer in JSON, also when no route matches.
    return path.startswith(("/api/", "/v1/"))


def _presented_key(request) -> str | None:
    """An API key from `Authorization: Bearer ...` or `x-api-key` (what the OpenAI and Anthropic SDKs send)."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-Api-Key") or None


# URL kwarg of API routes outside /o/<slug>/ whose organization is the presented API key's
# (e.g. POST /api/v1/usage, called by an organization's own gateway).
ORG_FROM_KEY = "organization_from_api_key"

# What the middleware decided for a request: go on without a scope, across tenants, or in one
# organization; or answer at once.
_PASS, _UNSCOPED_ADMIN = "pass", "admin"


class TenancyMiddleware:
    """Resolve the organization of the URL, check membership, and keep its scope active.

    The scope stays active while the response renders. A user who is not an active member of
    the organization gets the same 404 as for an organization that does not exist. Works under
    WSGI and ASGI: under ASGI the membership look-up runs in a thread. (The gateway's /v1/ paths
    never come here under ASGI: portal.asgi serves them without the page middleware.)
    """

    sync_capable = async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self._acall(request)
        decision = self._decide(request)
        if decision == _PASS:
            return self.get_response(request)
        if decision == _UNSCOPED_ADMIN:
            with unscoped():
                return self.get_response(request)
        if not isinstance(decision, tuple):
            return decision
        organization, zone = decision
        with scope(organization), timezone.override(zone):
            return self.get_response(request)

    async def _acall(self, request):
        from asgiref.sync import sync_to_async

        decision = await sync_to_async(self._decide)(request)
        if decision == _PASS:
            return await self.get_response(request)
        if decision == _UNSCOPED_ADMIN:
            with unscoped():
                return await self.get_response(request)
        if not isinstance(decision, tuple):
            return decision
        organization, zone = decision
        # The scope and zone are context variables: the sync views Django runs in threads see them.
        with scope(organization), timezone.override(zone):
            return await self.get_response(request)

    def _decide(self, request):
        request.organization = None
        request.member = None
        try:
            match = resolve(request.path_info)
        except Resolver404:
            if _is_api_path(request.path_info):
                # API clients get JSON for every error, also for a path no route matches
                # (e.g. a non-integer id): Django's own 404 page is HTML.
                return JsonResponse({"detail": "Not found."}, status=404)
            return _PASS

        if match.app_name == "admin" or match.namespace == "admin":
            # Platform staff work across tenants; Django's admin itself requires is_staff.
            return _UNSCOPED_ADMIN

        slug = match.kwargs.get("org_slug")
        org_from_key = match.kwargs.get(ORG_FROM_KEY, False)
        if slug is None and not org_from_key:
            return _PASS

        request.api_key = None
        presented = _presented_key(request) if _is_api_path(request.path_info) else None
        if presented is not None:
            # Checked before the session is even looked at: a malformed key costs no database query.
            from apikeys.services import KeyRefused, authenticate

            try:
                request.api_key = authenticate(presented, ip=request.META.get("REMOTE_ADDR"))
            except KeyRefused as refused:
                return JsonResponse({"detail": str(refused)}, status=401, headers={"WWW-Authenticate": "Bearer"})
            member = self._key_member(request.api_key, slug)
            if member is None:
                return JsonResponse({"detail": "Not found."}, status=404)
        elif org_from_key:
            return JsonResponse({"detail": "This endpoint takes an API key: send `Authorization: Bearer tap_...`."},
                                status=401, headers={"WWW-Authenticate": "Bearer"})
        else:
            member = self._member_for(request, slug)
        if member is None:
            if not request.user.is_authenticated:
                from django.contrib.auth.views import redirect_to_login  # needs the app registry

                if _is_api_path(request.path_info):
                    return JsonResponse({"detail": "Authentication credentials were not provided."}, status=401)
                return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
            if _is_api_path(request.path_info):
                return JsonResponse({"detail": "Not found."}, status=404)
            raise Http404("No such organization.")

        request.organization = member.organization
        request.member = member
        # Pages show times in the organization's zone, the zone its periods are counted in.
        return member.organization, ZoneInfo(member.organization.time_zone)

    def process_view(self, request, view_func, view_args, view_kwargs):
        # Views read the organization from request.organization, never from the URL.
        view_kwargs.pop("org_slug", None)
        view_kwargs.pop(ORG_FROM_KEY, None)

    @staticmethod
    def _key_member(identity, slug):
        from portal.models import Member

        members = Member.all_objects.select_related("organization", "user", "team").filter(
            pk=identity.member_id, organization_id=identity.organization_id, is_active=True)
        return (members.filter(organization__slug=slug) if slug is not None else members).first()

    @staticmethod
    def _member_for(request, slug):
        from portal.models import Member

        if not request.user.is_authenticated:
            return None
        return (
            Member.all_objects.select_related("organization", "user", "team")
            .filter(organization__slug=slug, user=request.user, is_active=True)
            .first()
        )

