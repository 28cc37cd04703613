from django.urls import path

from identity.scim import views

# Under /scim/v2/o/<org_slug>/. Resource ids are strings to SCIM: a malformed one is a SCIM 404. The
# discovery endpoints are lists only (every URL kwarg names a tenant model: tests/portal/test_isolation.py).
urlpatterns = [
    path("ServiceProviderConfig", views.ServiceProviderConfigView.as_view(), name="scim_service_provider_config"),
    path("ResourceTypes", views.ResourceTypesView.as_view(), name="scim_resource_types"),
    path("Schemas", views.SchemasView.as_view(), name="scim_schemas"),
    path("Users", views.UsersView.as_view(), name="scim_users"),
    path("Users/<str:member_id>", views.UserView.as_view(), name="scim_user"),
    path("Groups", views.GroupsView.as_view(), name="scim_groups"),
    path("Groups/<str:team_id>", views.GroupView.as_view(), name="scim_group"),
]
