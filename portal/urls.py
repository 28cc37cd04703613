from django.contrib import admin
from django.urls import include, path

from billing import urls as billing_urls
from identity import urls as identity_urls
from portal import views

organization_patterns = [
    path("members/", views.member_list, name="member_list"),
    path("members/<int:member_id>/", views.member_edit, name="member_edit"),
    path("teams/", views.team_list, name="team_list"),
    path("teams/<int:team_id>/", views.team_edit, name="team_edit"),
    path("invitations/", views.invitation_list, name="invitation_list"),
    path("invitations/<int:invitation_id>/revoke/", views.invitation_revoke, name="invitation_revoke"),
    path("audit/", views.audit_log, name="audit_log"),
    path("settings/", views.organization_settings, name="organization_settings"),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("orgs/", views.organization_list, name="organization_list"),
    path("orgs/new/", views.organization_create, name="organization_create"),
    path("invitations/<str:token>/", views.invitation_accept, name="invitation_accept"),
    path("o/<slug:org_slug>/", include(organization_patterns)),
    path("o/<slug:org_slug>/", include("allowances.urls")),
    path("o/<slug:org_slug>/", include("apikeys.urls")),
    path("o/<slug:org_slug>/", include("gateway.page_urls")),
    path("o/<slug:org_slug>/", include("overage.urls")),
    path("o/<slug:org_slug>/", include("reports.urls")),
    path("o/<slug:org_slug>/", include(identity_urls.organization_patterns)),
    path("o/<slug:org_slug>/", include(billing_urls.urlpatterns)),
    path("", include(billing_urls.webhook_patterns)),
    path("accounts/", include(identity_urls.login_patterns)),
    path("accounts/", include("allauth.urls")),
    path("scim/v2/o/<slug:org_slug>/", include("identity.scim.urls")),
    path("admin/", admin.site.urls),
    path("", include("portal.api.urls")),
]
# The gateway's /v1/ paths are served by gateway.endpoints, routed there by portal.asgi.
