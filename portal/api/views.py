"""The organization-scoped REST API. Same services and rules as the pages."""

import contextvars

from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotAuthenticated, NotFound, PermissionDenied
from rest_framework.response import Response

from apikeys.services import KeyIdentity
from portal import selectors, services, tenancy
from portal.api.query import parse_query
from portal.api.serializers import (
    AuditLogEntrySerializer,
    AuditLogFilterSerializer,
    InvitationSerializer,
    MemberSerializer,
    TeamSerializer,
)
from portal.models import Team


class OrganizationAPIView:
    """Every API view is one: once DRF has authenticated the caller (an API key or the session), the
    caller must be an active member of the URL's organization (or, on routes without one, the key's
    organization), and the view runs in that organization's scope. Anyone else gets 404, as for an
    organization that does not exist; no caller, 401; a session the organization refuses (it
    requires single sign-on), 403."""

    key_only = False  # routes whose organization is the presented key's

    def dispatch(self, request, *args, **kwargs):
        # The scope activated for this caller ends with the request, whatever happens inside.
        return contextvars.copy_context().run(super().dispatch, request, *args, **kwargs)

    def perform_authentication(self, request):
        super().perform_authentication(request)
        member = self.caller(request)
        if member is not None:
            tenancy.activate(request, member)

    def caller(self, request):
        """The active member of the organization the authenticated caller acts as; None when nobody
        is authenticated (the permission check answers 401); NotFound when the caller is not one of
        the organization's. Views authenticated by another kind of credential say who it acts as."""
        key = request.auth if isinstance(request.auth, KeyIdentity) else None
        if self.key_only and key is None:
            raise NotAuthenticated("This endpoint takes an API key: send `Authorization: Bearer tap_...`.")
        if key is None and not request.user.is_authenticated:
            return None
        member = tenancy.member_for(slug=None if self.key_only else request.organization_slug, user=request.user,
                                    key=key)
        if member is None:
            raise NotFound()
        if key is None and (refusal := tenancy.session_refusal(request, member)):
            raise PermissionDenied(refusal)
        return member

    @property
    def organization(self):
        return self.request.organization


class OrganizationViewSet(OrganizationAPIView, viewsets.GenericViewSet):
    """Base for API views under /api/v1/o/<org_slug>/; `self.organization` is the URL's organization."""

    lookup_value_converter = "int"

    def lookup(self, model, pk, field: str):
        """An object of this organization named by id in a request body; 400 naming the field if not."""
        if pk is None:
            return None
        obj = model.objects.filter(organization=self.organization, pk=pk).first()
        if obj is None:
            raise ValidationError({field: f"No {field} with id {pk} in this organization."})
        return obj


class TeamViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = TeamSerializer
    lookup_url_kwarg = "team_id"
    required_roles = {"GET": ("hr",), "POST": ("hr",), "PUT": ("hr",), "PATCH": ("hr",)}

    def get_queryset(self):
        return selectors.team_list(organization=self.organization)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        team = services.team_create(organization=self.organization, actor=request.user, **serializer.validated_data)
        return Response(self.get_serializer(team).data, status=status.HTTP_201_CREATED)

    def update(self, request, team_id, partial=False):
        team = self.get_object()
        serializer = self.get_serializer(team, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        data = {"name": team.name, "cost_centre": team.cost_centre, **serializer.validated_data}
        team = services.team_update(team=team, actor=request.user, **data)
        return Response(self.get_serializer(team).data)

    def partial_update(self, request, team_id):
        return self.update(request, team_id, partial=True)


class MemberViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = MemberSerializer
    lookup_url_kwarg = "member_id"
    required_roles = {"GET": ("hr",), "PATCH": ("hr",)}

    def get_queryset(self):
        return selectors.member_list(organization=self.organization)

    def partial_update(self, request, member_id):
        member = self.get_object()
        serializer = self.get_serializer(member, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        team = self.lookup(Team, data["team_id"], "team") if "team_id" in data else member.team
        member = services.member_update(member=member, actor_member=request.member, team=team,
                                        roles=data.get("roles"), is_active=data.get("is_active"))
        return Response(self.get_serializer(member).data)


class InvitationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = InvitationSerializer
    lookup_url_kwarg = "invitation_id"
    required_roles = {"GET": ("hr",), "POST": ("hr",)}

    def get_queryset(self):
        return selectors.invitation_list(organization=self.organization)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        invitation, _token = services.invitation_create(
            organization=self.organization, actor_member=request.member, email=data["email"], roles=data["roles"],
            team=self.lookup(Team, data.get("team_id"), "team"),
        )
        return Response(self.get_serializer(invitation).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def revoke(self, request, invitation_id):
        invitation = services.invitation_revoke(invitation=self.get_object(), actor=request.user)
        return Response(self.get_serializer(invitation).data)


@extend_schema_view(list=extend_schema(parameters=[AuditLogFilterSerializer]))
class AuditLogViewSet(mixins.ListModelMixin, OrganizationViewSet):
    serializer_class = AuditLogEntrySerializer
    required_roles = {"GET": ("admin",)}

    def get_queryset(self):
        filters = parse_query(AuditLogFilterSerializer, self.request)
        return selectors.audit_log(organization=self.organization, action=filters.get("action", ""),
                                   actor_email=filters.get("actor", ""), object_type=filters.get("object_type", ""))
