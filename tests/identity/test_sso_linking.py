"""Who an organization's identity provider may log in as. Its admins choose the provider, so an
assertion is linked by email address only to an ordinary account of that one organization: an
owner's, an admin's, platform staff's, or the account of someone who is a member elsewhere too is
refused (they link from their own logged-in session), as is an address outside the verified
domains; nothing is linked and the refusal is audited. Only owners choose the provider, and a new
provider starts with no linked accounts: a reused subject does not log in as whoever was linked."""

import pytest
from allauth.socialaccount.models import SocialAccount
from django.core.exceptions import ValidationError

from identity import services as identity_services
from portal.models import AuditLogEntry, Member
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, UserFactory
from tests.identity.test_saml_login import client, post_to_acs, saml_idp, start_login  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db


def audited(org, action):
    with unscoped():
        return list(AuditLogEntry.objects.filter(organization=org.organization, action=action).order_by("pk")
                    .values_list("data", flat=True))


def linked(org):
    return SocialAccount.objects.filter(provider=f"{org.slug}-saml")


@pytest.mark.parametrize("who", ["owner", "admin", "member of another organization", "staff", "out of domain"])
def test_an_assertion_is_not_linked_to_an_account_it_must_not_take_over(client, org_a, org_b, saml_idp, who):
    if who in ("owner", "admin"):
        user = org_a.members[who].user
    elif who == "member of another organization":
        user = UserFactory(email="consultant@a.example")  # an address of A's domain, a member of B only
        MemberFactory(organization=org_b.organization, user=user, is_employee=True)
    elif who == "staff":
        user = UserFactory(email="support@a.example", is_staff=True)
    else:
        user = org_b.members["employee"].user
    form = saml_idp.answer(start_login(client, org_a), email=user.email)
    finished = post_to_acs(client, form)
    assert finished.status_code == 403
    assert "_auth_user_id" not in client.session
    assert not linked(org_a).exists()
    [refusal] = audited(org_a, "sso.refused")
    assert refusal["email"] == user.email
    # No membership made just in time either.
    assert Member.all_objects.filter(organization=org_a.organization, user=user).exists() == (who in ("owner", "admin"))


def test_an_ordinary_member_is_linked_by_email_and_audited(client, org_a, saml_idp):
    employee = org_a.members["employee"]
    form = saml_idp.answer(start_login(client, org_a), email=employee.user.email)
    assert post_to_acs(client, form).status_code == 302
    assert client.session["_auth_user_id"] == str(employee.user.pk)
    assert list(linked(org_a).values_list("user_id", flat=True)) == [employee.user.pk]
    assert [entry["email"] for entry in audited(org_a, "sso.account_linked")] == [employee.user.email]


def test_an_owner_links_their_company_account_from_their_own_session(client, org_a, saml_idp):
    owner = org_a.members["owner"]
    client.force_login(owner.user, backend="django.contrib.auth.backends.ModelBackend")
    response = client.post(f"/accounts/saml/{org_a.slug}/login/", {"process": "connect"})
    assert response.status_code == 302
    # The provider must name the logged-in account itself.
    other = saml_idp.answer(response["Location"], email=org_a.members["hr"].user.email)
    assert post_to_acs(client, other).status_code == 403
    assert not linked(org_a).exists()
    response = client.post(f"/accounts/saml/{org_a.slug}/login/", {"process": "connect"})
    post_to_acs(client, saml_idp.answer(response["Location"], email=owner.user.email))
    assert list(linked(org_a).values_list("user_id", flat=True)) == [owner.user.pk]
    client.logout()
    # Linked, the owner logs in through the provider.
    assert post_to_acs(client, saml_idp.answer(start_login(client, org_a), email=owner.user.email)).status_code == 302
    assert client.session["_auth_user_id"] == str(owner.user.pk)


def test_a_new_connection_forgets_the_linked_accounts(client, org_a, saml_idp):
    employee, owner = org_a.members["employee"], org_a.members["owner"]
    post_to_acs(client, saml_idp.answer(start_login(client, org_a), email=employee.user.email))
    assert linked(org_a).count() == 1
    with scope(org_a.organization):
        # Another name only: the same connection, the links stay.
        identity_services.identity_provider_save(organization=org_a.organization, actor=owner.user, kind="saml",
                                                 name="Acme SAML 2", metadata_xml=saml_idp.metadata, jit_enabled=True)
        assert linked(org_a).count() == 1
        identity_services.identity_provider_save(
            organization=org_a.organization, actor=owner.user, kind="oidc", name="Other", client_id="x",
            discovery_url="https://login.other.example/", client_secret="s", jit_enabled=True)
    assert not linked(org_a).exists()
    assert audited(org_a, "identity_provider.updated")[-1]["social_accounts_unlinked"] == 1


def test_only_an_owner_chooses_the_identity_provider(org_a):
    admin, owner = org_a.members["admin"], org_a.members["owner"]
    provider = org_a.identity_provider
    with scope(org_a.organization):
        for change in ({"discovery_url": "https://idp.evil.example/"}, {"client_id": "evil"},
                       {"kind": "saml", "metadata_url": "https://idp.evil.example/md", "entity_id": "e"}):
            data = {"kind": "oidc", "name": provider.name, "discovery_url": provider.discovery_url,
                    "client_id": provider.client_id, "jit_enabled": True} | change
            with pytest.raises(ValidationError, match="Only an owner"):
                identity_services.identity_provider_save(organization=org_a.organization, actor=admin.user, **data)
        # What is not the connection an admin may still change.
        renamed = identity_services.identity_provider_save(
            organization=org_a.organization, actor=admin.user, kind="oidc", name="Renamed",
            discovery_url=provider.discovery_url, client_id=provider.client_id, jit_enabled=False)
        assert (renamed.name, renamed.discovery_url) == ("Renamed", provider.discovery_url)
        with pytest.raises(ValidationError, match="Only an owner"):
            identity_services.identity_provider_delete(provider=renamed, actor=admin.user)
        identity_services.identity_provider_delete(provider=renamed, actor=owner.user)


def test_the_settings_page_refuses_an_admin_a_new_connection(as_admin, org_a):
    response = as_admin.post(f"/o/{org_a.slug}/settings/identity/", {
        "save_provider": "1", "kind": "oidc", "name": "Evil", "discovery_url": "https://idp.evil.example/",
        "client_id": "evil", "client_secret": "s", "default_role": "employee"})
    assert response.status_code == 400
    assert "Only an owner" in str(response.context["provider_form"].non_field_errors())
    with unscoped():
        org_a.identity_provider.refresh_from_db()
    assert org_a.identity_provider.discovery_url == "https://idp.a.example/"
