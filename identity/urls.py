from django.urls import path

from identity import views

# Under /o/<org_slug>/: the organization's identity settings (owners and admins).
organization_patterns = [
    path("settings/identity/", views.identity_settings, name="identity_settings"),
    path("settings/identity/test/", views.identity_provider_test, name="identity_provider_test"),
    path("settings/identity/delete/", views.identity_provider_delete, name="identity_provider_delete"),
    path("settings/identity/domains/<int:email_domain_id>/verify/", views.email_domain_verify,
         name="email_domain_verify"),
    path("settings/identity/domains/<int:email_domain_id>/remove/", views.email_domain_remove,
         name="email_domain_remove"),
    path("settings/identity/scim-tokens/<int:scim_token_id>/revoke/", views.scim_token_revoke,
         name="scim_token_revoke"),
]

# Under /accounts/: logging in with a company account.
login_patterns = [
    path("company/", views.sso_start, name="sso_start"),
    path("company/route/", views.sso_route, name="sso_route"),
]
