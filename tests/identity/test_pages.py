"""The identity settings page: an owner or admin configures the identity provider (its client
secret stored encrypted), tests the connection, requires single sign-on only once a test passed and
a break-glass owner is chosen, verifies email domains by DNS, and issues SCIM tokens shown once.
Everything privileged is in the audit log; HR and employees cannot use the page."""

import pytest
from oidc_provider_mock import run_server_in_thread

from identity.models import EmailDomain, IdentityProvider, ScimToken, cipher
from portal.models import AuditLogEntry
from portal.tenancy import unscoped
from tests.support.dns_server import TxtServer

pytestmark = pytest.mark.django_db


def page(org):
    return f"/o/{org.slug}/settings/identity/"


def provider_of(org) -> IdentityProvider:
    with unscoped():
        return IdentityProvider.objects.get(organization=org.organization)


def actions(org, prefix):
    with unscoped():
        return list(AuditLogEntry.objects.filter(organization=org.organization, action__startswith=prefix)
                    .values_list("action", flat=True))


def save(client, org, **fields):
    data = {"save_provider": "1", "kind": "oidc", "name": "Acme Login", "discovery_url": "https://idp.a.example/",
            "client_id": "portal-a", "jit_enabled": "on", "default_role": "employee"} | fields
    return client.post(page(org), {key: value for key, value in data.items() if value is not None})


@pytest.mark.parametrize("role", ["hr", "approver", "employee"])
def test_only_admins_and_owners_reach_the_page(login, org_a, role):
    assert login(org_a.members[role]).get(page(org_a)).status_code == 403


def test_the_client_secret_is_stored_encrypted_and_kept_when_left_empty(as_admin, org_a):
    response = save(as_admin, org_a, client_secret="s3cret-of-the-idp")
    assert response.status_code == 302
    provider = provider_of(org_a)
    assert provider.client_secret_encrypted != "s3cret-of-the-idp" and cipher.looks_encrypted(
        provider.client_secret_encrypted)
    assert provider.client_secret == "s3cret-of-the-idp"
    assert save(as_admin, org_a, name="Acme SSO").status_code == 302  # secret left empty: kept
    assert provider_of(org_a).client_secret == "s3cret-of-the-idp"
    with unscoped():
        logged = list(AuditLogEntry.objects.filter(organization=org_a.organization,
                                                   action="identity_provider.updated").values_list("data", flat=True))
    assert logged and all("s3cret" not in str(data) for data in logged)


def test_bad_input_gets_field_errors_and_changes_nothing(as_admin, org_a):
    before = provider_of(org_a)
    for fields, field in [({"discovery_url": "not a url"}, "discovery_url"), ({"kind": "ldap"}, "kind"),
                          ({"kind": "saml", "metadata_xml": "<nope"}, "metadata_xml"),
                          ({"default_role": "owner"}, "default_role"),
                          ({"sso_required": "on"}, "break_glass_member")]:
        response = save(as_admin, org_a, **fields)
        assert response.status_code == 400, fields
        assert response.context["provider_form"].errors.get(field), (fields, response.context["provider_form"].errors)
    after = provider_of(org_a)
    assert (after.name, after.kind, after.discovery_url, after.sso_required) == (
        before.name, before.kind, before.discovery_url, before.sso_required)


def test_test_the_connection_then_require_single_sign_on(as_owner, org_a):
    from django.test import Client

    owner = org_a.members["owner"]
    employee_browser = Client()
    employee_browser.force_login(org_a.members["employee"].user, backend="django.contrib.auth.backends.ModelBackend")
    with run_server_in_thread() as server:
        url = f"http://localhost:{server.server_port}"
        save(as_owner, org_a, discovery_url=url, client_secret="x")
        # Not tested yet: single sign-on cannot be required.
        response = save(as_owner, org_a, discovery_url=url, sso_required="on", break_glass_member=owner.pk)
        assert response.status_code == 400 and "Test the connection first" in str(
            response.context["provider_form"].errors["sso_required"])
        assert as_owner.post(page(org_a) + "test/").status_code == 302
    provider = provider_of(org_a)
    assert provider.tested_at is not None and all(check["ok"] for check in provider.test_report)
    assert save(as_owner, org_a, discovery_url=url, sso_required="on", break_glass_member=owner.pk).status_code == 302
    provider = provider_of(org_a)
    assert provider.sso_required and provider.break_glass_member_id == owner.pk
    # The members' password sessions are refused from the next request, with the way in; the
    # break-glass owner's is not.
    refused = employee_browser.get(f"/o/{org_a.slug}/")
    assert refused.status_code == 403 and "requires single sign-on" in refused.content.decode()
    assert as_owner.get(page(org_a)).status_code == 200
    assert {"identity_provider.tested", "identity_provider.sso_required"} <= set(actions(org_a, "identity_provider"))


def test_a_failing_connection_test_says_why(as_admin, org_a):
    save(as_admin, org_a, discovery_url="http://127.0.0.1:9/")  # nothing listens there
    response = as_admin.post(page(org_a) + "test/", follow=True)
    assert "The connection test failed: discovery document" in response.content.decode()
    assert provider_of(org_a).tested_at is None


def test_an_email_domain_is_verified_by_its_txt_record_and_only_once(as_admin, login, org_a, org_b, settings):
    response = as_admin.post(page(org_a), {"add_domain": "1", "domain": "Research.A.Example"})
    assert response.status_code == 302
    with unscoped():
        domain = EmailDomain.objects.get(organization=org_a.organization, domain="research.a.example")
    with TxtServer({"research.a.example": ["v=spf1 -all"]}) as dns:
        settings.IDENTITY_DNS_NAMESERVERS = [f"127.0.0.1:{dns.port}"]
        response = as_admin.post(page(org_a) + f"domains/{domain.pk}/verify/", follow=True)
        assert "No TXT record" in response.content.decode()
        dns.records["research.a.example"].append(domain.txt_record)
        as_admin.post(page(org_a) + f"domains/{domain.pk}/verify/")
        domain.refresh_from_db()
        assert domain.verified_at is not None

        # Organization B claims the same domain and publishes its own record: still A's.
        b_admin = login(org_b.members["admin"])
        b_admin.post(page(org_b), {"add_domain": "1", "domain": "research.a.example"})
        with unscoped():
            b_domain = EmailDomain.objects.get(organization=org_b.organization, domain="research.a.example")
        dns.records["research.a.example"].append(b_domain.txt_record)
        response = b_admin.post(page(org_b) + f"domains/{b_domain.pk}/verify/", follow=True)
        assert "is verified by another organization" in response.content.decode()
        b_domain.refresh_from_db()
        assert b_domain.verified_at is None
    assert "email_domain.verified" in actions(org_a, "email_domain")


def test_a_scim_token_is_shown_once_and_stored_as_an_hmac(as_admin, org_a):
    response = as_admin.post(page(org_a), {"create_token": "1", "name": "Okta provisioning"})
    assert response.status_code == 201 and "no-store" in response["Cache-Control"]
    secret = response.context["new_token"]
    assert secret.startswith("tas_") and secret in response.content.decode()
    with unscoped():
        token = ScimToken.objects.get(organization=org_a.organization, name="Okta provisioning")
    assert secret not in token.secret_hash and token.last_four == secret[-4:]
    again = as_admin.get(page(org_a)).content.decode()
    assert secret not in again and f"{token.display_prefix}…{token.last_four}" in again
    assert as_admin.get(f"/scim/v2/o/{org_a.slug}/Users", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200
    assert as_admin.post(page(org_a) + f"scim-tokens/{token.pk}/revoke/").status_code == 302
    assert as_admin.get(f"/scim/v2/o/{org_a.slug}/Users", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401
