"""Reads for the gateway's pages and the dashboards: provider connections and usage records."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

from django.db.models import Count, Min, QuerySet, Sum
from django.shortcuts import get_object_or_404
from django.utils import timezone

from allowances.periods import period_bounds
from gateway.models import BreakerTrip, ProviderConnection, UsageRecord, UsageRollup
from portal.models import Member, Organization


def connections_of(*, organization: Organization) -> QuerySet[ProviderConnection]:
    return ProviderConnection.objects.filter(organization=organization)


def connection_get(*, organization: Organization, connection_id: int) -> ProviderConnection:
    return get_object_or_404(connections_of(organization=organization), pk=connection_id)


def breaker_trip_get(*, organization: Organization, breaker_trip_id: int) -> BreakerTrip:
    return get_object_or_404(BreakerTrip.objects.filter(organization=organization), pk=breaker_trip_id)


def usage_summary(*, organization: Organization, days: int = 30) -> list[dict]:
    """Charged tokens, cost and requests by team and model over the last `days` days, from the roll-ups."""
    since = timezone.localdate(timezone=ZoneInfo(organization.time_zone)) - timedelta(days=days)
    return list(UsageRollup.objects.filter(organization=organization, day__gt=since)
                .values("team_name", "model").annotate(requests=Sum("requests"), charged=Sum("charged_tokens"),
                                                       cost=Sum("cost")).order_by("-charged"))


def usage_records(*, organization: Organization, member: Member | None = None) -> QuerySet[UsageRecord]:
    records = UsageRecord.objects.filter(organization=organization).select_related("member__user", "api_key")
    return records.filter(member=member) if member is not None else records


def routed_to_economy(*, account) -> dict:
    """The member's requests of the open period that budget-aware routing sent to economy models:
    {"requests": n, "since": first one's time, "models": [{"routed_from", "model"}]}."""
    begin, _end = period_bounds(account.organization, account.period_start)
    routed = UsageRecord.objects.filter(member_id=account.member_id, occurred_at__gte=begin).exclude(routed_from="")
    summary = routed.aggregate(requests=Count("id"), since=Min("occurred_at"))
    summary["models"] = list(routed.values("routed_from", "model").distinct().order_by("routed_from", "model"))
    return summary


def uncharged_usage(*, organization: Organization, days: int = 30) -> dict:
    """Requests of the last `days` days whose provider reported more than their hold covered (a
    fault: the excess was not charged): {"requests": n, "tokens": total}."""
    since = timezone.now() - timedelta(days=days)
    return UsageRecord.objects.filter(organization=organization, occurred_at__gte=since, uncharged_tokens__gt=0
                                      ).aggregate(requests=Count("id"), tokens=Sum("uncharged_tokens"))
