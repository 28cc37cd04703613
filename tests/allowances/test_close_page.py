"""The dashboard's "When <Month> closed" card: after the monthly close the member sees what was
booked at the end of last month (what rolled over, what expired) with the reasons, for the whole of
the new month; before any close there is no card.

No clock is frozen: the close takes an explicit `at`, and so does `selectors.dashboard`. The pages
are read at the real time, so the page tests close the month before the current one.
"""

import re
from datetime import date, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import strip_tags

from allowances import closing, ledger, selectors, services
from allowances.models import Account, LedgerEntry
from allowances.periods import period_start_for
from portal.models import Member
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

ZONE = "Europe/Berlin"
Kind = LedgerEntry.Kind
_CARD = re.compile(r'<div class="card" data-testid="last-close">(.*?)</div>', re.S)
_ROW = re.compile(r"<tr><td>(.*?)</td><td class=\"num\">(.*?)</td>\s*<td>(.*?)</td></tr>", re.S)
_TOKENS = re.compile(r'title="([\d,]+) tokens"')


# -- helpers ---------------------------------------------------------------------------------------------------------


def local(*args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(ZONE))


def begin_of(period: date) -> datetime:
    return local(period.year, period.month, 1)


def previous_period(period: date) -> date:
    return (datetime(period.year, period.month, 1) - timedelta(days=1)).date().replace(day=1)


def build(period: date, *, slug: str) -> SimpleNamespace:
    """An organization in Berlin whose team policy (1,000,000 a month, up to 10% of it rolls over for
    one period) governs long before `period`; an employee's account opened in `period`."""
    organization = OrganizationFactory(name=f"Closing {slug}", slug=slug, time_zone=ZONE)
    team = TeamFactory(organization=organization, name="Platform")
    long_ago = begin_of(period) - timedelta(days=90)
    hr = MemberFactory(organization=organization, is_hr=True, is_employee=False, joined_at=long_ago,
                       user=UserFactory(email=f"hr@{slug}.example"))
    with scope(organization):
        policy = services.policy_create(organization=organization, actor=hr.user, name="Standard",
                                        monthly_tokens=1_000_000, rollover_rule="capped_percent",
                                        rollover_cap_percent=10)
        services.policy_assign(organization=organization, actor=hr.user, policy=policy, team=team, immediately=True,
                               at=long_ago)
    employee = MemberFactory(organization=organization, team=team, joined_at=long_ago,
                             user=UserFactory(email=f"employee@{slug}.example"))
    employee = Member.all_objects.select_related("organization").get(pk=employee.pk)
    with scope(organization):
        account = services.account_open(member=employee, at=begin_of(period) + timedelta(days=9, hours=12))
    assert (account.period_start, account.granted) == (period, 1_000_000)
    return SimpleNamespace(organization=organization, team=team, hr=hr, employee=employee, account=account,
                           policy=policy)


def use(account: Account, tokens: int, key: str) -> None:
    with scope(account.organization):
        hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key)
        ledger.settle(hold=hold, used_tokens=tokens)


def fresh(account: Account) -> Account:
    with unscoped():
        return Account.all_objects.select_related("organization", "member").get(pk=account.pk)


def board_at(account: Account, at: datetime):
    account = fresh(account)
    with scope(account.organization):
        return selectors.dashboard(account=account, at=at)


def entries(board) -> list[tuple]:
    return sorted((entry.kind, entry.tokens, entry.reason) for entry in board.last_close)


def card(response):
    """(heading, [(what, tokens, why)]) of the last-close card, or None when there is none."""
    assert response.status_code == 200
    match = _CARD.search(response.content.decode())
    if match is None:
        return None
    html = match.group(1)
    heading = strip_tags(re.search(r"<h2>(.*?)</h2>", html, re.S).group(1)).strip()
    rows = sorted((strip_tags(what).strip(), int(_TOKENS.search(tokens).group(1).replace(",", "")),
                   strip_tags(why).strip()) for what, tokens, why in _ROW.findall(html))
    return heading, rows


# -- the selector, at chosen moments ---------------------------------------------------------------------------------


def test_a_few_days_into_the_new_month_the_last_close_is_shown():
    march = date(2026, 3, 1)
    org = build(march, slug="spring")
    use(org.account, 300_000, "march")
    assert board_at(org.account, local(2026, 3, 28, 12)).last_close == []  # not closed yet

    closing.close_due_periods(at=local(2026, 4, 1, 0, 30))
    board = board_at(org.account, local(2026, 4, 3, 10))

    assert board.closed_period == march
    # 700,000 unused: 10% of the monthly 1,000,000 rolls over, the rest expires.
    assert entries(board) == sorted([
        (Kind.EXPIRY, 600_000, "Unused this period beyond what the policy rolls over"),
        (Kind.ROLLOVER_OUT, 100_000, "Rolls over (usable until the period of 2026-04-01)"),
    ])
    # The new month's rollover in and grant are the new period's, not part of the close's card.
    assert not {Kind.ROLLOVER_IN, Kind.GRANT} & {entry.kind for entry in board.last_close}
    # The card stays for the whole month.
    assert entries(board_at(org.account, local(2026, 4, 30, 23, 59))) == entries(board)


def test_only_the_latest_close_is_shown_and_expired_rollover_is_explained():
    december = date(2025, 12, 1)
    org = build(december, slug="winter")
    use(org.account, 300_000, "december")
    closing.close_due_periods(at=local(2026, 1, 1, 1))

    board = board_at(org.account, local(2026, 1, 4, 9))
    assert board.closed_period == december  # across the year boundary
    assert entries(board) == sorted([
        (Kind.EXPIRY, 600_000, "Unused this period beyond what the policy rolls over"),
        (Kind.ROLLOVER_OUT, 100_000, "Rolls over (usable until the period of 2026-01-01)"),
    ])

    # January: 1,000,000 granted plus 100,000 rolled in; 50,000 used. The youngest tokens are the
    # unused ones: the month's grant rolls over (capped) or expires, and 50,000 of the rolled-over
    # tranche reach the end of their life.
    use(org.account, 50_000, "january")
    closing.close_due_periods(at=local(2026, 2, 1, 1))
    board = board_at(org.account, local(2026, 2, 5, 9))
    assert board.closed_period == date(2026, 1, 1)
    assert entries(board) == sorted([
        (Kind.EXPIRY, 50_000, "Rolled-over tokens reached the end of their life"),
        (Kind.EXPIRY, 900_000, "Unused this period beyond what the policy rolls over"),
        (Kind.ROLLOVER_OUT, 100_000, "Rolls over (usable until the period of 2026-02-01)"),
    ])


def test_no_card_before_any_close():
    org = build(date(2026, 3, 1), slug="fresh")
    board = board_at(org.account, local(2026, 3, 15, 12))
    assert board.last_close == []


# -- the page, read now ----------------------------------------------------------------------------------------------


@pytest.fixture
def closed_last_month():
    """The employee used 300,000 of last month's 1,000,000 tokens; last month is not closed yet."""
    now = timezone.now()
    current = period_start_for(SimpleNamespace(time_zone=ZONE), now)
    last_month = previous_period(current)
    org = build(last_month, slug="pages")
    use(org.account, 300_000, "last-month")
    org.now, org.current, org.last_month = now, current, last_month
    return org


def test_the_employee_sees_the_close_on_the_dashboard(closed_last_month, login):
    org = closed_last_month
    url = reverse("dashboard", kwargs={"org_slug": org.organization.slug})
    client = login(org.employee)
    assert card(client.get(url)) is None  # the month ended but was not closed yet

    closing.close_due_periods(at=org.now)
    assert fresh(org.account).period_start == org.current

    heading, rows = card(client.get(url))
    assert heading == f"When {org.last_month:%B %Y} closed"
    assert rows == sorted([
        ("Expiry", 600_000, "Unused this period beyond what the policy rolls over"),
        ("Rollover out", 100_000, f"Rolls over (usable until the period of {org.current.isoformat()})"),
    ])


def test_other_members_see_no_card(closed_last_month, login):
    org = closed_last_month
    closing.close_due_periods(at=org.now)
    # HR's own account opens now (no policy governs HR): nothing of the employee's close is theirs.
    response = login(org.hr).get(reverse("dashboard", kwargs={"org_slug": org.organization.slug}))
    assert card(response) is None
    assert "Rolls over (usable until" not in response.content.decode()


def test_no_card_on_a_fresh_dashboard(org_a, as_employee):
    response = as_employee.get(reverse("dashboard", kwargs={"org_slug": org_a.slug}))
    assert card(response) is None
    assert "closed</h2>" not in response.content.decode()


def test_the_card_reports_the_overage_that_lapsed_and_the_overage_billed(login):
    """200,000 approved overage on top of 1,000,000: 1,100,000 used, so the allowance is gone and half
    of the overage too. Nothing rolls over or expires; 100,000 lapse and 100,000 are billed."""
    now = timezone.now()
    last_month = previous_period(period_start_for(SimpleNamespace(time_zone=ZONE), now))
    org = build(last_month, slug="overage")
    with scope(org.organization):
        ledger.post(account=org.account, kind=Kind.OVERAGE_GRANT, tokens=200_000, idempotency_key="overage-request:1",
                    reference="overage-request:1")
    use(org.account, 1_100_000, "beyond-the-allowance")
    closing.close_due_periods(at=now)

    heading, rows = card(login(org.employee).get(reverse("dashboard", kwargs={"org_slug": org.organization.slug})))
    assert heading == f"When {last_month:%B %Y} closed"
    assert rows == sorted([
        ("Overage lapsed", 100_000, "Approved overage not used this period (lapsed, not billed)"),
        ("Overage used (billed)", 100_000, "Approved overage used this period, billed to the organization"),
    ])
