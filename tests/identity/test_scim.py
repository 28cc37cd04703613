"""SCIM 2.0 provisioning driven by a SCIM client library (scim2-client), as a directory (Okta, Entra
ID) drives it: discovery, the lifecycle of Users (members) and Groups (teams), filters and
pagination, and malformed bodies answered with SCIM errors. The client calls the portal's WSGI
application in this process (scim2-client's WSGI engine), through every middleware."""

import json

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from scim2_client.engines.wsgi import WSGISCIMClient
from scim2_models import (Group, GroupMember, PatchOp, PatchOperation, SCIMException, SearchRequest,
                          User)

from apikeys.models import ApiKey
from identity.models import DirectoryEntry
from portal.models import AuditLogEntry, Member, Team
from portal.tenancy import scope, unscoped
from portal.wsgi import application

pytestmark = pytest.mark.django_db


def portal(environ, start_response):
    """The portal's WSGI application inside the test's transaction: as Django's test client does, its
    end of request does not close the database connection (the test's transaction is on it)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        result = application(environ, start_response)
        body = b"".join(result)
        result.close()
        return [body]
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def directory(org, secret=None) -> WSGISCIMClient:
    client = WSGISCIMClient(portal, base_url=f"http://testserver/scim/v2/o/{org.slug}",
                            headers={"Authorization": f"Bearer {secret or org.scim_token_secret}"})
    client.discover()  # the resource types, schemas and service provider configuration, from the portal
    return client


def member(pk) -> Member:
    with unscoped():
        return Member.objects.select_related("user", "team").get(pk=int(pk))


def test_discovery_describes_users_groups_and_what_is_supported(org_a):
    client = directory(org_a)
    config = client.provider.config
    assert config.patch.supported and config.filter.supported and not config.bulk.supported
    assert config.filter.max_results == 200
    assert {t.name for t in client.provider.resource_types} == {"User", "Group"}
    assert {schema.id for schema in client.provider.schemas} >= {"urn:ietf:params:scim:schemas:core:2.0:User",
                                                                    "urn:ietf:params:scim:schemas:core:2.0:Group"}


def test_user_lifecycle_create_read_replace_patch_deactivate_delete(org_a):
    client = directory(org_a)
    created = client.create(User(user_name="dana@a.example", name={"given_name": "Dana", "family_name": "Scully"},
                                 emails=[{"value": "dana@a.example", "primary": True}], external_id="okta-1"))
    assert created.id and created.active is True and created.external_id == "okta-1"
    dana = member(created.id)
    assert dana.organization_id == org_a.organization.pk and dana.roles == ["employee"]
    assert (dana.user.first_name, dana.user.last_name) == ("Dana", "Scully")
    assert not dana.user.has_usable_password()

    fetched = client.query(User, created.id)
    assert fetched.user_name == "dana@a.example" and fetched.meta.location.endswith(f"/Users/{created.id}")

    fetched.name = fetched.name.model_copy(update={"given_name": "Dana K."})
    replaced = client.replace(fetched)
    assert replaced.name.given_name == "Dana K." and member(created.id).user.first_name == "Dana K."

    patch = PatchOp[User](operations=[PatchOperation[User](op="replace", path="active", value=False)])
    patched = client.modify(User, created.id, patch)
    assert patched.active is False and member(created.id).is_active is False
    with unscoped():
        assert AuditLogEntry.objects.filter(action="member.deactivated", object_id=created.id,
                                            data__via__startswith="SCIM token tas_").exists()

    patch = PatchOp[User](operations=[PatchOperation[User](op="replace", value={"active": True})])
    assert client.modify(User, created.id, patch).active is True

    client.delete(User, created.id)
    assert member(created.id).is_active is False  # kept, with its ledger
    with pytest.raises(SCIMException) as missing:
        client.query(User, created.id)
    assert missing.value.to_error().status == 404
    # The directory can provision the person again: the same membership comes back.
    again = client.create(User(user_name="dana@a.example"))
    assert again.id == created.id and member(again.id).is_active


def test_users_outside_the_verified_domains_or_twice_are_refused(org_a):
    client = directory(org_a)
    with pytest.raises(SCIMException) as outside:
        client.create(User(user_name="someone@gmail.example"))
    assert (outside.value.to_error().status, outside.value.to_error().scim_type) == (400, "invalidValue")
    with pytest.raises(SCIMException) as twice:
        client.create(User(user_name=org_a.members["employee"].user.email))
    assert (twice.value.to_error().status, twice.value.to_error().scim_type) == (409, "uniqueness")


def test_filters_and_pagination(org_a):
    client = directory(org_a)
    for n in range(7):
        client.create(User(user_name=f"bulk{n}@a.example", external_id=f"ext-{n}"))
    everyone = client.query(User)
    assert everyone.total_results == 5 + 7  # the fixture's members (one per role) and the new ones

    found = client.query(User, query_parameters=SearchRequest(filter='userName eq "BULK3@a.example"'))
    assert [u.user_name for u in found.resources] == ["bulk3@a.example"]
    found = client.query(User, query_parameters=SearchRequest(filter='externalId eq "ext-5" or userName sw "owner@"'))
    assert sorted(u.user_name for u in found.resources) == ["bulk5@a.example", "owner@a.example"]
    found = client.query(User, query_parameters=SearchRequest(filter='emails[value co "bulk"] and not (active eq false)'))
    assert found.total_results == 7

    pages, start = [], 1
    while True:
        page = client.query(User, query_parameters=SearchRequest(filter='userName sw "bulk"', start_index=start,
                                                               count=3))
        assert page.total_results == 7 and page.start_index == start
        pages.append([u.user_name for u in page.resources or []])
        start += 3
        if start > page.total_results:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(sum(pages, [])) == sorted(f"bulk{n}@a.example" for n in range(7))

    with pytest.raises(SCIMException) as bad:
        client.query(User, query_parameters=SearchRequest(filter="nickName eq \"x\""))
    assert (bad.value.to_error().status, bad.value.to_error().scim_type) == (400, "invalidFilter")


def test_group_lifecycle_moves_members_between_teams(org_a):
    client = directory(org_a)
    employee, approver = org_a.members["employee"], org_a.members["approver"]
    group = client.create(Group(display_name="Research", external_id="g-1",
                                members=[GroupMember(value=str(employee.pk))]))
    assert member(employee.pk).team.name == "Research"

    patch = PatchOp[Group](operations=[PatchOperation[Group](op="add", path="members",
                                                             value=[{"value": str(approver.pk)}])])
    patched = client.modify(Group, group.id, patch)
    assert {m.value for m in patched.members} == {str(employee.pk), str(approver.pk)}
    assert member(approver.pk).team.name == "Research"

    patch = PatchOp[Group](operations=[PatchOperation[Group](op="remove", path=f'members[value eq "{employee.pk}"]')])
    client.modify(Group, group.id, patch)
    assert member(employee.pk).team is None

    fetched = client.query(Group, group.id)
    fetched.display_name = "Research & Development"
    assert client.replace(fetched).display_name == "Research & Development"
    found = client.query(Group, query_parameters=SearchRequest(filter=f'members[value eq "{approver.pk}"]'))
    assert [g.display_name for g in found.resources] == ["Research & Development"]

    client.delete(Group, group.id)
    assert member(approver.pk).team is None
    with unscoped():
        assert Team.objects.filter(pk=int(group.id)).exists()  # kept for its history, no longer listed
    assert group.id not in {g.id for g in client.query(Group).resources or []}


def test_a_member_deleted_by_scim_loses_keys_and_sessions(org_a, client):
    scim = directory(org_a)
    employee = org_a.members["employee"]
    client.force_login(employee.user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.get(f"/o/{org_a.slug}/").status_code == 200
    scim.delete(User, str(employee.pk))
    assert client.get(f"/o/{org_a.slug}/").status_code == 302  # the session ended: to the login page
    with unscoped():
        assert not ApiKey.objects.filter(member=employee, revoked_at__isnull=True).exists()
        assert DirectoryEntry.objects.get(member=employee).deleted_at is not None


MALFORMED = {
    "not json": b"{not json",
    "not an object": b"[1, 2]",
    "wrong type": json.dumps({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": 5,
                              "active": "sometimes"}).encode(),
    "no userName": json.dumps({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"]}).encode(),
    "unknown schema": json.dumps({"schemas": ["urn:nope"], "userName": "x@a.example"}).encode(),
    "deep": ("[" * 5000 + "]" * 5000).encode(),
    "not utf-8": b"\xff\xfe{}",
    "patch without operations": json.dumps({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"]}).encode(),
    "patch of a read-only attribute": json.dumps({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                                  "Operations": [{"op": "replace", "path": "id", "value": "1"}]}).encode(),
    "bad patch op": json.dumps({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                                "Operations": [{"op": "explode", "path": "active"}]}).encode(),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("where", ["Users", "Users/{id}", "Groups", "Groups/{team}"])
def test_malformed_bodies_get_scim_errors_and_change_nothing(client, org_a, case, where):
    from tests.portal.test_isolation import snapshot

    path = f"/scim/v2/o/{org_a.slug}/" + where.format(id=org_a.members["employee"].pk, team=org_a.team.pk)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {org_a.scim_token_secret}"}
    assert client.get(f"/scim/v2/o/{org_a.slug}/Users", **headers).status_code == 200  # the token's last use
    before = snapshot(org_a.organization)
    client.raise_request_exception = False
    for method in (("post",) if "{" not in where else ("put", "patch")):
        response = getattr(client, method)(path, data=MALFORMED[case], content_type="application/scim+json", **headers)
        assert 400 <= response.status_code < 500, (method, path, response.status_code, response.content)
        body = response.json()
        assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"], body
        assert body["status"] == str(response.status_code) and body["detail"]
    assert snapshot(org_a.organization) == before


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "Bearer tas_x", "Basic dXNlcjpwYXNz"])
def test_requests_without_a_valid_token_are_refused_in_scim_shape(client, org_a, authorization):
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = client.get(f"/scim/v2/o/{org_a.slug}/Users", **headers)
    assert response.status_code == 401 and response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]


def test_a_revoked_token_is_refused(client, org_a):
    from identity import services

    with scope(org_a.organization):
        services.scim_token_revoke(token=org_a.scim_token, actor=org_a.members["owner"].user)
    response = client.get(f"/scim/v2/o/{org_a.slug}/Users", HTTP_AUTHORIZATION=f"Bearer {org_a.scim_token_secret}")
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_a_token_of_one_organization_is_refused_on_anothers_endpoint(org_a, org_b):
    """(Every SCIM route of B, aimed at by A's token, is in tests/portal/test_isolation.py.)"""
    mine = directory(org_a)
    theirs = WSGISCIMClient(portal, base_url=f"http://testserver/scim/v2/o/{org_b.slug}",
                            headers={"Authorization": f"Bearer {org_a.scim_token_secret}"}, provider=mine.provider)
    with pytest.raises(SCIMException) as refused:
        theirs.query(User)
    assert refused.value.to_error().status == 404
    with pytest.raises(SCIMException) as refused:
        theirs.create(User(user_name="intruder@b.example"))
    assert refused.value.to_error().status == 404
    with unscoped():
        assert not Member.objects.filter(user__email="intruder@b.example").exists()
