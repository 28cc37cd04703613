"""Each rule that SQL expresses for speed equals its one Python definition, on random cases
evaluated by PostgreSQL: the rollover rule (AllowancePolicy), the policy in force
(assignment_in_force), the month arithmetic (periods_after), a key's spend reset
(KeySpend.spent_in), the ledger's moves (MOVES) in its single and its set-based statements, and
which usage is billable overage and what of it lapses (allowances.consumption).
A change to one form and not the other fails here.
"""

import json
import random
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection

from allowances import ledger
from allowances.closing_sql import close_chunk
from allowances.consumption import base_of, billable_usage, overage_of, unused_overage, unused_overage_sql
from allowances.models import Account, AllowancePolicy, KeySpend, LedgerEntry, PolicyAssignment
from allowances.periods import next_period_start, periods_after, periods_after_sql
from allowances.selectors import assignment_in_force, assignment_in_force_sql, billable_overage, members_governed_by
from apikeys import services as api_key_services
from portal.models import Member, Team
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory

pytestmark = pytest.mark.django_db
Kind = LedgerEntry.Kind
UTC = dt_timezone.utc


def rows(sql: str, params) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def random_policy_rules(rng: random.Random) -> dict:
    """The columns of a valid policy (its check constraints hold), edge values included."""
    monthly = rng.choice([0, 1, 99, 100, 101, 12_345, 1_000_000, 10_000_000_000, rng.randint(0, 10**10)])
    rule = rng.choice(AllowancePolicy.Rollover.values)
    spec = {"monthly_tokens": monthly, "rollover_rule": rule, "rollover_cap_tokens": None, "rollover_cap_percent": None}
    if rule == AllowancePolicy.Rollover.CAPPED_TOKENS:
        spec["rollover_cap_tokens"] = rng.choice([1, 7, 1000, rng.randint(1, 10**10)])
    if rule == AllowancePolicy.Rollover.CAPPED_PERCENT:
        spec["rollover_cap_percent"] = rng.choice([1, 3, 33, 50, 99, 100, rng.randint(1, 100)])
    if rng.random() < 0.5:
        spec |= {"overage_rule": AllowancePolicy.Overage.AUTO_APPROVE, "auto_approve_tokens": rng.randint(1, 10**10),
                 "auto_approve_requests": rng.randint(1, 1000)}
    return spec


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sql_rollover_equals_the_policy_method(seed):
    rng = random.Random(seed)
    organization = OrganizationFactory()
    with unscoped():
        policies = AllowancePolicy.all_objects.bulk_create(
            AllowancePolicy(organization=organization, name=f"P{i}", **random_policy_rules(rng)) for i in range(60))
    unused = [-(10**10), -1, 0, 1, 2, 99, 100, 101, 999, 10**10, 2 * 10**10] + [rng.randint(-10**6, 10**11)
                                                                                for _ in range(40)]
    found = rows(f"""
        SELECT p.id, u.unused, {AllowancePolicy.rollover_amount_sql("p", "u.unused")}
        FROM {AllowancePolicy._meta.db_table} p CROSS JOIN unnest(%s::bigint[]) AS u(unused)
        WHERE p.organization_id = %s""", [unused, organization.pk])
    by_id = {policy.pk: policy for policy in policies}
    assert len(found) == len(policies) * len(unused)
    for policy_id, amount, rolled in found:
        policy = by_id[policy_id]
        assert rolled == policy.rollover_amount(amount), (
            policy.rollover_rule, policy.rollover_cap_tokens, policy.rollover_cap_percent, policy.monthly_tokens, amount)


def test_no_policy_rolls_nothing_over_in_sql():
    found = rows(f"""
        SELECT {AllowancePolicy.rollover_amount_sql("p", "500")}
        FROM (SELECT 1) one LEFT JOIN {AllowancePolicy._meta.db_table} p ON false""", [])
    assert found == [(0,)]


def test_the_sql_month_arithmetic_equals_periods_after():
    rng = random.Random(7)
    cases = [(date(2026, 12, 1), 1), (date(2027, 1, 1), -1), (date(2028, 2, 1), 1), (date(2026, 1, 1), 24),
             (date(2026, 11, 1), -23), (date(2026, 5, 1), 0)]
    cases += [(date(rng.randint(1900, 2200), rng.randint(1, 12), 1), rng.randint(-30, 30)) for _ in range(3000)]
    found = rows(f"SELECT {periods_after_sql('t.start', 't.count')} FROM unnest(%s::date[], %s::int[]) "
                 "WITH ORDINALITY AS t(start, count, position) ORDER BY t.position",
                 [[start for start, _ in cases], [count for _, count in cases]])
    assert [row[0] for row in found] == [periods_after(start, count) for start, count in cases]
    assert all(next_period_start(start) == periods_after(start, 1) for start, _ in cases)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_sql_policy_in_force_equals_assignment_in_force_on_random_histories(seed):
    rng = random.Random(seed)
    organization, other = OrganizationFactory(), OrganizationFactory()
    moments = [datetime(2026, month, 1, tzinfo=UTC) + timedelta(hours=hours)
               for month in (1, 2, 3) for hours in (0, 12)]
    with scope(organization):
        teams = [TeamFactory(organization=organization) for _ in range(3)]
        members = [MemberFactory(organization=organization, team=rng.choice([*teams, None]),
                                 is_active=rng.random() < 0.9) for _ in range(12)]
        policies = [AllowancePolicy.objects.create(organization=organization, name=f"P{i}", monthly_tokens=i)
                    for i in range(4)]
        for target in rng.sample([*teams, *members], 10):
            for effective_from in rng.sample(moments, rng.randint(1, 3)):
                PolicyAssignment.objects.create(
                    organization=organization, policy=rng.choice(policies), effective_from=effective_from,
                    **({"team": target} if isinstance(target, Team) else {"member": target}))
    with scope(other):  # another organization's assignment, on this one's team ids, governs none of them
        foreign = AllowancePolicy.objects.create(organization=other, name="Foreign", monthly_tokens=1)
        for team in teams:
            PolicyAssignment.objects.create(organization=other, policy=foreign, team_id=team.pk,
                                            effective_from=moments[0] - timedelta(days=1))
    ats = sorted({moment + delta for moment in moments for delta in (-timedelta(microseconds=1), timedelta(0))})
    found = rows(f"""
        SELECT m.id, t.at, ({assignment_in_force_sql(organization="%s", member="m.id", team="m.team_id", at="t.at")})
        FROM {Member._meta.db_table} m CROSS JOIN unnest(%s::timestamptz[]) AS t(at)
        WHERE m.organization_id = %s""", [organization.pk, ats, organization.pk])
    assert len(found) == len(members) * len(ats)
    in_sql = {(member_id, at): policy_id for member_id, at, policy_id in found}
    with scope(organization):
        for member in members:
            for at in ats:
                assignment = assignment_in_force(member=member, at=at)
                assert in_sql[member.pk, at] == (assignment.policy_id if assignment else None), (member.pk, at)
        # The ORM form of the same rule, for a policy's members, agrees as well.
        for policy in policies:
            for at in ats:
                assert set(members_governed_by(policy=policy, at=at).values_list("pk", flat=True)) == {
                    member.pk for member in members
                    if member.is_active and in_sql[member.pk, at] == policy.pk}, (policy.pk, at)


def test_the_sql_key_spend_reset_equals_spent_in():
    rng = random.Random(11)
    organization = OrganizationFactory()
    periods = [None, date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)]
    with unscoped():
        counters = KeySpend.all_objects.bulk_create(
            KeySpend(organization=organization, period_start=rng.choice(periods), held=rng.randint(0, 10**6),
                     used=rng.choice([0, rng.randint(0, 10**9)])) for _ in range(200))
    found = rows(f"""
        SELECT k.id, t.period, {KeySpend.counted_sql("k", "k.held + k.used", "t.period")}
        FROM {KeySpend._meta.db_table} k CROSS JOIN unnest(%s::date[]) AS t(period)
        WHERE k.organization_id = %s""", [periods[1:], organization.pk])
    by_id = {counter.pk: counter for counter in counters}
    assert len(found) == len(counters) * 3
    for counter_id, period, spent in found:
        assert spent == by_id[counter_id].spent_in(period), (by_id[counter_id].period_start, period)


# -- the ledger's two forms ------------------------------------------------------------------------------------


def test_every_entry_kind_has_its_moves_and_the_sql_deltas_are_the_python_ones():
    assert set(ledger.MOVES) == set(Kind.values)
    tokens = [0, 1, 7, -5, 10**12]
    deltas = ", ".join(ledger._delta_sql(bucket, "t.kind", "t.tokens") for bucket in range(3))
    kinds = [kind for kind in Kind.values for _ in tokens]
    found = rows(f"SELECT t.kind, t.tokens, {deltas} FROM unnest(%s::text[], %s::bigint[]) AS t(kind, tokens)",
                 [kinds, tokens * len(Kind.values)])
    assert len(found) == len(kinds)
    account = ledger.AccountRef(pk=1, organization_id=1)
    for kind, amount, granted, held, used in found:
        params = ledger._params(account=account, kind=kind, tokens=amount, idempotency_key="k")
        assert (granted, held, used) == (params["g"], params["h"], params["u"]), kind


SEQUENCE = [  # (kind, tokens, with the key): entries no balance refuses, as a set of posts takes them
    (Kind.GRANT, 1_000, False), (Kind.BONUS, 250, False), (Kind.USAGE, 400, True), (Kind.ADJUSTMENT, -30, False),
    (Kind.USAGE, 75, True), (Kind.EXPIRY, 100, False), (Kind.ROLLOVER_OUT, 50, False), (Kind.ROLLOVER_IN, 50, False),
    (Kind.OVERAGE_GRANT, 20, False), (Kind.USAGE, 9, False),
]


def test_a_set_of_posts_moves_accounts_and_key_counters_as_the_same_single_posts_do():
    organization = OrganizationFactory()
    period = date(2026, 11, 1)
    with scope(organization):
        members = [MemberFactory(organization=organization) for _ in range(2)]
        accounts = [Account.objects.create(organization=organization, member=member, period_start=period)
                    for member in members]
        keys = [api_key_services.api_key_create(member=member, actor=member.user, name="k", endpoints=["chat"])[0]
                for member in members]
        # Each key's counter was last moved in October: it counts as zero in November, in both forms.
        KeySpend.objects.filter(pk__in=[key.spend_id for key in keys]).update(
            period_start=date(2026, 10, 1), held=40, used=900)
        single, batch = zip(accounts, keys)
        for number, (kind, tokens, keyed) in enumerate(SEQUENCE):
            ledger.post(account=single[0], kind=kind, tokens=tokens, idempotency_key=f"e{number}", reference="r",
                        **({"api_key_id": single[1].pk, "spend_id": single[1].spend_id, "model": "m"} if keyed else {}))
        source = [{"position": number, "account_id": batch[0].pk, "kind": kind, "tokens": tokens,
                   "period_start": str(period), "idempotency_key": f"e{number}", "reason": "", "reference": "r",
                   "model": "m" if keyed else "", "actor_id": None, "api_key_id": batch[1].pk if keyed else None}
                  for number, (kind, tokens, keyed) in enumerate(SEQUENCE)]
        sql = f"""WITH src AS (SELECT * FROM json_to_recordset(%(rows)s::json) AS (
                      position int, account_id bigint, kind text, tokens bigint, period_start date,
                      idempotency_key text, reason text, reference text, model text, actor_id bigint,
                      api_key_id bigint)),
                  {ledger.post_set_sql("src", order_by="e.position", keyed=True)}
                  SELECT count(*) FROM posted"""
        assert ledger.post_set(sql, {"rows": json.dumps(source)}, organization_id=organization.pk) == [(len(SEQUENCE),)]
        # Run again, nothing is new: idempotent by key like a single post.
        assert ledger.post_set(sql, {"rows": json.dumps(source)}, organization_id=organization.pk) == [(0,)]

        def state(account, key):
            account.refresh_from_db()
            spend = KeySpend.objects.get(pk=key.spend_id)
            entries = list(LedgerEntry.objects.filter(account=account).order_by("id").values_list(
                "kind", "tokens", "granted_delta", "held_delta", "used_delta", "period_start", "idempotency_key",
                "model", "api_key_id"))
            return ((account.granted, account.held, account.used), (spend.period_start, spend.held, spend.used),
                    [entry[:-1] + (entry[-1] is not None,) for entry in entries])

        assert state(*single) == state(*batch)
        assert state(*batch)[:2] == ((1_000 + 250 - 30 - 100 - 50 + 50 + 20, 0, 400 + 75 + 9),
                                     (period, 0, 400 + 75))
    assert ledger.verify(organization_id=organization.pk) == []


# -- which usage is billable overage, and what of the overage lapses -------------------------------------------


def test_the_sql_unused_overage_equals_unused_overage():
    rng = random.Random(5)
    cases = [(available, overage) for available in (-(10**10), -1, 0, 1, 5, 10**10) for overage in (0, 1, 7, 10**10)]
    cases += [(rng.randint(-(10**6), 10**6), rng.choice([0, rng.randint(1, 10**6)])) for _ in range(500)]
    found = rows(f"SELECT {unused_overage_sql('t.available', 't.overage')} FROM unnest(%s::bigint[], %s::bigint[]) "
                 "WITH ORDINALITY AS t(available, overage, position) ORDER BY t.position",
                 [[available for available, _ in cases], [overage for _, overage in cases]])
    assert [row[0] for row in found] == [unused_overage(available=a, overage=o) for a, o in cases]


MODELS = ["model-a", "model-b", "model-c"]


def billable_by_reference(organization, period) -> dict:
    """`billable_usage` on each account's entries, read plainly: what was held when the period
    opened (the holds and closings of earlier periods), its base and overage grants, its usage."""
    found = {}
    for account in Account.objects.filter(organization=organization):
        entries = list(LedgerEntry.objects.filter(account=account).order_by("id"))
        in_period = [e for e in entries if e.period_start == period]
        billable = billable_usage(
            carried=sum(e.held_delta for e in entries if e.period_start < period),
            base=sum(base_of(e, period) for e in entries),
            overage=sum(overage_of(e, period) for e in entries),
            usage=[(e.model, e.used_delta) for e in in_period if e.used_delta])
        for model, tokens in billable.items():
            found[account.member_id, model] = tokens
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_sql_billable_overage_is_billable_usage_of_every_account_and_period(seed):
    """Random months of grants, approved overage, usage of several models in and beyond the
    balance, and holds left open across the close and settled in the next month."""
    rng = random.Random(seed)
    organization = OrganizationFactory(time_zone="UTC")
    periods = [date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1)]
    with scope(organization):
        teams = [TeamFactory(organization=organization) for _ in range(2)]
        members = [MemberFactory(organization=organization, team=rng.choice([*teams, None])) for _ in range(10)]
        accounts = [Account.objects.create(organization=organization, member=member, period_start=periods[0])
                    for member in members]
        carried = {account.pk: [] for account in accounts}
        for month, period in enumerate(periods):
            for number, account in enumerate(accounts):
                key = f"{month}:{number}"
                ledger.post(account=account, kind=Kind.GRANT, tokens=rng.choice([0, 500, 2_000]), idempotency_key=key)
                for hold in carried[account.pk]:  # requests in flight at the close end in this month
                    if rng.random() < 0.7:
                        ledger.settle(hold=hold, used_tokens=rng.randint(0, hold.tokens))
                    else:
                        ledger.release(hold=hold)
                carried[account.pk] = []
                for step in range(rng.randint(0, 8)):
                    what = rng.random()
                    if what < 0.2:
                        ledger.post(account=account, kind=Kind.OVERAGE_GRANT, tokens=rng.randint(1, 1_500),
                                    idempotency_key=f"overage-request:{key}:{step}", reference="overage-request:x")
                    elif what < 0.3:
                        ledger.post(account=account, kind=Kind.BONUS, tokens=rng.randint(1, 800),
                                    idempotency_key=f"b:{key}:{step}")
                    elif what < 0.4:  # recorded beyond the balance, as usage ingest does
                        tokens = rng.randint(1, 1_000)
                        ledger.post(account=account, kind=Kind.USAGE, tokens=tokens, used_delta=tokens,
                                    model=rng.choice(MODELS), idempotency_key=f"u:{key}:{step}")
                    else:
                        try:
                            hold = ledger.authorize(account=account, tokens=rng.randint(1, 900),
                                                    idempotency_key=f"h:{key}:{step}", model=rng.choice(MODELS),
                                                    ttl=timedelta(days=120))
                        except ledger.InsufficientTokens:
                            continue
                        if rng.random() < 0.2:
                            carried[account.pk].append(hold)  # still in flight when the month closes
                        else:
                            ledger.settle(hold=hold, used_tokens=rng.randint(0, hold.tokens))
            if month < len(periods) - 1:
                assert close_chunk(organization=organization, period=period, after=0, limit=100)[0] == len(accounts)
        assert ledger.verify(organization_id=organization.pk) == []
        for period in periods:
            expected = billable_by_reference(organization, period)
            found = billable_overage(organization=organization, period=period)
            assert {(row.member_id, row.model): row.tokens for row in found} == expected, period
            teams_of = {member.pk: member.team_id for member in members}
            assert all(row.team_id == teams_of[row.member_id] for row in found)
        assert any(billable_by_reference(organization, period) for period in periods), "nothing was billable"
