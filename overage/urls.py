from django.urls import path

from overage import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("overage/", views.request_list, name="overage_request_list"),
    path("overage/new/", views.request_new, name="overage_request_new"),
    path("overage/notices/dismiss/", views.notices_dismiss, name="overage_notices_dismiss"),
    path("overage/<int:overage_request_id>/edit/", views.request_edit, name="overage_request_edit"),
    path("overage/<int:overage_request_id>/cancel/", views.request_cancel, name="overage_request_cancel"),
    path("approvals/", views.approval_queue, name="approval_queue"),
    path("approvals/approve/", views.approvals_approve, name="approvals_approve"),
    path("approvals/settings/", views.approval_settings, name="approval_settings"),
    path("approvals/<int:overage_request_id>/", views.approval_detail, name="approval_detail"),
]
