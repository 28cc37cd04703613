"""Each rule that SQL expresses for speed equals its one Python definition, on random cases
evaluated by PostgreSQL: a key's spend reset (KeySpend.spent_in), and the ledger's moves (MOVES)
in its single and its set-based statements. A change to one form and not the other fails here.
"""

import json
import random
from datetime import date

import pytest
from django.db import connection

from allowances import ledger
from allowances.models import Account, KeySpend, LedgerEntry
from apikeys import services as api_key_services
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, OrganizationFactory

pytestmark = pytest.mark.django_db
Kind = LedgerEntry.Kind


def rows(sql: str, params) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


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
