"""One leaver rule, however a member leaves (deactivated on the members page or by the directory's
active=false, or deleted by the directory): their API keys are revoked, not only refused while
they are inactive, so a member made active again does not get their old keys back."""

import json

import pytest

from apikeys.models import ApiKey
from portal import services as portal_services
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped

pytestmark = pytest.mark.django_db

SCIM = "application/scim+json"


def scim(client, org, method, path, body=None):
    return getattr(client, method)(f"/scim/v2/o/{org.slug}/{path}", data=json.dumps(body) if body else None,
                                   content_type=SCIM, HTTP_AUTHORIZATION=f"Bearer {org.scim_token_secret}")


def active(client, org, member, value: bool):
    response = scim(client, org, "patch", f"Users/{member.pk}", {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "path": "active", "value": value}]})
    assert response.status_code == 200, response.content


def leave(how, client, org, member):
    if how == "members page":
        with scope(org.organization):
            portal_services.member_update(member=member, actor_member=org.members["admin"], team=member.team,
                                          is_active=False)
    elif how == "directory deactivation":
        active(client, org, member, False)
    else:
        assert scim(client, org, "delete", f"Users/{member.pk}").status_code == 204


@pytest.mark.parametrize("how", ["members page", "directory deactivation", "directory deletion"])
def test_a_leavers_keys_are_revoked_and_stay_revoked_when_they_come_back(client, org_a, how):
    employee = org_a.members["employee"]
    leave(how, client, org_a, employee)
    with unscoped():
        key = ApiKey.objects.get(pk=org_a.api_key.pk)
        assert key.revoked_at is not None
        ended = AuditLogEntry.objects.get(organization=org_a.organization, action="member.access_ended")
    assert ended.data["api_keys_revoked"] == [f"{key.display_prefix}…{key.last_four}"]
    if how == "directory deletion":
        created = scim(client, org_a, "post", "Users", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                                        "userName": employee.user.email})
        assert created.status_code == 201, created.content
    else:
        active(client, org_a, employee, True)
    with unscoped():
        assert ApiKey.objects.get(pk=key.pk).refusal() is not None
    response = client.get(f"/api/v1/o/{org_a.slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {org_a.api_key_secret}")
    assert response.status_code == 401
