"""Reads for billing: what a period's consumed billable overage costs, by team and model; the
settlements; whether overage approvals are frozen by a settlement past due."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone

from allowances.models import CatalogModel
from allowances.selectors import billable_overage
from billing.models import BillingAccount, Settlement, SettlementLine
from portal.models import CURRENCIES, Organization, Team


def minor_digits(currency: str) -> int:
    return CURRENCIES.get(currency, 2)


def to_minor(amount: Decimal, currency: str) -> int:
    """A Decimal amount in whole minor units (cents), half up: the one place money is rounded."""
    return int(amount.scaleb(minor_digits(currency)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def from_minor(amount_minor: int, currency: str) -> Decimal:
    return Decimal(amount_minor).scaleb(-minor_digits(currency))


@dataclass
class ModelCost:
    model: str
    tokens: int
    amount_minor: int
    priced: bool  # the model has a catalog price (a model no longer in the catalog is not charged)


@dataclass
class TeamCost:
    team_id: int | None
    team: str
    cost_centre: str
    models: list[ModelCost] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(row.tokens for row in self.models)

    @property
    def amount_minor(self) -> int:
        return sum(row.amount_minor for row in self.models)


@dataclass
class PeriodCost:
    period: date
    currency: str
    teams: list[TeamCost]

    @property
    def tokens(self) -> int:
        return sum(team.tokens for team in self.teams)

    @property
    def amount_minor(self) -> int:
        return sum(team.amount_minor for team in self.teams)

    @property
    def unpriced_models(self) -> list[str]:
        return sorted({row.model or "unattributed" for team in self.teams for row in team.models if not row.priced})


def period_cost(*, organization: Organization, period: date) -> PeriodCost:
    """The period's consumed billable overage (allowances.selectors.billable_overage, the one
    rule) priced from the catalog (Pricing.billable_cost), by team and model: each (team, model)
    rounded once to minor units, a team the sum of its rows. A period still open: so far."""
    currency = organization.currency
    pricing = {model.model_id: model.pricing for model in CatalogModel.objects.filter(organization=organization)}
    tokens = defaultdict(int)
    for row in billable_overage(organization=organization, period=period):
        tokens[(row.team_id, row.model)] += row.tokens
    teams = Team.objects.filter(organization=organization).in_bulk({team_id for team_id, _ in tokens if team_id})
    by_team: dict[int | None, TeamCost] = {}
    for (team_id, model), count in sorted(tokens.items(), key=lambda item: (item[0][0] or 0, item[0][1])):
        team = teams.get(team_id)
        cost = by_team.setdefault(team_id, TeamCost(team_id=team_id, team=team.name if team else "No team",
                                                    cost_centre=team.cost_centre if team else ""))
        price = pricing.get(model)
        amount = to_minor(price.billable_cost(count), currency) if price else 0
        cost.models.append(ModelCost(model=model, tokens=count, amount_minor=amount, priced=price is not None))
    return PeriodCost(period=period, currency=currency, teams=sorted(by_team.values(), key=lambda t: t.team.lower()))


def billing_account(*, organization: Organization) -> BillingAccount | None:
    return BillingAccount.objects.filter(organization=organization).first()


def settlement_list(*, organization: Organization) -> QuerySet[Settlement]:
    return Settlement.objects.filter(organization=organization).prefetch_related("lines").order_by("-period_start")


def settlement_get(*, organization: Organization, settlement_id: int) -> Settlement:
    return get_object_or_404(settlement_list(organization=organization), pk=settlement_id)


def settlement_lines(*, settlement: Settlement) -> QuerySet[SettlementLine]:
    return SettlementLine.objects.filter(settlement=settlement).order_by("team_name", "id")


CHARGEBACK_COLUMNS = ["period", "team", "cost_centre", "model", "tokens", "cost", "currency", "stripe_invoice_id"]


def chargeback_rows(*, settlement: Settlement) -> list[list[str]]:
    """Finance's chargeback of a settlement: a row per team and model."""
    rows = []
    for line in settlement_lines(settlement=settlement):
        for item in line.by_model:
            rows.append([f"{settlement.period_start:%Y-%m}", line.team_name, line.cost_centre, item["model"],
                         str(item["tokens"]), str(from_minor(item["amount_minor"], settlement.currency)),
                         settlement.currency, settlement.stripe_invoice_id])
    return rows


def grace_period() -> timedelta:
    return timedelta(days=settings.BILLING_GRACE_DAYS)


def approvals_frozen(*, organization: Organization, at: datetime | None = None) -> str | None:
    """Why new overage approvals are frozen (None: they are not): a settlement past due for longer
    than the grace period (BILLING_GRACE_DAYS), until it is paid."""
    at = at or timezone.now()
    overdue = (Settlement.objects.filter(organization=organization, status=Settlement.Status.PAST_DUE,
                                         past_due_since__lte=at - grace_period())
               .order_by("period_start").first())
    if overdue is None:
        return None
    return (f"Overage approvals are frozen: the payment of {overdue.period_start:%B %Y}'s overage settlement "
            f"failed on {overdue.past_due_since:%Y-%m-%d} and is still due. An owner or admin can update the "
            "payment method and retry it on the billing page; approvals resume once it is paid.")
