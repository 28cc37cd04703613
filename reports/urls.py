from django.urls import path

from reports import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("reports/insights/", views.insights, name="insights"),
    path("reports/statements/", views.statements, name="statements"),
    path("reports/statements/exports/", views.statement_exports, name="statement_exports"),
    path("reports/statements/exports/<int:statement_export_id>/", views.statement_export, name="statement_export"),
    path("reports/payroll/", views.payroll, name="payroll"),
    path("reports/reconciliation/", views.reconciliation, name="reconciliation"),
    path("reports/settings/", views.report_settings, name="report_settings"),
]
