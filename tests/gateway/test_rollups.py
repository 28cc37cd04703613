"""Daily usage roll-ups: the usage records of one calendar day in the organization's own zone, summed
per member and model with the member's team; recomputing a day replaces its rows. HR reads the last
30 days of them by team and model on the usage page.

Org A counts its days in Europe/Berlin (UTC+1 in winter, UTC+2 in summer), org B in UTC. The
boundaries are written out in UTC by hand, not computed with the code under test.
"""

import re
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from django.utils.html import strip_tags

from gateway.models import UsageRecord, UsageRollup
from gateway.rollups import rollup_day, rollup_recent
from portal.models import Member, Organization
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
DAY = date(2026, 3, 10)  # a winter day in Berlin: local midnight is 23:00 UTC the day before
_SUMMARY = re.compile(r'<table data-testid="usage-summary">.*?<tbody>(.*?)</tbody>', re.S)
_ROW = re.compile(r"<tr>(.*?)</tr>", re.S)
_CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)
_TOKENS = re.compile(r'title="([\d,]+) tokens"')


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def berlin(org_a):
    """Org A in Europe/Berlin, with a second team ("Research") and a member without a team."""
    with unscoped():
        Organization.objects.filter(pk=org_a.organization.pk).update(time_zone="Europe/Berlin")
    org_a.organization.refresh_from_db()
    org_a.research = TeamFactory(organization=org_a.organization, name="Research")
    org_a.researcher = MemberFactory(organization=org_a.organization, team=org_a.research,
                                     user=UserFactory(email="researcher@a.example"))
    org_a.loner = MemberFactory(organization=org_a.organization, team=None, user=UserFactory(email="loner@a.example"))
    return org_a


def record(organization, member, at: datetime, *, model="gpt-test", input_tokens=0, output_tokens=0, cached_tokens=0,
           charged_tokens=0, cost="0", status=UsageRecord.Status.OK) -> UsageRecord:
    with scope(organization):
        return UsageRecord.objects.create(
            organization=organization, member=member, model=model, endpoint="chat", status=status,
            input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
            charged_tokens=charged_tokens, cost=Decimal(cost), occurred_at=at)


def rollups(organization, day=None) -> dict:
    """{(member id, model): (team, requests, input, output, cached, charged, cost)}"""
    with unscoped():
        rows = UsageRollup.all_objects.filter(organization=organization)
        if day is not None:
            rows = rows.filter(day=day)
        result = {}
        for row in rows:
            key = (row.member_id, row.model) if day is not None else (row.day, row.member_id, row.model)
            assert key not in result, f"two roll-up rows for {key}"
            result[key] = (row.team_name, row.requests, row.input_tokens, row.output_tokens, row.cached_tokens,
                           row.charged_tokens, row.cost)
        return result


def days_rolled_up(organization) -> set:
    with unscoped():
        return set(UsageRollup.all_objects.filter(organization=organization).values_list("day", flat=True))


# -- one day ---------------------------------------------------------------------------------------------------------


def test_a_day_is_summed_per_member_and_model_in_the_organizations_zone(berlin, org_b):
    org = berlin.organization
    employee = berlin.members["employee"]
    # Mar 10 in Berlin runs from 2026-03-09 23:00 UTC to 2026-03-10 23:00 UTC.
    record(org, employee, utc(2026, 3, 9, 22, 59, 59), charged_tokens=1)  # 23:59:59 on Mar 9 in Berlin
    record(org, employee, utc(2026, 3, 9, 23), input_tokens=100, output_tokens=50, cached_tokens=10,
           charged_tokens=200, cost="0.001000")  # Berlin's midnight: the first instant of Mar 10
    record(org, employee, utc(2026, 3, 10, 12), input_tokens=300, output_tokens=100, charged_tokens=500,
           cost="0.002500")
    record(org, employee, utc(2026, 3, 10, 22, 59, 59), model="claude-test", input_tokens=7, output_tokens=3,
           charged_tokens=70, cost="0.5")  # 23:59:59 on Mar 10 in Berlin
    record(org, employee, utc(2026, 3, 10, 23, 30), charged_tokens=4_000)  # 00:30 on Mar 11 in Berlin
    record(org, berlin.researcher, utc(2026, 3, 10, 8), input_tokens=900, output_tokens=100, charged_tokens=1_000,
           cost="1.25")
    record(org, berlin.loner, utc(2026, 3, 10, 9), status=UsageRecord.Status.REFUSED)
    # Org B (UTC) at the same instants: never in org A's roll-up.
    record(org_b.organization, org_b.members["employee"], utc(2026, 3, 10, 12), charged_tokens=999_999, cost="9")

    assert rollup_day(organization=org, day=DAY) == 4
    assert rollups(org, DAY) == {
        (employee.pk, "gpt-test"): ("Team a", 2, 400, 150, 10, 700, Decimal("0.0035")),
        (employee.pk, "claude-test"): ("Team a", 1, 7, 3, 0, 70, Decimal("0.5")),
        (berlin.researcher.pk, "gpt-test"): ("Research", 1, 900, 100, 0, 1_000, Decimal("1.25")),
        (berlin.loner.pk, "gpt-test"): ("", 1, 0, 0, 0, 0, Decimal("0")),
    }
    assert days_rolled_up(org_b.organization) == set()

    # The record at 23:30 UTC on Mar 10 is Mar 11 in Berlin; the one at 22:59:59 UTC on Mar 9 is Mar 9.
    assert rollup_day(organization=org, day=DAY + timedelta(days=1)) == 1
    assert rollups(org, DAY + timedelta(days=1)) == {(employee.pk, "gpt-test"): ("Team a", 1, 0, 0, 0, 4_000, 0)}
    assert rollup_day(organization=org, day=DAY - timedelta(days=1)) == 1
    assert rollups(org, DAY - timedelta(days=1))[employee.pk, "gpt-test"][5] == 1


def test_the_same_instant_is_another_day_in_a_utc_organization(berlin, org_b):
    late = utc(2026, 3, 10, 23, 30)
    record(berlin.organization, berlin.members["employee"], late, charged_tokens=10)
    record(org_b.organization, org_b.members["employee"], late, charged_tokens=20)
    for org in (berlin.organization, org_b.organization):
        for day in (DAY, DAY + timedelta(days=1)):
            rollup_day(organization=org, day=day)

    assert rollups(berlin.organization, DAY) == {}
    assert [row[5] for row in rollups(berlin.organization, DAY + timedelta(days=1)).values()] == [10]
    assert [row[5] for row in rollups(org_b.organization, DAY).values()] == [20]
    assert rollups(org_b.organization, DAY + timedelta(days=1)) == {}


@pytest.mark.parametrize(("occurred_at", "local_day"), [
    # Spring forward: Mar 29, 2026 has 23 hours in Berlin (00:00 CET = 23:00 UTC, 24:00 CEST = 22:00 UTC).
    (utc(2026, 3, 28, 22, 59), date(2026, 3, 28)),
    (utc(2026, 3, 28, 23, 0), date(2026, 3, 29)),
    (utc(2026, 3, 29, 21, 59), date(2026, 3, 29)),
    (utc(2026, 3, 29, 22, 0), date(2026, 3, 30)),
    # Fall back: Oct 25, 2026 has 25 hours (00:00 CEST = 22:00 UTC, 24:00 CET = 23:00 UTC).
    (utc(2026, 10, 24, 21, 59), date(2026, 10, 24)),
    (utc(2026, 10, 24, 22, 0), date(2026, 10, 25)),
    (utc(2026, 10, 25, 22, 59), date(2026, 10, 25)),
    (utc(2026, 10, 25, 23, 0), date(2026, 10, 26)),
])
def test_days_follow_daylight_saving_time(berlin, occurred_at, local_day):
    org = berlin.organization
    record(org, berlin.members["employee"], occurred_at, charged_tokens=5)
    for day in (local_day - timedelta(days=1), local_day, local_day + timedelta(days=1)):
        rollup_day(organization=org, day=day)
    assert days_rolled_up(org) == {local_day}


# -- recomputing -----------------------------------------------------------------------------------------------------


def test_recomputing_a_day_replaces_its_rows(berlin, org_b):
    org = berlin.organization
    employee = berlin.members["employee"]
    record(org, employee, utc(2026, 3, 10, 10), charged_tokens=100, cost="0.1")
    record(org, berlin.researcher, utc(2026, 3, 10, 11), model="claude-test", charged_tokens=50)
    record(org_b.organization, org_b.members["employee"], utc(2026, 3, 10, 10), charged_tokens=7)
    rollup_day(organization=org_b.organization, day=DAY)
    other_before = rollups(org_b.organization)

    assert rollup_day(organization=org, day=DAY) == 2
    first = rollups(org, DAY)
    assert rollup_day(organization=org, day=DAY) == 2  # a rerun is harmless: the same rows, no duplicates
    assert rollups(org, DAY) == first
    with unscoped():
        assert UsageRollup.all_objects.filter(organization=org, day=DAY).count() == 2

    # A record arriving late (an ingested event) and a team change show on the next run.
    record(org, employee, utc(2026, 3, 10, 20), charged_tokens=900, cost="0.9")
    with unscoped():
        Member.all_objects.filter(pk=employee.pk).update(team=berlin.research)
    assert rollup_day(organization=org, day=DAY) == 2
    assert rollups(org, DAY)[employee.pk, "gpt-test"] == ("Research", 2, 0, 0, 0, 1_000, Decimal("1.0"))

    # Rows of a member and model that no longer have records that day disappear.
    with scope(org):
        UsageRecord.objects.filter(member=berlin.researcher).delete()
    assert rollup_day(organization=org, day=DAY) == 1
    assert set(rollups(org, DAY)) == {(employee.pk, "gpt-test")}

    # Other days and other organizations are left alone.
    assert rollups(org_b.organization) == other_before
    assert days_rolled_up(org) == {DAY}


def test_rollup_recent_does_yesterday_and_today_in_each_organizations_zone(berlin, org_b):
    at = utc(2026, 3, 10, 23, 30)  # Mar 11, 00:30 in Berlin; still Mar 10 in UTC
    a, b = berlin.organization, org_b.organization
    for day in (7, 8, 9, 10):
        record(a, berlin.members["employee"], utc(2026, 3, day, 12), charged_tokens=day)
        record(b, org_b.members["employee"], utc(2026, 3, day, 12), charged_tokens=day)
    record(a, berlin.members["employee"], utc(2026, 3, 10, 23, 15), charged_tokens=11)  # Berlin's Mar 11

    rows = rollup_recent(at=at)
    assert days_rolled_up(a) == {date(2026, 3, 10), date(2026, 3, 11)}
    assert days_rolled_up(b) == {date(2026, 3, 9), date(2026, 3, 10)}
    assert rows == 4
    assert [row[5] for row in rollups(a, date(2026, 3, 11)).values()] == [11]
    assert [row[5] for row in rollups(b, date(2026, 3, 9)).values()] == [9]

    assert rollup_recent(at=at) == 4  # hourly reruns recompute, never add
    with unscoped():
        assert UsageRollup.all_objects.count() == 4


def test_task_runs_eagerly_and_is_scheduled(org_a, org_b):
    from gateway.tasks import rollup_usage
    from portal.celery import app

    # The fixtures each made one record just now (20 charged tokens by the employee, gpt-test).
    assert rollup_usage.delay().get() == 2
    today = timezone.localdate()  # both organizations are in UTC
    for org in (org_a, org_b):
        assert rollups(org.organization, today) == {
            (org.members["employee"].pk, "gpt-test"): (org.team.name, 1, 10, 5, 0, 20, Decimal("0"))}

    schedule = settings.CELERY_BEAT_SCHEDULE["usage-rollups"]
    assert schedule["task"] == rollup_usage.name == "gateway.rollup_usage"
    assert schedule["task"] in app.tasks


# -- the usage page --------------------------------------------------------------------------------------------------


def summary(response) -> list[tuple]:
    """[(team, model, requests, charged tokens, cost)] of the 30-day summary table, or None without it."""
    assert response.status_code == 200
    match = _SUMMARY.search(response.content.decode())
    if match is None:
        return None
    rows = []
    for row in _ROW.findall(match.group(1)):
        cells = _CELL.findall(row)
        if len(cells) == 1:  # "Nothing rolled up yet"
            continue
        team, model, requests, charged, cost = cells
        rows.append((strip_tags(team).strip(), strip_tags(model).strip(), int(requests),
                     int(_TOKENS.search(charged).group(1).replace(",", "")), cost.strip()))
    return rows


def noon(days_ago: int) -> datetime:
    return datetime.combine(timezone.now().date() - timedelta(days=days_ago), time(12), tzinfo=UTC)


@pytest.fixture
def rolled_up(org_a, org_b):
    """Roll-ups of the last days in both organizations (both in UTC), and one of long ago."""
    a, b = org_a.organization, org_b.organization
    research = TeamFactory(organization=a, name="Research")
    researcher = MemberFactory(organization=a, team=research, user=UserFactory(email="researcher@a.example"))
    employee = org_a.members["employee"]
    record(a, employee, noon(1), charged_tokens=1_500, cost="0.25")
    record(a, employee, noon(3), charged_tokens=2_500, cost="0.50")
    record(a, org_a.members["hr"], noon(3), charged_tokens=1_000, cost="0.25")
    record(a, researcher, noon(2), model="claude-test", charged_tokens=7_000, cost="2")
    record(a, employee, noon(45), model="ancient-model", charged_tokens=123_456)
    record(b, org_b.members["employee"], noon(1), model="b-secret-model", charged_tokens=31_337, cost="3")
    for org in (a, b):
        for days_ago in (1, 2, 3, 45):
            rollup_day(organization=org, day=timezone.now().date() - timedelta(days=days_ago))
    return org_a


@pytest.mark.parametrize("role", ["hr", "admin", "owner"])
def test_hr_sees_the_30_day_summary_by_team_and_model(rolled_up, login, role):
    response = login(rolled_up.members[role]).get(reverse("usage_list", kwargs={"org_slug": rolled_up.slug}))
    assert summary(response) == [
        ("Research", "claude-test", 1, 7_000, "2.00"),
        ("Team a", "gpt-test", 3, 5_000, "1.00"),
    ]
    # The roll-up of 45 days ago ("ancient-model") is outside the 30 days; org B's never shows.
    page = response.content.decode()
    assert "b-secret-model" not in page and "Team b" not in page


def test_each_organization_sees_only_its_own_rollups(rolled_up, org_b, login):
    response = login(org_b.members["hr"]).get(reverse("usage_list", kwargs={"org_slug": org_b.slug}))
    assert summary(response) == [("Team b", "b-secret-model", 1, 31_337, "3.00")]
    page = response.content.decode()
    assert "Research" not in page and "claude-test" not in page


@pytest.mark.parametrize("role", ["employee", "approver"])
def test_members_without_hr_do_not_see_the_summary(rolled_up, login, role):
    response = login(rolled_up.members[role]).get(reverse("usage_list", kwargs={"org_slug": rolled_up.slug}))
    assert summary(response) is None
    page = response.content.decode()
    assert "Last 30 days by team and model" not in page
    assert "Research" not in page and "claude-test" not in page


def test_the_summary_says_when_nothing_is_rolled_up(org_a, login):
    response = login(org_a.members["hr"]).get(reverse("usage_list", kwargs={"org_slug": org_a.slug}))
    assert summary(response) == []
    assert "Nothing rolled up yet" in response.content.decode()
