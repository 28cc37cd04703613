"""Pages of company identity: the login's "continue with your company account", and the settings
page where an owner or admin configures the identity provider, tests it, verifies email domains
and issues the directory's SCIM tokens."""

import http.client
import logging
from functools import wraps

import requests
from allauth.socialaccount.providers.openid_connect import views as oidc_views
from allauth.socialaccount.providers.saml import views as saml_views
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from lxml import etree
from onelogin.saml2 import xmlparser
from onelogin.saml2.errors import OneLogin_Saml2_Error, OneLogin_Saml2_ValidationError

from identity import selectors, services
from identity.adapter import ALLAUTH_PROVIDER
from identity.forms import CompanyLoginForm, EmailDomainForm, IdentityProviderForm, ScimTokenForm
from identity.models import IdentityProvider
from portal import selectors as portal_selectors
from portal.forms import apply_service_error
from portal.models import Member
from portal.tenancy import require_roles
from portal.views import org_url


log = logging.getLogger(__name__)


def login_url(provider: IdentityProvider) -> str:
    """Where a login through the provider starts (django-allauth's view for the provider's kind)."""
    if provider.kind == IdentityProvider.Kind.SAML:
        return reverse("saml_login", kwargs={"organization_slug": provider.organization.slug})
    return reverse(f"{ALLAUTH_PROVIDER[provider.kind]}_login", kwargs={"provider_id": provider.provider_id})


def _company_login(request, email: str):
    provider = selectors.provider_for_email(email)
    return {"provider": provider, "provider_login_url": login_url(provider) if provider else None,
            "next": request.GET.get("next", "")}


# What python3-saml raises, beyond what django-allauth's SAML views handle, on XML it will not read
# (malformed, a DTD or entities); and what fetching an identity provider's SAML metadata or OpenID
# Connect discovery document raises when it cannot be had (urllib's URLError is an OSError).
SAML_UNREADABLE = (etree.LxmlError, xmlparser.DTDForbidden, xmlparser.EntitiesForbidden, xmlparser.NotSupportedError,
                   OneLogin_Saml2_Error, OneLogin_Saml2_ValidationError)
PROVIDER_UNREACHABLE = (OSError, http.client.HTTPException, requests.RequestException)
UNREACHABLE = ("The identity provider could not be reached (its metadata or discovery document could not be "
               "fetched); try again later, or ask your administrator to check its settings.")


def _failures_refused(view, org_kwarg: str):
    """django-allauth's login view, with what it lets through answered as a 400 page saying why."""
    def refused(request, kwargs, error, reason):
        log.warning("Single sign-on request of %s refused: %r", kwargs.get(org_kwarg), error)
        return render(request, "identity/sso_refused.html", {"reason": reason, "provider": None}, status=400)

    @wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except PROVIDER_UNREACHABLE as error:
            return refused(request, kwargs, error, UNREACHABLE)
        except SAML_UNREADABLE as error:
            return refused(request, kwargs, error, "The identity provider's SAML message could not be read; nothing "
                                                   "was logged in.")
    return wrapped


saml_finish_acs = _failures_refused(saml_views.finish_acs, "organization_slug")
saml_login = _failures_refused(saml_views.login, "organization_slug")
saml_metadata = _failures_refused(saml_views.metadata, "organization_slug")
oidc_login = _failures_refused(oidc_views.login, "provider_id")
oidc_callback = _failures_refused(oidc_views.callback, "provider_id")


def sso_required(request, *, member, reason: str):
    """The page a session gets in an organization that requires single sign-on it did not use: the
    way in is the organization's identity provider, back to the page asked for."""
    provider = selectors.identity_provider_of(organization=member.organization)
    return render(request, "identity/sso_required.html", {
        "reason": reason, "provider": provider, "provider_login_url": login_url(provider),
        "next": request.get_full_path()}, status=403)


@require_GET
def sso_route(request):
    """The login page's fragment, fetched as the email is typed: a "continue with your company
    account" button when the address's domain belongs to an organization with an identity provider."""
    return render(request, "identity/_company_login.html", _company_login(request, request.GET.get("login", "")))


@require_http_methods(["GET", "POST"])
def sso_start(request):
    """Log in with a company account, without JavaScript: the email address picks the provider."""
    form = CompanyLoginForm(request.POST or request.GET or None)
    context = {"form": form}
    if form.is_bound and form.is_valid():
        context.update(_company_login(request, form.cleaned_data["email"]))
        if context["provider"] is None:
            form.add_error("email", "This address does not log in with a company account: use your password.")
    return render(request, "identity/sso_start.html", context, status=400 if form.errors else 200)


def _provider_form(request, provider):
    organization = request.organization
    initial = {"kind": IdentityProvider.Kind.OIDC, "jit_enabled": True, "default_role": "employee"}
    if provider is not None:
        initial = {field: getattr(provider, field) for field in services.PROVIDER_FIELDS}
    owners = Member.objects.filter(organization=organization, is_owner=True, is_active=True).select_related("user")
    return IdentityProviderForm(request.POST if request.method == "POST" and "save_provider" in request.POST else None,
                                initial=initial, teams=portal_selectors.team_list(organization=organization),
                                owners=owners)


@never_cache
@require_roles("admin")
@require_http_methods(["GET", "POST"])
def identity_settings(request):
    organization = request.organization
    provider = selectors.identity_provider_of(organization=organization)
    provider_form = _provider_form(request, provider)
    domain_form = EmailDomainForm(request.POST if "add_domain" in request.POST else None)
    token_form = ScimTokenForm(request.POST if "create_token" in request.POST else None)
    new_token = None
    status = 200
    if request.method == "POST":  # an invalid form, or a new SCIM token's page (its secret shown once)
        try:
            if "save_provider" in request.POST and provider_form.is_valid():
                data = dict(provider_form.cleaned_data)
                secret = data.pop("client_secret")
                services.identity_provider_save(organization=organization, actor=request.user, client_secret=secret,
                                                **data)
                messages.success(request, "Identity provider saved. Test the connection.")
                return redirect(org_url(request, "identity_settings"))
            if "add_domain" in request.POST and domain_form.is_valid():
                domain = services.email_domain_add(organization=organization, actor=request.user,
                                                   **domain_form.cleaned_data)
                messages.success(request, f"Add the TXT record below at {domain.domain}, then verify.")
                return redirect(org_url(request, "identity_settings"))
            if "create_token" in request.POST and token_form.is_valid():
                _token, new_token = services.scim_token_create(organization=organization,
                                                               actor_member=request.member, **token_form.cleaned_data)
                token_form = ScimTokenForm()
        except ValidationError as error:
            for form, button in ((provider_form, "save_provider"), (domain_form, "add_domain"),
                                 (token_form, "create_token")):
                if button in request.POST:
                    apply_service_error(form, error)
        status = 201 if new_token else 400
    response = render(request, "identity/settings.html", {
        "provider": provider, "provider_form": provider_form, "domain_form": domain_form, "token_form": token_form,
        "domains": selectors.email_domain_list(organization=organization),
        "tokens": selectors.scim_token_list(organization=organization), "new_token": new_token,
        "login_url": login_url(provider) if provider else None,
        "callback_url": request.build_absolute_uri(
            reverse("openid_connect_callback", kwargs={"provider_id": provider.provider_id}))
        if provider and provider.kind == IdentityProvider.Kind.OIDC else None,
        "saml_urls": {name: request.build_absolute_uri(reverse(f"saml_{name}", kwargs={
            "organization_slug": organization.slug})) for name in ("metadata", "acs")}
        if provider and provider.kind == IdentityProvider.Kind.SAML else None,
        "scim_base_url": request.build_absolute_uri(f"/scim/v2/o/{organization.slug}/"),
    }, status=status)
    return response


@require_roles("admin")
@require_POST
def identity_provider_test(request):
    provider = selectors.identity_provider_of(organization=request.organization)
    if provider is None:
        messages.error(request, "Configure an identity provider first.")
    else:
        checks = services.identity_provider_test(provider=provider, actor=request.user)
        if all(check.ok for check in checks):
            messages.success(request, "The connection works. Try a login with your company account too.")
        else:
            messages.error(request, "The connection test failed: " + "; ".join(
                f"{check.what}: {check.detail}" for check in checks if not check.ok))
    return redirect(org_url(request, "identity_settings"))


@require_roles("admin")
@require_POST
def identity_provider_delete(request):
    provider = selectors.identity_provider_of(organization=request.organization)
    if provider is not None:
        try:
            services.identity_provider_delete(provider=provider, actor=request.user)
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
        else:
            messages.success(request, "Identity provider removed: members log in with passwords again.")
    return redirect(org_url(request, "identity_settings"))


@require_roles("admin")
@require_POST
def email_domain_verify(request, email_domain_id):
    domain = selectors.email_domain_get(organization=request.organization, email_domain_id=email_domain_id)
    try:
        services.email_domain_verify(email_domain=domain, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"{domain.domain} is verified.")
    return redirect(org_url(request, "identity_settings"))


@require_roles("admin")
@require_POST
def email_domain_remove(request, email_domain_id):
    domain = selectors.email_domain_get(organization=request.organization, email_domain_id=email_domain_id)
    services.email_domain_remove(email_domain=domain, actor=request.user)
    messages.success(request, f"{domain.domain} removed.")
    return redirect(org_url(request, "identity_settings"))


@require_roles("admin")
@require_POST
def scim_token_revoke(request, scim_token_id):
    token = selectors.scim_token_get(organization=request.organization, scim_token_id=scim_token_id)
    try:
        services.scim_token_revoke(token=token, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Token {token.name} revoked.")
    return redirect(org_url(request, "identity_settings"))
