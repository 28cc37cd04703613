"""django-allauth's social accounts, one identity provider per organization.

The providers are allauth's own (`openid_connect`, `saml`); their apps are built from the
organizations' IdentityProvider rows (the client secret decrypted only here), never stored as
allauth SocialApp rows. An identity provider vouches only for the addresses in its organization's
verified email domains: only those are taken as verified, linked to an existing account by email
address (an ordinary account of that organization only; others link from their own logged-in
session, a "connect" login), or given a new account; and a login must be one the organization
allows (identity.services.sso_login_check). Every refusal is in the organization's audit log.
"""

from __future__ import annotations

from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from allauth.socialaccount.models import SocialApp
from allauth.socialaccount.providers.base.constants import AuthProcess
from django.shortcuts import render

from identity import selectors, services
from identity.models import IdentityProvider

ALLAUTH_PROVIDER = {IdentityProvider.Kind.OIDC: "openid_connect", IdentityProvider.Kind.SAML: "saml"}
# What python3-saml reads an address and names from: allauth's defaults plus the plain names many
# identity providers send.
SAML_ATTRIBUTES = {
    "uid": ["urn:oasis:names:tc:SAML:attribute:subject-id"],
    "email": ["urn:oid:0.9.2342.19200300.100.1.3", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
              "email", "mail", "emailAddress"],
    "first_name": ["http://schemas.xmlsoap.org/ws/2005/05/identity/claims/givenname", "urn:oid:2.5.4.42", "givenName",
                   "firstName"],
    "last_name": ["http://schemas.xmlsoap.org/ws/2005/05/identity/claims/surname", "urn:oid:2.5.4.4", "sn", "surname",
                  "lastName"],
}


def social_app(provider: IdentityProvider) -> SocialApp:
    """The (unsaved) allauth app of an organization's identity provider."""
    if provider.kind == IdentityProvider.Kind.OIDC:
        return SocialApp(provider="openid_connect", provider_id=provider.provider_id, name=provider.name,
                         client_id=provider.client_id, secret=provider.client_secret,
                         settings={"server_url": provider.discovery_url})
    # allauth's SAML URLs name the app by its client id: the organization's slug.
    return SocialApp(provider="saml", provider_id=provider.provider_id, name=provider.name,
                     client_id=provider.organization.slug,
                     settings={"idp": services.saml_idp_settings(provider), "attribute_mapping": SAML_ATTRIBUTES,
                               "use_nameid_for_email": False,
                               "advanced": {"strict": True, "reject_idp_initiated_sso": True}})


def identity_provider_of(sociallogin_or_provider) -> IdentityProvider | None:
    provider = getattr(sociallogin_or_provider, "provider", sociallogin_or_provider)
    return selectors.provider_by_id(provider.app.provider_id) if provider.app else None


def refuse(request, provider: IdentityProvider | None, reason: str, *, email: str = "", user=None):
    """Stop the login on a page saying why; recorded in the organization's audit log."""
    if provider is not None:
        services.sso_refusal_record(provider=provider, email=email, user=user, reason=reason)
    raise ImmediateHttpResponse(render(request, "identity/sso_refused.html",
                                       {"reason": reason, "provider": provider}, status=403))


class SocialAccountAdapter(DefaultSocialAccountAdapter):
    def list_apps(self, request, provider=None, client_id=None):
        if provider in (None, *ALLAUTH_PROVIDER.values()):
            kind = next((kind for kind, name in ALLAUTH_PROVIDER.items() if name == provider), None)
            # allauth names a SAML app by its client id, the organization's slug.
            candidates = selectors.providers(kind=kind, slug=client_id if kind == IdentityProvider.Kind.SAML else None)
        else:  # a provider id, `<slug>-<kind>`
            candidates = [found] if (found := selectors.provider_by_id(provider)) else []
        apps = []
        for identity_provider in candidates:
            try:
                app = social_app(identity_provider)
            except ValueError:  # SAML metadata that no longer reads: that provider is unusable
                continue
            if provider and provider not in (app.provider, app.provider_id):
                continue
            if client_id and app.client_id != client_id:
                continue
            apps.append(app)
        return apps

    def list_providers(self, request):
        # Never a list of every organization's provider: the login page routes by email domain.
        return []

    def is_email_verified(self, provider, email) -> bool:
        identity_provider = identity_provider_of(provider)
        return identity_provider is not None and selectors.email_is_organizations(
            organization=identity_provider.organization, email=email)

    def can_authenticate_by_email(self, login, email) -> bool:
        return self.is_email_verified(login.provider, email)

    def pre_social_login(self, request, sociallogin):
        identity_provider = identity_provider_of(sociallogin)
        if identity_provider is None:
            refuse(request, None, "This identity provider is no longer configured.")
        email = next((address.email for address in sociallogin.email_addresses
                      if self.is_email_verified(sociallogin.provider, address.email)),
                     sociallogin.user.email if sociallogin.user else "")
        by_email = False
        if sociallogin.state.get("process") == AuthProcess.CONNECT:
            # Linking from one's own logged-in session: the provider must name that very account.
            user = request.user if request.user.is_authenticated else None
            if user is None or user.email.lower() != email.lower():
                refuse(request, identity_provider, f"{identity_provider.name} signed you in as {email or 'nobody'}: "
                       "log in to that account first to link it.", email=email, user=user)
        elif sociallogin.account.pk is not None:  # the provider's subject is linked to an account
            user = sociallogin.user
        else:  # an account with the address (allauth's lookup found it: it is about to be linked), or none
            user = sociallogin.user if sociallogin.is_existing else None
            # Logged in as that very account already (e.g. with its password), it links its own.
            by_email = user is not None and user.pk != request.user.pk
        try:
            services.sso_login_check(provider=identity_provider, email=email, user=user, by_email=by_email)
        except services.SsoRefused as refused:
            refuse(request, identity_provider, str(refused), email=email, user=user)
