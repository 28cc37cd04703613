from django.urls import path

from gateway import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("providers/", views.provider_list, name="provider_list"),
    path("providers/<int:provider_connection_id>/", views.provider_edit, name="provider_edit"),
    path("usage/", views.usage_list, name="usage_list"),
]
