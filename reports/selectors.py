"""Reads of the reports: value-per-token insights (from the roll-ups), benefit statements and the
payroll export (from the ledger), reconciliation results. Each takes the organization."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import connection
from django.db.models import Q, QuerySet, Sum

from allowances.models import Account, CatalogModel, LedgerEntry
from allowances.periods import periods_after
from allowances.pricing import MILLION
from gateway.models import SUMMED, UsageRollup, UsageTeamRollup
from portal.models import CURRENCIES, Member, Organization
from reports.models import ReconciliationAlert, ReconciliationLine, ReportSettings, StatementExport

# -- settings ------------------------------------------------------------------------------------


def report_settings(*, organization: Organization) -> ReportSettings:
    """The organization's settings, or the defaults (unsaved) when it never changed them."""
    found = ReportSettings.objects.filter(organization=organization).select_related(
        "economy_model", "valuation_model").first()
    return found or ReportSettings(organization=organization)


# -- money ---------------------------------------------------------------------------------------


def money(amount: Decimal, currency: str) -> Decimal:
    """An amount in the currency's minor units (JPY has none), rounded half up."""
    return Decimal(amount).quantize(Decimal(1).scaleb(-CURRENCIES[currency]), rounding=ROUND_HALF_UP)


def unit_cost(amount: Decimal) -> Decimal:
    """A cost per request: finer than a minor unit (the usage records' own precision)."""
    return Decimal(amount).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def percent(part, whole) -> Decimal:
    """part of whole in percent, to two places (0 of nothing is 0)."""
    if not whole:
        return Decimal("0.00")
    return (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


# -- insights ------------------------------------------------------------------------------------

ECONOMY, PREMIUM = "economy", "premium"


def model_tiers(*, organization: Organization, settings: ReportSettings | None = None) -> dict[str, str]:
    """Catalog model id -> tier: the settings' economy model and every model no dearer than it (by
    input and output price) are economy; the others premium. No economy model: all economy."""
    settings = settings or report_settings(organization=organization)
    economy = settings.economy_model
    tiers = {}
    for model in CatalogModel.objects.filter(organization=organization):
        cheaper = economy is not None and (model.input_price_per_million <= economy.input_price_per_million
                                           and model.output_price_per_million <= economy.output_price_per_million)
        tiers[model.model_id] = ECONOMY if economy is None or cheaper else PREMIUM
    return tiers


@dataclass
class TierFigures:
    tier: str
    requests: int = 0
    ok_requests: int = 0
    cost: Decimal = Decimal(0)
    ok_cost: Decimal = Decimal(0)

    @property
    def cost_per_request(self) -> Decimal:
        return unit_cost(self.cost / self.requests) if self.requests else Decimal("0.000000")

    @property
    def cost_per_successful_request(self) -> Decimal:
        return unit_cost(self.ok_cost / self.ok_requests) if self.ok_requests else Decimal("0.000000")


@dataclass
class Insights:
    currency: str
    since: date
    until: date
    requests: int = 0
    cost: Decimal = Decimal(0)
    tiers: dict[str, TierFigures] = field(default_factory=dict)
    premium_ok_requests: int = 0
    small_premium_requests: int = 0
    small_premium_share: Decimal = Decimal(0)  # percent of the premium tier's successful requests
    routing_savings: Decimal = Decimal(0)
    input_tokens: int = 0
    cached_tokens: int = 0
    cached_share: Decimal = Decimal(0)  # percent of the prompt tokens (input + cached)
    caching_savings: Decimal = Decimal(0)
    refused_requests: int = 0
    error_requests: int = 0
    retried_requests: int = 0
    no_usage_requests: int = 0
    refusal_rate: Decimal = Decimal(0)
    error_rate: Decimal = Decimal(0)
    retry_rate: Decimal = Decimal(0)
    no_usage_rate: Decimal = Decimal(0)
    trend: list[Insights] = field(default_factory=list)  # one per week (Monday to Sunday), oldest first


def _rollups(*, organization: Organization, team: str | None, member: Member | None) -> QuerySet:
    if member is not None:
        return UsageRollup.objects.filter(organization=organization, member=member)
    rows = UsageTeamRollup.objects.filter(organization=organization)
    return rows if team is None else rows.filter(team_name=team)


def _figures(rows, *, organization, currency, since, until, tiers, economy_pricing, catalog) -> Insights:
    """Insights of roll-up sums per model: rows of {model, <SUMMED>}."""
    result = Insights(currency=currency, since=since, until=until)
    routed_cost, economy_cost, caching_saved = Decimal(0), Decimal(0), Decimal(0)
    for row in rows:
        tier = tiers.get(row["model"], ECONOMY)
        figures = result.tiers.setdefault(tier, TierFigures(tier=tier))
        figures.requests += row["requests"]
        figures.ok_requests += row["ok_requests"]
        figures.cost += row["cost"]
        figures.ok_cost += row["ok_cost"]
        result.requests += row["requests"]
        result.cost += row["cost"]
        result.input_tokens += row["input_tokens"]
        result.cached_tokens += row["cached_tokens"]
        for name in ("refused_requests", "error_requests", "retried_requests", "no_usage_requests"):
            setattr(result, name, getattr(result, name) + row[name])
        model = catalog.get(row["model"])
        if model is not None:
            caching_saved += (Decimal(row["cached_tokens"])
                              * (model.input_price_per_million - model.cached_price_per_million) / MILLION)
        if tier == PREMIUM:
            result.premium_ok_requests += row["ok_requests"]
            result.small_premium_requests += row["small_requests"]
            routed_cost += row["small_cost"]
            economy_cost += economy_pricing.cost(row["small_input_tokens"], row["small_output_tokens"],
                                                 row["small_cached_tokens"])
    result.cost = money(result.cost, currency)
    result.small_premium_share = percent(result.small_premium_requests, result.premium_ok_requests)
    result.routing_savings = money(max(routed_cost - economy_cost, Decimal(0)), currency)
    result.cached_share = percent(result.cached_tokens, result.input_tokens + result.cached_tokens)
    result.caching_savings = money(max(caching_saved, Decimal(0)), currency)
    result.refusal_rate = percent(result.refused_requests, result.requests)
    result.error_rate = percent(result.error_requests, result.requests)
    result.retry_rate = percent(result.retried_requests, result.requests)
    result.no_usage_rate = percent(result.no_usage_requests, result.requests)
    return result


def insights(*, organization: Organization, since: date, until: date, team: str | None = None,
             member: Member | None = None) -> Insights:
    """Value-per-token figures of the days since..until (inclusive, in the organization's zone),
    of the organization, one team (by name; "" for members without one) or one member, with a
    trend by week. Read from the roll-ups only (hourly fresh)."""
    settings = report_settings(organization=organization)
    catalog = {model.model_id: model for model in CatalogModel.objects.filter(organization=organization)}
    tiers = model_tiers(organization=organization, settings=settings)
    economy_pricing = settings.economy_model.pricing if settings.economy_model else None
    sums = {name: Sum(name) for name in SUMMED}
    rows = (_rollups(organization=organization, team=team, member=member)
            .filter(day__gte=since, day__lte=until).order_by())
    kwargs = dict(organization=organization, currency=organization.currency, tiers=tiers,
                  economy_pricing=economy_pricing, catalog=catalog)
    by_week = defaultdict(list)
    for row in rows.values("day", "model").annotate(**sums):
        by_week[row["day"] - timedelta(days=row["day"].weekday())].append(row)
    total = _figures(rows.values("model").annotate(**sums), since=since, until=until, **kwargs)
    for week in sorted(by_week):
        total.trend.append(_figures(_merged(by_week[week]), since=max(week, since),
                                    until=min(week + timedelta(days=6), until), **kwargs))
    return total


def _merged(rows) -> list[dict]:
    """Rows of one model summed over days."""
    merged: dict[str, dict] = {}
    for row in rows:
        into = merged.setdefault(row["model"], {"model": row["model"], **{name: 0 for name in SUMMED}})
        for name in SUMMED:
            into[name] += row[name]
    return list(merged.values())


def insight_teams(*, organization: Organization) -> list[str]:
    """The team names the roll-ups know (for the team filter)."""
    return list(UsageTeamRollup.objects.filter(organization=organization).order_by("team_name")
                .values_list("team_name", flat=True).distinct())


# -- benefit statements --------------------------------------------------------------------------

# Ledger entry kind -> the statement line it is shown on; None: it moves no balance (holds and
# their releases only reserve). A new kind is one line here (tests/reports check every kind is).
# Transfers between members (issue 18) are one "transferred" line: in less out.
STATEMENT_LINES = {
    "grant": "granted",
    "bonus": "granted",
    "rollover_in": "rolled_over",
    "rollover_out": "rolled_over",
    "transfer_in": "transferred",
    "transfer_out": "transferred",
    "overage_grant": "overage_approved",
    "overage_lapse": "overage_lapsed",
    "adjustment": "adjusted",
    "usage": "used",
    "expiry": "expired",
    "hold": None,
    "release": None,
    "close": None,  # by its parts (CLOSE_PART_LINES)
}
# A close entry's parts -> their lines: its closing parts on the statement of the period it
# closes, its opening parts on the next one's (signs as LedgerEntry.CLOSING_PARTS / OPENING_PARTS).
CLOSE_PART_LINES = {"close_overage_billed": "overage_approved", "close_overage_lapsed": "overage_lapsed",
                    "close_expired": "expired", "close_rollover_expired": "expired", "close_rolled_over": "rolled_over",
                    "close_granted": "granted"}
# The lines in the order a statement shows them, with their labels.
LINE_LABELS = {
    "granted": "Granted",
    "rolled_over": "Rolled over (in less out)",
    "transferred": "Transferred",
    "overage_approved": "Approved overage",
    "overage_lapsed": "Overage lapsed unused",
    "adjusted": "Adjustments",
    "used": "Used",
    "expired": "Expired",
}
assert set(STATEMENT_LINES.values()) - {None} == set(LINE_LABELS)


@dataclass
class StatementLine:
    line: str
    label: str
    tokens: int  # the line's effect on the balance: what was added (positive) or taken (negative)
    value: Decimal  # at catalog prices, in the organization's currency


@dataclass
class Statement:
    member_id: int
    email: str
    name: str
    employee_id: str
    team: str
    cost_centre: str
    period_start: date
    currency: str
    lines: list[StatementLine]

    def tokens(self, line: str) -> int:
        return next(item.tokens for item in self.lines if item.line == line)

    def value(self, line: str) -> Decimal:
        return next(item.value for item in self.lines if item.line == line)

    @property
    def net_tokens(self) -> int:
        return sum(item.tokens for item in self.lines)

    @property
    def net_value(self) -> Decimal:
        return sum((item.value for item in self.lines), Decimal(0))


def token_value(*, organization: Organization, settings: ReportSettings | None = None) -> Decimal:
    """What one allowance token is worth in the organization's currency: what it buys of the
    valuation model as input (its input price per token over its input multiplier)."""
    settings = settings or report_settings(organization=organization)
    model = settings.valuation_model or (CatalogModel.objects.filter(organization=organization, is_active=True)
                                         .filter(Q(input_price_per_million__gt=0)).order_by("pk").first())
    if model is None:
        return Decimal(0)
    return model.input_price_per_million / model.input_multiplier / MILLION


_SUMS_SQL = (f"SELECT account_id, kind, SUM(granted_delta - used_delta) FROM {LedgerEntry._meta.db_table} "
             "WHERE organization_id = %s AND period_start = %s AND kind <> 'close'{accounts} GROUP BY account_id, kind")
# The parts of the closes that count in the period: its own close's closing parts, the previous
# one's opening parts, each signed.
_PART_SUMS_SQL = (
    "SELECT account_id, " + ", ".join(
        f"SUM(CASE WHEN period_start = %(period)s THEN {LedgerEntry.CLOSING_PARTS.get(part, 0)} "
        f"ELSE {LedgerEntry.OPENING_PARTS.get(part, 0)} END * {part})" for part in CLOSE_PART_LINES)
    + f" FROM {LedgerEntry._meta.db_table} WHERE organization_id = %(org)s AND kind = 'close' "
    "AND period_start IN (%(previous)s, %(period)s){accounts} GROUP BY account_id")


def statements(*, organization: Organization, period_start: date,
               members: list[Member] | None = None) -> list[Statement]:
    """The benefit statements of one period: per member, the sum of their account's ledger entries
    of the period by statement line, each valued at catalog prices. The one definition, for one
    member and for a whole organization (one grouped query over the period's entries)."""
    currency = organization.currency
    rate = token_value(organization=organization)
    accounts = Account.objects.filter(organization=organization, member__isnull=False).select_related(
        "member__user", "member__team")  # a team pool is no member's: its figures are the transfer report's
    if members is not None:
        accounts = accounts.filter(member__in=members)
    accounts = {account.pk: account for account in accounts.order_by("member__user__email")}
    ids = list(accounts)
    if not ids:
        return []
    sums: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(LINE_LABELS, 0))
    only = " AND account_id = ANY(%s)" if members is not None else ""
    with connection.cursor() as cursor:
        cursor.execute(_SUMS_SQL.format(accounts=only),
                       [organization.pk, period_start] + ([ids] if members is not None else []))
        for account_id, kind, tokens in cursor.fetchall():
            line = STATEMENT_LINES[kind]  # a kind missing from the table is a bug: fail loudly
            if line is not None:
                sums[account_id][line] += int(tokens)
        cursor.execute(_PART_SUMS_SQL.format(accounts=" AND account_id = ANY(%(ids)s)" if members is not None else ""),
                       {"org": organization.pk, "period": period_start, "previous": periods_after(period_start, -1),
                        "ids": ids})
        for account_id, *parts in cursor.fetchall():
            for part, tokens in zip(CLOSE_PART_LINES.values(), parts, strict=True):
                sums[account_id][part] += int(tokens)
    external_ids = dict(Member.objects.filter(organization=organization, directory__isnull=False)
                        .exclude(directory__external_id="").values_list("pk", "directory__external_id"))
    result = []
    for account_id, account in accounts.items():
        member = account.member
        team = member.team
        lines = [StatementLine(line=line, label=label, tokens=sums[account_id][line],
                               value=money(sums[account_id][line] * rate, currency))
                 for line, label in LINE_LABELS.items()]
        result.append(Statement(member_id=member.pk, email=member.user.email, name=member.user.get_full_name(),
                                employee_id=external_ids.get(member.pk, ""), team=team.name if team else "",
                                cost_centre=(team.cost_centre or team.name) if team else "",
                                period_start=period_start, currency=currency, lines=lines))
    return result


def statement(*, member: Member, period_start: date) -> Statement | None:
    found = statements(organization=member.organization, period_start=period_start, members=[member])
    return found[0] if found else None


def statement_periods(*, organization: Organization, member: Member | None = None) -> list[date]:
    """The periods that have ledger entries (a member's own, or the organization's), newest first;
    a close entry opens the next period too."""
    entries = LedgerEntry.objects.filter(organization=organization)
    if member is not None:
        entries = entries.filter(account__member=member)
    periods = set(entries.order_by().values_list("period_start", flat=True).distinct())
    periods |= {periods_after(period, 1) for period in entries.filter(kind=LedgerEntry.Kind.CLOSE).order_by()
                .values_list("period_start", flat=True).distinct()}
    return sorted(periods, reverse=True)


def statement_exports(*, organization: Organization) -> QuerySet[StatementExport]:
    return StatementExport.objects.filter(organization=organization).defer("csv_data", "zip_data")


# -- payroll -------------------------------------------------------------------------------------


@dataclass
class PayrollRow:
    employee_id: str  # the directory's external id, else the email
    email: str
    cost_centre: str
    team: str
    tokens_granted: int  # granted and approved overage (what the benefit gave this period)
    tokens_used: int
    value_granted: Decimal
    value_used: Decimal
    currency: str


PAYROLL_GRANTED = ("granted", "overage_approved")


def payroll(*, organization: Organization, period_start: date) -> list[PayrollRow]:
    """One row per member for payroll and the HRIS: the period's statements in payroll's terms."""
    rows = []
    for item in statements(organization=organization, period_start=period_start):
        rows.append(PayrollRow(
            employee_id=item.employee_id or item.email, email=item.email, cost_centre=item.cost_centre,
            team=item.team, tokens_granted=sum(item.tokens(line) for line in PAYROLL_GRANTED),
            tokens_used=-item.tokens("used"), value_granted=sum(item.value(line) for line in PAYROLL_GRANTED),
            value_used=-item.value("used"), currency=item.currency))
    return rows


# -- reconciliation ------------------------------------------------------------------------------


def reconciliation_lines(*, organization: Organization, since: date) -> QuerySet[ReconciliationLine]:
    return (ReconciliationLine.objects.filter(organization=organization, day__gte=since)
            .select_related("connection").order_by("-day", "connection__name", "model"))


def reconciliation_alerts(*, organization: Organization, since: date) -> QuerySet[ReconciliationAlert]:
    return (ReconciliationAlert.objects.filter(organization=organization, day__gte=since)
            .select_related("connection").order_by("-day", "connection__name", "model", "kind"))
