"""The monthly close: every organization's periods end at local midnight of the 1st, in its own zone.

No clock is frozen: every function under test takes an explicit `at`, and accounts are opened in
the period a test needs with `account_open(at=...)`. The expected boundaries are written out in
UTC by hand (not computed with the code under test), and the ledger is checked with `verify()`
after every close.
"""

import logging
import threading
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from fractions import Fraction
from io import StringIO
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.utils import timezone

from allowances import closing, ledger, selectors
from allowances import services
from allowances.models import Account, LedgerEntry
from allowances.periods import next_period_start, period_start_for, periods_after, prorate
from portal.models import Member
from portal.tenancy import scope
from tests.allowances.helpers import hold_is_open
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
MICROSECOND = timedelta(microseconds=1)
Kind = LedgerEntry.Kind


# -- helpers ---------------------------------------------------------------------------------------------------------


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(zone: str, *args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(zone))


def begin_of(zone: str, period: date) -> datetime:
    return local(zone, period.year, period.month, 1)


def build_org(zone: str, period: date, *, slug: str | None = None, members: int = 1, **policy) -> SimpleNamespace:
    """An organization in `zone` whose team policy is in force long before `period`, with `members`
    veteran members whose accounts are opened (with the full monthly grant) in `period`."""
    organization = OrganizationFactory(time_zone=zone, **({"slug": slug} if slug else {}))
    team = TeamFactory(organization=organization)
    long_ago = begin_of(zone, period) - timedelta(days=90)
    hr = MemberFactory(organization=organization, is_hr=True, is_employee=False, joined_at=long_ago)  # no team
    with scope(organization):
        policy = services.policy_create(organization=organization, actor=hr.user, name="Monthly",
                                        **({"monthly_tokens": 1_000_000} | policy))
        # Nobody is in the team yet, so assigning "immediately" opens no account.
        services.policy_assign(organization=organization, actor=hr.user, policy=policy, team=team, immediately=True,
                               at=long_ago)
    people = [MemberFactory(organization=organization, team=team, joined_at=long_ago) for _ in range(members)]
    accounts = [open_account(person, at=begin_of(zone, period) + timedelta(days=9, hours=12)) for person in people]
    return SimpleNamespace(organization=organization, team=team, hr=hr, policy=policy, members=people,
                           accounts=accounts, actor=hr.user, zone=zone)


def open_account(member, *, at: datetime) -> Account:
    # As stored: joined_at comes back from the database in UTC, as it does in production.
    member = Member.all_objects.select_related("organization").get(pk=member.pk)
    with scope(member.organization):
        return services.account_open(member=member, at=at)


def use(account: Account, tokens: int, key: str) -> None:
    with scope(account.organization):
        hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key)
        ledger.settle(hold=hold, used_tokens=tokens)


def stored(account: Account) -> Account:
    return Account.all_objects.get(pk=account.pk)


def last_entry_id() -> int:
    return LedgerEntry.all_objects.order_by("-id").values_list("id", flat=True).first() or 0


def rows(account: Account, *, after: int = 0) -> list[tuple]:
    """The account's entries (written after entry `after`) as a sorted multiset of
    (period, kind, tokens, reference), a close entry with its parts as `closed` writes them:
    which entries a close books matters, not their order."""
    return sorted(
        (e.period_start, e.kind, e.tokens, e.reference) if e.kind != Kind.CLOSE else closed(
            e.period_start, billed=e.close_overage_billed, lapsed=e.close_overage_lapsed, expired=e.close_expired,
            rollover_expired=e.close_rollover_expired,
            rolled=dict(zip(e.close_rollover_until, e.close_rollover_tokens, strict=True)), granted=e.close_granted,
            reference=e.reference)
        for e in LedgerEntry.all_objects.filter(account_id=account.pk, id__gt=after))


def closed(period: date, *, billed=0, lapsed=0, expired=0, rollover_expired=0, rolled: dict | None = None, granted=0,
           reference="") -> tuple:
    """A close entry's row in `rows`: its net tokens, then its parts; `rolled` {usable until: tokens}."""
    rolled = rolled or {}
    assert sum(rolled.values()) == 0 or all(rolled.values())
    return (period, Kind.CLOSE, billed - lapsed - expired - rollover_expired + granted, reference, billed, lapsed,
            expired, rollover_expired, sorted(rolled.items()), granted)


def grants(account: Account) -> list[tuple]:
    """(period, tokens, idempotency key) of the account's monthly grants: those an account opened
    with, and those of each close for the next period."""
    entries = LedgerEntry.all_objects.filter(account_id=account.pk).order_by("period_start", "id")
    return ([(e.period_start, e.tokens, e.idempotency_key) for e in entries.filter(kind=Kind.GRANT)]
            + [(next_period_start(e.period_start), e.close_granted, e.idempotency_key)
               for e in entries.filter(kind=Kind.CLOSE, close_granted__gt=0)])


def ledger_snapshot(organization=None) -> dict:
    """Every entry and every account (of one organization or all), to compare runs exactly."""
    entries = LedgerEntry.all_objects.all()
    accounts = Account.all_objects.all()
    if organization is not None:
        entries, accounts = entries.filter(organization=organization), accounts.filter(organization=organization)
    return {
        "entries": sorted(entries.values_list("id", "account_id", "kind", "tokens", "granted_delta", "held_delta",
                                              "used_delta", "period_start", "idempotency_key", "reference")),
        "accounts": sorted(accounts.values_list("id", "period_start", "granted", "held", "used", "overdraft_limit")),
    }


def due_pks(at: datetime) -> list[int]:
    return [organization.pk for organization in closing.organizations_due(at=at)]


def close(at: datetime, organization=None) -> closing.CloseReport:
    report = closing.close_due_periods(at=at, organization=organization)
    assert ledger.verify() == []
    return report


# -- 1. the earliest and the latest zones -------------------------------------------------------------------------------


def test_utc_plus_14_closes_ten_hours_before_the_utc_month_ends_and_utc_minus_12_twelve_hours_after():
    november = date(2026, 11, 1)
    east = build_org("Pacific/Kiritimati", november, slug="kiritimati", members=2)
    west = build_org("Etc/GMT+12", november, slug="baker-island", members=2)  # POSIX sign: UTC-12
    east_midnight, west_midnight = utc(2026, 11, 30, 10), utc(2026, 12, 1, 12)
    assert east_midnight == local("Pacific/Kiritimati", 2026, 12, 1)
    assert west_midnight == local("Etc/GMT+12", 2026, 12, 1)

    # Just before Kiritimati's midnight nobody is due, and a close changes nothing.
    before = ledger_snapshot()
    assert due_pks(east_midnight - MICROSECOND) == []
    report = close(east_midnight - MICROSECOND)
    assert (report.organizations, report.accounts_closed, report.periods) == (0, 0, [])
    assert ledger_snapshot() == before

    # 10:00 UTC on November 30th is December 1st in Kiritimati: only that organization is due.
    assert due_pks(east_midnight) == [east.organization.pk]
    report = close(east_midnight)
    assert report.periods == [("kiritimati", november, 2)]
    assert [stored(a).period_start for a in east.accounts] == [date(2026, 12, 1)] * 2
    assert [stored(a).period_start for a in west.accounts] == [november] * 2
    for account in east.accounts:
        assert grants(account)[-1] == (date(2026, 12, 1), 1_000_000, "close:2026-11-01")

    # All of December 1st UTC until noon is still November 30th at UTC-12.
    late = ledger_snapshot()
    assert due_pks(west_midnight - MICROSECOND) == []
    assert close(west_midnight - MICROSECOND).accounts_closed == 0
    assert ledger_snapshot() == late

    assert due_pks(west_midnight) == [west.organization.pk]
    report = close(west_midnight)
    assert report.periods == [("baker-island", november, 2)]
    assert [stored(a).period_start for a in west.accounts] == [date(2026, 12, 1)] * 2
    assert due_pks(west_midnight + timedelta(hours=1)) == []


# -- 2. DST: the close is at local midnight of the 1st, whatever the offset is that day ---------------------------------


@pytest.mark.parametrize("zone, period, midnight_utc", [
    # Summer time began on March 29th: April 1st 00:00 is CEST (UTC+2).
    ("Europe/Berlin", date(2026, 3, 1), utc(2026, 3, 31, 22)),
    # Summer time ended on October 25th: November 1st 00:00 is CET (UTC+1).
    ("Europe/Berlin", date(2026, 10, 1), utc(2026, 10, 31, 23)),
    # Daylight time began on March 8th: April 1st 00:00 is EDT (UTC-4).
    ("America/New_York", date(2026, 3, 1), utc(2026, 4, 1, 4)),
    # Daylight time ends at 02:00 on November 1st itself: its midnight is still EDT (UTC-4).
    ("America/New_York", date(2026, 10, 1), utc(2026, 11, 1, 4)),
    # The November period contains the change; December 1st 00:00 is EST (UTC-5).
    ("America/New_York", date(2026, 11, 1), utc(2026, 12, 1, 5)),
])
def test_a_dst_zone_closes_exactly_at_local_midnight_of_the_first(zone, period, midnight_utc):
    org = build_org(zone, period, members=2)
    following = next_period_start(period)
    assert midnight_utc == begin_of(zone, following)

    for too_early in (midnight_utc - timedelta(hours=1), midnight_utc - MICROSECOND):
        assert due_pks(too_early) == []
        assert close(too_early).accounts_closed == 0
        assert [stored(a).period_start for a in org.accounts] == [period] * 2

    assert due_pks(midnight_utc) == [org.organization.pk]
    report = close(midnight_utc)
    assert report.periods == [(org.organization.slug, period, 2)]
    for account in org.accounts:
        assert stored(account).period_start == following
        assert grants(account) == [(period, 1_000_000, f"grant:{period}"),
                                   (following, 1_000_000, f"close:{period}")]
    # An hour later (the other offset) there is nothing more to do.
    assert due_pks(midnight_utc + timedelta(hours=1)) == []


# -- 3. February of a leap year ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Australia/Sydney", "America/New_York", "UTC"])
def test_february_2028_closes_at_local_midnight_of_march_first_not_on_the_28th_or_29th(zone):
    february = date(2028, 2, 1)
    org = build_org(zone, february)
    [account] = org.accounts

    for moment in (local(zone, 2028, 2, 28, 23, 59, 59), local(zone, 2028, 2, 29, 12),
                   local(zone, 2028, 3, 1) - MICROSECOND):
        assert due_pks(moment) == []
        assert close(moment).accounts_closed == 0
        assert stored(account).period_start == february

    march_first = local(zone, 2028, 3, 1)
    assert due_pks(march_first) == [org.organization.pk]
    assert close(march_first).periods == [(org.organization.slug, february, 1)]
    assert stored(account).period_start == date(2028, 3, 1)
    assert grants(account)[-1] == (date(2028, 3, 1), 1_000_000, "close:2028-02-01")


def test_a_leap_february_joiner_is_pro_rated_over_29_days_and_march_is_whole():
    zone, february = "Australia/Sydney", date(2028, 2, 1)  # no DST change in February there
    org = build_org(zone, february)
    joiner = MemberFactory(organization=org.organization, team=org.team, joined_at=local(zone, 2028, 2, 15))
    account = open_account(joiner, at=local(zone, 2028, 2, 20))
    assert stored(account).granted == 1_000_000 * 15 // 29  # February 15th to 29th: 15 of 29 days
    close(local(zone, 2028, 3, 1))
    assert stored(account).period_start == date(2028, 3, 1)
    assert grants(account)[-1] == (date(2028, 3, 1), 1_000_000, "close:2028-02-01")


# -- 4. a member who joined mid-month -------------------------------------------------------------------------------


def test_a_mid_month_joiners_pro_rated_period_closes_with_the_others_and_the_next_grant_is_whole():
    zone, november = "Asia/Tokyo", date(2026, 11, 1)
    org = build_org(zone, november)
    [veteran] = org.accounts
    joiner = MemberFactory(organization=org.organization, team=org.team, joined_at=local(zone, 2026, 11, 16))
    account = open_account(joiner, at=local(zone, 2026, 11, 20, 9))
    assert stored(account).granted == 500_000  # 15 of November's 30 days
    use(account, 100_000, "joiner-usage")

    report = close(local(zone, 2026, 12, 1))
    assert report.periods == [(org.organization.slug, november, 2)]
    assert rows(account) == sorted([
        (november, Kind.GRANT, 500_000, f"policy:{org.policy.pk}"),
        (november, Kind.HOLD, 100_000, ""),
        (november, Kind.USAGE, 100_000, ""),
        # the policy rolls nothing over; December's grant
        closed(november, expired=400_000, granted=1_000_000, reference=f"policy:{org.policy.pk}"),
    ])
    for each in (account, veteran):
        assert stored(each).period_start == date(2026, 12, 1)
        assert stored(each).available == 1_000_000


@pytest.mark.parametrize("zone, joined, period", [
    ("Europe/Berlin", (2026, 10, 1, 0, 30), date(2026, 10, 1)),  # a 745-hour month (summer time ends)
    ("Europe/Berlin", (2026, 3, 16), date(2026, 3, 1)),  # a 743-hour month (summer time begins)
    ("America/New_York", (2026, 11, 1, 0, 30), date(2026, 11, 1)),  # a 721-hour month
])
def test_a_joiner_in_a_dst_month_is_pro_rated_by_the_real_time_left_and_never_above_the_monthly_amount(
        zone, joined, period):
    org = build_org(zone, period)
    joined_at = local(zone, *joined)
    joiner = MemberFactory(organization=org.organization, team=org.team, joined_at=joined_at)
    account = open_account(joiner, at=joined_at + timedelta(days=2))

    begin, end = (begin_of(zone, p).astimezone(UTC) for p in (period, next_period_start(period)))
    left = Fraction(int((end - joined_at.astimezone(UTC)).total_seconds()), int((end - begin).total_seconds()))
    granted = stored(account).granted
    assert granted <= 1_000_000, f"a joiner was granted {granted:,} tokens, more than the monthly 1,000,000"
    assert granted == prorate(1_000_000, left)

    close(begin_of(zone, next_period_start(period)))
    assert stored(account).period_start == next_period_start(period)
    assert grants(account)[-1][1] == 1_000_000


# -- 5. a policy changed mid-month ----------------------------------------------------------------------------------


def test_a_policy_updated_mid_month_rolls_over_by_its_new_rule_and_grants_its_new_amount():
    zone, november = "Europe/Paris", date(2026, 11, 1)  # no DST change in November
    org = build_org(zone, november, monthly_tokens=300_000)  # nothing rolls over
    [account] = org.accounts
    use(account, 100_000, "early-usage")
    with scope(org.organization):
        services.policy_update(policy=org.policy, actor=org.actor, immediately=True, at=local(zone, 2026, 11, 16),
                               monthly_tokens=600_000, rollover_rule="all")
    # Half the month left: + 600,000 / 2 - 300,000 / 2.
    assert stored(account).available == 300_000 + 150_000 - 100_000

    mark = last_entry_id()
    close(local(zone, 2026, 12, 1))
    december = date(2026, 12, 1)
    assert rows(account, after=mark) == [  # nothing expires
        closed(november, rolled={december: 350_000}, granted=600_000, reference=f"policy:{org.policy.pk}"),
    ]
    assert stored(account).available == 950_000


def test_a_policy_assigned_immediately_mid_month_governs_the_close_and_the_next_grant():
    zone, november = "UTC", date(2026, 11, 1)
    org = build_org(zone, november, monthly_tokens=300_000)  # nothing rolls over
    [account] = org.accounts
    [member] = org.members
    use(account, 100_000, "early-usage")
    with scope(org.organization):
        generous = services.policy_create(organization=org.organization, actor=org.actor, name="Generous",
                                          monthly_tokens=2_000_000, rollover_rule="capped_tokens",
                                          rollover_cap_tokens=50_000, overage_rule="auto_approve",
                                          auto_approve_tokens=20_000, auto_approve_requests=2)
        services.policy_assign(organization=org.organization, actor=org.actor, policy=generous,
                               member=Member.objects.get(pk=member.pk), immediately=True, at=utc(2026, 11, 16))
    assert stored(account).available == 300_000 + (1_000_000 - 150_000) - 100_000

    mark = last_entry_id()
    close(utc(2026, 12, 1))
    december = date(2026, 12, 1)
    assert rows(account, after=mark) == [
        closed(november, expired=1_000_000, rolled={december: 50_000}, granted=2_000_000,
               reference=f"policy:{generous.pk}"),
    ]
    # Auto-approval approves overage requests; it lends no overdraft.
    assert (stored(account).available, stored(account).overdraft_limit) == (2_050_000, 0)


def test_a_policy_assigned_mid_month_for_the_next_period_leaves_the_close_to_the_old_policy():
    zone, november = "UTC", date(2026, 11, 1)
    org = build_org(zone, november, monthly_tokens=300_000)  # nothing rolls over
    [account] = org.accounts
    use(account, 100_000, "early-usage")
    with scope(org.organization):
        generous = services.policy_create(organization=org.organization, actor=org.actor, name="Generous",
                                          monthly_tokens=2_000_000, rollover_rule="all",
                                          overage_rule="auto_approve", auto_approve_tokens=20_000,
                                          auto_approve_requests=2)
        assignment = services.policy_assign(organization=org.organization, actor=org.actor, policy=generous,
                                            team=org.team, at=utc(2026, 11, 16))
    assert assignment.effective_from == utc(2026, 12, 1)
    assert stored(account).available == 200_000  # nothing changes before December

    mark = last_entry_id()
    close(utc(2026, 12, 1))
    december = date(2026, 12, 1)
    assert rows(account, after=mark) == [
        # the old policy (in force until the end) rolls nothing over
        closed(november, expired=200_000, granted=2_000_000, reference=f"policy:{generous.pk}"),
    ]
    assert (stored(account).available, stored(account).overdraft_limit) == (2_000_000, 0)


@pytest.mark.parametrize("rule, rolled", [
    ({"rollover_rule": "none"}, 0),
    ({"rollover_rule": "all"}, 60_000),
    ({"rollover_rule": "capped_tokens", "rollover_cap_tokens": 25_000}, 25_000),
    ({"rollover_rule": "capped_percent", "rollover_cap_percent": 50}, 50_000),
    ({"rollover_rule": "capped_percent", "rollover_cap_percent": 80}, 60_000),  # the cap is above what is unused
])
def test_the_close_rolls_over_what_the_rule_allows_and_expires_the_rest(rule, rolled):
    november = date(2026, 11, 1)
    org = build_org("UTC", november, monthly_tokens=100_000, **rule)
    [account] = org.accounts
    use(account, 40_000, "usage")
    mark = last_entry_id()
    close(utc(2026, 12, 1))
    assert rows(account, after=mark) == [
        closed(november, expired=60_000 - rolled, rolled={date(2026, 12, 1): rolled} if rolled else {},
               granted=100_000, reference=f"policy:{org.policy.pk}"),
    ]
    assert stored(account).available == 100_000 + rolled


def test_the_close_lapses_unused_overage_bills_the_rest_and_keeps_open_holds_held():
    november, december = date(2026, 11, 1), date(2026, 12, 1)
    org = build_org("UTC", november, members=3, monthly_tokens=100_000, overage_rule="request_approval")
    over, holding, past = org.accounts
    with scope(org.organization):  # approved overage requests' grants
        for account in (over, past):
            ledger.post(account=account, kind=Kind.OVERAGE_GRANT, tokens=50_000,
                        idempotency_key=f"overage-request:{account.pk}", reference=f"overage-request:{account.pk}")
    use(over, 120_000, "big")  # the allowance, then 20,000 of the 50,000 approved overage
    with scope(org.organization):  # usage recorded past the balance (an organization's own gateway reports it)
        ledger.post(account=past, kind=Kind.USAGE, tokens=160_000, used_delta=160_000, idempotency_key="ingested",
                    model="reported")
        hold = ledger.authorize(account=holding, tokens=10_000, idempotency_key="in-flight")

    mark = last_entry_id()
    close(utc(2026, 12, 1))
    # Overage is used last, so what is unused is overage first: 30,000 lapse, unbilled.
    policy = f"policy:{org.policy.pk}"
    assert rows(over, after=mark) == [closed(november, lapsed=30_000, granted=100_000, reference=policy)]
    assert stored(over).available == 100_000
    # 10,000 used past the allowance and the overage: booked as billable overage, so December starts at zero.
    assert rows(past, after=mark) == [closed(november, billed=10_000, granted=100_000, reference=policy)]
    with scope(org.organization):
        billed = {row.member_id: row.tokens for row in selectors.billable_overage(organization=org.organization,
                                                                                 period=november)}
    assert billed == {over.member_id: 20_000, past.member_id: 60_000}
    # The hold crosses the boundary: still held, not expired, not counted as unused.
    assert rows(holding, after=mark) == [closed(november, expired=90_000, granted=100_000, reference=policy)]
    # The held 10,000 stay granted (from November) on top of December's whole grant.
    assert (stored(holding).held, stored(holding).available) == (10_000, 100_000)
    assert hold_is_open(hold.id)
    ledger.release(hold=hold)
    assert (stored(holding).held, stored(holding).available) == (0, 110_000)
    assert ledger.verify() == []


# -- 6. several periods behind ----------------------------------------------------------------------------------------


def test_accounts_several_periods_behind_are_closed_month_by_month_and_a_rerun_does_nothing():
    zone = "Asia/Kolkata"
    june, july, august, september = (date(2026, m, 1) for m in (6, 7, 8, 9))
    org = build_org(zone, june, rollover_rule="all", rollover_lifetime_periods=2, monthly_tokens=100_000)
    [behind] = org.accounts
    use(behind, 30_000, "june-usage")
    # A second member whose account only opened in August: one period behind.
    late = MemberFactory(organization=org.organization, team=org.team, joined_at=local(zone, 2026, 1, 1))
    late_account = open_account(late, at=local(zone, 2026, 8, 10))

    at = local(zone, 2026, 9, 5)
    assert due_pks(at) == [org.organization.pk]
    report = close(at)
    assert report.periods == [(org.organization.slug, june, 1), (org.organization.slug, july, 1),
                              (org.organization.slug, august, 2)]
    assert (report.organizations, report.accounts_closed) == (1, 4)

    policy = f"policy:{org.policy.pk}"
    assert rows(behind) == sorted([
        (june, Kind.GRANT, 100_000, policy),
        (june, Kind.HOLD, 30_000, ""),
        (june, Kind.USAGE, 30_000, ""),
        closed(june, rolled={august: 70_000}, granted=100_000, reference=policy),  # lives two periods: July and August
        # June's tranche carries on; July's unused grant rolls over
        closed(july, rolled={august: 70_000, september: 100_000}, granted=100_000, reference=policy),
        # June's tranche reached the end of its life
        closed(august, rollover_expired=70_000, rolled={september: 100_000, date(2026, 10, 1): 100_000}, granted=100_000,
               reference=policy),
    ])
    assert [g[0] for g in grants(behind)] == [june, july, august, september]  # one grant per month
    assert stored(behind).period_start == september and stored(behind).available == 300_000
    assert [g[0] for g in grants(late_account)] == [august, september]
    assert stored(late_account).period_start == september

    # Run again (at the same moment and later in the month): nothing is due, nothing changes.
    snapshot = ledger_snapshot()
    assert due_pks(at) == []
    for again in (at, local(zone, 2026, 9, 30, 23)):
        assert close(again).accounts_closed == 0
        assert closing.close_organization_periods(organization=org.organization, at=again) == []
    assert ledger_snapshot() == snapshot

    # September closes alone a month later. Usage eats the oldest tokens first: all of July's
    # tranche (which ends with September) and half of August's, so nothing is left to expire.
    use(behind, 150_000, "september-usage")
    mark = last_entry_id()
    close(local(zone, 2026, 10, 1))
    october, november = date(2026, 10, 1), date(2026, 11, 1)
    assert rows(behind, after=mark) == [
        # what is left of August's tranche, and September's grant, unused
        closed(september, rolled={october: 50_000, november: 100_000}, granted=100_000, reference=policy),
    ]
    assert stored(behind).available == 250_000


# -- 7. idempotency and one organization only -------------------------------------------------------------------------


def test_closing_twice_or_one_organization_only_leaves_the_ledger_identical_and_other_organizations_alone():
    october = date(2026, 10, 1)
    first = build_org("Europe/Berlin", october, slug="first", members=3, rollover_rule="capped_percent",
                      rollover_cap_percent=10)
    second = build_org("America/New_York", october, slug="second", members=2)
    use(first.accounts[0], 250_000, "first-usage")
    use(second.accounts[0], 400_000, "second-usage")
    at = utc(2026, 12, 1, 12)  # both have October and November to close

    untouched_second = ledger_snapshot(second.organization)
    report = close(at, organization=first.organization)
    assert report.periods == [("first", october, 3), ("first", date(2026, 11, 1), 3)]
    assert ledger_snapshot(second.organization) == untouched_second
    assert due_pks(at) == [second.organization.pk]
    once = ledger_snapshot()

    # The same close again, for the organization or for everybody due: nothing more for `first`.
    assert close(at, organization=first.organization).accounts_closed == 0
    assert ledger_snapshot() == once
    report = close(at)
    assert report.periods == [("second", october, 2), ("second", date(2026, 11, 1), 2)]
    assert ledger_snapshot(first.organization) == ledger_snapshot_of(once, first.organization)
    twice = ledger_snapshot()
    assert close(at).accounts_closed == 0
    assert close(at, organization=second.organization).accounts_closed == 0
    assert ledger_snapshot() == twice
    for account in first.accounts + second.accounts:
        assert stored(account).period_start == date(2026, 12, 1)
        assert len(grants(account)) == 3  # October, November, December: once each


def ledger_snapshot_of(snapshot: dict, organization) -> dict:
    accounts = set(Account.all_objects.filter(organization=organization).values_list("id", flat=True))
    return {"entries": [row for row in snapshot["entries"] if row[1] in accounts],
            "accounts": [row for row in snapshot["accounts"] if row[0] in accounts]}


def test_close_period_closes_each_account_once_across_chunks():
    november = date(2026, 11, 1)
    org = build_org("UTC", november, members=5)
    assert closing.close_period(organization=org.organization, period=november, chunk_size=2) == 5
    assert closing.close_period(organization=org.organization, period=november, chunk_size=2) == 0
    assert ledger.verify() == []
    assert all(len(grants(account)) == 2 for account in org.accounts)


# -- 8. the command ---------------------------------------------------------------------------------------------------


def run_command(*args) -> list[str]:
    out = StringIO()
    call_command("close_periods", *args, stdout=out)
    return out.getvalue().splitlines()


def test_the_command_closes_what_is_due_at_the_given_moment_for_one_or_all_organizations():
    october = date(2026, 10, 1)
    east = build_org("Pacific/Kiritimati", october, slug="east", members=2)
    west = build_org("Etc/GMT+12", date(2026, 11, 1), slug="west", members=1)

    # A second before Kiritimati's midnight: only its October, which ended a month ago.
    assert run_command("--at", "2026-11-30T09:59:59+00:00") == [
        "east: closed the period of October 2026 on 2 accounts",  # October ended long ago there
        "closed 2 account periods in 1 organizations",
    ]
    # Another offset, same instant as Kiritimati's midnight; --org limits it to one organization.
    assert run_command("--org", "west", "--at", "2026-12-01T00:00:00+14:00") == [
        "closed 0 account periods in 1 organizations"]
    assert run_command("--at", "2026-12-01T00:00:00+14:00") == [
        "east: closed the period of November 2026 on 2 accounts",
        "closed 2 account periods in 1 organizations",
    ]
    assert run_command("--at", "2026-12-01T12:00:00Z", "--org", "west") == [
        "west: closed the period of November 2026 on 1 accounts",
        "closed 1 account periods in 1 organizations",
    ]
    assert run_command("--at", "2026-12-01T12:00:00Z") == ["closed 0 account periods in 0 organizations"]
    assert [stored(a).period_start for a in east.accounts + west.accounts] == [date(2026, 12, 1)] * 3
    assert ledger.verify() == []


@pytest.mark.parametrize("args, message", [
    (("--at", "nonsense"), "--at needs an ISO 8601 time with its offset, not 'nonsense'"),
    (("--at", "2026-12-01T00:00:00"), "--at needs an ISO 8601 time with its offset, not '2026-12-01T00:00:00'"),
    (("--at", "2026-12-01"), "--at needs an ISO 8601 time with its offset, not '2026-12-01'"),
    (("--at", "2026-13-45T00:00:00+00:00"), "--at needs an ISO 8601 time with its offset"),
    (("--org", "no-such-org"), "no organization with slug 'no-such-org'"),
    (("--org", "no-such-org", "--at", "2026-12-01T00:00:00+00:00"), "no organization with slug 'no-such-org'"),
])
def test_the_command_refuses_a_bad_moment_or_an_unknown_organization_and_closes_nothing(args, message):
    org = build_org("UTC", date(2026, 10, 1))
    before = ledger_snapshot()
    with pytest.raises(CommandError) as refused:
        run_command(*args)
    assert message in str(refused.value)
    assert ledger_snapshot() == before
    assert stored(org.accounts[0]).period_start == date(2026, 10, 1)


# -- 9. the embedded scheduler ----------------------------------------------------------------------------------------


class Recorder(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class OnePass(threading.Event):
    """A stop event that is set as soon as the scheduler waits for its next tick (after one pass)."""

    passes = 0

    def wait(self, timeout=None):
        self.passes += 1
        self.set()
        return True


@pytest.mark.django_db(transaction=True)  # the scheduler thread has its own connection: the rows must be committed
def test_the_embedded_scheduler_runs_every_due_task_once_in_a_thread_and_stops(settings):
    from portal import scheduler

    # Broken entries first (an unknown task, a task that raises): logged, and the others still run.
    from portal.celery import app

    @app.task(name="tests.closing.boom")
    def boom():
        raise RuntimeError("boom")

    settings.CELERY_BEAT_SCHEDULE = {"unknown": {"task": "allowances.no_such_task", "schedule": 60.0},
                                     "raises": {"task": "tests.closing.boom", "schedule": 60.0},
                                     **settings.CELERY_BEAT_SCHEDULE}
    now = timezone.now()
    current = period_start_for(SimpleNamespace(time_zone="UTC"), now)
    previous = date(current.year - (current.month == 1), (current.month - 2) % 12 + 1, 1)
    org = build_org("UTC", previous)
    [account] = org.accounts
    with scope(org.organization):
        stale = ledger.authorize(account=account, tokens=3_000, idempotency_key="stale", ttl=timedelta(seconds=-1))
        fresh = ledger.authorize(account=account, tokens=2_000, idempotency_key="fresh")

    stop = OnePass()

    def run():
        try:
            scheduler.run_forever(stop)
        finally:
            connections.close_all()

    failures = Recorder(level=logging.ERROR)
    logging.getLogger("portal.scheduler").addHandler(failures)
    try:
        thread = threading.Thread(target=run, name="test-scheduler", daemon=True)
        thread.start()
        thread.join(timeout=120)
    finally:
        logging.getLogger("portal.scheduler").removeHandler(failures)
    assert not thread.is_alive() and stop.passes == 1

    assert not hold_is_open(stale.id) and hold_is_open(fresh.id)  # the sweeper ran
    after = stored(account)
    assert after.period_start == current  # the hourly close ran
    assert grants(account)[-1] == (current, 1_000_000, f"close:{periods_after(current, -1)}")
    # The fresh hold stays held across the boundary (still backed by last period's tokens).
    assert (after.held, after.available) == (2_000, 1_000_000)
    assert ledger.verify() == []
    assert [record.getMessage() for record in failures.records] == [
        "scheduled task allowances.no_such_task failed", "scheduled task tests.closing.boom failed"]
