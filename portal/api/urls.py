from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import AllowAny
from rest_framework.routers import SimpleRouter

from allowances.api import views as allowance_views
from billing import api as billing_api
from gateway import api as gateway_api
from overage import api as overage_api
from portal.api import views
from reports import api as reports_api

router = SimpleRouter(use_regex_path=False)
router.register("teams", views.TeamViewSet, basename="api-team")
router.register("members", views.MemberViewSet, basename="api-member")
router.register("invitations", views.InvitationViewSet, basename="api-invitation")
router.register("audit-log", views.AuditLogViewSet, basename="api-audit-log")
router.register("policies", allowance_views.PolicyViewSet, basename="api-policy")
router.register("assignments", allowance_views.AssignmentViewSet, basename="api-assignment")
router.register("grants", allowance_views.GrantViewSet, basename="api-grant")
router.register("balances", allowance_views.BalanceViewSet, basename="api-balance")
router.register("ledger-entries", allowance_views.LedgerEntryViewSet, basename="api-ledger-entry")
router.register("models", allowance_views.CatalogModelViewSet, basename="api-catalog-model")
router.register("overage-requests", overage_api.OverageRequestViewSet, basename="api-overage-request")
router.register("payroll", reports_api.PayrollViewSet, basename="api-payroll")
router.register("billing/settlements", billing_api.SettlementViewSet, basename="api-settlement")

urlpatterns = [
    path("api/v1/o/<slug:org_slug>/", include(router.urls)),
    # The organization is the API key's (an organization's own gateway reporting to the portal).
    path("api/v1/usage", gateway_api.UsageIngestView.as_view(), name="api-usage-ingest"),
    path("api/v1/authorize", gateway_api.AuthorizeView.as_view(), name="api-authorize"),
    path("api/v1/settle", gateway_api.SettleView.as_view(), name="api-settle"),
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="api-schema"),
]
