"""Single sign-on required is one rule, checked wherever a session acts in an organization (its pages
and the REST API): a session not signed in through that organization's identity provider gets a
page offering it (403 on the API), whatever login made it (a password, another organization's
identity provider, an invitation accepted); API keys are not sessions and keep working. A password
login is refused by that organization only, not for the person's others; the break-glass owner is
exempt only while an active owner. An owner or admin, whose account a provider does not link by
email, links it from their own password session."""

import pytest
from allauth.socialaccount.models import SocialAccount
from django.test import Client
from django.utils import timezone

from identity.models import IdentityProvider
from portal.models import Member
from portal.services import SIGNED_IN_THROUGH
from portal.tenancy import unscoped
from tests.factories import PASSWORD, MemberFactory
from tests.identity.test_saml_login import client, post_to_acs, saml_idp, start_login  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db


def require_sso(org):
    with unscoped():
        IdentityProvider.objects.filter(organization=org.organization).update(
            sso_required=True, break_glass_member=org.members["owner"], tested_at=timezone.now())


def browser(user, *, signed_in_through=None) -> Client:
    client = Client()
    client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
    if signed_in_through is not None:
        session = client.session
        session[SIGNED_IN_THROUGH] = signed_in_through.organization.pk
        session.save()
    return client


@pytest.fixture
def in_both(org_a, org_b):
    """B's employee, an employee of A too; B requires single sign-on."""
    employee = org_b.members["employee"]
    MemberFactory(organization=org_a.organization, user=employee.user, is_employee=True)
    require_sso(org_b)
    return employee


@pytest.mark.parametrize("signed_in", ["with a password", "through A's identity provider"])
def test_a_session_not_signed_in_through_the_organizations_provider_is_refused_there_only(org_a, org_b, in_both,
                                                                                         signed_in):
    client = browser(in_both.user, signed_in_through=org_a if signed_in != "with a password" else None)
    assert client.get(f"/o/{org_a.slug}/").status_code == 200
    for path in (f"/o/{org_b.slug}/", f"/o/{org_b.slug}/members/"):
        refused = client.get(path)
        assert refused.status_code == 403
        page = refused.content.decode()
        assert "Org b requires single sign-on" in page
        assert f'action="/accounts/oidc/{org_b.slug}-oidc/login/"' in page and f'value="{path}"' in page
    api = client.get(f"/api/v1/o/{org_b.slug}/balances/")
    assert api.status_code == 403 and "requires single sign-on" in api.json()["detail"]
    assert client.get(f"/api/v1/o/{org_a.slug}/balances/").status_code == 200


def test_a_session_signed_in_through_the_organizations_provider_is_let_in(org_b, in_both):
    client = browser(in_both.user, signed_in_through=org_b)
    assert client.get(f"/o/{org_b.slug}/").status_code == 200
    assert client.get(f"/api/v1/o/{org_b.slug}/balances/").status_code == 200


def test_api_keys_are_not_sessions(client, org_b, in_both):
    response = client.get(f"/api/v1/o/{org_b.slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {org_b.api_key_secret}")
    assert response.status_code == 200


@pytest.mark.parametrize("also_in_a", [True, False])
def test_a_password_login_is_refused_by_the_organization_that_requires_sso_only(org_a, org_b, in_both, also_in_a):
    person = in_both if also_in_a else org_b.members["hr"]
    client = Client()
    assert client.post("/accounts/login/", {"login": person.user.email, "password": PASSWORD}).status_code == 302
    if also_in_a:
        assert client.get(f"/o/{org_a.slug}/").status_code == 200
    refused = client.get(f"/o/{org_b.slug}/")
    assert refused.status_code == 403 and "requires single sign-on" in refused.content.decode()


def test_the_break_glass_owner_is_exempt_only_while_an_active_owner(org_b):
    require_sso(org_b)
    owner = org_b.members["owner"]
    client = browser(owner.user)
    assert client.get(f"/o/{org_b.slug}/").status_code == 200
    with unscoped():
        Member.objects.filter(pk=owner.pk).update(is_owner=False, is_admin=True)
    assert client.get(f"/o/{org_b.slug}/").status_code == 403


def test_an_invitation_accepted_with_a_password_does_not_open_an_organization_that_requires_sso(org_b):
    require_sso(org_b)
    client = Client()
    response = client.post(f"/invitations/{org_b.invitation_token}/", {
        "first_name": "New", "last_name": "Comer", "password1": "a-long-passphrase-9",
        "password2": "a-long-passphrase-9"}, follow=True)
    assert response.status_code == 403 and "requires single sign-on" in response.content.decode()


def test_an_admin_links_their_company_account_from_their_password_session(client, org_a, saml_idp):
    require_sso(org_a)
    admin = org_a.members["admin"]
    client.force_login(admin.user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.get(f"/o/{org_a.slug}/").status_code == 403
    post_to_acs(client, saml_idp.answer(start_login(client, org_a), email=admin.user.email))
    assert client.session["_auth_user_id"] == str(admin.user.pk)
    assert client.get(f"/o/{org_a.slug}/").status_code == 200
    assert SocialAccount.objects.filter(provider=f"{org_a.slug}-saml", user=admin.user).exists()
