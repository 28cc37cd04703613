"""The monthly calendar: closing every account's period once the organization's local month ended.

Each organization counts its months in its own time zone, so the hourly job closes an
organization as soon as its month is over where it is (UTC+14 first, UTC-12 last). Accounts are
closed in chunks of ids, each chunk by a few set-based statements in one transaction
(allowances/closing_sql.py) that lock its rows and check their period again, so:

- a period is closed once per account whatever runs it: the job twice, two workers at once, or
  a rerun after a worker was killed half way (what was closed stays closed, the rest is done);
- a large organization never holds one long transaction (one chunk at most).

An account that is several periods behind (the job did not run for a while) is closed period by
period, oldest first, so every month gets its own rollover, expiry and grant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime

from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from allowances.closing_sql import close_chunk
from allowances.models import Account
from allowances.periods import period_start_for
from portal.models import Organization
from portal.tenancy import unscoped

log = logging.getLogger(__name__)
CHUNK_SIZE = 1000


@dataclass
class CloseReport:
    organizations: int = 0
    accounts_closed: int = 0
    periods: list = field(default_factory=list)  # (organization slug, period start, accounts closed)


def organizations_due(*, at: datetime | None = None) -> list[Organization]:
    """Organizations with an account whose period ended in the organization's own zone."""
    at = at or timezone.now()
    with unscoped():
        candidates = Organization.objects.filter(pk__in=Account.all_objects.values("organization_id")).order_by("pk")
        return [organization for organization in candidates
                if Account.all_objects.filter(organization=organization,
                                              period_start__lt=period_start_for(organization, at)).exists()]


def close_organization_periods(*, organization: Organization, at: datetime | None = None,
                               chunk_size: int = CHUNK_SIZE) -> list[tuple[date, int]]:
    """Close every period of the organization that ended before `at`; [(period, accounts closed)]."""
    current = period_start_for(organization, at or timezone.now())
    closed = []
    while True:
        oldest = Account.all_objects.filter(organization=organization, period_start__lt=current).aggregate(
            oldest=Min("period_start"))["oldest"]
        if oldest is None:
            return closed
        count = close_period(organization=organization, period=oldest, chunk_size=chunk_size)
        closed.append((oldest, count))
        log.info("closed %s accounts of %s for the period of %s", count, organization.slug, oldest)
        _settle(organization, oldest)


def _settle(organization: Organization, period: date) -> None:
    """The closed period's consumed billable overage goes to Stripe (billing), in a task of its own."""
    from billing import tasks as billing_tasks

    transaction.on_commit(lambda: billing_tasks.settle_period.delay(organization.pk, period.isoformat()))


def close_period(*, organization: Organization, period: date, chunk_size: int = CHUNK_SIZE) -> int:
    """Close `period` on every account of the organization still in it; how many this call closed."""
    closed, after = 0, 0
    while True:
        count, after = close_chunk(organization=organization, period=period, after=after, limit=chunk_size)
        if after is None:
            return closed
        closed += count


def close_due_periods(*, at: datetime | None = None, organization: Organization | None = None,
                      chunk_size: int = CHUNK_SIZE) -> CloseReport:
    """Close what is due now (or at `at`) for one organization or all of them."""
    report = CloseReport()
    for due in ([organization] if organization is not None else organizations_due(at=at)):
        report.organizations += 1
        for period, count in close_organization_periods(organization=due, at=at, chunk_size=chunk_size):
            report.accounts_closed += count
            report.periods.append((due.slug, period, count))
    return report
