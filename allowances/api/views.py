"""The allowances API for HR systems: the same services, permissions and validation as the pages."""

from django.core.exceptions import ValidationError
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response

from allowances import selectors, services
from allowances.api.serializers import (
    AssignmentSerializer,
    BalanceSerializer,
    BulkGrantSerializer,
    CatalogModelSerializer,
    GrantSerializer,
    LedgerEntryFilterSerializer,
    LedgerEntrySerializer,
    PolicySerializer,
    PolicyUpdateSerializer,
)
from allowances.models import AllowancePolicy
from portal.api.permissions import ANY_MEMBER
from portal.api.query import PageQuery, parse_query
from portal.api.views import OrganizationViewSet
from portal.models import Member, Team


def idempotency_header(max_length: int) -> OpenApiParameter:
    return OpenApiParameter("Idempotency-Key", {"type": "string", "maxLength": max_length}, OpenApiParameter.HEADER,
                            required=False, description="Retrying with the same key returns the first result.")


def idempotency_key(request, max_length: int) -> str:
    key = request.headers.get("Idempotency-Key", "")
    if len(key) > max_length:
        raise ValidationError({"Idempotency-Key": f"At most {max_length} characters."})
    return key


# What the stored keys hold: a grant's own, and a batch's (its rows' grants add a suffix to it).
GRANT_KEY, BATCH_KEY = 100, 80


class PolicyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = PolicySerializer
    lookup_url_kwarg = "allowance_policy_id"
    required_roles = {"GET": ("hr",), "POST": ("hr",), "PATCH": ("hr",)}

    def get_queryset(self):
        return selectors.policy_list(organization=self.organization)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        policy = services.policy_create(organization=self.organization, actor=request.user, **serializer.validated_data)
        return Response(PolicySerializer(policy).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=PolicyUpdateSerializer, responses=PolicySerializer)
    def partial_update(self, request, allowance_policy_id):
        policy = self.get_object()
        serializer = PolicyUpdateSerializer(policy, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        immediately = data.pop("applies", "next") == "now"
        policy = services.policy_update(policy=policy, actor=request.user, immediately=immediately, **data)
        return Response(PolicySerializer(policy).data)


class AssignmentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = AssignmentSerializer
    lookup_url_kwarg = "policy_assignment_id"
    required_roles = {"GET": ("hr",), "POST": ("hr",)}

    def get_queryset(self):
        return selectors.assignment_list(organization=self.organization)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        policy = self.lookup(AllowancePolicy, data["policy_id"], "policy")
        assignment = services.policy_assign(
            organization=self.organization, actor=request.user, policy=policy,
            team=self.lookup(Team, data.get("team_id"), "team"), member=self.lookup(Member, data.get("member_id"), "member"),
            immediately=data["applies"] == "now")
        return Response(self.get_serializer(assignment).data, status=status.HTTP_201_CREATED)


class GrantViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = GrantSerializer
    lookup_url_kwarg = "grant_id"
    required_roles = {"GET": ("hr",), "POST": ("hr",)}

    def get_queryset(self):
        return selectors.grant_list(organization=self.organization)

    @extend_schema(parameters=[idempotency_header(GRANT_KEY)])
    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        grant = services.grant_create(
            organization=self.organization, actor=request.user, tokens=data["tokens"], reason=data["reason"],
            team=self.lookup(Team, data.get("team_id"), "team"), member=self.lookup(Member, data.get("member_id"), "member"),
            idempotency_key=idempotency_key(request, GRANT_KEY))
        return Response(self.get_serializer(grant).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def revoke(self, request, grant_id):
        grant = services.grant_revoke(grant=self.get_object(), actor=request.user)
        return Response(self.get_serializer(grant).data)

    @extend_schema(request=BulkGrantSerializer, responses={201: GrantSerializer(many=True)},
                   parameters=[idempotency_header(BATCH_KEY)])
    @action(detail=False, methods=["post"])
    def bulk(self, request):
        """Grant every row, or nothing: a 400 answer names each bad row."""
        serializer = BulkGrantSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        batch = services.grant_bulk(organization=self.organization, actor=request.user,
                                    rows=serializer.validated_data["grants"],
                                    idempotency_key=idempotency_key(request, BATCH_KEY))
        return Response(self.get_serializer(batch.grants.order_by("pk"), many=True).data, status=status.HTTP_201_CREATED)


class _OwnOrAllMixin:
    """Employees see their own rows; HR sees everyone's."""

    def sees_everyone(self) -> bool:
        # A key reads its owner's own usage only, whatever the owner's roles.
        return self.request.auth is None and self.request.member.has_any_role(["hr"])


class BalanceViewSet(_OwnOrAllMixin, mixins.ListModelMixin, OrganizationViewSet):
    serializer_class = BalanceSerializer
    required_roles = {"GET": ANY_MEMBER}
    key_scope = "usage_read"

    def get_queryset(self):
        accounts = selectors.account_list(organization=self.organization)
        return accounts if self.sees_everyone() else accounts.filter(member=self.request.member)

    def list(self, request, *args, **kwargs):
        parse_query(PageQuery, request)  # a refused request opens no account
        services.account_open(member=request.member)  # a member sees their balance before first use too
        return super().list(request, *args, **kwargs)


class LedgerEntryViewSet(_OwnOrAllMixin, mixins.ListModelMixin, OrganizationViewSet):
    serializer_class = LedgerEntrySerializer
    required_roles = {"GET": ANY_MEMBER}
    key_scope = "usage_read"

    @extend_schema(parameters=[LedgerEntryFilterSerializer])
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)

    def get_queryset(self):
        filters = parse_query(LedgerEntryFilterSerializer, self.request)
        member_id = filters.get("member") if self.sees_everyone() else self.request.member.pk
        entries = selectors.ledger_entries(organization=self.organization, member_id=member_id)
        return entries.filter(kind=filters["kind"]) if "kind" in filters else entries


class CatalogModelViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = CatalogModelSerializer
    lookup_url_kwarg = "catalog_model_id"
    required_roles = {"GET": ANY_MEMBER, "POST": ("admin",), "PATCH": ("admin",)}

    def get_queryset(self):
        return selectors.catalog(organization=self.organization)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        entry = services.catalog_model_create(organization=self.organization, actor=request.user, **serializer.validated_data)
        return Response(self.get_serializer(entry).data, status=status.HTTP_201_CREATED)

    def partial_update(self, request, catalog_model_id):
        entry = self.get_object()
        serializer = self.get_serializer(entry, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        entry = services.catalog_model_update(catalog_model=entry, actor=request.user, **serializer.validated_data)
        return Response(self.get_serializer(entry).data)
