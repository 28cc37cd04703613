"""The set-based close books, entry for entry, what the close's rules say for each account.

Two organizations are built alike (same teams, policies, members) and live the same random
months (grants, bonuses, approved overage, usage beyond the balance, open holds, policy changes,
overage requests left pending); one is closed account by account by a reference model of the
rules written plainly in Python here (`close_by_reference`, on the Python definitions of the
policy in force, the rollover rule, the overage that lapses and the month arithmetic), the other
by `closing_sql.close_chunk`. After every month the two ledgers must be the same entry for entry,
the same requests must have lapsed, and both ledgers must verify.
"""

import random
from datetime import date, timedelta

import pytest
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from allowances import ledger
from allowances.closing_sql import ROLLOVER_REFERENCE, close_chunk
from allowances.consumption import unused_overage
from allowances.models import Account, AllowancePolicy, LedgerEntry, PolicyAssignment
from allowances.periods import next_period_start, period_bounds, periods_after
from allowances.selectors import policy_in_force, transferable
from overage.models import OverageRequest
from portal.models import Member
from portal.tenancy import scope
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory

Kind = LedgerEntry.Kind

pytestmark = pytest.mark.transactional

POLICIES = [
    {"name": "None", "monthly_tokens": 1000, "rollover_rule": "none"},
    {"name": "All", "monthly_tokens": 800, "rollover_rule": "all", "rollover_lifetime_periods": 2},
    {"name": "Capped", "monthly_tokens": 1200, "rollover_rule": "capped_tokens", "rollover_cap_tokens": 300,
     "rollover_lifetime_periods": 3},
    {"name": "Percent", "monthly_tokens": 1500, "rollover_rule": "capped_percent", "rollover_cap_percent": 25},
    {"name": "Overage", "monthly_tokens": 500, "rollover_rule": "all", "overage_rule": "auto_approve",
     "auto_approve_tokens": 200, "auto_approve_requests": 2, "rollover_lifetime_periods": 1},
]
FIRST = date(2026, 1, 1)


def build(label: str, members: int):
    organization = OrganizationFactory(slug=f"close-{label}", name=f"Close {label}", time_zone="Europe/Berlin")
    with scope(organization):
        teams = [TeamFactory(organization=organization, name=f"T{i}") for i in range(3)]
        policies = [AllowancePolicy.objects.create(organization=organization, **spec) for spec in POLICIES]
        begin = period_bounds(organization, FIRST)[0]
        for index, team in enumerate(teams):
            PolicyAssignment.objects.create(organization=organization, policy=policies[index], team=team,
                                            effective_from=begin)
        accounts = []
        for index in range(members):
            team = teams[index % 3] if index % 7 else None  # some members without a team (no policy)
            member = MemberFactory(organization=organization, team=team, is_active=index % 11 != 5)
            if index % 4 == 0:  # a member's own policy wins over the team's
                PolicyAssignment.objects.create(organization=organization, policy=policies[3 + index % 2],
                                                member=member, effective_from=begin)
            accounts.append(Account.objects.create(organization=organization, member=member, period_start=FIRST))
        # Team pools: accounts no policy governs, given to by transfers, drawn on by holds.
        accounts += [Account.objects.create(organization=organization, team=team, period_start=FIRST) for team in teams]
    return organization, policies, accounts


def live_a_month(organization, policies, accounts, period, seed, month):
    """The same random month for each organization (the seed decides, not the organization)."""
    rng = random.Random(seed * 1000 + month)
    with scope(organization):
        if month == 2:  # a policy changes from next month on for team T0's members
            PolicyAssignment.objects.create(organization=organization, policy=policies[2],
                                            team=accounts[1].member.team,
                                            effective_from=period_bounds(organization, next_period_start(period))[0])
        for index, account in enumerate(accounts):
            account.refresh_from_db()
            key = f"{period}:{index}"
            if account.team_id is not None:  # a pool: what members give it, and holds on it (never overage)
                ledger.post(account=account, kind="transfer_in", tokens=rng.randint(0, 900), idempotency_key=f"b:{key}")
                for n in range(rng.randint(0, 3)):
                    # A pool is held only as the part of a member's hold: one whose own base is spent.
                    member_account = next(a for a in accounts if a.member_id is not None)
                    member_account.refresh_from_db()
                    try:
                        hold = ledger.authorize(account=member_account, pool_account_id=account.pk,
                                                tokens=transferable(account=member_account) + rng.randint(1, 400),
                                                idempotency_key=f"h:{key}:{n}", ttl=timedelta(days=90))
                    except ledger.InsufficientTokens:
                        continue
                    if rng.random() < 0.8:
                        ledger.settle(hold=hold, used_tokens=rng.randint(0, 600))
                continue
            if month == 0:
                ledger.post(account=account, kind="grant", tokens=rng.choice([0, 700, 1000]), idempotency_key=f"g:{key}")
            if rng.random() < 0.4:
                ledger.post(account=account, kind="bonus", tokens=rng.randint(1, 900), idempotency_key=f"b:{key}")
            if rng.random() < 0.3:  # an approved overage request's grant
                ledger.post(account=account, kind="overage_grant", tokens=rng.randint(1, 700),
                            idempotency_key=f"overage-request:{key}", reference="overage-request")
            if rng.random() < 0.25 and not OverageRequest.objects.filter(member=account.member, state="pending").exists():
                OverageRequest.objects.create(organization=organization, member=account.member, period_start=period,
                                              tokens=rng.randint(1, 5000), reason="more")
            if rng.random() < 0.2:
                Account.objects.filter(pk=account.pk).update(overdraft_limit=rng.choice([0, 100, 300]))
                account.refresh_from_db()
            for n in range(rng.randint(0, 3)):
                tokens, settle, used = rng.randint(1, 400), rng.random() < 0.8, rng.randint(0, 600)
                try:
                    hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=f"h:{key}:{n}",
                                            ttl=timedelta(days=90))
                except ledger.InsufficientTokens:
                    continue  # refused alike in both organizations
                if settle:  # else the hold stays open across the close
                    ledger.settle(hold=hold, used_tokens=used)  # sometimes beyond the hold
            if rng.random() < 0.15:  # usage recorded beyond the balance (e.g. a late settle)
                tokens = rng.randint(1, 2000)
                ledger.post(account=account, kind="usage", tokens=tokens, used_delta=tokens, idempotency_key=f"u:{key}")


_PARTS = LedgerEntry.PARTS + ("close_rollover_until", "close_rollover_tokens")
# One close entry through the ledger's set of posts (a relation of one row).
_POST_ONE = (f"WITH one (account_id, kind, tokens, period_start, idempotency_key, reason, reference, {', '.join(_PARTS)}) "
             "AS (VALUES (%(account)s::bigint, 'close', %(tokens)s::bigint, %(period)s::date, %(key)s, %(reason)s, "
             "%(reference)s, %(close_overage_billed)s::bigint, %(close_overage_lapsed)s::bigint, %(close_expired)s::bigint, "
             "%(close_rollover_expired)s::bigint, "
             "%(close_rolled_over)s::bigint, %(close_granted)s::bigint, %(close_rollover_until)s::date[], "
             "%(close_rollover_tokens)s::bigint[])), "
             + ledger.post_set_sql("one", order_by="e.account_id", keyed=False, part_columns=_PARTS)
             + " SELECT count(*) FROM posted")


def previous_tranches(account, period) -> dict:
    """The rolled-over tranches the last close left in `period`: {until: tokens}, from its close
    entry, or from rollover_in entries (closes of the old shape)."""
    tranches: dict = {}
    old = LedgerEntry.objects.filter(account=account, period_start=period, kind=Kind.ROLLOVER_IN)
    for reference, tokens in old.values_list("reference", "tokens"):
        until = reference.removeprefix(ROLLOVER_REFERENCE)
        tranches[until] = tranches.get(until, 0) + tokens
    last = LedgerEntry.objects.filter(account=account, period_start=periods_after(period, -1), kind=Kind.CLOSE).first()
    if last is not None:
        for until, tokens in zip(last.close_rollover_until, last.close_rollover_tokens, strict=True):
            tranches[until.isoformat()] = tranches.get(until.isoformat(), 0) + tokens
    return tranches


@transaction.atomic
def close_by_reference(*, account: Account, period) -> bool:
    """One account's close by the rules (see allowances/closing_sql.py): its parts computed here in
    Python, posted as one close entry."""
    account = Account.objects.select_for_update().get(pk=account.pk)
    if account.period_start != period:
        return False
    organization = account.organization
    next_period = next_period_start(period)
    member = Member.objects.select_related("organization").filter(pk=account.member_id).first()  # None: a pool
    opening_at = period_bounds(organization, next_period)[0]
    closing_policy = policy_in_force(member=member, at=opening_at - timedelta(microseconds=1)) if member else None

    entries = LedgerEntry.objects.filter(account=account, period_start=period)
    overage = sum(entries.filter(kind=Kind.OVERAGE_GRANT).values_list("granted_delta", flat=True))
    base_granted = sum(entries.filter(kind__in=(Kind.GRANT, Kind.BONUS, Kind.ADJUSTMENT, Kind.TRANSFER_OUT,
                                                Kind.TRANSFER_IN))
                       .values_list("granted_delta", flat=True))
    base_granted += sum(LedgerEntry.objects.filter(account=account, period_start=periods_after(period, -1),
                                                   kind=Kind.CLOSE).values_list("close_granted", flat=True))
    unused = account.available
    billed = max(-unused, 0)
    unused = max(unused, 0)
    lapsed = unused_overage(available=unused, overage=overage)  # approved overage is used last
    unused -= lapsed
    tranches = previous_tranches(account, period)

    base_unused = min(unused, max(base_granted, 0))
    rest = unused - base_unused
    carried: dict = {}
    rollover_expired = 0
    for until in sorted(tranches, reverse=True):  # the longest-living tranche is the youngest
        tranche_unused = min(rest, tranches[until])
        rest -= tranche_unused
        if until <= period.isoformat():
            rollover_expired += tranche_unused
        else:
            carried[until] = tranche_unused
    base_unused += rest
    rolled = closing_policy.rollover_amount(base_unused) if closing_policy else 0
    expired = base_unused - rolled
    if rolled:
        until = periods_after(period, closing_policy.rollover_lifetime_periods).isoformat()
        carried[until] = carried.get(until, 0) + rolled
    carried = {until: tokens for until, tokens in sorted(carried.items()) if tokens}

    new_policy = policy_in_force(member=member, at=opening_at) if member else None
    granted = new_policy.monthly_tokens if new_policy is not None and member.is_active else 0  # never for a pool
    Account.objects.filter(pk=account.pk, period_start=period).update(period_start=next_period)
    if member is not None:
        OverageRequest.objects.filter(member=member, state="pending", period_start__lte=period).update(
            state="lapsed", decided_at=timezone.now(),
            decision_note=f"Still pending when {period:%B %Y} closed: ask again if you still need tokens this month.")
    if billed or lapsed or expired or rollover_expired or carried or granted:
        ledger.post_set(_POST_ONE, {
            "account": account.pk, "tokens": billed - lapsed - expired - rollover_expired + granted, "period": period,
            "key": f"close:{period}", "reason": f"{period:%B %Y} closed",
            "reference": f"policy:{new_policy.pk}" if granted else "", "close_overage_billed": billed,
            "close_overage_lapsed": lapsed, "close_expired": expired, "close_rollover_expired": rollover_expired,
            "close_rolled_over": sum(carried.values()),
            "close_granted": granted, "close_rollover_until": [date.fromisoformat(until) for until in carried],
            "close_rollover_tokens": list(carried.values())}, organization_id=organization.pk)
    return True


def ledger_of(organization):
    """Entries per account position, in a form that does not depend on ids or the organization."""
    with scope(organization):
        accounts = list(Account.objects.order_by("pk"))
        position = {account.pk: index for index, account in enumerate(accounts)}
        entries = sorted((position[e.account_id], e.kind, e.tokens, e.granted_delta, e.held_delta, e.used_delta,
                          str(e.period_start), e.idempotency_key, e.reason, e.reference.split(":")[0]
                          if e.reference.startswith("policy:") else e.reference,
                          *(getattr(e, part) for part in LedgerEntry.PARTS), e.close_rollover_until,
                          e.close_rollover_tokens)
                         for e in LedgerEntry.objects.exclude(idempotency_key__regex=r"^(g|b|h|u|hold|settle|release):"))
        balances = [(a.period_start, a.granted, a.held, a.used, a.overdraft_limit) for a in accounts]
        requests = sorted((position[r.member.account.pk], str(r.period_start), r.tokens, r.state, r.decision_note)
                          for r in OverageRequest.objects.select_related("member__account"))
    return entries, balances, requests


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_set_based_close_books_what_the_rules_book_for_each_account(seed):
    one, policies_one, accounts_one = build("one", 40)
    two, policies_two, accounts_two = build("two", 40)
    period = FIRST
    for month in range(4):
        live_a_month(one, policies_one, accounts_one, period, seed, month)
        live_a_month(two, policies_two, accounts_two, period, seed, month)
        with scope(one):
            for account in accounts_one:
                assert close_by_reference(account=Account(pk=account.pk, organization_id=one.pk), period=period)
        closed, after = 0, 0
        while True:
            count, after = close_chunk(organization=two, period=period, after=after, limit=7)
            if after is None:
                break
            closed += count
        assert closed == len(accounts_two)
        assert ledger_of(one) == ledger_of(two), f"month {month}"
        assert ledger.verify() == []
        period = next_period_start(period)
    with scope(two):  # the months had what the comparison is about
        closes = LedgerEntry.objects.filter(kind=Kind.CLOSE)
        assert closes.filter(close_overage_lapsed__gt=0).exists()
        assert closes.filter(close_overage_billed__gt=0).exists()
        assert closes.filter(close_expired__gt=0, close_rolled_over__gt=0).exists()
        assert closes.filter(close_rollover_expired__gt=0).exists()
        assert any(len(tranches) > 1 for tranches in closes.values_list("close_rollover_tokens", flat=True))
        assert OverageRequest.objects.filter(state="lapsed").exists()
        assert closes.filter(close_expired__gt=0, account__team__isnull=False).exists()  # pools expired
        # One entry per account per close, none for an account whose close had no part.
        assert not closes.values("account_id", "period_start").annotate(n=Count("id")).filter(n__gt=1).exists()
        assert closes.count() < 4 * len(accounts_two)
        pool_holds = LedgerEntry.objects.filter(kind=Kind.HOLD, account__team__isnull=False)
        assert pool_holds.filter(closed_by__isnull=True).exists()  # pool holds open across closes
        assert LedgerEntry.objects.filter(kind=Kind.USAGE, account__team__isnull=False, used_delta__gt=0).exists()


def test_a_chunk_is_closed_once_and_a_rerun_finds_nothing():
    organization, _policies, accounts = build("once", 10)
    with scope(organization):
        for account in accounts:
            ledger.post(account=account, kind="bonus", tokens=100, idempotency_key=f"b:{account.pk}")
    assert close_chunk(organization=organization, period=FIRST, after=0, limit=100)[0] == len(accounts) == 13  # 3 pools
    before = ledger_of(organization)
    assert close_chunk(organization=organization, period=FIRST, after=0, limit=100) == (0, None)
    assert ledger_of(organization) == before
    assert ledger.verify() == []
