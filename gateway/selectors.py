"""Reads for the gateway's pages and the dashboards: provider connections and usage records."""

from __future__ import annotations

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from gateway.models import ProviderConnection, UsageRecord
from portal.models import Member, Organization


def connections_of(*, organization: Organization) -> QuerySet[ProviderConnection]:
    return ProviderConnection.objects.filter(organization=organization)


def connection_get(*, organization: Organization, connection_id: int) -> ProviderConnection:
    return get_object_or_404(connections_of(organization=organization), pk=connection_id)


def usage_records(*, organization: Organization, member: Member | None = None) -> QuerySet[UsageRecord]:
    records = UsageRecord.objects.filter(organization=organization).select_related("member__user", "api_key")
    return records.filter(member=member) if member is not None else records
