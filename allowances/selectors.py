"""Reads for allowances: which policy governs a member, balances, dashboards, history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import Case, Count, F, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum, Value, When
from django.db.models.lookups import GreaterThan
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404
from django.utils import timezone

from allowances.consumption import (OVERAGE_KINDS, base_sql, billable_part_sql, kinds_sql, overage_sql,
                                    unused_overage)
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
from gateway.models import UsageRollup
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


def _policy_in_force(at: datetime):
    """The id of the policy governing the outer member at `at`, by the rule of assignment_in_force."""
    in_force = PolicyAssignment.objects.filter(effective_from__lte=at).order_by("-effective_from", "-id")
    own = Subquery(in_force.filter(member=OuterRef("pk")).values("policy_id")[:1])
    team = Subquery(in_force.filter(team=OuterRef("team_id")).values("policy_id")[:1])
    return Coalesce(own, team)


def members_governed_by(*, policy: AllowancePolicy, at: datetime) -> QuerySet[Member]:
    """The active members `policy` governs at `at`, by the rule of assignment_in_force, in one query."""
    return (Member.objects.filter(organization=policy.organization, is_active=True).select_related("organization")
            .annotate(policy_in_force=_policy_in_force(at)).filter(policy_in_force=policy.pk))


def policy_in_force(*, member: Member, at: datetime | None = None) -> AllowancePolicy | None:
    assignment = assignment_in_force(member=member, at=at)
    return assignment.policy if assignment is not None else None


def _sum_in_period(period: date, field: str):
    return Coalesce(Subquery(
        LedgerEntry.objects.filter(account=OuterRef("account"), period_start=period).order_by()
        .values("account").annotate(total=Sum(field)).values("total"),
        output_field=IntegerField(),
    ), Value(0))


def _parts(parts: dict):
    return sum((sign * F(column) for column, sign in parts.items()), Value(0))


def _granted_in(period: date):
    """What an entry of `period` or the one before adds to the granted tokens of `period`: a close
    entry its closing parts to the period it closes and its opening parts to the next."""
    return Case(
        When(kind=LedgerEntry.Kind.CLOSE, period_start=period, then=_parts(LedgerEntry.CLOSING_PARTS)),
        When(kind=LedgerEntry.Kind.CLOSE, then=_parts(LedgerEntry.OPENING_PARTS)),
        When(period_start=period, then=F("granted_delta")),
        default=Value(0), output_field=IntegerField())


def _granted_in_period(period: date):
    """Per member (OuterRef account): the tokens granted into `period` (see `_granted_in`)."""
    return Coalesce(Subquery(
        LedgerEntry.objects.filter(account=OuterRef("account"), period_start__in=(periods_after(period, -1), period))
        .filter(Q(period_start=period) | Q(kind=LedgerEntry.Kind.CLOSE)).order_by()
        .values("account").annotate(total=Sum(_granted_in(period))).values("total"),
        output_field=IntegerField(),
    ), Value(0))


def granted_in_period(*, account: Account, period: date) -> int:
    """The tokens granted into the account's `period` (less what its close took, once closed)."""
    return (LedgerEntry.objects.filter(account=account, period_start__in=(periods_after(period, -1), period))
            .filter(Q(period_start=period) | Q(kind=LedgerEntry.Kind.CLOSE))
            .aggregate(total=Sum(_granted_in(period)))["total"] or 0)


def close_lines(*, account: Account, period: date) -> list:
    """What the close of `period` booked on the account, line by line (its closing parts): from its
    close entry, or from the entries of a close of the old shape."""
    entries = list(LedgerEntry.objects.filter(account=account, period_start=period).filter(
        Q(kind=LedgerEntry.Kind.CLOSE) | Q(idempotency_key__startswith=f"close:{period}:")).order_by("id"))
    lines = []
    for entry in entries:
        if entry.kind == LedgerEntry.Kind.CLOSE:
            lines += [line for line in entry.close_lines if not line.opening]
        else:
            lines.append(entry)
    return lines


# HR's balances table: the sorts and level filters it offers (query value -> what it orders by).
BALANCE_SORTS = {"email": "user__email", "team": "team__name", "granted": "granted_this_period",
                 "used": "used_this_period", "held": "held_now", "left": "available_now"}
BALANCE_LEVELS = {"low": "Low", "exhausted": "Used up", "ok": "OK", "none": "No policy"}


def member_balances(*, organization: Organization, search: str = "", team_id: int | None = None,
                    level: str = "", sort: str = "email", at: datetime | None = None) -> QuerySet[Member]:
    """Members with what their account was granted and used in the open period, held and left now,
    and the policy in force (HR's overview). `level` is a key of BALANCE_LEVELS; `sort` a key of
    BALANCE_SORTS, "-" first for descending; anything else is ignored."""
    at = at or timezone.now()
    period = period_start_for(organization, at)
    members = (Member.objects.filter(organization=organization, is_active=True)
               .select_related("user", "team", "account")
               .annotate(used_this_period=_sum_in_period(period, "used_delta"),
                         granted_this_period=_granted_in_period(period),
                         held_now=Coalesce(F("account__held"), Value(0)),
                         available_now=Coalesce(F("account__granted") - F("account__used") - F("account__held"), Value(0)),
                         policy_in_force=_policy_in_force(at)))
    search = search.replace("\x00", "").strip()  # PostgreSQL refuses NUL characters: a 500 for ?q=%00
    if search:
        members = members.filter(user__email__icontains=search)
    if team_id:
        members = members.filter(team_id=team_id)
    if level == "none":
        members = members.filter(policy_in_force__isnull=True)
    elif level in BALANCE_LEVELS:
        members = members.filter(balance_level_filter(level, available=F("available_now"),
                                                      granted=F("granted_this_period")))
    descending = sort.startswith("-")
    order = BALANCE_SORTS.get(sort.removeprefix("-"), "user__email")
    return members.order_by(f"-{order}" if descending else order, "user__email")


def member_balance_get(*, organization: Organization, member_id: int) -> Member:
    return get_object_or_404(member_balances(organization=organization), pk=member_id)


LOW_FRACTION = 5  # a balance under a fifth of what the period granted is low


def balance_level(*, available: int, granted: int) -> str:
    """"exhausted" (nothing left), "low" (under a fifth of what the period granted) or "ok"; the
    dashboard's gauge and banner, the request-more entry and HR's filters all go by it (the
    filters by `balance_level_filter`, its form in the database, tested against this one)."""
    if available <= 0:
        return "exhausted"
    return "low" if available * LOW_FRACTION < granted else "ok"


def balance_level_filter(level: str, *, available, granted) -> Q:
    """`balance_level` as a filter over the expressions `available` and `granted`."""
    exhausted = Q(GreaterThan(Value(1), available))
    if level == "exhausted":
        return exhausted
    low = Q(GreaterThan(granted, available * LOW_FRACTION))
    return ~exhausted & low if level == "low" else ~exhausted & ~low


@dataclass(frozen=True)
class Gauge:
    """Used, held and left against what was granted this period, in whole per-mille of the gauge."""
    granted: int
    used: int
    held: int
    left: int
    level: str

    @property
    def scale(self) -> int:
        return max(self.granted, self.used + self.held + max(self.left, 0), 1)

    def _permille(self, tokens: int) -> int:
        return max(tokens, 0) * 1000 // self.scale

    @property
    def used_permille(self) -> int:
        return self._permille(self.used)

    @property
    def held_permille(self) -> int:
        return self._permille(self.held)

    @property
    def left_permille(self) -> int:
        return max(1000 - self.used_permille - self.held_permille, 0) if self.left > 0 else 0


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
    granted_this_period: int = 0
    today: date | None = None

    @property
    def gauge(self) -> Gauge:
        available = self.account.available
        return Gauge(granted=self.granted_this_period, used=self.used_this_period, held=self.account.held,
                     left=available, level=balance_level(available=available, granted=self.granted_this_period))

    @property
    def is_new(self) -> bool:
        """Nothing granted and nothing used yet: the dashboard explains what comes next."""
        return not self.granted_this_period and not self.used_this_period and self.account.available <= 0

    @property
    def last_day(self) -> date:
        return (self.period_end - timedelta(days=1)).date()


def dashboard(*, account: Account, at: datetime | None = None) -> Dashboard:
    at = at or timezone.now()
    organization = account.organization
    zone = ZoneInfo(organization.time_zone)
    period = period_start_for(organization, at)
    begin, end = period_bounds(organization, period)
    in_period = LedgerEntry.objects.filter(account=account, period_start=period)
    granted = granted_in_period(account=account, period=period)
    usage = in_period.exclude(used_delta=0)
    used = usage.aggregate(total=Sum("used_delta"))["total"] or 0
    today = at.astimezone(zone).date()
    per_day: dict[date, int] = {}
    for day, _team, _model, tokens in usage_by_day(organization=organization, since=begin.date(), at=at,
                                                   member=account.member):
        per_day[day] = per_day.get(day, 0) + tokens
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
    last_close = close_lines(account=account, period=closed_period)
    billed = sum(row.tokens for row in billable_overage(organization=organization, period=closed_period,
                                                        member=account.member))
    alerts = list(UsageAlert.objects.filter(account=account, period_start=account.period_start).order_by("-threshold"))
    return Dashboard(
        last_close=last_close, closed_period=closed_period, alerts=alerts, last_close_billed=billed,
        granted_this_period=granted, today=today,
        account=account, policy=policy_in_force(member=account.member, at=at), period_begin=begin, period_end=end,
        used_this_period=used, days_left=max((end.date() - today).days, 0), burn_per_day=burn, run_out_on=run_out,
        daily=daily, by_model=[(model or "unattributed", total) for model, total in by_model],
    )


@dataclass
class Overview:
    """An organization's open period for HR and admins: spend against the total allowance, by team
    and by model, and the last days by team. History comes from the hourly roll-ups (days before
    today), today from the ledger, so the figures are live."""
    period_begin: datetime
    period_end: datetime
    today: date
    gauge: Gauge
    members: int
    by_team: list[tuple[str, int]]  # this period
    by_model: list[tuple[str, int]]
    days: list[date]  # the last OVER_TIME_DAYS days, whichever period they were in
    by_day_and_team: dict[str, list[int]]
    attention: list[Member]  # members near or past their limit, fewest tokens left first

    @property
    def last_day(self) -> date:
        return (self.period_end - timedelta(days=1)).date()


NO_TEAM = "No team"


def usage_by_day(*, organization: Organization, since: date, at: datetime | None = None,
                 member: Member | None = None) -> list[tuple[date, str, str, int]]:
    """(day, team, model, tokens) from `since` to today, of the organization or one member:
    roll-ups for the days before today (by when the usage happened), the ledger's usage entries
    for today (the roll-up of today lags by up to an hour)."""
    at = at or timezone.now()
    zone = ZoneInfo(organization.time_zone)
    today = at.astimezone(zone).date()
    today_begins = datetime.combine(today, datetime.min.time(), tzinfo=zone)
    rollups = UsageRollup.objects.filter(organization=organization, day__gte=since, day__lt=today)
    entries = LedgerEntry.objects.filter(organization=organization, created_at__gte=today_begins, created_at__lte=at)
    # What a member drew from their team pool is theirs too, as the usage records (and so the
    # roll-ups) count it.
    drawn_by = Q(account__member__isnull=True) & _drawn_by(member) if member is not None else Q()
    if member is not None:
        rollups, entries = rollups.filter(member=member), entries.filter(Q(account__member=member) | drawn_by)
    history = rollups.values("day", "team_name", "model").annotate(tokens=Sum("charged_tokens")).order_by()
    rows = [(row["day"], row["team_name"] or NO_TEAM, row["model"], row["tokens"]) for row in history]
    live = (entries.exclude(used_delta=0)
            .values(team=Coalesce("account__member__team__name", *_drawer("team__name")), model_id=F("model"))
            .annotate(tokens=Sum("used_delta")).order_by())
    rows += [(today, row["team"] or NO_TEAM, row["model_id"] or "unattributed", row["tokens"]) for row in live]
    return [row for row in rows if row[3]]


# Who drew a pool's usage entry: the member whose hold its pool's hold was part of (a hold taken
# by member email through the authorize API has no key), else the key's owner (a settlement
# after the sweeper released the hold closes none).
_DRAWERS = ("closes_hold__pooled_in__account__member", "api_key__member")


def _drawer(field: str) -> list[str]:
    return [f"{drawer}__{field}" for drawer in _DRAWERS]


def _drawn_by(member: Member) -> Q:
    return Q(closes_hold__pooled_in__account__member=member) | Q(api_key__member=member)


def _totals(pairs) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for name, tokens in pairs:
        totals[name] = totals.get(name, 0) + tokens
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))


OVER_TIME_DAYS = 30


def organization_overview(*, organization: Organization, at: datetime | None = None) -> Overview:
    at = at or timezone.now()
    zone = ZoneInfo(organization.time_zone)
    period = period_start_for(organization, at)
    begin, end = period_bounds(organization, period)
    today = at.astimezone(zone).date()
    first_day = today - timedelta(days=OVER_TIME_DAYS - 1)
    usage = usage_by_day(organization=organization, since=min(first_day, begin.date()), at=at)
    this_period = [row for row in usage if row[0] >= begin.date()]
    balances = member_balances(organization=organization, at=at)
    sums = balances.aggregate(granted=Sum("granted_this_period"), held=Sum("held_now"), left=Sum("available_now"),
                              members=Count("pk"))
    used = sum(tokens for _day, _team, _model, tokens in this_period)
    granted, held, left = sums["granted"] or 0, sums["held"] or 0, sums["left"] or 0
    days = [first_day + timedelta(days=offset) for offset in range(OVER_TIME_DAYS)]
    recent = [row for row in usage if row[0] >= first_day]
    per_day: dict[str, list[int]] = {team: [0] * len(days) for team, _tokens in
                                     _totals((team, tokens) for _day, team, _model, tokens in recent)}
    for day, team, _model, tokens in recent:
        per_day[team][(day - first_day).days] += tokens
    attention = list(balances.filter(granted_this_period__gt=0).filter(
        balance_level_filter("low", available=F("available_now"), granted=F("granted_this_period"))
        | balance_level_filter("exhausted", available=F("available_now"), granted=F("granted_this_period"))
    ).order_by("available_now", "user__email")[:10])
    return Overview(period_begin=begin, period_end=end, today=today, members=sums["members"],
                    gauge=Gauge(granted=granted, used=used, held=held, left=left,
                                level=balance_level(available=left, granted=granted) if granted else "ok"),
                    by_team=_totals((team, tokens) for _day, team, _model, tokens in this_period),
                    by_model=_totals((model, tokens) for _day, _team, model, tokens in this_period),
                    days=days, by_day_and_team=per_day, attention=attention)


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
    """The members' accounts (team pools are not a member's allowance: see team_pool)."""
    return Account.objects.filter(organization=organization, member__isnull=False).select_related(
        "member__user").order_by("member__user__email")


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
    SELECT e.account_id FROM {_ENTRY} e
    WHERE e.organization_id = %(org)s AND e.period_start = %(period)s AND e.kind IN ({kinds_sql(OVERAGE_KINDS)})
    UNION
    SELECT e.account_id FROM {_ENTRY} e
    WHERE e.organization_id = %(org)s AND e.period_start = %(period)s AND e.kind = '{LedgerEntry.Kind.CLOSE}'
      AND e.close_overage_billed > 0),
totals AS (
    SELECT a.id AS account_id, a.member_id,
           a.held - COALESCE(SUM(e.held_delta) FILTER (WHERE e.period_start >= %(period)s), 0) AS carried,
           COALESCE(SUM({base_sql("e", "%(period)s", "%(previous)s")}), 0) AS base,
           COALESCE(SUM({overage_sql("e", "%(period)s")}), 0) AS overage
    FROM {_ACCOUNT} a JOIN with_overage w ON w.account_id = a.id
    LEFT JOIN {_ENTRY} e ON e.account_id = a.id AND e.period_start >= %(previous)s
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
        cursor.execute(_BILLABLE, {"org": organization.pk, "period": period, "previous": periods_after(period, -1),
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


def pool_enabled(*, member: Member) -> bool:
    """Whether `member` may give to and draw on a team pool: pools on and a team to have one."""
    rules = transfer_rules(organization=member.organization)
    return rules.team_pools and member.team_id is not None


def pool_account_id(*, member: Member) -> int | None:
    """The account of the team pool `member` draws on once their own balance is spent: their
    team's, while the organization's team pools are on (else None)."""
    from allowances.models import TransferSettings

    if member.team_id is None or not TransferSettings.objects.filter(
            organization_id=member.organization_id, team_pools=True).exists():
        return None
    return Account.objects.filter(team_id=member.team_id).values_list("id", flat=True).first()


def team_pool(*, member: Member) -> dict | None:
    """The pool of the member's team as its members see it (None: no team): its balance in the
    open period, who gave to it and who drew on it (the usage charged to it, by the key's owner)."""
    from allowances.models import Transfer

    if member.team_id is None:
        return None
    pool = Account.objects.filter(team_id=member.team_id).first()
    board = {"team": member.team, "account": pool, "enabled": pool_enabled(member=member), "given": [],
             "drawn": [], "available": 0, "given_tokens": 0, "drawn_tokens": 0, "mine_drawn": 0}
    if pool is None:
        return board
    board["available"] = max(pool.available, 0)
    board["given"] = list(Transfer.objects.filter(organization=member.organization, pool_team_id=member.team_id,
                                                  period_start=pool.period_start).select_related("giver__user"))
    board["given_tokens"] = sum(t.tokens for t in board["given"])
    drawn = (LedgerEntry.objects.filter(account=pool, period_start=pool.period_start, kind=LedgerEntry.Kind.USAGE)
             .values(drawer=Coalesce(*_drawer("id")), email=Coalesce(*_drawer("user__email")))
             .annotate(tokens=Sum("used_delta")).filter(tokens__gt=0).order_by("-tokens"))
    board["drawn"] = [{"email": row["email"] or "—", "tokens": row["tokens"], "member_id": row["drawer"]}
                      for row in drawn]
    board["drawn_tokens"] = sum(row["tokens"] for row in board["drawn"])
    board["mine_drawn"] = sum(row["tokens"] for row in board["drawn"] if row["member_id"] == member.pk)
    return board


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

    transfers = Transfer.objects.filter(organization=member.organization).select_related(
        "giver__user", "receiver__user", "pool_team")
    if period is not None:
        transfers = transfers.filter(period_start=period)
    given, received = list(transfers.filter(giver=member)), list(transfers.filter(receiver=member))
    return {"given": given, "received": received, "given_tokens": sum(t.tokens for t in given),
            "received_tokens": sum(t.tokens for t in received)}


def transfer_report(*, organization: Organization, period: date) -> dict:
    """HR's report of a period's transfers: every transfer, and the totals by team and member."""
    from allowances.models import Transfer

    transfers = list(Transfer.objects.filter(organization=organization, period_start=period).select_related(
        "giver__user", "giver__team", "receiver__user", "receiver__team", "pool_team").order_by("-created_at", "-id"))
    by_member: dict[int, dict] = {}
    by_pool: dict[int, dict] = {}
    for transfer in transfers:
        for member, side in ((transfer.giver, "given"), (transfer.receiver, "received")):
            if member is not None:
                row = by_member.setdefault(member.pk, {"member": member, "given": 0, "received": 0})
                row[side] += transfer.tokens
        if transfer.pool_team is not None:
            pool = by_pool.setdefault(transfer.pool_team_id, {"team": transfer.pool_team, "received": 0, "givers": set()})
            pool["received"] += transfer.tokens
            pool["givers"].add(transfer.giver.user.email)
    pools = Account.objects.filter(organization=organization, team__isnull=False).select_related("team")
    for pool in pools.annotate(drawn=Sum("entries__used_delta", filter=Q(entries__period_start=period))):
        row = by_pool.setdefault(pool.team_id, {"team": pool.team, "received": 0, "givers": set()})
        row["drawn"] = pool.drawn or 0
        row["available"] = max(pool.available, 0) if pool.period_start == period else None
    return {"transfers": transfers, "tokens": sum(t.tokens for t in transfers),
            "members": sorted(by_member.values(), key=lambda row: row["member"].user.email),
            "pools": sorted(({**row, "givers": sorted(row["givers"])} for row in by_pool.values()),
                            key=lambda row: row["team"].name)}
