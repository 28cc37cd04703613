"""Daily usage roll-ups by member and model (with the member's team), from the usage records.

A day is a calendar day in the organization's time zone. Rolling a day up again recomputes it
from the records, so the hourly job can keep today and yesterday fresh and a rerun is harmless.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from gateway.models import UsageRecord, UsageRollup
from portal.models import Organization
from portal.tenancy import scope, unscoped


def rollup_day(*, organization: Organization, day: date) -> int:
    """Recompute one day of one organization; returns the number of roll-up rows."""
    zone = ZoneInfo(organization.time_zone)
    begin = datetime.combine(day, time.min, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)
    with scope(organization), transaction.atomic():
        sums = (UsageRecord.objects.filter(organization=organization, occurred_at__gte=begin, occurred_at__lt=end)
                .values("member_id", "member__team__name", "model")
                .annotate(requests=Count("id"), input_tokens=Sum("input_tokens"), output_tokens=Sum("output_tokens"),
                          cached_tokens=Sum("cached_tokens"), charged_tokens=Sum("charged_tokens"), cost=Sum("cost"))
                .order_by())
        rows = [UsageRollup(organization=organization, day=day, member_id=row["member_id"],
                            team_name=row["member__team__name"] or "", model=row["model"], requests=row["requests"],
                            input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                            cached_tokens=row["cached_tokens"], charged_tokens=row["charged_tokens"], cost=row["cost"])
                for row in sums]
        UsageRollup.objects.filter(organization=organization, day=day).delete()
        UsageRollup.objects.bulk_create(rows)
    return len(rows)


def rollup_recent(*, at: datetime | None = None) -> int:
    """Yesterday and today (so far) in every organization's zone."""
    at = at or timezone.now()
    rows = 0
    with unscoped():
        organizations = list(Organization.objects.order_by("pk"))
    for organization in organizations:
        today = at.astimezone(ZoneInfo(organization.time_zone)).date()
        for day in (today - timedelta(days=1), today):
            rows += rollup_day(organization=organization, day=day)
    return rows
