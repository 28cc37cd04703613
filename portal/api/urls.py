from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import AllowAny
from rest_framework.routers import SimpleRouter

from portal.api import views

router = SimpleRouter(use_regex_path=False)
router.register("teams", views.TeamViewSet, basename="api-team")
router.register("members", views.MemberViewSet, basename="api-member")
router.register("invitations", views.InvitationViewSet, basename="api-invitation")
router.register("audit-log", views.AuditLogViewSet, basename="api-audit-log")

urlpatterns = [
    path("api/v1/o/<slug:org_slug>/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="api-schema"),
]
