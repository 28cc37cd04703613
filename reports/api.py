"""The payroll / HRIS export in the REST API: one row per member for a period (HR)."""

from datetime import date

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers
from rest_framework.response import Response

from portal.api.query import _AsSent, parse_query
from portal.api.views import OrganizationViewSet
from reports import selectors

PERIOD_PATTERN = r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])$"


class QueryRegexField(_AsSent, serializers.RegexField):
    pass


class PayrollQuery(serializers.Serializer):
    period = QueryRegexField(PERIOD_PATTERN, help_text="The period (calendar month in the organization's zone), "
                                                        "as YYYY-MM.")

    def validate_period(self, value: str) -> date:
        return date(int(value[:4]), int(value[5:7]), 1)


class PayrollRowSerializer(serializers.Serializer):
    """One member's allowance in a period, in payroll's terms."""

    employee_id = serializers.CharField(help_text="The directory's external id (SCIM), else the email.")
    email = serializers.EmailField()
    cost_centre = serializers.CharField(help_text="The member's team's cost centre code, else its name.")
    team = serializers.CharField()
    tokens_granted = serializers.IntegerField(help_text="Granted and approved overage in the period.")
    tokens_used = serializers.IntegerField()
    value_granted = serializers.CharField(help_text="A decimal at catalog prices in the currency below, in its "
                                                    "minor units (e.g. 12.50 USD, 1250 JPY).")
    value_used = serializers.CharField(help_text="A decimal, like value_granted.")
    currency = serializers.CharField()


class PayrollViewSet(mixins.ListModelMixin, OrganizationViewSet):
    """GET /api/v1/o/<slug>/payroll/?period=YYYY-MM: every member's row (HR; a key needs usage_read)."""

    serializer_class = PayrollRowSerializer
    required_roles = {"GET": ("hr",)}
    key_scope = "usage_read"
    pagination_class = None

    @extend_schema(parameters=[PayrollQuery])
    def list(self, request, *args, **kwargs):
        period = parse_query(PayrollQuery, request)["period"]
        rows = selectors.payroll(organization=self.organization, period_start=period)
        return Response(PayrollRowSerializer(rows, many=True).data)
