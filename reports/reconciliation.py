"""Reconciliation: each OpenAI and Anthropic connection's own usage report, per UTC day and model,
against what the portal recorded for the connection's catalog models.

The reports are fetched through the gateway's HTTP client (gateway.upstream.session: the same
address rule, no redirects followed), with the connection's secret (the providers' usage APIs
take an admin key: the connection's key must be one for its report to be read).

- OpenAI: GET {base}/organization/usage/completions?bucket_width=1d&group_by=model (its
  input_tokens include the cached ones, the portal's do not).
- Anthropic: GET {base}/organizations/usage_report/messages?bucket_width=1d&group_by[]=model
  (uncached input and cache creation are the portal's input, cache reads its cached input).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal

import aiohttp
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate

from gateway import crypto, upstream
from gateway.models import ProviderConnection, UsageRecord

MAX_PAGES = 20
Kind = ProviderConnection.Kind
RECONCILED_KINDS = (Kind.OPENAI, Kind.ANTHROPIC)


class ReportUnavailable(Exception):
    """The provider's report could not be read; the message says why (shown to admins)."""


@dataclass
class ProviderUsage:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def _count(value) -> int:
    try:
        return _whole(value)
    except ValueError:
        raise ReportUnavailable(f"the report has a count that is not a whole number: {value!r}") from None


def _whole(value) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upstream.MAX_REPORTED_TOKENS:
        raise ValueError(value)
    return value


def _bucket_day(bucket: dict, family: str) -> date:
    try:
        if family == "anthropic":
            return datetime.fromisoformat(str(bucket["starting_at"]).replace("Z", "+00:00")).astimezone(UTC).date()
        return datetime.fromtimestamp(int(bucket["start_time"]), UTC).date()
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ReportUnavailable("the report has a bucket without a valid start") from None


def parse_report(family: str, pages: list[dict]) -> dict[tuple[date, str], ProviderUsage]:
    """(UTC day, provider model) -> usage, from the pages of one report."""
    found: dict[tuple[date, str], ProviderUsage] = {}
    for page in pages:
        buckets = page.get("data") if isinstance(page, dict) else None
        if not isinstance(buckets, list):
            raise ReportUnavailable("the report has no list of buckets")
        for bucket in buckets:
            if not isinstance(bucket, dict) or not isinstance(bucket.get("results"), list):
                raise ReportUnavailable("the report has a bucket without results")
            day = _bucket_day(bucket, family)
            for result in bucket["results"]:
                if not isinstance(result, dict) or not isinstance(result.get("model"), str):
                    raise ReportUnavailable("the report has a result without a model")
                usage = found.setdefault((day, result["model"]), ProviderUsage())
                if family == "anthropic":
                    creation = result.get("cache_creation") or {}
                    created = sum(_count(v) for v in creation.values()) if isinstance(creation, dict) else 0
                    usage.input_tokens += _count(result.get("uncached_input_tokens")) + created
                    usage.cached_tokens += _count(result.get("cache_read_input_tokens"))
                    usage.output_tokens += _count(result.get("output_tokens"))
                    usage.requests += _count(result.get("num_model_requests"))  # not in Anthropic's report
                else:
                    cached = _count(result.get("input_cached_tokens"))
                    usage.input_tokens += max(_count(result.get("input_tokens")) - cached, 0)
                    usage.cached_tokens += cached
                    usage.output_tokens += _count(result.get("output_tokens"))
                    usage.requests += _count(result.get("num_model_requests"))
    return found


def _request(connection: ProviderConnection, start: date, end: date, page: str | None) -> tuple[str, dict, dict]:
    secret = crypto.decrypt(connection.secret_ciphertext) if connection.secret_ciphertext else ""
    begin, finish = (datetime.combine(day, time.min, tzinfo=UTC) for day in (start, end))
    if connection.kind == Kind.ANTHROPIC:
        params = {"starting_at": begin.strftime("%Y-%m-%dT%H:%M:%SZ"), "ending_at": finish.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "bucket_width": "1d", "group_by[]": "model", "limit": "31"}
        url = connection.base_url + "/organizations/usage_report/messages"
        family = "anthropic"
    else:
        params = {"start_time": str(int(begin.timestamp())), "end_time": str(int(finish.timestamp())),
                  "bucket_width": "1d", "group_by": "model", "limit": "31"}
        url = connection.base_url + "/organization/usage/completions"
        family = "openai"
    if page:
        params["page"] = page
    return url, params, upstream.provider_headers(family, secret)


async def _fetch(connection: ProviderConnection, start: date, end: date) -> list[dict]:
    pages, page = [], None
    try:
        for _ in range(MAX_PAGES):
            url, params, headers = _request(connection, start, end, page)
            async with upstream.session().get(
                    url, params=params, headers=headers,
                    timeout=upstream.timeouts(connection.connect_timeout, connection.read_timeout)) as response:
                body = await response.read()
                if response.status != 200:
                    raise ReportUnavailable(f"the provider answered {response.status}: {body[:200].decode(errors='replace')}")
            try:
                data = json.loads(body)
            except ValueError:
                raise ReportUnavailable("the provider's report is not JSON") from None
            pages.append(data)
            page = data.get("next_page") if isinstance(data, dict) and data.get("has_more") else None
            if not page:
                return pages
        raise ReportUnavailable(f"the report has more than {MAX_PAGES} pages")
    except upstream.UpstreamRefused as refused:
        raise ReportUnavailable(refused.client_message) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        raise ReportUnavailable(f"the provider could not be reached: {error or type(error).__name__}") from None
    finally:
        await upstream.close_session()


def provider_usage(connection: ProviderConnection, *, start: date, end: date) -> dict[tuple[date, str], ProviderUsage]:
    """The provider's own report of the UTC days start..end (end excluded)."""
    try:
        pages = asyncio.run(_fetch(connection, start, end))
    except ValueError as error:  # the secret cannot be read
        raise ReportUnavailable(str(error)) from None
    return parse_report("anthropic" if connection.kind == Kind.ANTHROPIC else "openai", pages)


@dataclass
class PortalUsage:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost: Decimal = Decimal(0)
    zero_records: int = 0  # successful requests recorded at zero tokens or zero cost


def portal_usage(*, connection: ProviderConnection, provider_models: dict[str, str], start: date,
                 end: date) -> dict[tuple[date, str], PortalUsage]:
    """(UTC day, provider model) -> what the portal recorded for the connection's catalog models
    (`provider_models`: catalog model id -> the provider's name for it), days start..end (end
    excluded)."""
    rows = (UsageRecord.objects
            .filter(organization_id=connection.organization_id, model__in=list(provider_models),
                    occurred_at__gte=datetime.combine(start, time.min, tzinfo=UTC),
                    occurred_at__lt=datetime.combine(end, time.min, tzinfo=UTC))
            .annotate(utc_day=TruncDate("occurred_at", tzinfo=UTC)).values("utc_day", "model")
            .annotate(requests=Count("id"), input=Sum("input_tokens"), output=Sum("output_tokens"),
                      cached=Sum("cached_tokens"), total_cost=Sum("cost"),
                      zero=Count("id", filter=Q(status=UsageRecord.Status.OK) & (Q(charged_tokens=0) | Q(cost=0))))
            .order_by())
    found: dict[tuple[date, str], PortalUsage] = {}
    for row in rows:
        usage = found.setdefault((row["utc_day"], provider_models[row["model"]]), PortalUsage())
        usage.requests += row["requests"]
        usage.input_tokens += row["input"]
        usage.output_tokens += row["output"]
        usage.cached_tokens += row["cached"]
        usage.cost += row["total_cost"]
        usage.zero_records += row["zero"]
    return found
