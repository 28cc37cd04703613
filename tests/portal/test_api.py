"""The REST API under /api/v1/o/<slug>/: same rules as the services, and JSON for every answer."""

import json

import pytest

from portal.models import AuditLogEntry, Invitation, Member, Team
from tests.factories import MemberFactory, TeamFactory


def api(org, rest=""):
    return f"/api/v1/o/{org.slug}/{rest}"


def send(client, method, path, body=None):
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, data=json.dumps(body), content_type="application/json")


def error(response, status) -> dict:
    """The JSON body of an error answer with this status."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert body
    return body


def ok(response, status=200):
    assert response.status_code == status, (response.status_code, response.content[:300])
    return response.json()


def entries(organization, action):
    return list(AuditLogEntry.all_objects.filter(organization=organization, action=action).order_by("id"))


def fresh(member):
    return Member.all_objects.get(pk=member.pk)


# -- reads ---------------------------------------------------------------------------------------------------


def test_list_members(as_hr, org_a, org_b):
    body = ok(as_hr.get(api(org_a, "members/")))
    assert body["count"] == 5
    emails = {row["email"] for row in body["results"]}
    assert emails == {member.user.email for member in org_a.members.values()}
    hr = next(row for row in body["results"] if row["email"] == "hr@a.example")
    assert hr["roles"] == ["hr"] and hr["team"] == org_a.team.pk and hr["is_active"] is True
    assert set(hr) == {"id", "email", "name", "team", "roles", "is_active", "joined_at"}


def test_retrieve_member(as_hr, org_a, org_b):
    employee = org_a.members["employee"]
    body = ok(as_hr.get(api(org_a, f"members/{employee.pk}/")))
    assert (body["id"], body["email"], body["roles"]) == (employee.pk, "employee@a.example", ["employee"])
    error(as_hr.get(api(org_a, f"members/{org_b.members['employee'].pk}/")), 404)
    error(as_hr.get(api(org_a, "members/999999/")), 404)


def test_list_and_retrieve_teams(as_hr, org_a, org_b):
    TeamFactory(organization=org_a.organization, name="Ops", cost_centre="OPS-1")
    body = ok(as_hr.get(api(org_a, "teams/")))
    assert [row["name"] for row in body["results"]] == ["Ops", "Team a"]
    body = ok(as_hr.get(api(org_a, f"teams/{org_a.team.pk}/")))
    assert body["name"] == "Team a" and body["id"] == org_a.team.pk
    error(as_hr.get(api(org_a, f"teams/{org_b.team.pk}/")), 404)


def test_list_and_retrieve_invitations(as_hr, org_a, org_b):
    body = ok(as_hr.get(api(org_a, "invitations/")))
    assert [row["email"] for row in body["results"]] == ["newcomer@a.example"]
    row = body["results"][0]
    assert row["status"] == "open" and row["roles"] == ["employee"] and row["team"] == org_a.team.pk
    assert "token_hash" not in row and "token" not in row
    assert ok(as_hr.get(api(org_a, f"invitations/{org_a.invitation.pk}/")))["id"] == org_a.invitation.pk
    error(as_hr.get(api(org_a, f"invitations/{org_b.invitation.pk}/")), 404)


def test_audit_log_for_admins(as_admin, org_a):
    body = ok(as_admin.get(api(org_a, "audit-log/"), {"action": "test."}))
    assert [row["action"] for row in body["results"]] == ["test.seeded"]
    assert body["results"][0]["actor_email"] == "owner@a.example"
    everything = ok(as_admin.get(api(org_a, "audit-log/")))["results"]
    assert everything and all(row["actor_email"].endswith("@a.example") for row in everything)
    assert ok(as_admin.get(api(org_a, "audit-log/"), {"action": "team."}))["results"] == []


def test_audit_log_is_refused_to_hr(as_hr, org_a):
    assert "detail" in error(as_hr.get(api(org_a, "audit-log/")), 403)


def test_employees_cannot_use_the_member_api(login, org_a):
    client = login(org_a.members["employee"])
    for rest in ("members/", "teams/", "invitations/"):
        assert "detail" in error(client.get(api(org_a, rest)), 403)


def test_another_organization_answers_404_json(as_owner, org_a, org_b):
    for rest in ("members/", "teams/", "invitations/", "audit-log/"):
        error(as_owner.get(api(org_b, rest)), 404)
    error(send(as_owner, "post", api(org_b, "teams/"), {"name": "Injected"}), 404)
    assert not Team.all_objects.filter(name="Injected").exists()


# -- teams ----------------------------------------------------------------------------------------------------


def test_create_team(as_hr, org_a):
    body = ok(send(as_hr, "post", api(org_a, "teams/"), {"name": "  Research ", "cost_centre": "R-1"}), 201)
    team = Team.all_objects.get(pk=body["id"])
    assert (team.organization_id, team.name, team.cost_centre) == (org_a.organization.pk, "Research", "R-1")
    assert body["name"] == "Research"
    (entry,) = entries(org_a.organization, "team.created")
    assert entry.actor == org_a.members["hr"].user and entry.object_id == str(team.pk)


@pytest.mark.parametrize("name", ["Team a", "team A", ""])
def test_create_duplicate_or_blank_team_is_400_naming_name(as_hr, org_a, name):
    before = Team.all_objects.count()
    body = error(send(as_hr, "post", api(org_a, "teams/"), {"name": name}), 400)
    assert "name" in body
    assert Team.all_objects.count() == before
    assert not entries(org_a.organization, "team.created")


def test_patch_team(as_hr, org_a):
    body = ok(send(as_hr, "patch", api(org_a, f"teams/{org_a.team.pk}/"), {"cost_centre": "C-9"}))
    assert body["cost_centre"] == "C-9" and body["name"] == "Team a"
    team = Team.all_objects.get(pk=org_a.team.pk)
    assert (team.name, team.cost_centre) == ("Team a", "C-9")
    (entry,) = entries(org_a.organization, "team.updated")
    assert entry.data == {"cost_centre": ["", "C-9"]}


def test_patch_team_to_a_taken_name_is_400(as_hr, org_a):
    TeamFactory(organization=org_a.organization, name="Ops")
    body = error(send(as_hr, "patch", api(org_a, f"teams/{org_a.team.pk}/"), {"name": "OPS"}), 400)
    assert "name" in body
    assert Team.all_objects.get(pk=org_a.team.pk).name == "Team a"


def test_patch_team_of_another_organization_is_404(as_owner, org_a, org_b):
    error(send(as_owner, "patch", api(org_a, f"teams/{org_b.team.pk}/"), {"name": "Taken"}), 404)
    assert Team.all_objects.get(pk=org_b.team.pk).name == "Team b"


# -- members --------------------------------------------------------------------------------------------------


def test_hr_patches_a_members_team(as_hr, org_a):
    employee = org_a.members["employee"]
    ops = TeamFactory(organization=org_a.organization, name="Ops")
    body = ok(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"team": ops.pk}))
    assert body["team"] == ops.pk
    assert fresh(employee).team_id == ops.pk
    body = ok(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"team": None}))
    assert body["team"] is None and fresh(employee).team_id is None
    assert len(entries(org_a.organization, "member.updated")) == 2


def test_patch_without_team_keeps_the_team(as_admin, org_a):
    employee = org_a.members["employee"]
    ok(send(as_admin, "patch", api(org_a, f"members/{employee.pk}/"), {"roles": ["employee", "approver"]}))
    member = fresh(employee)
    assert member.team_id == org_a.team.pk
    assert member.roles == ["approver", "employee"]
    (entry,) = entries(org_a.organization, "member.updated")
    assert entry.data == {"roles": [["employee"], ["approver", "employee"]]}


def test_hr_changing_roles_is_400_naming_roles(as_hr, org_a):
    employee = org_a.members["employee"]
    body = error(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"roles": ["hr"]}), 400)
    assert "roles" in body
    assert fresh(employee).roles == ["employee"]
    assert not entries(org_a.organization, "member.updated")


def test_admin_granting_owner_is_400(as_admin, org_a):
    employee = org_a.members["employee"]
    body = error(send(as_admin, "patch", api(org_a, f"members/{employee.pk}/"), {"roles": ["owner"]}), 400)
    assert "roles" in body
    assert fresh(employee).roles == ["employee"]


@pytest.mark.parametrize("roles", [[], ["boss"], "employee"])
def test_invalid_roles_are_400_naming_roles(as_owner, org_a, roles):
    employee = org_a.members["employee"]
    body = error(send(as_owner, "patch", api(org_a, f"members/{employee.pk}/"), {"roles": roles}), 400)
    assert "roles" in body
    assert fresh(employee).roles == ["employee"]


def test_team_of_another_organization_is_400_naming_team(as_hr, org_a, org_b):
    employee = org_a.members["employee"]
    body = error(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"team": org_b.team.pk}), 400)
    assert "team" in body
    assert fresh(employee).team_id == org_a.team.pk
    error(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"team": "ops"}), 400)


def test_last_owner_cannot_be_demoted_or_deactivated(as_admin, login, org_a):
    owner = org_a.members["owner"]
    # An admin does not hold the owner role, so cannot deactivate an owner at all.
    body = error(send(as_admin, "patch", api(org_a, f"members/{owner.pk}/"), {"is_active": False}), 400)
    assert "is_active" in body
    client = login(owner)
    body = error(send(client, "patch", api(org_a, f"members/{owner.pk}/"), {"roles": ["admin"]}), 400)
    assert "roles" in body
    member = fresh(owner)
    assert member.is_active and member.roles == ["owner"]
    assert not entries(org_a.organization, "member.updated")
    assert not entries(org_a.organization, "member.deactivated")


def test_deactivate_and_reactivate_a_member(as_hr, org_a):
    employee = org_a.members["employee"]
    body = ok(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"is_active": False}))
    assert body["is_active"] is False and fresh(employee).is_active is False
    (entry,) = entries(org_a.organization, "member.deactivated")
    assert entry.data == {"is_active": [True, False]}
    ok(send(as_hr, "patch", api(org_a, f"members/{employee.pk}/"), {"is_active": True}))
    assert fresh(employee).is_active is True


def test_an_owner_can_be_deactivated_by_another_owner(login, org_a):
    second_owner = MemberFactory(organization=org_a.organization, is_owner=True)
    owner = org_a.members["owner"]
    ok(send(login(second_owner), "patch", api(org_a, f"members/{owner.pk}/"), {"is_active": False}))
    assert fresh(owner).is_active is False


def test_deactivating_yourself_is_400(as_hr, org_a):
    hr = org_a.members["hr"]
    body = error(send(as_hr, "patch", api(org_a, f"members/{hr.pk}/"), {"is_active": False}), 400)
    assert "is_active" in body
    assert fresh(hr).is_active


def test_read_only_member_fields_are_ignored(as_owner, org_a):
    employee = org_a.members["employee"]
    ok(send(as_owner, "patch", api(org_a, f"members/{employee.pk}/"), {"email": "hijack@evil.example", "id": 1}))
    member = fresh(employee)
    assert member.user.email == "employee@a.example" and member.pk == employee.pk


def test_patch_member_of_another_organization_is_404(as_owner, org_a, org_b):
    target = org_b.members["employee"]
    error(send(as_owner, "patch", api(org_a, f"members/{target.pk}/"), {"is_active": False}), 404)
    assert fresh(target).is_active


# -- invitations ------------------------------------------------------------------------------------------------


def test_create_invitation(as_hr, org_a, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        body = ok(send(as_hr, "post", api(org_a, "invitations/"),
                       {"email": "Fresh@Example.com", "roles": ["employee"], "team": org_a.team.pk}), 201)
    assert body["email"] == "fresh@example.com" and body["status"] == "open"
    assert body["roles"] == ["employee"] and body["team"] == org_a.team.pk
    assert "token" not in body and "token_hash" not in body
    invitation = Invitation.all_objects.get(pk=body["id"])
    assert invitation.organization_id == org_a.organization.pk
    (mail,) = mailoutbox
    assert mail.to == ["fresh@example.com"] and "/invitations/" in mail.body
    assert len(entries(org_a.organization, "invitation.created")) == 1


@pytest.mark.parametrize(("payload", "field"), [
    ({"email": "not-an-email", "roles": ["employee"]}, "email"),
    ({"roles": ["employee"]}, "email"),
    ({"email": "x@example.com", "roles": ["emperor"]}, "roles"),
    ({"email": "x@example.com", "roles": []}, "roles"),
    ({"email": "x@example.com"}, "roles"),
    ({"email": "x@example.com", "roles": ["admin"]}, "roles"),  # HR cannot grant admin
    ({"email": "employee@a.example", "roles": ["employee"]}, "email"),  # already a member
    ({"email": "newcomer@a.example", "roles": ["employee"]}, "email"),  # already invited
    ({"email": "x@example.com", "roles": ["employee"], "team": 999999}, "team"),
])
def test_create_invitation_field_errors(as_hr, org_a, mailoutbox, django_capture_on_commit_callbacks, payload, field):
    before = Invitation.all_objects.count()
    with django_capture_on_commit_callbacks(execute=True):
        body = error(send(as_hr, "post", api(org_a, "invitations/"), payload), 400)
    assert field in body
    assert Invitation.all_objects.count() == before
    assert mailoutbox == []


def test_create_invitation_with_a_team_of_another_organization_is_400(as_hr, org_a, org_b):
    body = error(send(as_hr, "post", api(org_a, "invitations/"),
                      {"email": "x@example.com", "roles": ["employee"], "team": org_b.team.pk}), 400)
    assert "team" in body
    assert not Invitation.all_objects.filter(email="x@example.com").exists()


def test_revoke_invitation_once(as_hr, org_a):
    path = api(org_a, f"invitations/{org_a.invitation.pk}/revoke/")
    body = ok(as_hr.post(path))
    assert body["status"] == "revoked" and body["revoked_at"]
    revoked_at = Invitation.all_objects.get(pk=org_a.invitation.pk).revoked_at
    assert revoked_at is not None

    body = error(as_hr.post(path), 400)
    assert body["non_field_errors"]
    assert Invitation.all_objects.get(pk=org_a.invitation.pk).revoked_at == revoked_at
    assert len(entries(org_a.organization, "invitation.revoked")) == 1


def test_revoke_invitation_of_another_organization_is_404(as_owner, org_a, org_b):
    error(as_owner.post(api(org_a, f"invitations/{org_b.invitation.pk}/revoke/")), 404)
    assert Invitation.all_objects.get(pk=org_b.invitation.pk).status == "open"


# -- errors are JSON -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "rest"), [
    ("get", "members/"), ("get", "teams/"), ("get", "invitations/"), ("get", "audit-log/"),
    ("post", "teams/"), ("patch", "members/1/"), ("post", "invitations/1/revoke/"),
])
def test_unauthenticated_is_401_json(client, org_a, method, rest):
    body = error(send(client, method, api(org_a, rest), {} if method != "get" else None), 401)
    assert "detail" in body


def test_undeclared_methods_are_refused_with_json(as_owner, org_a):
    team_path = api(org_a, f"teams/{org_a.team.pk}/")
    for method, path in [("delete", team_path), ("delete", api(org_a, "teams/")),
                         ("put", api(org_a, f"members/{org_a.members['employee'].pk}/")),
                         ("delete", api(org_a, f"members/{org_a.members['employee'].pk}/")),
                         ("patch", api(org_a, "audit-log/")), ("put", api(org_a, "teams/"))]:
        response = send(as_owner, method, path, {})
        assert response.status_code in (403, 405), (method, path, response.status_code)
        assert error(response, response.status_code)["detail"]
    assert Team.all_objects.filter(pk=org_a.team.pk).exists()
    assert Member.all_objects.filter(pk=org_a.members["employee"].pk).exists()


@pytest.mark.parametrize(("method", "rest"), [("post", "teams/"), ("patch", "members/{pk}/"), ("post", "invitations/"),
                                              ("patch", "teams/{team}/")])
def test_malformed_json_is_400_json(as_owner, org_a, method, rest):
    path = api(org_a, rest.format(pk=org_a.members["employee"].pk, team=org_a.team.pk))
    response = getattr(as_owner, method)(path, data='{"name": "Broken",', content_type="application/json")
    assert "detail" in error(response, 400)


def test_a_json_body_that_is_not_an_object_is_400_json(as_owner, org_a):
    response = as_owner.post(api(org_a, "teams/"), data="[1, 2]", content_type="application/json")
    assert error(response, 400)


@pytest.mark.parametrize("rest", ["teams/abc/", "members/1.5/", "invitations/x/revoke/", "members/-1/"])
def test_a_non_integer_id_is_404_json(as_owner, org_a, rest):
    error(as_owner.get(api(org_a, rest)), 404)


# -- schema --------------------------------------------------------------------------------------------------


def test_openapi_schema_lists_the_organization_paths(client):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert "/api/v1/o/{org_slug}/members/" in paths
    assert "/api/v1/o/{org_slug}/teams/" in paths
    assert "/api/v1/o/{org_slug}/members/{member_id}/" in paths
    assert "/api/v1/o/{org_slug}/invitations/{invitation_id}/revoke/" in paths
    assert set(paths["/api/v1/o/{org_slug}/members/{member_id}/"]) >= {"get", "patch"}
    assert "delete" not in paths["/api/v1/o/{org_slug}/teams/{team_id}/"]


def test_openapi_schema_default_format(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    content = response.content.decode()
    assert "/api/v1/o/{org_slug}/members/:" in content
    assert "/api/v1/o/{org_slug}/teams/:" in content
