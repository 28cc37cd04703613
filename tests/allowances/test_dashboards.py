"""HR's and admins' overview, the balances table (levels, sorting, CSV, drill-down) and the rule
of what a low or used-up balance is, in Python and in SQL."""

import csv
import io
import re
from datetime import timedelta

import pytest
from django.db.models import Value
from django.urls import reverse
from django.utils import timezone

from allowances import ledger, selectors
from allowances.models import Account
from allowances.periods import period_bounds, period_start_for
from gateway.models import UsageRollup
from portal.models import Member
from portal.tenancy import scope, unscoped
from tests.allowances.test_pages import grant, use
from tests.factories import MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db


def url(org, name, **kwargs):
    return reverse(name, kwargs={"org_slug": org.slug, **kwargs})


@pytest.fixture
def research(org_a):
    """A second team with one member: 100,000 granted, 95,000 used today on claude-x (low)."""
    team = TeamFactory(organization=org_a.organization, name="Research")
    member = MemberFactory(organization=org_a.organization, team=team, user=UserFactory(email="res@a.example"))
    grant(org_a, member, 100_000)
    use(member, 95_000, model="claude-x")
    return member


# -- the rule ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granted", [0, 1, 5, 100, 1_000_000])
def test_the_balance_level_filter_in_sql_agrees_with_the_rule_in_python(org_a, granted):
    member = org_a.members["employee"]
    for available in (-10, -1, 0, 1, 2, 19, 20, 21, 199_999, 200_000, 200_001, 1_000_000):
        expected = selectors.balance_level(available=available, granted=granted)
        with scope(org_a.organization):
            matched = [level for level in ("ok", "low", "exhausted") if Member.objects.filter(pk=member.pk).filter(
                selectors.balance_level_filter(level, available=Value(available), granted=Value(granted))).exists()]
        assert matched == [expected], (available, granted)


def test_the_gauge_splits_used_held_and_left_against_what_was_granted():
    gauge = selectors.Gauge(granted=1_000, used=250, held=100, left=650, level="ok")
    assert (gauge.used_permille, gauge.held_permille, gauge.left_permille) == (250, 100, 650)
    overspent = selectors.Gauge(granted=1_000, used=1_200, held=0, left=-200, level="exhausted")
    assert (overspent.used_permille, overspent.left_permille) == (1000, 0)


# -- the overview -----------------------------------------------------------------------------------------------------


def test_the_overview_counts_today_live_from_the_ledger_not_the_roll_up(org_a, research):
    use(org_a.members["employee"], 1_000, model="gpt-test")
    organization = org_a.organization
    today = timezone.localdate()
    with scope(organization):  # a stale roll-up of today: the ledger's figures win
        UsageRollup.objects.create(organization=organization, day=today, member=research, team_name="Research",
                                   model="claude-x", charged_tokens=1)
        board = selectors.organization_overview(organization=organization)
    assert board.by_team == [("Research", 95_000), ("Team a", 1_000)]
    assert board.by_model == [("claude-x", 95_000), ("gpt-test", 1_000)]
    assert board.gauge.used == 96_000
    assert board.days[-1] == today and board.by_day_and_team["Research"][-1] == 95_000
    assert len(board.days) == selectors.OVER_TIME_DAYS
    assert [member.user.email for member in board.attention] == ["res@a.example"]


def test_the_overview_takes_earlier_days_from_the_roll_up(org_a, research):
    organization = org_a.organization
    begin = period_bounds(organization, period_start_for(organization))[0]
    at = begin + timedelta(days=1, hours=12)  # the period's second day: its first is history
    with scope(organization):
        UsageRollup.objects.create(organization=organization, day=begin.date(), member=research,
                                   team_name="Research", model="claude-x", charged_tokens=7_000)
        UsageRollup.objects.create(organization=organization, day=begin.date(), member=org_a.members["employee"],
                                   team_name="", model="gpt-test", charged_tokens=3_000)
        board = selectors.organization_overview(organization=organization, at=at)
    # Today's ledger entries (made now, not on the period's second day) are not the roll-up's day.
    assert board.by_team == [("Research", 7_000), (selectors.NO_TEAM, 3_000)]
    assert len(board.days) == selectors.OVER_TIME_DAYS and board.days[-1] == begin.date() + timedelta(days=1)
    assert {team: values[-2:] for team, values in board.by_day_and_team.items()} == {
        "Research": [7_000, 0], selectors.NO_TEAM: [3_000, 0]}


def test_over_time_reaches_back_into_the_last_period_but_the_breakdowns_are_this_periods(org_a, research):
    organization = org_a.organization
    begin = period_bounds(organization, period_start_for(organization))[0]
    with scope(organization):
        UsageRollup.objects.create(organization=organization, day=begin.date() - timedelta(days=1), member=research,
                                   team_name="Research", model="claude-x", charged_tokens=40_000)
        board = selectors.organization_overview(organization=organization)
    assert board.by_team == [("Research", 95_000)]  # last period's day is not this period's spend
    day = board.days.index(begin.date() - timedelta(days=1))
    assert board.by_day_and_team["Research"][day] == 40_000


def test_the_overview_page_shows_the_breakdowns_charts_and_who_is_near_the_limit(login, org_a, research):
    for role in ("hr", "admin", "owner"):
        response = login(org_a.members[role]).get(url(org_a, "overview"))
        assert response.status_code == 200
    page = response.content.decode()
    for testid in ("org-gauge", "team-chart", "org-model-chart", "time-chart", "team-table", "model-table"):
        assert f'data-testid="{testid}"' in page, testid
    team_table = re.search(r'data-testid="team-table">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r"<tr><td>(.*?)</td><td class=\"num\">([0-9,]+)</td></tr>", team_table) == [("Research", "95,000")]
    assert "<title>Research: 95,000 tokens</title>" in page  # the chart's own tooltip
    attention = re.findall(r'data-testid="attention-row"><td><a href="([^"]+)">([^<]+)</a>', page)
    assert attention == [(url(org_a, "balance_detail", member_id=research.pk), "res@a.example")]


def test_the_overview_exports_its_tables_as_csv(login, org_a, research):
    response = login(org_a.members["hr"]).get(url(org_a, "overview"), {"export": "models"})
    assert response["Content-Type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(response.content.decode()))) == [
        ["model", "tokens used this period"], ["claude-x", "95000"]]


# -- balances ---------------------------------------------------------------------------------------------------------


def listed(response) -> list[str]:
    return re.findall(r'<tr data-testid="balance-row">\s*<td><a href="[^"]+">([^<]+)</a>', response.content.decode())


def test_balances_filter_by_level_and_sort_by_any_column(login, org_a, research):
    client = login(org_a.members["hr"])
    empty = MemberFactory(organization=org_a.organization, user=UserFactory(email="zero@a.example"))
    grant(org_a, empty, 1_000)
    use(empty, 1_000)
    assert listed(client.get(url(org_a, "balances"), {"level": "low"})) == ["res@a.example"]
    assert listed(client.get(url(org_a, "balances"), {"level": "exhausted"})) == [
        "admin@a.example", "approver@a.example", "hr@a.example", "owner@a.example", "zero@a.example"]
    everyone = listed(client.get(url(org_a, "balances"), {"level": "none"}))  # the fixture's policy starts next month
    assert "res@a.example" in everyone and "employee@a.example" in everyone
    by_used = listed(client.get(url(org_a, "balances"), {"sort": "-used"}))
    assert by_used[:2] == ["res@a.example", "zero@a.example"]
    by_left = listed(client.get(url(org_a, "balances"), {"sort": "left"}))
    assert by_left[-2:] == ["employee@a.example", "res@a.example"]  # 4,000 and 5,000 left: the most
    for junk in ("-", "--used", "pk", "user__password", "\x00", "level"):
        assert client.get(url(org_a, "balances"), {"sort": junk, "level": junk}).status_code == 200


def test_balances_csv_is_what_the_table_shows_with_formulas_defused(login, org_a, research):
    sneaky = MemberFactory(organization=org_a.organization, user=UserFactory(email="=cmd@a.example"),
                           team=TeamFactory(organization=org_a.organization, name="=HYPERLINK(1)"))
    grant(org_a, sneaky, 10)
    response = login(org_a.members["hr"]).get(url(org_a, "balances"), {"level": "low", "export": "csv"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows == [["email", "team", "policy", "granted this period", "used this period", "held", "left", "level"],
                    ["res@a.example", "Research", "", "100000", "95000", "0", "5000", "low"]]
    everyone = list(csv.reader(io.StringIO(login(org_a.members["hr"]).get(
        url(org_a, "balances"), {"export": "csv", "q": "cmd"}).content.decode())))
    assert everyone[1][:2] == ["'=cmd@a.example", "'=HYPERLINK(1)"]


def test_the_drill_down_shows_a_members_allowance_keys_and_usage(login, org_a):
    employee = org_a.members["employee"]
    use(employee, 2_000)
    response = login(org_a.members["hr"]).get(url(org_a, "balance_detail", member_id=employee.pk))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'data-testid="gauge"' in page and 'data-testid="usage-chart"' in page
    assert "fixture key" in page  # the member's key
    with unscoped():
        outsider = Account.all_objects.exclude(organization=org_a.organization).values_list("member_id", flat=True)
    for other in list(outsider)[:1] + [10**9]:
        assert login(org_a.members["hr"]).get(url(org_a, "balance_detail", member_id=other)).status_code == 404


def test_a_new_member_sees_what_comes_next_not_an_empty_gauge(login, org_a):
    newcomer = MemberFactory(organization=org_a.organization, user=UserFactory(email="new@a.example"))
    page = login(newcomer).get(url(org_a, "dashboard")).content.decode()
    assert 'data-testid="empty-state"' in page and 'data-testid="gauge"' not in page
    assert "Your allowance is used up" not in page  # nothing was granted: not an alarm


def test_a_low_balance_raises_the_banner_with_the_way_to_ask_for_more(login, org_a, research):
    page = login(research).get(url(org_a, "dashboard")).content.decode()
    assert re.search(r'data-testid="overage-entry" data-level="low" role="alert"', page)
    assert "Your allowance is running low" in page and 'data-testid="request-more"' in page
    assert 'data-testid="gauge" data-level="low"' in page
    with scope(org_a.organization):
        account = Account.objects.get(member=research)
        ledger.post(account=account, kind=ledger.Kind.USAGE, tokens=5_000, used_delta=5_000,
                    idempotency_key="ingest:rest")
    page = login(research).get(url(org_a, "dashboard")).content.decode()
    assert 'data-level="exhausted" role="alert"' in page and "Your allowance is used up for this period." in page


def test_the_employee_s_days_before_today_come_from_the_roll_up_by_when_usage_happened(org_a):
    employee = org_a.members["employee"]
    organization = org_a.organization
    begin = period_bounds(organization, period_start_for(organization))[0]
    at = begin + timedelta(days=1, hours=12)
    with scope(organization):
        UsageRollup.objects.create(organization=organization, day=begin.date(), member=employee, team_name="Team a",
                                   model="gpt-test", charged_tokens=12_345)
        UsageRollup.objects.create(organization=organization, day=begin.date(), member=org_a.members["hr"],
                                   team_name="Team a", model="gpt-test", charged_tokens=99)  # someone else's
        board = selectors.dashboard(account=Account.objects.get(member=employee), at=at)
    assert board.daily[0] == (begin.date(), 12_345) and board.daily[1] == (begin.date() + timedelta(days=1), 0)


def test_names_in_the_charts_are_text_not_markup(login, org_a):
    team = TeamFactory(organization=org_a.organization, name='<script>alert("team")</script>')
    member = MemberFactory(organization=org_a.organization, team=team, user=UserFactory(email="x@a.example"))
    grant(org_a, member, 1_000)
    use(member, 500, model="gpt-test")
    page = login(org_a.members["hr"]).get(url(org_a, "overview")).content.decode()
    assert 'data-testid="team-chart"' in page
    assert '<script>alert("team")' not in page and "&lt;script&gt;alert" in page
