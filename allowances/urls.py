from django.urls import path

from allowances import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("overview/", views.overview, name="overview"),
    path("balances/", views.balances, name="balances"),
    path("balances/<int:member_id>/", views.balance_detail, name="balance_detail"),
    path("policies/", views.policy_list, name="policy_list"),
    path("policies/assign/", views.policy_assign, name="policy_assign"),
    path("policies/<int:allowance_policy_id>/", views.policy_edit, name="policy_edit"),
    path("grants/", views.grant_list, name="grant_list"),
    path("grants/import/", views.grant_import, name="grant_import"),
    path("grants/import/<int:grant_batch_id>/", views.grant_batch, name="grant_batch"),
    path("grants/<int:grant_id>/revoke/", views.grant_revoke, name="grant_revoke"),
    path("models/", views.catalog, name="catalog"),
    path("models/<int:catalog_model_id>/", views.catalog_model_edit, name="catalog_model_edit"),
    path("models/aliases/", views.model_alias_create, name="model_alias_create"),
    path("models/aliases/<int:model_alias_id>/delete/", views.model_alias_delete, name="model_alias_delete"),
    path("transfers/", views.transfer_list, name="transfer_list"),
    path("transfers/report/", views.transfer_report, name="transfer_report"),
    path("transfers/pool/", views.team_pool, name="team_pool"),
    path("settings/transfers/", views.transfer_settings, name="transfer_settings"),
]
