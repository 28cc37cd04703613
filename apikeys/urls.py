from django.urls import path

from apikeys import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("keys/", views.key_list, name="key_list"),
    path("keys/new/", views.key_create, name="key_create"),
    path("keys/all/", views.key_admin, name="key_admin"),
    path("keys/<int:api_key_id>/rotate/", views.key_rotate, name="key_rotate"),
    path("keys/<int:api_key_id>/revoke/", views.key_revoke, name="key_revoke"),
    path("keys/<int:api_key_id>/resume/", views.key_resume, name="key_resume"),
    path("keys/<int:api_key_id>/breaker-exempt/", views.key_breaker_exempt, name="key_breaker_exempt"),
]
