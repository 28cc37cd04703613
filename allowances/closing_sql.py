"""The period close of a chunk of accounts: a handful of set-based statements in one transaction.

Lock the chunk's accounts, compute every account's close into temporary tables, then post one
close entry per account that carries the close's parts (billed overage, lapsed overage, expired,
rolled over with its tranches, the next period's grant; an account with none gets no entry) and
move the accounts to the next period in one set of posts (`ledger.post_set_sql`).

What an account's close books: what is unused is split youngest first. Approved overage is
used last (allowances/consumption.py), so the unused tokens are overage first: that part lapses,
unbilled. The rest is base allowance: tokens granted this period are the youngest, then
rolled-over tranches by how long they still live (usage consumes the oldest tokens first). This
period's unused grants roll over as the closing policy says and the rest expires; rolled-over
tranches carry on until their lifetime ends, then expire. What is left came back from holds
taken in an earlier period and released in this one: it is older base allowance and follows the
same rule as this period's. Usage recorded past the balance (a negative balance) is booked as
billable overage so the next period starts at zero, never paying for the last one. Open
holds stay held across the boundary. Overage requests of the period still pending lapse. The
next period opens with the monthly grant of the policy in force then, for active members.

A team pool closes the same way, as an account no policy governs: what it has left expires (its
tokens were members' unused base allowance of the period, which their own policies would not
have let them carry on at will; a pool that rolled over would), its open holds are carried, and
it opens the next period empty.

The rules the close applies have one definition each, in Python (`assignment_in_force`,
`AllowancePolicy.rollover_amount`, `consumption.unused_overage`, `periods_after`); the close uses
their SQL forms, each held equal to its Python form by tests/allowances/test_rules_in_sql.py, and
tests/allowances/test_closing_sql.py holds whole closes against a reference model.
"""

from __future__ import annotations

from datetime import date, timedelta

from django.db import connection, transaction

from allowances import ledger
from allowances.consumption import OVERAGE_KINDS, kinds_sql, unused_overage_sql
from allowances.models import Account, AllowancePolicy, LedgerEntry
from allowances.periods import next_period_start, period_bounds, periods_after, periods_after_sql
from allowances.selectors import assignment_in_force_sql
from overage.models import OverageRequest
from portal.models import AuditLogEntry, Member, Organization

Kind = LedgerEntry.Kind
_A, _E, _M, _P = Account._meta.db_table, LedgerEntry._meta.db_table, Member._meta.db_table, AllowancePolicy._meta.db_table
_R = OverageRequest._meta.db_table
_AUDIT = AuditLogEntry._meta.db_table
# Closes before the close entry wrote rolled-over tranches as rollover_in entries referenced so.
ROLLOVER_REFERENCE = "rollover-until:"  # + the first day of the last period rolled-over tokens may be used in
# The entries granted this period that are not rolled-over tranches: its grants, split from its overage.
_BASE_KINDS = kinds_sql((Kind.GRANT, Kind.BONUS, Kind.ADJUSTMENT, Kind.TRANSFER_OUT, Kind.TRANSFER_IN))
_GRANTED_KINDS = kinds_sql((Kind.GRANT, Kind.BONUS, Kind.ADJUSTMENT, Kind.TRANSFER_OUT, Kind.TRANSFER_IN,
                            *OVERAGE_KINDS))


def _policy_at(moment: str, alias: str) -> str:
    """The policy in force for member `b` at a moment, as `alias` (NULLs when none)."""
    in_force = assignment_in_force_sql(organization="%(org)s", member="b.member_id", team="b.team_id", at=moment)
    return f"LEFT JOIN LATERAL ({in_force}) {alias}_a ON true LEFT JOIN {_P} {alias} ON {alias}.id = {alias}_a.policy_id"


# The previous close as it left this period: entries of the old shape in this period (its grant
# among the base kinds, its rollover_in tranches), or the one close entry of the previous period
# (its opening parts).
_PLAN = f"""
CREATE TEMP TABLE close_base ON COMMIT DROP AS
SELECT b.*, GREATEST(b.available, 0) - b.overage_unused AS unused_base,
       cp.name AS closing_name, cp.rollover_rule, cp.rollover_cap_tokens, cp.rollover_cap_percent,
       cp.rollover_lifetime_periods, cp.monthly_tokens,
       np.id AS new_policy_id, np.name AS new_name, np.monthly_tokens AS new_monthly
FROM (SELECT g.*, {unused_overage_sql("g.available", "g.overage_granted")} AS overage_unused
      FROM (SELECT a.id AS account_id, a.member_id, m.team_id, m.is_active, a.granted - a.used - a.held AS available,
                   s.base_granted, s.overage_granted
            FROM {_A} a
            -- Each member by its key: joined by hash, the planner read every member of every
            -- organization for each chunk (OFFSET 0 keeps the subquery a per-row look-up).
            LEFT JOIN LATERAL (SELECT m.team_id, m.is_active FROM {_M} m WHERE m.id = a.member_id OFFSET 0) m ON true
            CROSS JOIN LATERAL (
                SELECT COALESCE(SUM(e.granted_delta) FILTER (WHERE e.period_start = %(period)s
                                                               AND e.kind IN ({_BASE_KINDS})), 0)
                         + COALESCE(SUM(e.close_granted) FILTER (WHERE e.period_start = %(previous)s
                                                                   AND e.kind = '{Kind.CLOSE}'), 0) AS base_granted,
                       COALESCE(SUM(e.granted_delta) FILTER (WHERE e.period_start = %(period)s
                                                               AND e.kind IN ({kinds_sql(OVERAGE_KINDS)})), 0)
                         AS overage_granted
                FROM {_E} e WHERE e.account_id = a.id AND e.period_start IN (%(previous)s, %(period)s)
                  AND e.kind IN ({_GRANTED_KINDS}, '{Kind.CLOSE}')) s
            WHERE a.id = ANY(%(ids)s) AND a.period_start = %(period)s) g) b
{_policy_at("%(closing_at)s", "cp")}
{_policy_at("%(opening_at)s", "np")};

CREATE TEMP TABLE close_tranche ON COMMIT DROP AS
WITH t AS (
    SELECT account_id, until, SUM(tokens) AS tokens FROM (
        SELECT e.account_id, substr(e.reference, {len(ROLLOVER_REFERENCE) + 1}) AS until, e.tokens
        FROM {_E} e
        WHERE e.account_id = ANY(%(ids)s) AND e.period_start = %(period)s AND e.kind = '{Kind.ROLLOVER_IN}'
        UNION ALL
        SELECT e.account_id, to_char(r.until, 'YYYY-MM-DD'), r.tokens
        FROM {_E} e CROSS JOIN LATERAL unnest(e.close_rollover_until, e.close_rollover_tokens) r (until, tokens)
        WHERE e.account_id = ANY(%(ids)s) AND e.period_start = %(previous)s AND e.kind = '{Kind.CLOSE}') i
    GROUP BY 1, 2),
r AS (
    SELECT t.*, b.unused_base - LEAST(b.unused_base, GREATEST(b.base_granted, 0)) AS rest,
           COALESCE(SUM(t.tokens) OVER (PARTITION BY t.account_id ORDER BY t.until DESC
                                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
    FROM t JOIN close_base b ON b.account_id = t.account_id)
SELECT account_id, until, LEAST(GREATEST(rest - before, 0), tokens) AS unused, until <= %(period_text)s AS expired
FROM r;

CREATE TEMP TABLE close_plan ON COMMIT DROP AS
WITH s AS (
    SELECT b.*, GREATEST(-b.available, 0) AS overage,
           LEAST(b.unused_base, GREATEST(b.base_granted, 0))
             + (b.unused_base - LEAST(b.unused_base, GREATEST(b.base_granted, 0)) - COALESCE(t.unused, 0))
             AS base_unused,
           COALESCE(t.expired, 0) AS tranches_expired
    FROM close_base b
    LEFT JOIN (SELECT account_id, SUM(unused) AS unused, SUM(unused) FILTER (WHERE expired) AS expired
               FROM close_tranche GROUP BY account_id) t ON t.account_id = b.account_id)
SELECT s.*, {AllowancePolicy.rollover_amount_sql("s", "s.base_unused")} AS rolled,
       to_char({periods_after_sql("%(period)s::date", "COALESCE(s.rollover_lifetime_periods, 1)")}, 'YYYY-MM-DD')
         AS rolled_until
FROM s;

CREATE TEMP TABLE close_carry ON COMMIT DROP AS
SELECT account_id, array_agg(until::date ORDER BY until) AS until, array_agg(tokens ORDER BY until) AS tokens,
       SUM(tokens) AS rolled_over
FROM (SELECT account_id, until, SUM(tokens) AS tokens FROM (
          SELECT account_id, until, unused AS tokens FROM close_tranche WHERE NOT expired
          UNION ALL
          SELECT account_id, rolled_until, rolled FROM close_plan WHERE rolled > 0) c
      GROUP BY account_id, until HAVING SUM(tokens) > 0) c
GROUP BY account_id;
"""

# One close entry per account that has any part; every account of the plan moves to the next
# period in the UPDATE that moves its buckets by it; its requests still pending lapse in the same
# statement.
_PARTS = LedgerEntry.PARTS + ("close_rollover_until", "close_rollover_tokens")
_POST = f"""
WITH parts AS (
    SELECT p.account_id, p.overage AS close_overage_billed, p.overage_unused AS close_overage_lapsed,
           p.base_unused - p.rolled AS close_expired, p.tranches_expired AS close_rollover_expired,
           COALESCE(c.rolled_over, 0) AS close_rolled_over,
           CASE WHEN p.new_policy_id IS NOT NULL AND p.new_monthly > 0 AND p.is_active THEN p.new_monthly ELSE 0 END
             AS close_granted,
           COALESCE(c.until, '{{}}') AS close_rollover_until, COALESCE(c.tokens, '{{}}') AS close_rollover_tokens,
           p.new_policy_id
    FROM close_plan p LEFT JOIN close_carry c ON c.account_id = p.account_id),
close_entries AS (
    SELECT account_id, '{Kind.CLOSE}' AS kind,
           {LedgerEntry.parts_sql("parts", LedgerEntry.CLOSING_PARTS)} + {LedgerEntry.parts_sql("parts", LedgerEntry.OPENING_PARTS)}
             AS tokens,
           %(period)s::date AS period_start, %(close)s AS idempotency_key, %(reason)s AS reason,
           CASE WHEN close_granted > 0 THEN 'policy:' || new_policy_id ELSE '' END AS reference, {", ".join(_PARTS)}
    FROM parts
    WHERE close_overage_billed > 0 OR close_overage_lapsed > 0 OR close_expired > 0 OR close_rollover_expired > 0
       OR close_rolled_over > 0 OR close_granted > 0),
{ledger.post_set_sql("close_entries", order_by="e.account_id", keyed=False, accounts="close_plan",
                     account_changes="period_start = %(next)s", part_columns=_PARTS)},
lapsed AS (UPDATE {_R} r SET state = '{OverageRequest.State.LAPSED}', decided_at = %(now)s, decision_note = %(lapse_note)s
           FROM close_plan p WHERE r.member_id = p.member_id AND r.organization_id = %(org)s
             AND r.state = '{OverageRequest.State.PENDING}' AND r.period_start <= %(period)s
           RETURNING r.id, r.tokens, r.period_start),
-- The audit log entry portal.audit.log_action writes for a request the close lapsed (no actor).
lapse_audit AS (INSERT INTO {_AUDIT} (organization_id, actor_id, actor_email, action, object_type, object_id,
                                      object_repr, data, created_at)
                SELECT %(org)s, NULL, '', 'overage_request.lapsed', '{OverageRequest._meta.label_lower}', id::text,
                       'overage request #' || id, jsonb_build_object('tokens', tokens, 'period', period_start::text),
                       %(now)s
                FROM lapsed)
SELECT count(*) FROM posted"""

# Dropped here as well as on commit: inside an outer transaction the next chunk reuses the names.
_DROP = "DROP TABLE close_carry, close_plan, close_tranche, close_base"


def close_key(period: date) -> str:
    """The idempotency key of an account's close entry for `period` (one per account and period)."""
    return f"close:{period}"


def close_chunk(*, organization: Organization, period: date, after: int, limit: int) -> tuple[int, int | None]:
    """Close up to `limit` accounts still in `period` with ids above `after`, in one transaction.

    Returns (accounts closed, the last id looked at, or None when there were none)."""
    next_period = next_period_start(period)
    opening_at = period_bounds(organization, next_period)[0]
    params = {
        "org": organization.pk, "period": period, "period_text": period.isoformat(), "next": next_period,
        "previous": periods_after(period, -1), "closing_at": opening_at - timedelta(microseconds=1),
        "opening_at": opening_at, "close": close_key(period), "reason": f"{period:%B %Y} closed",
        "lapse_note": f"Still pending when {period:%B %Y} closed: ask again if you still need tokens this month.",
    }
    with transaction.atomic():
        with connection.cursor() as cursor:
            # JIT compiling the plan cost more than it saved (about 35 ms a chunk), and the sort of a
            # chunk's entries spilled to disk at the default work_mem.
            cursor.execute("SET LOCAL jit = off; SET LOCAL work_mem = '64MB'")
            cursor.execute(f"SELECT id FROM {_A} WHERE organization_id = %s AND period_start = %s AND id > %s "
                           "ORDER BY id LIMIT %s FOR UPDATE", [organization.pk, period, after, limit])
            ids = [row[0] for row in cursor.fetchall()]
            if not ids:
                return 0, None
            cursor.execute(_PLAN, params | {"ids": ids})
        ledger.post_set(_POST, params, organization_id=organization.pk)
        with connection.cursor() as cursor:
            cursor.execute(_DROP)
    return len(ids), ids[-1]
