"""REST endpoints for organizations that run their own gateway: report usage, hold and settle.

They live at /api/v1/usage, /api/v1/authorize and /api/v1/settle; the organization is the one of
the presented API key, which must carry the usage_write scope (only admins can mint those).
"""

from django.core.exceptions import ValidationError
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from allowances import ledger
from gateway import services
from apikeys.authentication import ApiKeyAuthentication
from portal.api import fields
from portal.api.fields import WholeNumberField, object_id
from portal.api.schema import NOT_BLANK
from portal.api.views import OrganizationAPIView


# The event as `services._clean_event` checks it, by hand for speed (a batch is a thousand of
# them); tests/gateway/test_ingest_schema.py holds the two together.
USAGE_EVENT = {
    "type": "object",
    "properties": {
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": services.MAX_EVENT_KEY, "pattern": NOT_BLANK,
                            "description": "Identifies the event: a retried event is counted once."},
        "api_key": {"type": "string", "description": "The key that made the request: tap_<id> (its first 16 "
                                                      "characters), or the whole key."},
        "member": {"type": "string", "description": "Or the member's email."},
        "model": {"type": "string", "description": "A model id of the organization's catalog."},
        "input_tokens": {"type": "integer", "minimum": 0, "maximum": services.MAX_EVENT_TOKENS},
        "output_tokens": {"type": "integer", "minimum": 0, "maximum": services.MAX_EVENT_TOKENS, "nullable": True},
        "cached_tokens": {"type": "integer", "minimum": 0, "maximum": services.MAX_EVENT_TOKENS, "nullable": True},
        "timestamp": {"type": "string", "format": "date-time", "nullable": True,
                      "description": "When it happened, with its offset; at most 5 minutes ahead. Default: now."},
    },
    "required": ["idempotency_key", "model", "input_tokens"],
    "oneOf": [{"required": ["member"]}, {"required": ["api_key"]}],
}
USAGE_BATCH = {
    "type": "object",
    "properties": {"events": {"type": "array", "items": USAGE_EVENT, "minItems": 1, "maxItems": services.MAX_EVENTS}},
    "required": ["events"],
}
USAGE_ANSWER = {
    "type": "object",
    "properties": {
        "results": {"type": "array", "description": "One per event, in order.", "items": {
            "type": "object",
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "idempotency_key": {"type": "string", "nullable": True},
                "status": {"type": "string", "enum": ["recorded", "duplicate", "rejected"],
                           "description": "recorded (charged_tokens debited), duplicate (counted before), or "
                                          "rejected (errors by field; nothing recorded)"},
                "charged_tokens": {"type": "integer", "minimum": 0},
                "errors": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["index", "idempotency_key", "status"],
        }},
        "recorded": {"type": "integer", "minimum": 0},
        "duplicates": {"type": "integer", "minimum": 0},
        "rejected": {"type": "integer", "minimum": 0},
    },
    "required": ["results", "recorded", "duplicates", "rejected"],
}


class _GatewayApiView(OrganizationAPIView, APIView):
    authentication_classes = [ApiKeyAuthentication]  # a key, never a session
    key_only = True  # the organization is the key's
    required_roles = {"POST": ("admin",)}
    key_scope = "usage_write"


class UsageIngestView(_GatewayApiView):
    @extend_schema(request={"application/json": USAGE_BATCH}, responses={
        200: USAGE_ANSWER, 413: OpenApiResponse(description="More than 1,000 events, or a body past the size limit.")})
    def post(self, request):
        """Record up to 1,000 usage events; each answered on its own, duplicates counted once."""
        events = request.data.get("events") if isinstance(request.data, dict) else None
        if isinstance(events, list) and len(events) > services.MAX_EVENTS:
            return Response({"detail": f"At most {services.MAX_EVENTS} events per batch; this one has {len(events)}."},
                            status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        results = services.usage_ingest(organization=self.organization, actor=request.user, events=events)
        counts = {state: sum(1 for r in results if r["status"] == state) for state in ("recorded", "duplicate", "rejected")}
        return Response({"results": results, "recorded": counts["recorded"], "duplicates": counts["duplicate"],
                         "rejected": counts["rejected"]})


class AuthorizeSerializer(serializers.Serializer):
    idempotency_key = fields.CharField(max_length=150)
    api_key = fields.CharField(required=False)
    member = fields.EmailField(required=False)
    model = fields.CharField()
    input_tokens = WholeNumberField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    max_output_tokens = WholeNumberField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    ttl_seconds = WholeNumberField(min_value=1, max_value=24 * 3600, required=False)


class HoldSerializer(serializers.Serializer):
    hold_id = serializers.IntegerField(source="id")
    tokens = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    model = fields.CharField()


class AuthorizeView(_GatewayApiView):
    @extend_schema(request=AuthorizeSerializer, responses={
        201: HoldSerializer, 429: OpenApiResponse(description="The allowance, or the key's cap, cannot cover it.")})
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
    hold_id = object_id()
    input_tokens = WholeNumberField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    output_tokens = WholeNumberField(min_value=0, max_value=services.MAX_EVENT_TOKENS)
    cached_tokens = WholeNumberField(min_value=0, max_value=services.MAX_EVENT_TOKENS, default=0)


class SettleView(_GatewayApiView):
    @extend_schema(request=SettleSerializer, responses={404: OpenApiResponse(
        response={"$ref": "#/components/schemas/ValidationError"}, description="No such hold (named by hold_id)."),
                                                        200: inline_serializer("SettleAnswer", {
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
