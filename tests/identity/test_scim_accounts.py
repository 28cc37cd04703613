"""What the directory provisions is one email address of a verified domain; an account that exists
with it but never proved it is adopted without the password whoever made it chose; the directory's
changes of a person's name and externalId are in the audit log."""

import json

import pytest
from allauth.account.models import EmailAddress
from django.test import Client

from identity.models import EmailDomain
from portal.models import AuditLogEntry, User
from portal.tenancy import unscoped
from tests.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db

USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def scim(client, org, method, path, body):
    return getattr(client, method)(f"/scim/v2/o/{org.slug}/{path}", data=json.dumps(body),
                                   content_type="application/scim+json",
                                   HTTP_AUTHORIZATION=f"Bearer {org.scim_token_secret}")


@pytest.mark.parametrize("user_name", ["x@y@a.example", "x y@a.example", "@a.example", "a.example"])
def test_a_user_name_must_be_one_email_address(client, org_a, user_name):
    response = scim(client, org_a, "post", "Users", {"schemas": [USER], "userName": user_name})
    assert response.status_code == 400 and response.json()["scimType"] == "invalidValue", response.content
    assert not User.objects.filter(email__iexact=user_name.strip()).exists()


def test_an_unproven_account_with_the_address_is_adopted_without_its_password(client, org_a):
    squatter = UserFactory(email="newhire@a.example")  # signed up, never confirmed the address
    EmailAddress.objects.update_or_create(user=squatter, email=squatter.email,
                                          defaults={"verified": False, "primary": True})
    assert scim(client, org_a, "post", "Users", {"schemas": [USER], "userName": squatter.email}).status_code == 201
    squatter.refresh_from_db()
    assert not squatter.has_usable_password()
    assert EmailAddress.objects.get(user=squatter).verified
    login = Client().post("/accounts/login/", {"login": squatter.email, "password": PASSWORD})
    assert "_auth_user_id" not in login.client.session


def test_a_proven_account_keeps_its_password(client, org_a, org_b):
    person = org_b.members["employee"].user
    with unscoped():
        EmailDomain.objects.filter(organization=org_b.organization).delete()
        EmailDomain.objects.filter(organization=org_a.organization).update(domain="b.example")
    EmailAddress.objects.update_or_create(user=person, email=person.email, defaults={"verified": True})
    assert scim(client, org_a, "post", "Users", {"schemas": [USER], "userName": person.email}).status_code == 201
    person.refresh_from_db()
    assert person.has_usable_password()


def test_name_and_external_id_changes_are_audited(client, org_a):
    employee = org_a.members["employee"]
    response = scim(client, org_a, "put", f"Users/{employee.pk}", {
        "schemas": [USER], "userName": employee.user.email, "externalId": "00u123",
        "name": {"givenName": "Ada", "familyName": "Lovelace"}})
    assert response.status_code == 200, response.content
    with unscoped():
        entries = {entry.action: entry.data for entry in AuditLogEntry.objects.filter(
            organization=org_a.organization, action__startswith="directory.")}
    assert entries["directory.name_changed"]["first_name"][1] == "Ada"
    assert entries["directory.name_changed"]["last_name"][1] == "Lovelace"
    assert entries["directory.external_id_changed"]["external_id"] == ["", "00u123"]
    assert "SCIM token" in entries["directory.name_changed"]["via"]
