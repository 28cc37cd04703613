from django.urls import path

from gateway import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("providers/", views.provider_list, name="provider_list"),
    path("providers/<int:provider_connection_id>/", views.provider_edit, name="provider_edit"),
    path("usage/", views.usage_list, name="usage_list"),
    path("settings/breaker/", views.breaker_settings, name="breaker_settings"),
    path("settings/breaker/<int:breaker_trip_id>/resume/", views.breaker_trip_resume, name="breaker_trip_resume"),
]
