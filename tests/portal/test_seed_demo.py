"""The demo seed: two organizations with an owner, HR, an approver and three employees in two teams.

It is idempotent, and the logins it prints really work.
"""

import re
from io import StringIO

import pytest
from allauth.account.models import EmailAddress
from django.core.management import call_command
from django.test import Client

from portal.models import Member, Organization, Team, User
from portal.tenancy import scope, unscoped

LOGIN_LINE = re.compile(r"^login (?P<email>\S+@\S+) (?P<password>\S+) (?P<roles>[a-z]+(?:,[a-z]+)*)$")

pytestmark = pytest.mark.django_db


def seed() -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def logins(output: str) -> dict[str, tuple[str, list[str]]]:
    """email -> (password, roles) of every `login EMAIL PASSWORD ROLES` line."""
    result = {}
    for line in output.splitlines():
        match = LOGIN_LINE.match(line.strip())
        if match:
            assert match["email"] not in result, f"{match['email']} printed twice"
            result[match["email"]] = (match["password"], match["roles"].split(","))
    return result


def counts() -> dict[str, int]:
    with unscoped():
        return {
            "organizations": Organization.objects.count(),
            "users": User.objects.count(),
            "members": Member.objects.count(),
            "teams": Team.objects.count(),
            "email_addresses": EmailAddress.objects.count(),
        }


def test_seed_creates_two_organizations_with_every_role():
    seed()
    organizations = list(Organization.objects.order_by("slug"))
    assert len(organizations) == 2
    with unscoped():
        for organization in organizations:
            members = list(Member.objects.filter(organization=organization).select_related("team"))
            by_role = {role: [m for m in members if m.roles == [role]] for role in ("owner", "hr", "approver", "employee")}
            assert len(by_role["owner"]) == 1, organization.slug
            assert len(by_role["hr"]) == 1, organization.slug
            assert len(by_role["approver"]) == 1, organization.slug
            assert len(by_role["employee"]) == 3, organization.slug
            assert len(members) == 6, f"{organization.slug}: members with other role sets: {[m.roles for m in members]}"
            assert all(m.is_active for m in members)
            teams = Team.objects.filter(organization=organization)
            assert teams.count() == 2
            employee_teams = {m.team_id for m in by_role["employee"]}
            assert len(employee_teams) == 2 and employee_teams == set(teams.values_list("pk", flat=True))
            assert all(m.team is not None and m.team.organization_id == organization.pk for m in members)


def test_seed_twice_creates_no_duplicates():
    first_output = seed()
    first = counts()
    assert first["organizations"] == 2 and first["members"] == 12 and first["users"] == 12 and first["teams"] == 4
    second_output = seed()
    assert counts() == first
    assert logins(second_output) == logins(first_output)


def test_seed_prints_a_login_for_every_demo_user():
    output = seed()
    printed = logins(output)
    with unscoped():
        members = list(Member.objects.select_related("user"))
    assert len(printed) == len(members) == 12
    assert set(printed) == {m.user.email for m in members}
    for member in members:
        _password, roles = printed[member.user.email]
        assert roles == member.roles, member.user.email
    for organization in Organization.objects.all():
        assert f"(/o/{organization.slug}/)" in output


def test_printed_credentials_log_in_and_reach_the_organization():
    seed()
    output = seed()  # the second run must leave working logins too
    printed = logins(output)
    assert len(printed) == 12
    with unscoped():
        slug_of = {m.user.email: m.organization.slug for m in Member.objects.select_related("user", "organization")}
    for email, (password, _roles) in printed.items():
        client = Client()
        response = client.post("/accounts/login/", {"login": email, "password": password})
        assert response.status_code == 302, f"{email} could not log in: {response.status_code}"
        response = client.get(f"/o/{slug_of[email]}/")
        assert response.status_code == 200, email
        assert email in response.content.decode()
    # A wrong password is refused (once: failed logins are rate limited per IP).
    refused = Client().post("/accounts/login/", {"login": email, "password": password + "x"})
    assert refused.status_code == 200 and "_auth_user_id" not in refused.client.session


def test_seed_resets_a_changed_demo_password():
    printed = logins(seed())
    email, (password, _roles) = next(iter(printed.items()))
    user = User.objects.get(email=email)
    user.set_password("something-else-entirely")
    user.save()
    assert not Client().login(email=email, password=password)
    seed()
    assert Client().post("/accounts/login/", {"login": email, "password": password}).status_code == 302


def test_seed_prints_a_working_api_key_per_employee_and_a_rerun_replaces_them():
    first = dict(re.findall(r"^api key for (\S+): (\S+)$", seed(), re.MULTILINE))
    output = seed()
    second = dict(re.findall(r"^api key for (\S+): (\S+)$", output, re.MULTILINE))
    employees = {email for email, (_password, roles) in logins(output).items() if "employee" in roles}
    assert set(first) == set(second) == employees and len(employees) == 6
    client = Client()
    for email, secret in second.items():
        slug = "acme" if email.endswith("@acme.example") else "globex"
        response = client.get(f"/api/v1/o/{slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert response.status_code == 200 and [row["email"] for row in response.json()["results"]] == [email]
    # The first run's keys were revoked when the second run minted new ones.
    email, old_secret = next(iter(first.items()))
    slug = "acme" if email.endswith("@acme.example") else "globex"
    assert Client().get(f"/api/v1/o/{slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {old_secret}").status_code == 401


def test_seed_leaves_a_working_approval_queue_in_both_organizations_and_a_rerun_adds_nothing():
    from overage.models import OverageRequest

    def requests():
        with unscoped():
            return sorted(OverageRequest.objects.values_list("organization__slug", "member__user__email", "tokens",
                                                             "state", "approved_tokens"))

    output = seed()
    first = requests()
    assert seed() and requests() == first
    for slug, approver in (("acme", "approver@acme.example"), ("globex", "approver@globex.example")):
        states = [state for org, _email, _tokens, state, _approved in first if org == slug]
        assert sorted(set(states)) == ["approved", "partially_approved", "pending", "rejected"], (slug, states)
        assert f"# 2 overage requests wait in /o/{slug}/approvals/ for {approver}" in output
        client = Client()
        assert client.post("/accounts/login/", {"login": approver, "password": logins(output)[approver][0]}
                           ).status_code == 302
        queue = client.get(f"/o/{slug}/approvals/").content.decode()
        assert queue.count('data-testid="queue-item"') == 2


def test_the_demo_gives_the_dashboards_usage_to_show_once_however_often_it_is_seeded():
    from allowances import selectors
    from allowances.models import Account
    from gateway.models import UsageRecord, UsageRollup

    seed()
    with unscoped():
        used = dict(Account.all_objects.filter(member__organization__slug="acme").values_list("member__user__email", "used"))
        records, rollups = UsageRecord.all_objects.count(), UsageRollup.all_objects.count()
    assert records and rollups
    assert sum(1 for tokens in used.values() if tokens) == 3  # the three employees
    seed()
    with unscoped():
        assert dict(Account.all_objects.filter(member__organization__slug="acme").values_list(
            "member__user__email", "used")) == used
        assert UsageRecord.all_objects.count() == records
        accounts = list(Account.all_objects.filter(member__organization__slug="acme", used__gt=0)
                        .select_related("organization", "member"))
    levels = []
    for account in accounts:
        with scope(account.organization):
            levels.append(selectors.dashboard(account=account).gauge.level)
    assert "low" in levels  # the demo shows the low-balance banner to one employee
