"""Shared data of the reports tests: a catalog with an economy and a premium model, and usage
records whose figures the tests compute by hand."""

from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from allowances import services as allowance_services
from gateway.models import UsageRecord
from portal.tenancy import scope


def catalog(organization, *, connection, actor=None, economy=("mini", "0.15", "0.60", "0.075"),
            premium=("big", "2.50", "10.00", "1.25")):
    """(economy model, premium model) in the organization's catalog, with these prices per million."""
    made = []
    for model_id, input_price, output_price, cached_price in (economy, premium):
        with scope(organization):
            made.append(allowance_services.catalog_model_create(
                organization=organization, actor=actor, model_id=model_id, display_name=model_id.title(),
                connection=connection, input_price_per_million=input_price, output_price_per_million=output_price,
                cached_price_per_million=cached_price))
    return tuple(made)


def record(organization, member, at: datetime, *, model, status="ok", input_tokens=0, output_tokens=0,
           cached_tokens=0, cost="0", charged_tokens=None) -> UsageRecord:
    with scope(organization):
        return UsageRecord.objects.create(
            organization=organization, member=member, model=model, endpoint="chat", status=status,
            input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
            charged_tokens=input_tokens + output_tokens + cached_tokens if charged_tokens is None else charged_tokens,
            cost=Decimal(cost), occurred_at=at)


def local(organization, *args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(organization.time_zone))
