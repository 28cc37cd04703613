"""The rules of portal.services, and that a refused call changes nothing."""

import json
from datetime import timedelta

import pytest
from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from portal import services
from portal.models import AuditLogEntry, Invitation, Member, Organization, Team, hash_token
from portal.tenancy import TenantModel, scope, unscoped
from tests.factories import InvitationFactory, MemberFactory, TeamFactory, UserFactory


def entries(organization, action=None):
    queryset = AuditLogEntry.all_objects.filter(organization=organization)
    if action:
        queryset = queryset.filter(action=action)
    return list(queryset.order_by("id"))


def state(organization) -> str:
    """Every row the organization owns, and its own row: compared before and after a refused call."""
    with unscoped():
        data = {
            model._meta.label: list(model.all_objects.filter(organization=organization).order_by("pk").values())
            for model in apps.get_app_config("portal").get_models()
            if issubclass(model, TenantModel)
        }
    data["organization"] = list(Organization.objects.filter(pk=organization.pk).values())
    return json.dumps(data, default=str, sort_keys=True)


def fresh(member):
    return Member.all_objects.get(pk=member.pk)


def field_errors(excinfo) -> dict:
    return excinfo.value.message_dict


# -- organization_create -------------------------------------------------------------------------------


def test_organization_create_makes_the_owner_and_logs_it(db):
    owner = UserFactory(email="founder@acme.example")
    organization = services.organization_create(name="  Acme Corp  ", owner=owner, time_zone="Europe/Berlin",
                                                currency="EUR")
    organization.refresh_from_db()
    assert organization.name == "Acme Corp"
    assert organization.slug == "acme-corp"
    assert (organization.time_zone, organization.currency) == ("Europe/Berlin", "EUR")

    member = Member.all_objects.get(organization=organization)
    assert member.user == owner
    assert member.is_active and member.is_owner and member.is_employee
    assert member.effective_roles >= {"owner", "admin", "hr", "approver", "employee"}

    log = entries(organization)
    assert [entry.action for entry in log] == ["organization.created", "member.added"]
    created, added = log
    assert created.actor == owner and created.actor_email == "founder@acme.example"
    assert created.object_id == str(organization.pk)
    assert created.data == {"name": "Acme Corp", "owner": "founder@acme.example"}
    assert added.object_id == str(member.pk)
    assert added.data == {"roles": ["owner", "employee"]}


def test_organization_create_gives_the_same_name_unique_slugs(db):
    owner = UserFactory()
    slugs = [services.organization_create(name="Acme", owner=owner).slug for _ in range(3)]
    assert slugs == ["acme", "acme-2", "acme-3"]
    assert Organization.objects.filter(name="Acme").count() == 3
    assert Member.all_objects.filter(user=owner, is_owner=True).count() == 3


@pytest.mark.parametrize("name", ["Admin", "API", "new", "Static", "Accounts", "Invitations", "orgs"])
def test_organization_create_avoids_reserved_slugs(db, name):
    organization = services.organization_create(name=name, owner=UserFactory())
    assert organization.slug not in services.RESERVED_SLUGS
    assert organization.slug == f"{name.lower()}-org"


def test_organization_create_without_a_usable_slug_still_gets_one(db):
    organization = services.organization_create(name="???", owner=UserFactory())
    assert organization.slug == "org"


@pytest.mark.parametrize("name", ["", "   "])
def test_organization_create_refuses_a_blank_name_and_changes_nothing(db, name):
    owner = UserFactory()
    with pytest.raises(ValidationError) as excinfo:
        services.organization_create(name=name, owner=owner)
    assert "name" in field_errors(excinfo)
    assert not Organization.objects.exists()
    assert not Member.all_objects.exists()
    assert not AuditLogEntry.all_objects.exists()


def test_organization_create_refuses_an_unknown_time_zone_and_changes_nothing(db):
    owner = UserFactory()
    with pytest.raises(ValidationError) as excinfo:
        services.organization_create(name="Acme", owner=owner, time_zone="Mars/Olympus")
    assert "time_zone" in field_errors(excinfo)
    assert not Organization.objects.exists()
    assert not Member.all_objects.exists()
    assert not AuditLogEntry.all_objects.exists()


# -- teams ---------------------------------------------------------------------------------------------------


def test_team_create_logs_it(org_a):
    actor = org_a.members["hr"].user
    with scope(org_a.organization):
        team = services.team_create(organization=org_a.organization, actor=actor, name="  Research ",
                                    cost_centre=" R-100 ")
    team = Team.all_objects.get(pk=team.pk)
    assert (team.organization_id, team.name, team.cost_centre) == (org_a.organization.pk, "Research", "R-100")
    (entry,) = entries(org_a.organization, "team.created")
    assert entry.actor == actor and entry.object_id == str(team.pk)
    assert entry.data == {"name": "Research", "cost_centre": "R-100"}


@pytest.mark.parametrize("name", ["Team a", "TEAM A", "  team a  ", "", "   "])
def test_team_create_refuses_duplicate_or_blank_names_and_changes_nothing(org_a, name):
    before = state(org_a.organization)
    with scope(org_a.organization), pytest.raises(ValidationError) as excinfo:
        services.team_create(organization=org_a.organization, actor=org_a.members["hr"].user, name=name)
    assert list(field_errors(excinfo)) == ["name"]
    assert state(org_a.organization) == before


def test_team_create_allows_a_name_another_organization_uses(org_a, org_b):
    with scope(org_a.organization):
        team = services.team_create(organization=org_a.organization, actor=org_a.members["hr"].user, name="Team b")
    assert team.organization_id == org_a.organization.pk


def test_team_update_logs_old_and_new_values(org_a):
    actor = org_a.members["admin"].user
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        services.team_update(team=team, actor=actor, name="Platform", cost_centre="P-7")
    team.refresh_from_db()
    assert (team.name, team.cost_centre) == ("Platform", "P-7")
    (entry,) = entries(org_a.organization, "team.updated")
    assert entry.actor == actor and entry.object_id == str(team.pk)
    assert entry.data == {"name": ["Team a", "Platform"], "cost_centre": ["", "P-7"]}


def test_team_update_logs_only_what_changed(org_a):
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        services.team_update(team=team, actor=org_a.members["hr"].user, name="Team a", cost_centre="C-1")
    (entry,) = entries(org_a.organization, "team.updated")
    assert entry.data == {"cost_centre": ["", "C-1"]}


def test_team_update_without_changes_writes_no_audit_entry(org_a):
    before = len(entries(org_a.organization))
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        services.team_update(team=team, actor=org_a.members["hr"].user, name=" Team a ", cost_centre="")
    assert len(entries(org_a.organization)) == before
    assert Team.all_objects.get(pk=org_a.team.pk).name == "Team a"


def test_team_update_may_change_the_case_of_its_own_name(org_a):
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        services.team_update(team=team, actor=org_a.members["hr"].user, name="TEAM A")
    assert Team.all_objects.get(pk=org_a.team.pk).name == "TEAM A"


@pytest.mark.parametrize("name", ["Ops", "ops", ""])
def test_team_update_refuses_duplicate_or_blank_names_and_changes_nothing(org_a, name):
    TeamFactory(organization=org_a.organization, name="Ops")
    before = state(org_a.organization)
    with scope(org_a.organization):
        team = Team.objects.get(pk=org_a.team.pk)
        with pytest.raises(ValidationError) as excinfo:
            services.team_update(team=team, actor=org_a.members["hr"].user, name=name, cost_centre="X")
    assert list(field_errors(excinfo)) == ["name"]
    assert state(org_a.organization) == before


# -- members --------------------------------------------------------------------------------------------------


def update(org, member, actor_role="owner", **kwargs):
    """member_update inside the organization's scope, as the member of `org` with `actor_role`."""
    with scope(org.organization):
        member = Member.objects.get(pk=member.pk)
        actor = Member.objects.get(pk=org.members[actor_role].pk) if isinstance(actor_role, str) else actor_role
        kwargs.setdefault("team", member.team)
        return services.member_update(member=member, actor_member=actor, **kwargs)


def test_admin_changes_roles_and_it_is_logged(org_a):
    employee = org_a.members["employee"]
    update(org_a, employee, "admin", roles=["approver", "employee"])
    assert fresh(employee).roles == ["approver", "employee"]
    (entry,) = entries(org_a.organization, "member.updated")
    assert entry.actor == org_a.members["admin"].user
    assert entry.object_id == str(employee.pk)
    assert entry.data == {"roles": [["employee"], ["approver", "employee"]]}


def test_hr_changes_a_members_team(org_a):
    employee = org_a.members["employee"]
    other_team = TeamFactory(organization=org_a.organization, name="Ops")
    update(org_a, employee, "hr", team=other_team)
    assert fresh(employee).team_id == other_team.pk
    (entry,) = entries(org_a.organization, "member.updated")
    assert entry.data == {"team": [org_a.team.pk, other_team.pk]}


def test_hr_cannot_change_roles_and_nothing_changes(org_a):
    other_team = TeamFactory(organization=org_a.organization, name="Ops")
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["employee"], "hr", team=other_team, roles=["employee", "approver"])
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_hr_may_send_unchanged_roles(org_a):
    employee = org_a.members["employee"]
    update(org_a, employee, "hr", roles=["employee"], team=None)
    assert fresh(employee).roles == ["employee"] and fresh(employee).team_id is None


def test_an_admin_cannot_grant_owner(org_a):
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["employee"], "admin", roles=["owner", "employee"])
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_an_admin_cannot_take_owner_away_even_with_a_second_owner(org_a):
    MemberFactory(organization=org_a.organization, is_owner=True)
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["owner"], "admin", roles=["admin"])
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_the_owner_can_grant_owner(org_a):
    update(org_a, org_a.members["admin"], "owner", roles=["owner"])
    assert fresh(org_a.members["admin"]).roles == ["owner"]


def test_roles_cannot_be_emptied(org_a):
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["employee"], "owner", roles=[])
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_the_last_active_owner_cannot_be_demoted(org_a):
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["owner"], "owner", roles=["admin"])
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_only_a_member_holding_all_their_roles_can_deactivate_them(org_a):
    before = state(org_a.organization)
    for actor, target in [("admin", "owner"), ("hr", "admin"), ("hr", "approver")]:
        with pytest.raises(ValidationError) as excinfo:
            update(org_a, org_a.members[target], actor, is_active=False)
        assert "is_active" in field_errors(excinfo)
    assert state(org_a.organization) == before
    update(org_a, org_a.members["employee"], "hr", is_active=False)
    assert fresh(org_a.members["employee"]).is_active is False


def test_the_last_active_owner_cannot_be_deactivated(org_a):
    # The only other owner is inactive: reactivating nobody, the last active one stays.
    inactive_owner = MemberFactory(organization=org_a.organization, is_owner=True, is_active=False)
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["owner"], inactive_owner, is_active=False)
    assert "is_active" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_an_inactive_second_owner_does_not_count(org_a):
    MemberFactory(organization=org_a.organization, is_owner=True, is_active=False)
    with pytest.raises(ValidationError):
        update(org_a, org_a.members["owner"], "owner", roles=["admin"])
    assert fresh(org_a.members["owner"]).is_owner


def test_an_owner_can_step_down_when_there_is_a_second_owner(org_a):
    MemberFactory(organization=org_a.organization, is_owner=True)
    update(org_a, org_a.members["owner"], "owner", roles=["admin", "employee"])
    assert fresh(org_a.members["owner"]).roles == ["admin", "employee"]
    (entry,) = entries(org_a.organization, "member.updated")
    assert entry.data == {"roles": [["owner"], ["admin", "employee"]]}


def test_an_owner_can_be_deactivated_when_there_is_a_second_owner(org_a):
    second_owner = MemberFactory(organization=org_a.organization, is_owner=True)
    owner = org_a.members["owner"]
    update(org_a, owner, second_owner, is_active=False)
    assert fresh(owner).is_active is False
    (entry,) = entries(org_a.organization, "member.deactivated")
    assert entry.actor == second_owner.user
    assert entry.object_id == str(owner.pk)
    assert entry.data == {"is_active": [True, False]}
    assert not entries(org_a.organization, "member.updated")


def test_nobody_can_deactivate_themselves(org_a):
    MemberFactory(organization=org_a.organization, is_owner=True)
    for role in ("owner", "hr"):
        before = state(org_a.organization)
        with pytest.raises(ValidationError) as excinfo:
            update(org_a, org_a.members[role], role, is_active=False)
        assert "is_active" in field_errors(excinfo)
        assert state(org_a.organization) == before


def test_a_team_of_another_organization_is_refused(org_a, org_b):
    team_b = Team.all_objects.get(pk=org_b.team.pk)
    before_a, before_b = state(org_a.organization), state(org_b.organization)
    with pytest.raises(ValidationError) as excinfo:
        update(org_a, org_a.members["employee"], "owner", team=team_b, roles=["employee", "hr"])
    assert "team" in field_errors(excinfo)
    assert (state(org_a.organization), state(org_b.organization)) == (before_a, before_b)


def test_reactivating_and_changing_team_is_logged_as_an_update(org_a):
    employee = org_a.members["employee"]
    Member.all_objects.filter(pk=employee.pk).update(is_active=False)
    update(org_a, employee, "hr", team=None, is_active=True)
    assert fresh(employee).is_active and fresh(employee).team_id is None
    (entry,) = entries(org_a.organization, "member.updated")
    assert entry.data == {"team": [org_a.team.pk, None], "is_active": [False, True]}


def test_member_update_without_changes_writes_no_audit_entry(org_a):
    before = len(entries(org_a.organization))
    update(org_a, org_a.members["employee"], "owner", roles=["employee"], is_active=True)
    assert len(entries(org_a.organization)) == before


# -- grantable roles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "expected"), [
    ("owner", {"owner", "admin", "hr", "approver", "employee"}),
    ("admin", {"admin", "hr", "approver", "employee"}),
    ("hr", {"hr", "employee"}),
    ("approver", {"approver"}),
    ("employee", {"employee"}),
])
def test_grantable_roles(org_a, role, expected):
    assert services.grantable_roles(org_a.members[role]) == expected


# -- invitations -------------------------------------------------------------------------------------------------


def invite(org, email, roles=("employee",), actor_role="hr", team=None):
    with scope(org.organization):
        actor = Member.objects.get(pk=org.members[actor_role].pk)
        return services.invitation_create(organization=org.organization, actor_member=actor, email=email,
                                          roles=list(roles), team=team)


def every_stored_value() -> str:
    """Every column of every row in the database, as text."""
    rows = []
    tables = set(connection.introspection.table_names())
    with unscoped():
        for model in apps.get_models(include_auto_created=True):
            if model._meta.db_table in tables:  # models still without a migration have no table yet
                rows.extend(model._base_manager.values())
    assert {"portal_invitation", "portal_auditlogentry"} <= tables
    return json.dumps(rows, default=str)


def test_invitation_create_stores_only_the_token_hash_and_mails_the_link(
        org_a, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        invitation, token = invite(org_a, "  New.Person@Example.COM ", roles=["hr", "employee"], team=org_a.team)
        assert mailoutbox == []  # only once the transaction commits
    assert len(callbacks) == 1

    invitation = Invitation.all_objects.get(pk=invitation.pk)
    assert invitation.email == "new.person@example.com"
    assert invitation.roles == ["hr", "employee"]
    assert invitation.team_id == org_a.team.pk
    assert invitation.invited_by == org_a.members["hr"].user
    assert invitation.status == "open"
    assert invitation.token_hash == hash_token(token)
    assert len(token) >= 32
    assert token not in every_stored_value()

    (mail,) = mailoutbox
    assert mail.to == ["new.person@example.com"]
    assert "Org a" in mail.subject
    assert f"/invitations/{token}/" in mail.body
    assert services._invitation_url(token) in mail.body

    (entry,) = entries(org_a.organization, "invitation.created")
    assert entry.actor == org_a.members["hr"].user
    assert entry.data == {"email": "new.person@example.com", "roles": ["hr", "employee"], "team": org_a.team.pk}


def test_invitation_create_refuses_an_active_member_and_changes_nothing(
        org_a, mailoutbox, django_capture_on_commit_callbacks):
    before = state(org_a.organization)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as excinfo:
        invite(org_a, "EMPLOYEE@a.example")
    assert "email" in field_errors(excinfo)
    assert state(org_a.organization) == before
    assert mailoutbox == []


def test_invitation_create_invites_a_deactivated_member_again(org_a):
    Member.all_objects.filter(pk=org_a.members["employee"].pk).update(is_active=False)
    invitation, _token = invite(org_a, "employee@a.example")
    assert invitation.status == "open"


def test_invitation_create_refuses_a_second_open_invitation(org_a, mailoutbox, django_capture_on_commit_callbacks):
    before = state(org_a.organization)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as excinfo:
        invite(org_a, "Newcomer@A.example")
    assert "email" in field_errors(excinfo)
    assert state(org_a.organization) == before
    assert mailoutbox == []


def test_invitation_create_replaces_an_expired_open_invitation(org_a):
    Invitation.all_objects.filter(pk=org_a.invitation.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    invitation, _token = invite(org_a, "newcomer@a.example")
    old = Invitation.all_objects.get(pk=org_a.invitation.pk)
    assert old.revoked_at is not None and old.status == "revoked"
    assert Invitation.all_objects.get(pk=invitation.pk).status == "open"
    assert Invitation.all_objects.filter(organization=org_a.organization, email="newcomer@a.example").count() == 2


def test_invitation_create_allows_the_same_email_in_another_organization(org_a, org_b):
    invitation, _token = invite(org_a, "newcomer@b.example")
    assert invitation.organization_id == org_a.organization.pk
    assert Invitation.all_objects.get(pk=org_b.invitation.pk).status == "open"


@pytest.mark.parametrize(("actor_role", "roles"), [("hr", ["admin"]), ("hr", ["approver"]), ("admin", ["owner"]),
                                                   ("hr", [])])
def test_invitation_create_refuses_roles_the_actor_cannot_grant(org_a, actor_role, roles, mailoutbox,
                                                                django_capture_on_commit_callbacks):
    before = state(org_a.organization)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as excinfo:
        invite(org_a, "someone@example.com", roles=roles, actor_role=actor_role)
    assert "roles" in field_errors(excinfo)
    assert state(org_a.organization) == before
    assert mailoutbox == []


def test_invitation_create_refuses_a_team_of_another_organization(org_a, org_b):
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        invite(org_a, "someone@example.com", team=Team.all_objects.get(pk=org_b.team.pk))
    assert "team" in field_errors(excinfo)
    assert state(org_a.organization) == before


def test_invitation_revoke_once(org_a):
    actor = org_a.members["hr"].user
    with scope(org_a.organization):
        invitation = Invitation.objects.get(pk=org_a.invitation.pk)
        services.invitation_revoke(invitation=invitation, actor=actor)
    invitation = Invitation.all_objects.get(pk=org_a.invitation.pk)
    assert invitation.status == "revoked"
    (entry,) = entries(org_a.organization, "invitation.revoked")
    assert entry.actor == actor and entry.data == {"email": "newcomer@a.example"}

    before = state(org_a.organization)
    with scope(org_a.organization), pytest.raises(ValidationError):
        services.invitation_revoke(invitation=Invitation.objects.get(pk=invitation.pk), actor=actor)
    assert state(org_a.organization) == before


def test_an_accepted_invitation_cannot_be_revoked(org_a):
    user = UserFactory(email="newcomer@a.example")
    services.invitation_accept(invitation=org_a.invitation, user=user)
    before = state(org_a.organization)
    with scope(org_a.organization), pytest.raises(ValidationError):
        services.invitation_revoke(invitation=Invitation.objects.get(pk=org_a.invitation.pk),
                                   actor=org_a.members["hr"].user)
    assert state(org_a.organization) == before


def test_invitation_accept_creates_the_member_and_logs_it(org_a):
    invitation = InvitationFactory(organization=org_a.organization, email="Joiner@Example.com", team=org_a.team,
                                   is_employee=True, is_approver=True)
    user = UserFactory(email="joiner@example.com")
    member = services.invitation_accept(invitation=invitation, user=user)
    member = Member.all_objects.get(pk=member.pk)
    assert (member.organization_id, member.user_id, member.team_id) == (org_a.organization.pk, user.pk, org_a.team.pk)
    assert member.roles == ["approver", "employee"] and member.is_active
    invitation.refresh_from_db()
    assert invitation.status == "accepted" and invitation.accepted_by == user
    (entry,) = entries(org_a.organization, "invitation.accepted")
    assert entry.actor == user and entry.object_id == str(invitation.pk)
    assert entry.data == {"email": "Joiner@Example.com", "roles": ["approver", "employee"], "team": org_a.team.pk}


def test_invitation_accept_refuses_another_email_and_changes_nothing(org_a):
    before = state(org_a.organization)
    with pytest.raises(ValidationError):
        services.invitation_accept(invitation=org_a.invitation, user=UserFactory(email="someone-else@a.example"))
    assert state(org_a.organization) == before


def test_invitation_accept_twice_is_refused(org_a):
    user = UserFactory(email="newcomer@a.example")
    services.invitation_accept(invitation=org_a.invitation, user=user)
    before = state(org_a.organization)
    with pytest.raises(ValidationError):
        services.invitation_accept(invitation=org_a.invitation, user=user)
    assert state(org_a.organization) == before
    assert Member.all_objects.filter(organization=org_a.organization, user=user).count() == 1


@pytest.mark.parametrize("status", ["revoked", "expired"])
def test_invitation_accept_refuses_a_closed_invitation(org_a, status):
    now = timezone.now()
    changes = {"revoked_at": now} if status == "revoked" else {"expires_at": now - timedelta(seconds=1)}
    Invitation.all_objects.filter(pk=org_a.invitation.pk).update(**changes)
    before = state(org_a.organization)
    with pytest.raises(ValidationError) as excinfo:
        services.invitation_accept(invitation=org_a.invitation, user=UserFactory(email="newcomer@a.example"))
    assert status in " ".join(excinfo.value.messages)
    assert state(org_a.organization) == before


def test_invitation_accept_refuses_an_active_member(org_a):
    invitation = InvitationFactory(organization=org_a.organization, email="employee@a.example", is_hr=True)
    before = state(org_a.organization)
    with pytest.raises(ValidationError):
        services.invitation_accept(invitation=invitation, user=org_a.members["employee"].user)
    assert state(org_a.organization) == before


def test_invitation_accept_reactivates_a_deactivated_member(org_a):
    employee = org_a.members["employee"]
    Member.all_objects.filter(pk=employee.pk).update(is_active=False, team=None)
    invitation = InvitationFactory(organization=org_a.organization, email="employee@a.example", team=org_a.team,
                                   is_employee=False, is_hr=True)
    member = services.invitation_accept(invitation=invitation, user=employee.user)
    assert member.pk == employee.pk
    member = fresh(employee)
    assert member.is_active and member.roles == ["hr"] and member.team_id == org_a.team.pk
    assert Member.all_objects.filter(organization=org_a.organization, user=employee.user).count() == 1
    assert len(entries(org_a.organization, "invitation.accepted")) == 1


def test_an_invitation_joins_its_own_organization_whatever_scope_is_active(org_a, org_b):
    user = UserFactory(email="newcomer@a.example")
    with scope(org_b.organization):
        member = services.invitation_accept(invitation=org_a.invitation, user=user)
    assert member.organization_id == org_a.organization.pk


def test_a_new_organization_is_isolated_from_existing_ones(org_a):
    organization = services.organization_create(name="Org a", owner=org_a.members["employee"].user)
    assert organization.slug != org_a.slug
    with scope(organization):
        assert list(Member.objects.values_list("user__email", flat=True)) == ["employee@a.example"]
        assert not Team.objects.exists()
