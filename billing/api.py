"""Settlements in the REST API (owners and admins, with a session): read-only, with their lines
per team and model, and each settlement's chargeback CSV for finance."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, serializers
from rest_framework.decorators import action
from rest_framework.negotiation import BaseContentNegotiation

from billing import selectors
from billing.models import Settlement, SettlementLine
from billing.views import chargeback_response
from portal.api import fields
from portal.api.views import OrganizationViewSet


class ErrorsInJSON(BaseContentNegotiation):
    """The chargeback answers its CSV itself; whatever the client accepts, an error is the API's
    JSON (as the schema declares), never a 406."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class ModelPartSerializer(serializers.Serializer):
    model = serializers.CharField(read_only=True, help_text="The catalog model id.")
    tokens = serializers.IntegerField(read_only=True, help_text="Billable overage tokens consumed.")
    amount_minor = serializers.IntegerField(read_only=True, help_text="Its cost in the currency's minor units.")


class SettlementLineSerializer(fields.ModelSerializer):
    """One team's (cost centre's) part of a settlement: one invoice item at Stripe."""

    team = serializers.IntegerField(source="team_id", read_only=True, allow_null=True)
    by_model = ModelPartSerializer(many=True, read_only=True)
    # Declared: a model field with a unique constraint would get a validator that queries it.
    stripe_invoice_item_id = serializers.CharField(read_only=True)

    class Meta:
        model = SettlementLine
        fields = ["id", "team", "team_name", "cost_centre", "tokens", "amount_minor", "by_model",
                  "stripe_invoice_item_id"]
        read_only_fields = fields


class SettlementSerializer(fields.ModelSerializer):
    """The charge of one period's consumed billable overage; money in the currency's minor units."""

    lines = SettlementLineSerializer(many=True, read_only=True)
    stripe_invoice_id = serializers.CharField(read_only=True, help_text="Empty until the invoice is made.")
    stripe_invoice_url = serializers.CharField(read_only=True, help_text="Stripe's invoice or receipt page, "
                                                                         "if Stripe gave one.")

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
    @action(detail=True, methods=["get"], content_negotiation_class=ErrorsInJSON)
    def chargeback(self, request, settlement_id):
        """The settlement's chargeback for finance, as CSV."""
        return chargeback_response(self.get_object())
