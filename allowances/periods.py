"""Periods: calendar months in the organization's time zone."""

from datetime import date, datetime
from datetime import timezone as dt_timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

from django.utils import timezone


def period_start_for(organization, at: datetime | None = None) -> date:
    local = (at or timezone.now()).astimezone(ZoneInfo(organization.time_zone))
    return date(local.year, local.month, 1)


def periods_after(start: date, count: int) -> date:
    """The first day of the period `count` periods after the one that starts on `start` (before it
    when negative)."""
    months = start.month - 1 + count
    return date(start.year + months // 12, months % 12 + 1, 1)


def periods_after_sql(start: str, count: str) -> str:
    """`periods_after` in SQL, for the set-based period close (`start` a first day of a month;
    held equal by tests/allowances/test_rules_in_sql.py)."""
    return f"({start} + make_interval(months => {count}))::date"


def next_period_start(start: date) -> date:
    return periods_after(start, 1)


def period_bounds(organization, start: date) -> tuple[datetime, datetime]:
    """The period's first and first-after-last instants, as aware datetimes in the org's zone."""
    zone = ZoneInfo(organization.time_zone)
    end = next_period_start(start)
    return (datetime(start.year, start.month, 1, tzinfo=zone), datetime(end.year, end.month, 1, tzinfo=zone))


def remaining_fraction(organization, at: datetime | None = None) -> Fraction:
    """Which part of the open period is still ahead at `at` (1 at its first instant)."""
    at = at or timezone.now()
    begin, end = period_bounds(organization, period_start_for(organization, at))
    # In UTC: two datetimes of one zone subtract as wall-clock time, an hour off in a DST month.
    utc = dt_timezone.utc
    at, begin, end = at.astimezone(utc), begin.astimezone(utc), end.astimezone(utc)
    return Fraction(int((end - at).total_seconds()), int((end - begin).total_seconds()))


def prorate(tokens: int, fraction: Fraction) -> int:
    """Whole tokens for a part of a period, rounded down (never grants more than the policy)."""
    return int(tokens * fraction.numerator // fraction.denominator)
