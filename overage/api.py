"""Overage requests in the REST API: the same services, rules and role checks as the pages.

A member lists and retrieves their own requests and those they may decide (approvers, within
their teams; admins), creates and cancels their own, and approvers decide. An API key needs the
`overage_requests` scope and acts with its owner's roles.
"""

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from allowances.api.views import idempotency_header, idempotency_key
from allowances.models import MAX_TOKENS
from overage import selectors, services
from overage.models import OverageRequest
from portal.api import fields
from portal.api.fields import MAX_ID, TokensField
from portal.api.permissions import ANY_MEMBER
from portal.api.query import QueryChoiceField, QueryIntegerField, parse_query
from portal.api.views import OrganizationViewSet

CONFLICT = OpenApiResponse(description="The request is no longer pending (decided, cancelled or lapsed), or the "
                                       "member already has a pending one; nothing was changed.")


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class OverageRequestSerializer(fields.ModelSerializer):
    """A member's ask for more tokens this month, and what was decided."""

    member = serializers.IntegerField(source="member_id", read_only=True)
    email = fields.EmailField(source="member.user.email", read_only=True)
    team = serializers.IntegerField(source="member.team_id", read_only=True, allow_null=True)
    tokens = TokensField(min_value=1, max_value=MAX_TOKENS, help_text="Tokens asked for this month.")
    # Checked by the service with the rest of the request (an empty reason is refused there, by name).
    reason = fields.CharField(max_length=services.REASON_LENGTH, allow_blank=True)
    model = fields.CharField(max_length=services.MODEL_LENGTH, required=False, allow_blank=True,
                             help_text="A catalog model id the tokens are for (optional).")
    project = fields.CharField(max_length=services.PROJECT_LENGTH, required=False, allow_blank=True)
    decided_by = fields.EmailField(source="decided_by.email", read_only=True, allow_null=True, default=None,
                                   help_text="Who decided (the requester for a cancellation; none for the policy "
                                             "or the period close).")

    class Meta:
        model = OverageRequest
        fields = ["id", "member", "email", "team", "period_start", "tokens", "reason", "model", "project", "state",
                  "approved_tokens", "decided_by", "decided_at", "decision_note", "auto_approved", "created_at"]
        read_only_fields = ["id", "period_start", "state", "approved_tokens", "decided_at", "decision_note",
                            "auto_approved", "created_at"]


class DecisionSerializer(serializers.Serializer):
    """An approver's decision on a pending request."""

    decision = serializers.ChoiceField(choices=services.DECISIONS)
    tokens = TokensField(min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True,
                         help_text="To approve in part: fewer tokens than asked for. Left out: in full.")
    note = fields.CharField(max_length=services.NOTE_LENGTH, required=False, allow_blank=True)
    asked_tokens = TokensField(min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True,
                               help_text="The amount asked for that you decided on: if the requester has changed "
                                         "the request since, the answer is 409 and nothing is decided.")


class OverageRequestFilterSerializer(serializers.Serializer):
    state = QueryChoiceField(required=False, choices=OverageRequest.State.choices)
    team = QueryIntegerField(required=False, min_value=1, max_value=MAX_ID, help_text="Requests of this team's members.")
    member = QueryIntegerField(required=False, min_value=1, max_value=MAX_ID, help_text="Requests of this member.")


@extend_schema_view(list=extend_schema(parameters=[OverageRequestFilterSerializer]))
class OverageRequestViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = OverageRequestSerializer
    lookup_url_kwarg = "overage_request_id"
    required_roles = {"GET": ANY_MEMBER, "POST": ANY_MEMBER}
    key_scope = "overage_requests"

    def get_queryset(self):
        if self.action == "cancel":  # only the requester's own: another member's answers like none
            return selectors.own_requests(member=self.request.member)
        if self.action != "list":
            return selectors.visible_requests(member=self.request.member)
        filters = parse_query(OverageRequestFilterSerializer, self.request)
        return selectors.request_list(member=self.request.member, state=filters.get("state", ""),
                                      team_id=filters.get("team"), member_id=filters.get("member"))

    @extend_schema(parameters=[idempotency_header(services.KEY_LENGTH)],
                   responses={201: OverageRequestSerializer, 200: OverageRequestSerializer, 409: CONFLICT})
    def create(self, request):
        """Ask for more tokens this month: 201 (approved at once under an auto_approve policy, else
        pending); 200 for a retry with the same Idempotency-Key."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            overage_request, created = services.overage_request_create(
                member=request.member, actor=request.user, **serializer.validated_data,
                idempotency_key=idempotency_key(request, services.KEY_LENGTH))
        except services.OverageConflict as conflict:
            raise Conflict(str(conflict)) from None
        return Response(self.get_serializer(overage_request).data,
                        status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(request=None, responses={200: OverageRequestSerializer, 409: CONFLICT})
    @action(detail=True, methods=["post"])
    def cancel(self, request, overage_request_id):
        """Withdraw your own pending request (again: no change)."""
        try:
            overage_request, _ = services.overage_request_cancel(overage_request=self.get_object(),
                                                                 actor_member=request.member)
        except services.OverageConflict as conflict:
            raise Conflict(str(conflict)) from None
        return Response(self.get_serializer(overage_request).data)

    @extend_schema(request=DecisionSerializer, responses={200: OverageRequestSerializer, 409: CONFLICT})
    @action(detail=True, methods=["post"], required_roles={"POST": ("approver",)})
    def decide(self, request, overage_request_id):
        """Approve in full, in part (`tokens`), or reject, with an optional note. The same decision
        sent again by the same approver answers the request as decided; another answers 409."""
        overage_request = self.get_object()
        serializer = DecisionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            decided, _ = services.overage_request_decide(overage_request=overage_request,
                                                         actor_member=request.member, **serializer.validated_data)
        except services.OverageConflict as conflict:
            raise Conflict(str(conflict)) from None
        return Response(self.get_serializer(decided).data)
