"""The organization pages, one behaviour per test, through the test client as a logged-in member."""

import re
from datetime import datetime, timezone as dt_timezone

import pytest
from django.apps import apps
from django.urls import reverse

from portal.models import AuditLogEntry, Member, Organization, Team
from portal.tenancy import TenantModel, unscoped
from tests.factories import MemberFactory, TeamFactory, UserFactory
from tests.urlwalk import walk

_MEMBER_ROW = re.compile(r'<tr data-testid="member-row">\s*<td>([^<]+)')
_AUDIT_ROW = re.compile(r'<tr data-testid="audit-row">(.*?)</tr>', re.S)
_CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)


def url(org, name, **kwargs):
    return reverse(name, kwargs={"org_slug": org.slug, **kwargs})


def member_emails(response) -> list[str]:
    return [email.strip() for email in _MEMBER_ROW.findall(response.content.decode())]


def audit_rows(response) -> list[tuple[str, str]]:
    """(actor email, action) of every row of the audit log page."""
    rows = []
    for row in _AUDIT_ROW.findall(response.content.decode()):
        cells = _CELL.findall(row)
        rows.append((cells[1].strip(), re.sub(r"</?code>", "", cells[2]).strip()))
    return rows


def entries(org, action):
    with unscoped():
        return list(AuditLogEntry.objects.filter(organization=org.organization, action=action).order_by("id"))


def reload(obj):
    with unscoped():
        return type(obj).all_objects.get(pk=obj.pk) if hasattr(type(obj), "all_objects") else type(obj).objects.get(pk=obj.pk)


def field_errors(response, field):
    return list(response.context["form"].errors.get(field, []))


@pytest.fixture
def second_team(org_a):
    team = TeamFactory(organization=org_a.organization, name="Research", cost_centre="RES-1")
    MemberFactory(organization=org_a.organization, team=team, user=UserFactory(email="zed@a.example"))
    return team


# -- member list ---------------------------------------------------------------------------------


def test_member_list_shows_the_organizations_members(org_a, org_b, login):
    client = login(org_a.members["hr"])
    response = client.get(url(org_a, "member_list"))
    assert response.status_code == 200
    emails = member_emails(response)
    assert sorted(emails) == sorted(m.user.email for m in org_a.members.values())
    assert not any(email.endswith("@b.example") for email in emails)


def test_member_list_filters_by_team(org_a, login, second_team):
    client = login(org_a.members["hr"])
    assert member_emails(client.get(url(org_a, "member_list"), {"team": second_team.pk})) == ["zed@a.example"]
    in_first = member_emails(client.get(url(org_a, "member_list"), {"team": org_a.team.pk}))
    assert sorted(in_first) == sorted(m.user.email for m in org_a.members.values())
    assert len(member_emails(client.get(url(org_a, "member_list")))) == 6


def test_member_list_filters_by_search(org_a, login, second_team):
    client = login(org_a.members["hr"])
    assert member_emails(client.get(url(org_a, "member_list"), {"q": "APPROVER@"})) == ["approver@a.example"]
    assert member_emails(client.get(url(org_a, "member_list"), {"q": "zed", "team": org_a.team.pk})) == []
    response = client.get(url(org_a, "member_list"), {"q": "nobody-matches"})
    assert member_emails(response) == [] and "No members match." in response.content.decode()


def test_member_list_htmx_request_returns_only_rows(org_a, login, second_team):
    client = login(org_a.members["hr"])
    response = client.get(url(org_a, "member_list"), {"team": second_team.pk}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    body = response.content.decode()
    assert "<html" not in body and "<nav" not in body and "<form" not in body
    assert member_emails(response) == ["zed@a.example"]
    # Without the header it is the whole page.
    assert "<html" in client.get(url(org_a, "member_list")).content.decode()


# -- member edit ---------------------------------------------------------------------------------


def test_hr_changes_a_members_team(org_a, login, second_team):
    hr, subject = org_a.members["hr"], org_a.members["employee"]
    client = login(hr)
    response = client.post(url(org_a, "member_edit", member_id=subject.pk), {"team": second_team.pk, "is_active": "on"})
    assert response.status_code == 302 and response["Location"] == url(org_a, "member_list")
    subject = reload(subject)
    assert subject.team_id == second_team.pk and subject.is_active and subject.roles == ["employee"]
    [entry] = entries(org_a, "member.updated")
    assert entry.actor_email == hr.user.email
    assert entry.object_id == str(subject.pk)
    assert entry.data == {"team": [org_a.team.pk, second_team.pk]}


def test_hr_form_has_no_roles_field_and_hr_cannot_change_roles(org_a, login):
    hr, subject = org_a.members["hr"], org_a.members["employee"]
    client = login(hr)
    response = client.get(url(org_a, "member_edit", member_id=subject.pk))
    assert response.status_code == 200
    assert "roles" not in response.context["form"].fields
    assert 'name="roles"' not in response.content.decode()
    # A hand-made POST with roles is ignored for HR.
    client.post(url(org_a, "member_edit", member_id=subject.pk),
                {"team": org_a.team.pk, "is_active": "on", "roles": ["owner", "admin"]})
    assert reload(subject).roles == ["employee"]
    assert entries(org_a, "member.updated") == []


def test_admin_changes_roles(org_a, login):
    admin, subject = org_a.members["admin"], org_a.members["employee"]
    client = login(admin)
    assert 'name="roles"' in client.get(url(org_a, "member_edit", member_id=subject.pk)).content.decode()
    response = client.post(url(org_a, "member_edit", member_id=subject.pk),
                           {"team": org_a.team.pk, "roles": ["approver", "employee"], "is_active": "on"})
    assert response.status_code == 302
    assert reload(subject).roles == ["approver", "employee"]
    [entry] = entries(org_a, "member.updated")
    assert entry.actor_email == admin.user.email
    assert entry.data == {"roles": [["employee"], ["approver", "employee"]]}


def test_deactivating_yourself_is_a_field_error(org_a, login):
    admin = org_a.members["admin"]
    client = login(admin)
    # is_active left out: the checkbox unticked.
    response = client.post(url(org_a, "member_edit", member_id=admin.pk), {"team": org_a.team.pk, "roles": ["admin"]})
    assert response.status_code == 200
    assert field_errors(response, "is_active") == ["You cannot deactivate yourself."]
    assert "You cannot deactivate yourself." in response.content.decode()
    assert reload(admin).is_active
    assert entries(org_a, "member.updated") == entries(org_a, "member.deactivated") == []


def test_removing_the_last_owner_role_is_a_field_error(org_a, login):
    owner = org_a.members["owner"]
    client = login(owner)
    response = client.post(url(org_a, "member_edit", member_id=owner.pk),
                           {"team": org_a.team.pk, "roles": ["admin"], "is_active": "on"})
    assert response.status_code == 200
    assert field_errors(response, "roles") == ["An organization needs at least one active owner."]
    owner = reload(owner)
    assert owner.roles == ["owner"] and owner.is_active
    assert entries(org_a, "member.updated") == []


def test_an_admin_cannot_deactivate_an_owner(org_a, login):
    owner = org_a.members["owner"]
    client = login(org_a.members["admin"])
    response = client.post(url(org_a, "member_edit", member_id=owner.pk), {"team": org_a.team.pk, "roles": ["owner"]})
    assert response.status_code == 200
    assert "holds all of this member" in " ".join(response.context["form"].errors.get("is_active", []))
    assert reload(owner).is_active
    assert entries(org_a, "member.deactivated") == []


def test_an_owner_can_step_down_when_another_owner_remains(org_a, login):
    owner = org_a.members["owner"]
    with unscoped():
        second = Member.all_objects.get(pk=org_a.members["admin"].pk)
        second.is_owner = True
        second.save()
    client = login(owner)
    response = client.post(url(org_a, "member_edit", member_id=owner.pk),
                           {"team": org_a.team.pk, "roles": ["admin"], "is_active": "on"})
    assert response.status_code == 302
    assert reload(owner).roles == ["admin"]


# -- teams -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   "])
def test_team_create_with_a_blank_name_is_a_field_error(org_a, login, name):
    client = login(org_a.members["hr"])
    response = client.post(url(org_a, "team_list"), {"name": name, "cost_centre": "X-1"})
    assert response.status_code == 200
    assert field_errors(response, "name")
    with unscoped():
        assert Team.all_objects.filter(organization=org_a.organization).count() == 1
    assert entries(org_a, "team.created") == []


@pytest.mark.parametrize("name", ["Team a", "TEAM A", "  team a  "])
def test_team_create_with_a_duplicate_name_is_a_field_error(org_a, login, name):
    client = login(org_a.members["hr"])
    response = client.post(url(org_a, "team_list"), {"name": name})
    assert response.status_code == 200
    assert field_errors(response, "name") == [f"A team called “{name.strip()}” already exists."]
    with unscoped():
        assert Team.all_objects.filter(organization=org_a.organization).count() == 1
    assert entries(org_a, "team.created") == []


def test_team_create(org_a, login):
    client = login(org_a.members["hr"])
    response = client.post(url(org_a, "team_list"), {"name": " Research ", "cost_centre": "RES-1"})
    assert response.status_code == 302 and response["Location"] == url(org_a, "team_list")
    with unscoped():
        team = Team.all_objects.get(organization=org_a.organization, name="Research")
    assert team.cost_centre == "RES-1"
    [entry] = entries(org_a, "team.created")
    assert entry.object_id == str(team.pk)
    assert "Research" in client.get(url(org_a, "team_list")).content.decode()


def test_team_edit(org_a, login):
    client = login(org_a.members["hr"])
    team = org_a.team
    response = client.get(url(org_a, "team_edit", team_id=team.pk))
    assert response.status_code == 200 and response.context["form"].initial["name"] == "Team a"
    response = client.post(url(org_a, "team_edit", team_id=team.pk), {"name": "Platform", "cost_centre": "PLT-7"})
    assert response.status_code == 302 and response["Location"] == url(org_a, "team_list")
    team = reload(team)
    assert (team.name, team.cost_centre) == ("Platform", "PLT-7")
    [entry] = entries(org_a, "team.updated")
    assert entry.data == {"name": ["Team a", "Platform"], "cost_centre": ["", "PLT-7"]}
    # The audit log shows the change as before and after, not as a Python dict.
    page = login(org_a.members["admin"]).get(url(org_a, "audit_log"), {"action": "team.updated"}).content.decode()
    pairs = re.findall(r'<dt>([^<]+)</dt><dd><del data-testid="before">([^<]*)</del> → <ins data-testid="after">'
                       r'([^<]*)</ins>', page)
    assert pairs == [("name", "Team a", "Platform"), ("cost centre", "—", "PLT-7")]
    assert "[&#x27;Team a&#x27;" not in page and "{&#x27;" not in page


def test_team_edit_to_another_teams_name_is_a_field_error(org_a, login, second_team):
    client = login(org_a.members["hr"])
    response = client.post(url(org_a, "team_edit", team_id=org_a.team.pk), {"name": "research"})
    assert response.status_code == 200
    assert field_errors(response, "name")
    assert reload(org_a.team).name == "Team a"
    # Changing only the case of its own name is fine.
    response = client.post(url(org_a, "team_edit", team_id=org_a.team.pk), {"name": "TEAM A"})
    assert response.status_code == 302 and reload(org_a.team).name == "TEAM A"


# -- invitations ---------------------------------------------------------------------------------


def test_invitation_revoke(org_a, login):
    hr, invitation = org_a.members["hr"], org_a.invitation
    client = login(hr)
    assert client.get(url(org_a, "invitation_revoke", invitation_id=invitation.pk)).status_code == 405
    assert reload(invitation).status == "open"

    response = client.post(url(org_a, "invitation_revoke", invitation_id=invitation.pk))
    assert response.status_code == 302 and response["Location"] == url(org_a, "invitation_list")
    invitation = reload(invitation)
    assert invitation.revoked_at is not None and invitation.status == "revoked"
    [entry] = entries(org_a, "invitation.revoked")
    assert entry.actor_email == hr.user.email and entry.object_id == str(invitation.pk)
    assert entry.data == {"email": invitation.email}

    # Revoking again changes nothing and writes nothing.
    response = client.post(url(org_a, "invitation_revoke", invitation_id=invitation.pk), follow=True)
    assert "already revoked" in response.content.decode()
    assert reload(invitation).revoked_at == invitation.revoked_at
    assert len(entries(org_a, "invitation.revoked")) == 1


# -- organization settings -----------------------------------------------------------------------


def test_organization_settings_refuse_unknown_time_zone_and_currency(org_a, login):
    client = login(org_a.members["admin"])
    response = client.post(url(org_a, "organization_settings"),
                           {"name": "Renamed", "time_zone": "Mars/Olympus_Mons", "currency": "XYZ"})
    assert response.status_code == 200
    assert field_errors(response, "time_zone") and field_errors(response, "currency")
    organization = Organization.objects.get(pk=org_a.organization.pk)
    assert (organization.name, organization.time_zone, organization.currency) == ("Org a", "UTC", "USD")
    assert entries(org_a, "organization.updated") == []


def test_organization_settings_change_is_saved_and_audited(org_a, login):
    admin = org_a.members["admin"]
    client = login(admin)
    response = client.post(url(org_a, "organization_settings"),
                           {"name": "Org A GmbH", "time_zone": "Europe/Berlin", "currency": "EUR"})
    assert response.status_code == 302 and response["Location"] == url(org_a, "organization_settings")
    organization = Organization.objects.get(pk=org_a.organization.pk)
    assert (organization.name, organization.time_zone, organization.currency) == ("Org A GmbH", "Europe/Berlin", "EUR")
    [entry] = entries(org_a, "organization.updated")
    assert entry.actor_email == admin.user.email
    assert entry.data == {"name": ["Org a", "Org A GmbH"], "time_zone": ["UTC", "Europe/Berlin"], "currency": ["USD", "EUR"]}
    # Saving the same values again writes no entry.
    client.post(url(org_a, "organization_settings"), {"name": "Org A GmbH", "time_zone": "Europe/Berlin", "currency": "EUR"})
    assert len(entries(org_a, "organization.updated")) == 1


# -- audit log -----------------------------------------------------------------------------------


@pytest.fixture
def audit_history(org_a, org_b):
    """Entries of 2025 by actors and actions of their own, apart from whatever the fixture logs today."""

    def add(org, actor_email, action, when):
        with unscoped():
            AuditLogEntry.all_objects.create(organization=org.organization, actor=None, actor_email=actor_email,
                                             action=action, created_at=when)

    add(org_a, "hana@history.example", "history.created", datetime(2025, 1, 10, 12, tzinfo=dt_timezone.utc))
    add(org_a, "adam@history.example", "archive.updated", datetime(2025, 2, 15, 12, tzinfo=dt_timezone.utc))
    add(org_a, "hana@history.example", "history.updated", datetime(2025, 3, 20, 12, tzinfo=dt_timezone.utc))
    add(org_b, "hana@history.example", "history.created", datetime(2025, 2, 15, 12, tzinfo=dt_timezone.utc))


HISTORY = [  # org A's entries of audit_history, newest first
    ("hana@history.example", "history.updated"),
    ("adam@history.example", "archive.updated"),
    ("hana@history.example", "history.created"),
]


def test_audit_log_lists_the_organizations_entries(org_a, login, audit_history):
    client = login(org_a.members["admin"])
    response = client.get(url(org_a, "audit_log"))
    assert response.status_code == 200
    rows = audit_rows(response)
    with unscoped():
        total = AuditLogEntry.all_objects.filter(organization=org_a.organization).count()
    assert len(rows) == min(total, 50)
    assert ("owner@a.example", "test.seeded") in rows  # the fixture's entry, from today
    # Newest first: the 2025 entries come last, in order; organization B's entry is not there.
    assert rows[-3:] == HISTORY
    assert len([row for row in rows if row[0] == "hana@history.example"]) == 2


def test_audit_log_filters_by_action(org_a, login, audit_history):
    client = login(org_a.members["admin"])
    response = client.get(url(org_a, "audit_log"), {"action": "history."})
    assert audit_rows(response) == [HISTORY[0], HISTORY[2]]
    response = client.get(url(org_a, "audit_log"), {"action": "archive.updated"})
    assert audit_rows(response) == [HISTORY[1]]
    response = client.get(url(org_a, "audit_log"), {"action": "no-such-action"})
    assert audit_rows(response) == [] and "Nothing matches these filters." in response.content.decode()


def test_audit_log_filters_by_actor_email(org_a, login, audit_history):
    client = login(org_a.members["admin"])
    response = client.get(url(org_a, "audit_log"), {"actor": "HANA@history"})
    assert audit_rows(response) == [HISTORY[0], HISTORY[2]]
    response = client.get(url(org_a, "audit_log"), {"actor": "@history.example", "action": "archive"})
    assert audit_rows(response) == [HISTORY[1]]


def test_audit_log_filters_by_date_range(org_a, login, audit_history):
    client = login(org_a.members["admin"])
    response = client.get(url(org_a, "audit_log"), {"since": "2025-02-01", "until": "2025-02-28"})
    assert audit_rows(response) == [HISTORY[1]]
    # Both ends are whole days, inclusive.
    response = client.get(url(org_a, "audit_log"), {"since": "2025-01-10", "until": "2025-01-10"})
    assert audit_rows(response) == [HISTORY[2]]
    response = client.get(url(org_a, "audit_log"), {"since": "2025-02-16", "until": "2025-12-31"})
    assert audit_rows(response) == [HISTORY[0]]
    response = client.get(url(org_a, "audit_log"), {"until": "2025-02-15"})
    assert audit_rows(response) == [HISTORY[1], HISTORY[2]]
    response = client.get(url(org_a, "audit_log"), {"since": "2025-02-16", "actor": "history.example"})
    assert audit_rows(response) == [HISTORY[0]]


def test_audit_log_bad_date_range_is_a_field_error(org_a, login, audit_history):
    client = login(org_a.members["admin"])
    response = client.get(url(org_a, "audit_log"), {"since": "2025-03-01", "until": "2025-02-01"})
    assert response.status_code == 400
    assert field_errors(response, "until") == ["The end date is before the start date."]
    assert "The end date is before the start date." in response.content.decode()


# -- garbage in, no 500 out ----------------------------------------------------------------------

GARBAGE_QUERIES = [
    "team=abc&page=zzz",
    "team=%C2%B2&page=%C2%B2",  # "²" is a digit to str.isdigit(), not to int()
    "team=99999999999999999999999&page=99999999999999999999999",
    "team=-1&page=-1&q=%00",
    "q=%ff%fe&team=&page=",
    "since=2025-13-45&until=yesterday&action=%00&actor=%00&object_type=%00",
    "limit=abc&offset=zzz&action=x&actor=y",
    "member=%C2%B2&kind=%00&since=%00",
    "member=99999999999999999999999&kind=no-such-kind&until=2025-02-30",
]


def tenant_model_for_kwarg(name: str):
    """`member_id` -> Member, the URL kwarg convention of tests/portal/test_isolation.py."""
    if not name.endswith("_id"):
        return None
    wanted = name[: -len("_id")].replace("_", "")
    return next((model for model in apps.get_models()
                 if issubclass(model, TenantModel) and model._meta.model_name == wanted), None)


@pytest.mark.parametrize("query", GARBAGE_QUERIES)
def test_no_page_answers_500_for_garbage_query_params(client, org_a, query):
    client.raise_request_exception = False  # report a crash as the 500 a user would see
    client.force_login(org_a.members["owner"].user, backend="django.contrib.auth.backends.ModelBackend")
    failures = []
    routes = [r for r in walk() if "org_slug" in r.kwarg_names]
    assert len(routes) > 10
    for route in routes:
        values = {"org_slug": org_a.slug}
        for name in route.kwarg_names:
            if name != "org_slug":
                model = tenant_model_for_kwarg(name)
                assert model is not None, f"{route.route!r}: kwarg {name!r} does not name a tenant model (<model>_id)"
                with unscoped():
                    obj = model.all_objects.filter(organization=org_a.organization).order_by("pk").first()
                values[name] = obj.pk if obj is not None else 1  # a 404 is fine here, a 500 is not
        path = route.build(**values)
        for headers in ({}, {"HX-Request": "true"}):
            response = client.get(f"{path}?{query}", headers=headers)
            if response.status_code >= 500:
                failures.append(f"GET {path}?{query} {headers or ''} -> {response.status_code}")
    assert not failures, "\n".join(failures)
