"""Settlements in the REST API (owners and admins, with a session): read-only, with their lines
per team and model, and each settlement's chargeback CSV for finance."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, renderers, serializers
from rest_framework.decorators import action

from billing import selectors
from billing.models import Settlement, SettlementLine
from billing.views import chargeback_response
from portal.api import fields
from portal.api.views import OrganizationViewSet


class CSVRenderer(renderers.BaseRenderer):
    """Lets a client ask for text/csv; the chargeback answers it itself, errors as their detail."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        detail = data.get("detail", data) if isinstance(data, dict) else data
        return str(detail).encode()


class ModelPartSerializer(serializers.Serializer):
    model = serializers.CharField(read_only=True, help_text="The catalog model id.")
    tokens = serializers.IntegerField(read_only=True, help_text="Billable overage tokens consumed.")
    amount_minor = serializers.IntegerField(read_only=True, help_text="Its cost in the currency's minor units.")


class SettlementLineSerializer(fields.ModelSerializer):
    """One team's (cost centre's) part of a settlement: one invoice item at Stripe."""

    team = serializers.IntegerField(source="team_id", read_only=True, allow_null=True)
    by_model = ModelPartSerializer(many=True, read_only=True)

    class Meta:
        model = SettlementLine
        fields = ["id", "team", "team_name", "cost_centre", "tokens", "amount_minor", "by_model",
                  "stripe_invoice_item_id"]
        read_only_fields = fields


class SettlementSerializer(fields.ModelSerializer):
    """The charge of one period's consumed billable overage; money in the currency's minor units."""

    lines = SettlementLineSerializer(many=True, read_only=True)

    class Meta:
        model = Settlement
        fields = ["id", "period_start", "status", "currency", "amount_minor", "tokens", "stripe_invoice_id",
                  "stripe_invoice_url", "last_error", "past_due_since", "paid_at", "created_at", "lines"]
        read_only_fields = fields


class SettlementViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationViewSet):
    serializer_class = SettlementSerializer
    lookup_url_kwarg = "settlement_id"
    required_roles = {"GET": ("admin",)}

    def get_queryset(self):
        return selectors.settlement_list(organization=self.organization)

    @extend_schema(responses={(200, "text/csv"): OpenApiResponse(
        response=OpenApiTypes.STR, description="A row per team and model: " + ", ".join(selectors.CHARGEBACK_COLUMNS))})
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, CSVRenderer])
    def chargeback(self, request, settlement_id):
        """The settlement's chargeback for finance, as CSV."""
        return chargeback_response(self.get_object())
