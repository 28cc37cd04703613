from django.urls import include, path, re_path

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

# Under /accounts/: logging in with a company account; django-allauth's SAML and OpenID Connect
# views, ahead of allauth's own routes (same paths; reversed by allauth's URL names).
login_patterns = [
    path("company/", views.sso_start, name="sso_start"),
    path("company/route/", views.sso_route, name="sso_route"),
    re_path(r"^saml/(?P<organization_slug>[^/]+)/", include([
        path("acs/finish/", views.saml_finish_acs),
        path("login/", views.saml_login),
        path("metadata/", views.saml_metadata),
    ])),
    re_path(r"^oidc/(?P<provider_id>[^/]+)/", include([
        path("login/", views.oidc_login),
        path("login/callback/", views.oidc_callback),
    ])),
]
