"""Reads for allowances: which policy governs a member, balances, dashboards, history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import IntegerField, OuterRef, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.shortcuts import get_object_or_404
from django.utils import timezone

from allowances.consumption import BASE_KINDS, OVERAGE_KINDS, billable_part_sql, kinds_sql, unused_overage
from allowances.models import (
    Account,
    AllowancePolicy,
    CatalogModel,
    Grant,
    GrantBatch,
    LedgerEntry,
    ModelAlias,
    PolicyAssignment,
    UsageAlert,
)
from allowances.periods import period_bounds, period_start_for, periods_after
from portal.models import Member, Organization


def assignment_in_force(*, member: Member, at: datetime | None = None) -> PolicyAssignment | None:
    """The member's own assignment wins; otherwise their team's; the latest one in force at `at`."""
    at = at or timezone.now()
    in_force = PolicyAssignment.objects.filter(effective_from__lte=at).select_related("policy").order_by(
        "-effective_from", "-id")
    own = in_force.filter(member=member).first()
    if own is not None or not member.team_id:
        return own
    return in_force.filter(team_id=member.team_id).first()


def assignment_in_force_sql(*, organization: str, member: str, team: str, at: str) -> str:
    """`assignment_in_force` in SQL, for the set-based period close: a subquery of the policy id
    in force for the member `member` of team `team` (NULL: none) at `at`, all SQL expressions
    (held equal by tests/allowances/test_rules_in_sql.py)."""
    return f"""SELECT pa.policy_id FROM {PolicyAssignment._meta.db_table} pa
        WHERE pa.organization_id = {organization} AND pa.effective_from <= {at}
          AND (pa.member_id = {member} OR ({team} IS NOT NULL AND pa.member_id IS NULL AND pa.team_id = {team}))
        ORDER BY (pa.member_id IS NOT NULL) DESC, pa.effective_from DESC, pa.id DESC LIMIT 1"""


def members_governed_by(*, policy: AllowancePolicy, at: datetime) -> QuerySet[Member]:
    """The active members `policy` governs at `at`, by the rule of assignment_in_force, in one query."""
    in_force = PolicyAssignment.objects.filter(effective_from__lte=at).order_by("-effective_from", "-id")
    own = Subquery(in_force.filter(member=OuterRef("pk")).values("policy_id")[:1])
    team = Subquery(in_force.filter(team=OuterRef("team_id")).values("policy_id")[:1])
    return (Member.objects.filter(organization=policy.organization, is_active=True).select_related("organization")
            .annotate(policy_in_force=Coalesce(own, team)).filter(policy_in_force=policy.pk))


def policy_in_force(*, member: Member, at: datetime | None = None) -> AllowancePolicy | None:
    assignment = assignment_in_force(member=member, at=at)
    return assignment.policy if assignment is not None else None


def _used_in_period(period: date):
    return Coalesce(Subquery(
        LedgerEntry.objects.filter(account=OuterRef("account"), period_start=period).order_by()
        .values("account").annotate(total=Sum("used_delta")).values("total"),
        output_field=IntegerField(),
    ), Value(0))


def member_balances(*, organization: Organization, search: str = "", team_id: int | None = None) -> QuerySet[Member]:
    """Members with their account and the tokens they used in the open period (HR's overview)."""
    period = period_start_for(organization)
    members = (Member.objects.filter(organization=organization, is_active=True)
               .select_related("user", "team", "account").annotate(used_this_period=_used_in_period(period)))
    search = search.replace("\x00", "").strip()  # PostgreSQL refuses NUL characters: a 500 for ?q=%00
    if search:
        members = members.filter(user__email__icontains=search)
    if team_id:
        members = members.filter(team_id=team_id)
    return members.order_by("user__email")


@dataclass
class Dashboard:
    account: Account
    policy: AllowancePolicy | None
    period_begin: datetime
    period_end: datetime
    used_this_period: int
    days_left: int
    burn_per_day: int
    run_out_on: date | None  # None: not before the period ends at this pace
    daily: list[tuple[date, int]]
    by_model: list[tuple[str, int]]
    last_close: list = ()  # the ledger entries of the last period's close: what rolled over, expired, lapsed
    closed_period: date | None = None
    last_close_billed: int = 0  # approved overage used in the closed period (billed to the organization)
    alerts: list = ()  # 80% / 100% alerts of the open period

    @property
    def last_day(self) -> date:
        return (self.period_end - timedelta(days=1)).date()


def dashboard(*, account: Account, at: datetime | None = None) -> Dashboard:
    at = at or timezone.now()
    organization = account.organization
    zone = ZoneInfo(organization.time_zone)
    period = period_start_for(organization, at)
    begin, end = period_bounds(organization, period)
    usage = LedgerEntry.objects.filter(account=account, period_start=period).exclude(used_delta=0)
    used = usage.aggregate(total=Sum("used_delta"))["total"] or 0
    per_day = dict(usage.annotate(day=TruncDate("created_at", tzinfo=zone)).values("day").annotate(
        total=Sum("used_delta")).values_list("day", "total"))
    today = at.astimezone(zone).date()
    daily, day = [], begin.date()
    while day < end.date():
        daily.append((day, per_day.get(day, 0) if day <= today else 0))
        day += timedelta(days=1)
    by_model = list(usage.values("model").annotate(total=Sum("used_delta")).order_by("-total").values_list("model", "total"))
    elapsed_days = max((at - begin).total_seconds() / 86400, 1 / 24)
    burn = int(used / elapsed_days)
    available = account.available
    run_out = None
    if available <= 0:
        run_out = today
    elif burn > 0:
        run_out_at = at + timedelta(days=available / burn)
        run_out = run_out_at.astimezone(zone).date() if run_out_at < end else None
    closed_period = periods_after(period, -1)
    last_close = list(LedgerEntry.objects.filter(account=account, idempotency_key__startswith=f"close:{closed_period}:")
                      .order_by("id"))
    billed = sum(row.tokens for row in billable_overage(organization=organization, period=closed_period,
                                                        member=account.member))
    alerts = list(UsageAlert.objects.filter(account=account, period_start=account.period_start).order_by("-threshold"))
    return Dashboard(
        last_close=last_close, closed_period=closed_period, alerts=alerts, last_close_billed=billed,
        account=account, policy=policy_in_force(member=account.member, at=at), period_begin=begin, period_end=end,
        used_this_period=used, days_left=max((end.date() - today).days, 0), burn_per_day=burn, run_out_on=run_out,
        daily=daily, by_model=[(model or "unattributed", total) for model, total in by_model],
    )


def ledger_history(*, account: Account, kind: str = "", since: date | None = None,
                   until: date | None = None) -> QuerySet[LedgerEntry]:
    entries = LedgerEntry.objects.filter(account=account).select_related("actor")
    if kind:
        entries = entries.filter(kind=kind)
    else:
        # Holds and their releases net to nothing once a request ends; shown when asked for by kind.
        entries = entries.exclude(kind__in=[LedgerEntry.Kind.HOLD, LedgerEntry.Kind.RELEASE])
    zone = ZoneInfo(account.organization.time_zone)
    if since:
        entries = entries.filter(created_at__gte=datetime.combine(since, datetime.min.time(), tzinfo=zone))
    if until:
        entries = entries.filter(created_at__lt=datetime.combine(until + timedelta(days=1), datetime.min.time(), tzinfo=zone))
    return entries.order_by("-created_at", "-id")


def ledger_entries(*, organization: Organization, member_id: int | None = None) -> QuerySet[LedgerEntry]:
    entries = LedgerEntry.objects.filter(organization=organization).select_related("account__member__user")
    if member_id:
        entries = entries.filter(account__member_id=member_id)
    return entries.order_by("-created_at", "-id")


def account_list(*, organization: Organization) -> QuerySet[Account]:
    return Account.objects.filter(organization=organization).select_related("member__user").order_by("member__user__email")


def policy_list(*, organization: Organization) -> QuerySet[AllowancePolicy]:
    return AllowancePolicy.objects.filter(organization=organization).order_by("name")


def policy_get(*, organization: Organization, policy_id: int) -> AllowancePolicy:
    return get_object_or_404(AllowancePolicy.objects.filter(organization=organization), pk=policy_id)


def assignment_list(*, organization: Organization) -> QuerySet[PolicyAssignment]:
    return PolicyAssignment.objects.filter(organization=organization).select_related("policy", "team", "member__user")


def grant_list(*, organization: Organization) -> QuerySet[Grant]:
    return Grant.objects.filter(organization=organization).select_related("member__user", "team", "created_by", "batch")


def grant_get(*, organization: Organization, grant_id: int) -> Grant:
    return get_object_or_404(Grant.objects.filter(organization=organization), pk=grant_id)


def grant_batch_get(*, organization: Organization, grant_batch_id: int) -> GrantBatch:
    return get_object_or_404(GrantBatch.objects.filter(organization=organization), pk=grant_batch_id)


def catalog(*, organization: Organization, active_only: bool = False) -> QuerySet[CatalogModel]:
    models = CatalogModel.objects.filter(organization=organization).select_related("connection", "economy_counterpart")
    return models.filter(is_active=True) if active_only else models.order_by("display_name")


def model_aliases(*, organization: Organization) -> QuerySet[ModelAlias]:
    return ModelAlias.objects.filter(organization=organization).select_related("catalog_model").order_by("alias")


def model_alias_get(*, organization: Organization, model_alias_id: int) -> ModelAlias:
    return get_object_or_404(ModelAlias.objects.filter(organization=organization).select_related("catalog_model"),
                             pk=model_alias_id)


def catalog_model_get(*, organization: Organization, catalog_model_id: int) -> CatalogModel:
    return get_object_or_404(CatalogModel.objects.filter(organization=organization), pk=catalog_model_id)


# -- consumed billable overage (what billing invoices) ---------------------------------------------


@dataclass(frozen=True)
class BillableUsage:
    member_id: int
    email: str
    team_id: int | None
    team: str
    model: str
    tokens: int


_ENTRY, _ACCOUNT = LedgerEntry._meta.db_table, Account._meta.db_table
# allowances.consumption's rule over the ledger: the accounts with overage in the period, what each
# carried in, was granted as base and as overage, and the billable part of each usage entry in the
# order recorded (ids are in the order entries were appended).
_BILLABLE = f"""
WITH with_overage AS (
    SELECT DISTINCT e.account_id FROM {_ENTRY} e
    WHERE e.organization_id = %(org)s AND e.period_start = %(period)s AND e.kind IN ({kinds_sql(OVERAGE_KINDS)})),
totals AS (
    SELECT a.id AS account_id, a.member_id,
           a.held - COALESCE(SUM(e.held_delta), 0) AS carried,
           COALESCE(SUM(e.granted_delta) FILTER (WHERE e.period_start = %(period)s
                                                   AND e.kind IN ({kinds_sql(BASE_KINDS)})), 0) AS base,
           COALESCE(SUM(e.granted_delta) FILTER (WHERE e.period_start = %(period)s
                                                   AND e.kind IN ({kinds_sql(OVERAGE_KINDS)})), 0) AS overage
    FROM {_ACCOUNT} a JOIN with_overage w ON w.account_id = a.id
    LEFT JOIN {_ENTRY} e ON e.account_id = a.id AND e.period_start >= %(period)s
    WHERE a.organization_id = %(org)s AND (%(member)s::bigint IS NULL OR a.member_id = %(member)s)
    GROUP BY a.id),
usage AS (
    SELECT e.account_id, e.model, e.used_delta AS tokens,
           SUM(e.used_delta) OVER (PARTITION BY e.account_id ORDER BY e.id) AS through
    FROM {_ENTRY} e JOIN totals t ON t.account_id = e.account_id
    WHERE e.period_start = %(period)s AND e.used_delta <> 0)
SELECT t.member_id, u.model,
       SUM({billable_part_sql(through="u.through", tokens="u.tokens", funds="t.carried + t.base",
                              overage="t.overage")}) AS billable
FROM usage u JOIN totals t ON t.account_id = u.account_id
GROUP BY t.member_id, u.model
"""


def billable_overage(*, organization: Organization, period: date, member: Member | None = None) -> list[BillableUsage]:
    """The consumed billable overage tokens of a period, per member (with the team they are in now:
    a settlement records the team it bills) and model, by allowances.consumption's rule. A period
    still open answers what is billable so far."""
    with connection.cursor() as cursor:
        cursor.execute(_BILLABLE, {"org": organization.pk, "period": period,
                                   "member": member.pk if member is not None else None})
        rows = [(member_id, model, int(tokens)) for member_id, model, tokens in cursor.fetchall() if tokens]
    members = Member.objects.filter(organization=organization).select_related("user", "team").in_bulk(
        {member_id for member_id, _model, _tokens in rows})
    return sorted((BillableUsage(member_id=member_id, email=members[member_id].user.email,
                                 team_id=members[member_id].team_id,
                                 team=members[member_id].team.name if members[member_id].team else "",
                                 model=model, tokens=tokens) for member_id, model, tokens in rows),
                  key=lambda row: (row.team, row.email, row.model))



# -- transfers -----------------------------------------------------------------------------------


def transferable(*, account: Account) -> int:
    """What the account may give now: its available balance beyond the overage it still holds
    (a period's overage is used last, so what is left is overage first: allowances.consumption)."""
    overage = LedgerEntry.objects.filter(account=account, period_start=account.period_start,
                                         kind__in=OVERAGE_KINDS).aggregate(total=Sum("granted_delta"))["total"] or 0
    available = account.available
    return max(available, 0) - unused_overage(available=available, overage=overage)


def transfer_rules(*, organization: Organization):
    from allowances.models import TransferSettings

    return (TransferSettings.objects.filter(organization=organization).first()
            or TransferSettings(organization=organization))


def transfer_receivers(*, member: Member) -> QuerySet[Member]:
    """Whom `member` may give to under the organization's rules."""
    rules = transfer_rules(organization=member.organization)
    others = Member.objects.filter(organization=member.organization, is_active=True).exclude(pk=member.pk)
    if rules.same_team_only:
        others = others.filter(team_id=member.team_id) if member.team_id else others.none()
    return others.select_related("user").order_by("user__email")


def transfers_of(*, member: Member, period: date | None = None) -> dict:
    """A member's transfers (of one period, if given): {"given": [...], "received": [...], totals}."""
    from allowances.models import Transfer

    transfers = Transfer.objects.filter(organization=member.organization).select_related("giver__user",
                                                                                       "receiver__user")
    if period is not None:
        transfers = transfers.filter(period_start=period)
    given, received = list(transfers.filter(giver=member)), list(transfers.filter(receiver=member))
    return {"given": given, "received": received, "given_tokens": sum(t.tokens for t in given),
            "received_tokens": sum(t.tokens for t in received)}


def transfer_report(*, organization: Organization, period: date) -> dict:
    """HR's report of a period's transfers: every transfer, and the totals by team and member."""
    from allowances.models import Transfer

    transfers = list(Transfer.objects.filter(organization=organization, period_start=period).select_related(
        "giver__user", "giver__team", "receiver__user", "receiver__team").order_by("-created_at", "-id"))
    by_member: dict[int, dict] = {}
    for transfer in transfers:
        for member, side in ((transfer.giver, "given"), (transfer.receiver, "received")):
            row = by_member.setdefault(member.pk, {"member": member, "given": 0, "received": 0})
            row[side] += transfer.tokens
    return {"transfers": transfers, "tokens": sum(t.tokens for t in transfers),
            "members": sorted(by_member.values(), key=lambda row: row["member"].user.email)}
