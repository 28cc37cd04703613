"""REST endpoints for organizations that run their own gateway: report usage, hold and settle.

They live at /api/v1/usage, /api/v1/authorize and /api/v1/settle; the organization is the one of
the presented API key, which must carry the usage_write scope (only admins can mint those).
"""

from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from allowances import ledger
from gateway import services
from apikeys.authentication import ApiKeyAuthentication
from portal.api.views import OrganizationAPIView


class _EventSerializer(serializers.Serializer):
    idempotency_key = serializers.CharField(max_length=services.MAX_EVENT_KEY)
    api_key = serializers.CharField(required=False, help_text="The key that made the request: tap_<id> (12 characters).")
    member = serializers.EmailField(required=False, help_text="Or the member's email.")
    model = serializers.CharField(help_text="A model id of the organization's catalog.")
    input_tokens = serializers.IntegerField(min_value=0)
    output_tokens = serializers.IntegerField(min_value=0, required=False)
    cached_tokens = serializers.IntegerField(min_value=0, required=False)
    timestamp = serializers.DateTimeField(required=False)


class UsageBatchSerializer(serializers.Serializer):
    events = _EventSerializer(many=True, help_text=f"1 to {services.MAX_EVENTS} events.")


class _GatewayApiView(OrganizationAPIView, APIView):
    authentication_classes = [ApiKeyAuthentication]  # a key, never a session
    key_only = True  # the organization is the key's
    required_roles = {"POST": ("admin",)}
    key_scope = "usage_write"


class UsageIngestView(_GatewayApiView):
    @extend_schema(request=UsageBatchSerializer, responses={200: inline_serializer("UsageIngestAnswer", {
        "results": serializers.ListField(child=serializers.DictField(), help_text=(
            "One per event, in order: status recorded (with charged_tokens), duplicate (counted before), "
            "or rejected (with errors by field)")),
        "recorded": serializers.IntegerField(), "duplicates": serializers.IntegerField(),
        "rejected": serializers.IntegerField()})})
    def post(self, request):
        """Record up to 1,000 usage events; each answered on its own, duplicates counted once."""
        events = request.data.get("events") if isinstance(request.data, dict) else None
        if isinstance(events, list) and len(events) > services.MAX_EVENTS:
            return Response({"events": [f"At most {services.MAX_EVENTS} events per batch; this one has {len(events)}."]},
                            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        results = services.usage_ingest(organization=self.organization, actor=request.user, events=events)
        counts = {state: sum(1 for r in results if r["status"] == state) for state in ("recorded", "duplicate", "rejected")}
        return Response({"results": results, "recorded": counts["recorded"], "duplicates": counts["duplicate"],
                         "rejected": counts["rejected"]})


class AuthorizeSerializer(serializers.Serializer):
    idempotency_key = serializers.CharField(max_length=150)
    api_key = serializers.CharField(required=False)
    member = serializers.EmailField(required=False)
    model = serializers.CharField()
    input_tokens = serializers.IntegerField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    max_output_tokens = serializers.IntegerField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    ttl_seconds = serializers.IntegerField(min_value=1, max_value=24 * 3600, required=False)


class HoldSerializer(serializers.Serializer):
    hold_id = serializers.IntegerField(source="id")
    tokens = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    model = serializers.CharField()


class AuthorizeView(_GatewayApiView):
    @extend_schema(request=AuthorizeSerializer, responses={201: HoldSerializer})
    def post(self, request):
        """Hold the worst case of a request before it runs; 429 when the allowance cannot cover it."""
        serializer = AuthorizeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        try:
            hold = services.hold_authorize(organization=self.organization, actor=request.user,
                                           member_email=data.pop("member", None), api_key=data.pop("api_key", None),
                                           **data)
        except (ledger.InsufficientTokens, ledger.KeyCapExceeded) as refusal:
            return Response({"detail": str(refusal)}, status=status.HTTP_429_TOO_MANY_REQUESTS)
        return Response(HoldSerializer(hold).data, status=status.HTTP_201_CREATED)


class SettleSerializer(serializers.Serializer):
    hold_id = serializers.IntegerField(min_value=1)
    input_tokens = serializers.IntegerField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    output_tokens = serializers.IntegerField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    cached_tokens = serializers.IntegerField(min_value=0, max_value=services.MAX_EVENT_TOKENS, default=0)


class SettleView(_GatewayApiView):
    @extend_schema(request=SettleSerializer, responses={200: inline_serializer("SettleAnswer", {
        "hold_id": serializers.IntegerField(), "charged_tokens": serializers.IntegerField(),
        "status": serializers.ChoiceField(["settled", "already_settled"])})})
    def post(self, request):
        """Settle a hold with what the request used; retries answer with the first settlement."""
        serializer = SettleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            charged, settled = services.hold_settle(organization=self.organization, actor=request.user,
                                                    **serializer.validated_data)
        except ValidationError as error:
            if "hold_id" in getattr(error, "message_dict", {}):
                return Response(error.message_dict, status=status.HTTP_404_NOT_FOUND)
            raise
        return Response({"hold_id": serializer.validated_data["hold_id"], "charged_tokens": charged,
                         "status": "settled" if settled else "already_settled"})
