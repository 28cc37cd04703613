"""Single sign-on end to end in headless Chromium, against a real OpenID Connect provider the test
runs on loopback (oidc-provider-mock): the login page routes a company address to "continue with
your company account", a known member's account is linked, just-in-time creation makes a member
with the default role and team (or is refused when off), and with single sign-on required the
members' password login is refused with the reason while the break-glass owner still logs in with
a password and TOTP."""

import re

import httpx
import pytest
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
from oidc_provider_mock import run_server_in_thread
from playwright.sync_api import expect

from identity import services as identity_services
from portal.models import Member
from portal.tenancy import scope, unscoped
from tests.support.mfa import current_totp_code


@pytest.fixture
def idp():
    with run_server_in_thread() as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def company(org_a, idp):
    """Org A's identity provider is the loopback OpenID Connect provider, its connection tested."""
    owner = org_a.members["owner"]
    with scope(org_a.organization):
        provider = identity_services.identity_provider_save(
            organization=org_a.organization, actor=owner.user, kind="oidc", name="Acme Login", discovery_url=idp,
            client_id="portal", client_secret="portal-secret", jit_enabled=True, default_role="employee",
            default_team=org_a.team)
        checks = identity_services.identity_provider_test(provider=provider, actor=owner.user)
    assert all(check.ok for check in checks), checks
    return provider


def sign_in_at_the_idp(page, idp, email):
    """What the person does at their identity provider: the mock asks who they are."""
    httpx.put(f"{idp}/users/{email}", json={"email": email, "email_verified": True, "given_name": "Casey"})
    page.wait_for_url(re.compile(r"^http://localhost:\d+/oauth2/authorize"))
    page.fill("input[name=sub]", email)
    page.get_by_role("button", name="Authorize").click()


def continue_with_company_account(page, portal_server, email):
    page.goto(f"{portal_server.url}/accounts/login/")
    page.fill("input[name=login]", email)
    button = page.get_by_role("button", name="Continue with your company account")
    expect(button).to_be_visible()
    expect(page.locator("[data-testid=company-login]")).to_contain_text("Acme Login")
    button.click()


def test_domain_routing_linking_and_just_in_time_creation(page, portal_server, company, idp, org_a):
    page.set_default_timeout(15_000)
    # An address outside any verified domain is offered no company login.
    page.goto(f"{portal_server.url}/accounts/login/")
    page.fill("input[name=login]", "someone@elsewhere.example")
    page.wait_for_timeout(800)
    expect(page.get_by_role("button", name="Continue with your company account")).to_have_count(0)

    # A known member: linked to their account, lands in their organization.
    employee = org_a.members["employee"]
    continue_with_company_account(page, portal_server, employee.user.email)
    sign_in_at_the_idp(page, idp, employee.user.email)
    expect(page).to_have_url(re.compile(rf"/o/{org_a.slug}/$"))
    with unscoped():
        assert employee.user.socialaccount_set.get().provider == company.provider_id
    page.context.clear_cookies()

    # An unknown address in the verified domain: a member made just in time, default role and team.
    continue_with_company_account(page, portal_server, "newhire@a.example")
    sign_in_at_the_idp(page, idp, "newhire@a.example")
    expect(page).to_have_url(re.compile(rf"/o/{org_a.slug}/$"))
    with unscoped():
        newhire = Member.objects.select_related("user").get(user__email="newhire@a.example")
    assert newhire.roles == ["employee"] and newhire.team_id == org_a.team.pk and newhire.is_active
    page.context.clear_cookies()

    # Just-in-time creation off: an unknown address is refused, and nothing is made.
    with scope(org_a.organization):
        identity_services.identity_provider_save(organization=org_a.organization, actor=org_a.members["owner"].user,
                                                 kind="oidc", name="Acme Login", discovery_url=idp, client_id="portal",
                                                 jit_enabled=False, default_role="employee")
    continue_with_company_account(page, portal_server, "stranger@a.example")
    sign_in_at_the_idp(page, idp, "stranger@a.example")
    expect(page.locator("[data-testid=sso-refusal]")).to_contain_text("ask an administrator to invite you")
    with unscoped():
        assert not Member.objects.filter(user__email="stranger@a.example").exists()


def test_sso_required_refuses_passwords_but_the_break_glass_owner(page, portal_server, company, idp, org_a, log_in):
    page.set_default_timeout(15_000)
    owner, employee = org_a.members["owner"], org_a.members["employee"]
    secret = generate_totp_secret()
    TOTP.activate(owner.user, secret)
    with scope(org_a.organization):
        identity_services.identity_provider_save(
            organization=org_a.organization, actor=owner.user, kind="oidc", name="Acme Login", discovery_url=idp,
            client_id="portal", jit_enabled=True, default_role="employee", sso_required=True,
            break_glass_member=owner)

    # A member's password session is refused by the organization, saying why, with the way in.
    log_in(employee.user.email, org_a.password)
    expect(page.get_by_text("requires single sign-on")).to_be_visible()
    expect(page).to_have_url(re.compile(rf"/o/{org_a.slug}/$"))
    page.get_by_role("button", name="Continue with your company account").click()
    sign_in_at_the_idp(page, idp, employee.user.email)
    expect(page).to_have_url(re.compile(rf"/o/{org_a.slug}/$"))
    page.context.clear_cookies()

    # The break-glass owner still logs in with the password, then TOTP.
    log_in(owner.user.email, org_a.password)
    expect(page).to_have_url(re.compile(r"/accounts/2fa/authenticate/$"))
    page.fill("input[name=code]", current_totp_code(secret))
    page.get_by_role("button", name="Sign In").click()
    expect(page).to_have_url(re.compile(rf"/o/{org_a.slug}/$"))
