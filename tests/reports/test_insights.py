"""Value-per-token insights: figures from seeded usage records, rolled up, match values computed by
hand (also in JPY and Asia/Tokyo); who sees what; nothing ranks members by tokens."""

import re
from datetime import date, timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from gateway.rollups import rollup_day
from portal.models import AuditLogEntry, Organization
from portal.tenancy import scope, unscoped
from reports import selectors, services
from reports.models import ReportSettings
from tests.factories import MemberFactory, TeamFactory, UserFactory
from tests.reports.helpers import catalog, local, record

pytestmark = pytest.mark.django_db

DAY = date(2026, 3, 10)
K = 1000


@pytest.fixture
def seeded(org_a):
    """Org A (USD, UTC): Ada (team Alpha) uses the premium model, Bo (team Beta) the economy one,
    on DAY; thresholds: a prompt of at most 1,000,000 tokens and a reply of at most 200,000."""
    organization = org_a.organization
    mini, big = catalog(organization, connection=org_a.provider_connection)
    with scope(organization):
        services.report_settings_update(organization=organization, actor=None, economy_model=mini,
                                        small_prompt_tokens=1_000 * K, small_reply_tokens=200 * K)
    alpha = TeamFactory(organization=organization, name="Alpha")
    beta = TeamFactory(organization=organization, name="Beta")
    ada = MemberFactory(organization=organization, team=alpha, user=UserFactory(email="ada@a.example"))
    bo = MemberFactory(organization=organization, team=beta, user=UserFactory(email="bo@a.example"))
    at = lambda *hm: local(organization, 2026, 3, 10, *hm)  # noqa: E731
    # Premium: small (prompt 1,000k incl. 200k cached, reply 100k) 3.25; large 22.50; refused;
    # a retry 30 s after the refusal, small: 3.75.
    record(organization, ada, at(9, 0), model="big", input_tokens=800 * K, cached_tokens=200 * K,
           output_tokens=100 * K, cost="3.25")
    record(organization, ada, at(9, 10), model="big", input_tokens=5000 * K, output_tokens=1000 * K, cost="22.50")
    record(organization, ada, at(9, 20), model="big", status="refused")
    record(organization, ada, at(9, 20, 30), model="big", input_tokens=900 * K, output_tokens=150 * K, cost="3.75")
    # Economy: ok 0.135 (600k of its prompt cached); a provider error; no usage reported (estimated 0.015).
    record(organization, bo, at(10, 0), model="mini", input_tokens=400 * K, cached_tokens=600 * K,
           output_tokens=50 * K, cost="0.135")
    record(organization, bo, at(10, 5), model="mini", status="upstream_error")
    record(organization, bo, at(10, 30), model="mini", status="no_usage", input_tokens=100 * K, cost="0.015")
    # The day before and after: outside the window.
    record(organization, ada, at(9, 0) - timedelta(days=1), model="big", input_tokens=K, cost="1")
    record(organization, bo, at(9, 0) + timedelta(days=1), model="mini", input_tokens=K, cost="1")
    for day in (DAY - timedelta(days=1), DAY, DAY + timedelta(days=1)):
        rollup_day(organization=organization, day=day)
    org_a.ada, org_a.bo = ada, bo
    return org_a


def figures(org, **kwargs):
    with scope(org.organization):
        return selectors.insights(organization=org.organization, since=DAY, until=DAY, **kwargs)


def test_the_organizations_figures_match_the_hand_computed_ones(seeded):
    found = figures(seeded)
    assert found.requests == 7
    assert found.cost == Decimal("29.65")
    premium, economy = found.tiers["premium"], found.tiers["economy"]
    assert (premium.requests, premium.ok_requests) == (4, 3)
    assert premium.cost_per_request == Decimal("7.375000")  # 29.50 / 4
    assert premium.cost_per_successful_request == Decimal("9.833333")  # 29.50 / 3
    assert (economy.requests, economy.ok_requests) == (3, 1)
    assert economy.cost_per_request == Decimal("0.050000")  # 0.15 / 3
    assert economy.cost_per_successful_request == Decimal("0.135000")
    # Two of the three successful premium requests were small: 3.25 + 3.75 = 7.00 at premium prices,
    # (800k*0.15 + 100k*0.60 + 200k*0.075 + 900k*0.15 + 150k*0.60)/1M = 0.42 at economy prices.
    assert (found.small_premium_requests, found.premium_ok_requests) == (2, 3)
    assert found.small_premium_share == Decimal("66.67")
    assert found.routing_savings == Decimal("6.58")
    # Cached: 800k of 8,000k prompt tokens; saved 200k*(2.50-1.25)/1M + 600k*(0.15-0.075)/1M = 0.295.
    assert found.cached_share == Decimal("10.00")
    assert found.caching_savings == Decimal("0.30")
    assert (found.refused_requests, found.error_requests, found.retried_requests, found.no_usage_requests) == (
        1, 1, 1, 1)
    assert found.refusal_rate == found.error_rate == found.retry_rate == found.no_usage_rate == Decimal("14.29")
    assert [(week.since, week.until, week.requests) for week in found.trend] == [(DAY, DAY, 7)]


def test_a_team_sees_its_own_usage_only(seeded):
    alpha = figures(seeded, team="Alpha")
    assert alpha.requests == 4 and set(alpha.tiers) == {"premium"}
    assert alpha.routing_savings == Decimal("6.58")
    beta = figures(seeded, team="Beta")
    assert beta.requests == 3 and beta.cost == Decimal("0.15") and beta.routing_savings == Decimal("0.00")


def test_a_members_own_figures_are_theirs_only(seeded):
    own = figures(seeded, member=seeded.bo)
    assert own.requests == 3 and own.cached_share == Decimal("54.55")  # 600k of 1,100k (the estimate counts)
    assert own.caching_savings == Decimal("0.05")  # 0.045, half up


def test_a_weeks_trend_splits_at_monday(seeded):
    organization = seeded.organization
    # DAY is a Tuesday; the record of Monday the 9th is in the same week, Sunday the 8th is not.
    record(organization, seeded.bo, local(organization, 2026, 3, 8, 12), model="mini", input_tokens=K, cost="0.5")
    rollup_day(organization=organization, day=date(2026, 3, 8))
    with scope(organization):
        found = selectors.insights(organization=organization, since=date(2026, 3, 2), until=date(2026, 3, 15))
    assert [(week.since, week.until, week.requests, week.cost) for week in found.trend] == [
        (date(2026, 3, 2), date(2026, 3, 8), 1, Decimal("0.50")),
        (date(2026, 3, 9), date(2026, 3, 15), 9, Decimal("31.65"))]  # DAY's 7 and the days before and after


def test_another_currency_and_time_zone(org_b):
    """Org B in JPY (no minor unit) and Asia/Tokyo: a day is Tokyo's, amounts whole yen."""
    with unscoped():
        Organization.objects.filter(pk=org_b.organization.pk).update(currency="JPY", time_zone="Asia/Tokyo")
    org_b.organization.refresh_from_db()
    organization = org_b.organization
    mini, big = catalog(organization, connection=org_b.provider_connection, economy=("mini", "20", "80", "10"),
                        premium=("big", "400", "1600", "200"))
    with scope(organization):
        services.report_settings_update(organization=organization, actor=None, economy_model=mini,
                                        small_prompt_tokens=1_000 * K, small_reply_tokens=200 * K)
    member = org_b.members["employee"]
    # 00:30 in Tokyo on March 10 is 15:30 UTC on March 9: it counts on the 10th.
    record(organization, member, local(organization, 2026, 3, 10, 0, 30), model="big", input_tokens=500 * K,
           cached_tokens=250 * K, output_tokens=100 * K, cost="410")
    # 23:59 in Tokyo on March 9 (14:59 UTC): the day before.
    record(organization, member, local(organization, 2026, 3, 9, 23, 59), model="big", input_tokens=5000 * K,
           cost="2000")
    for day in (date(2026, 3, 9), DAY):
        rollup_day(organization=organization, day=day)
    found = figures(org_b)
    assert found.currency == "JPY" and found.requests == 1
    assert found.cost == Decimal("410")
    # Economy prices of the small request: 500k*20 + 100k*80 + 250k*10 per million = 20.5 yen;
    # 410 - 20.5 = 389.5, to whole yen half up: 390.
    assert found.routing_savings == Decimal("390")
    assert found.cached_share == Decimal("33.33")
    assert found.caching_savings == Decimal("50")  # 250k * (400 - 200) / 1M


def test_changing_the_thresholds_rolls_the_recent_days_again(seeded, django_capture_on_commit_callbacks):
    """In-process (no broker): the change queues the roll-up of the last days on commit, which runs
    the task at once."""
    organization = seeded.organization
    today = timezone.localdate()
    record(organization, seeded.ada, timezone.now() - timedelta(minutes=5), model="big", input_tokens=50 * K,
           output_tokens=10 * K, cost="0.225")
    rollup_day(organization=organization, day=today)
    with scope(organization):
        assert selectors.insights(organization=organization, since=today, until=today).small_premium_requests == 1
    with scope(organization), django_capture_on_commit_callbacks(execute=True):
        services.report_settings_update(organization=organization, actor=seeded.members["admin"].user,
                                        small_prompt_tokens=10 * K)
    with scope(organization):
        assert selectors.insights(organization=organization, since=today, until=today).small_premium_requests == 0
        entry = AuditLogEntry.objects.filter(organization=organization, action="reports.settings_changed").first()
    assert entry.data == {"small_prompt_tokens": {"from": 1_000 * K, "to": 10 * K}}


# -- the page ------------------------------------------------------------------------------------


def test_hr_sees_the_organizations_figures_on_the_page(seeded, login, monkeypatch):
    monkeypatch.setattr(timezone, "localdate", lambda *a: DAY)
    response = login(seeded.members["hr"]).get(reverse("insights", kwargs={"org_slug": seeded.slug}), {"days": 7})
    assert response.status_code == 200
    html = response.content.decode()
    # The 7 days to DAY also hold the day before's small premium request: 1.00 at premium prices,
    # 1,000 * 0.15 / 1M at economy ones; 6.58 + 0.99985 = 7.58.
    assert 'data-testid="routing-savings">7.58 USD' in html
    assert 'data-testid="caching-savings">0.30 USD' in html
    assert 'data-testid="small-share">75.00% (3 of 4)' in html
    assert "ada@a.example" not in html and "bo@a.example" not in html  # no individual figures, no names


def test_an_employee_sees_only_their_own_figures(seeded, login, monkeypatch):
    monkeypatch.setattr(timezone, "localdate", lambda *a: DAY)
    response = login(seeded.bo).get(reverse("insights", kwargs={"org_slug": seeded.slug}), {"days": 7})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-testid="total-cost">0.15 USD' in html  # Bo's, not the organization's 29.65
    # An employee cannot ask for a team or another member: those inputs are not theirs.
    response = login(seeded.bo).get(reverse("insights", kwargs={"org_slug": seeded.slug}),
                                    {"days": 7, "team": "Alpha"})
    assert 'data-testid="total-cost">0.15 USD' in response.content.decode()


def test_hr_cannot_view_one_member_unless_the_organization_allows_it(seeded, login, monkeypatch):
    monkeypatch.setattr(timezone, "localdate", lambda *a: DAY)
    client = login(seeded.members["hr"])
    url = reverse("insights", kwargs={"org_slug": seeded.slug})
    response = client.get(url, {"days": 7, "member": seeded.bo.pk})
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    with scope(seeded.organization):
        services.report_settings_update(organization=seeded.organization, actor=seeded.members["admin"].user,
                                        per_member_views=True)
    response = client.get(url, {"days": 7, "member": seeded.bo.pk})
    assert response.status_code == 200
    assert 'data-testid="total-cost">0.15 USD' in response.content.decode()
    with unscoped():
        actions = list(AuditLogEntry.objects.filter(organization=seeded.organization).values_list("action", flat=True))
    assert "reports.settings_changed" in actions and "reports.member_insights_viewed" in actions


def test_members_are_listed_by_email_never_ranked_by_tokens(seeded, login):
    """With per-member views on, the member choice is alphabetical; the biggest user is not first."""
    organization = seeded.organization
    heavy = MemberFactory(organization=organization, user=UserFactory(email="zz-heavy@a.example"))
    record(organization, heavy, local(organization, 2026, 3, 10, 11), model="big", input_tokens=90_000 * K,
           cost="225")
    rollup_day(organization=organization, day=DAY)
    with scope(organization):
        services.report_settings_update(organization=organization, actor=None, per_member_views=True)
    html = login(seeded.members["hr"]).get(reverse("insights", kwargs={"org_slug": seeded.slug})).content.decode()
    select = re.search(r'<select name="member".*?</select>', html, re.S).group(0)
    options = re.findall(r'<option value="\d+">([^<]+)</option>', select)
    assert options == sorted(options) and options[-1] == "zz-heavy@a.example"
    assert all(re.fullmatch(r"[\w.+-]+@[\w.-]+", option) for option in options), options  # emails, no figures


def test_bad_filters_are_field_errors(seeded, login):
    response = login(seeded.members["hr"]).get(reverse("insights", kwargs={"org_slug": seeded.slug}),
                                               {"days": "abc", "team": "x" * 300})
    assert response.status_code == 400
    assert "Select a valid choice" in response.content.decode()


def test_report_settings_are_validated_and_audited(seeded, login):
    url = reverse("report_settings", kwargs={"org_slug": seeded.slug})
    client = login(seeded.members["admin"])
    response = client.post(url, {"small_prompt_tokens": "0", "small_reply_tokens": "-5",
                                 "reconciliation_tolerance_percent": "101", "reconciliation_tolerance_tokens": "x"})
    assert response.status_code == 400
    html = response.content.decode()
    assert html.count('class="errorlist') >= 4
    with scope(seeded.organization):
        before = ReportSettings.objects.get(organization=seeded.organization).small_prompt_tokens
    assert before == 1_000 * K
    response = client.post(url, {"per_member_views": "on", "small_prompt_tokens": "4000", "small_reply_tokens": "800",
                                 "reconciliation_tolerance_percent": "2.5", "reconciliation_tolerance_tokens": "10"})
    assert response.status_code == 302
    with scope(seeded.organization):
        row = ReportSettings.objects.get(organization=seeded.organization)
        assert (row.per_member_views, row.small_prompt_tokens, row.economy_model) == (True, 4000, None)
        assert AuditLogEntry.objects.filter(action="reports.settings_changed").count() == 2
