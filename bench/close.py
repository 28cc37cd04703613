"""Period close at scale: 1,000,000 accounts across 10 organizations on PostgreSQL.

Each account has its month's grant and, for most, some usage; every organization's team has a
policy that rolls over up to 20% and grants the next month. The close runs as the hourly job
would with one worker per core: one organization at a time per worker, chunks of accounts per
transaction (allowances/closing_sql.py). Prints the seconds and accounts per second, then checks
that every account moved to the next month exactly once.

Run with `make bench-close` (a private durable PostgreSQL is started for it). ACCOUNTS and
ORGANIZATIONS can be lowered for a quick run.
"""

import multiprocessing
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._database import create_database, database_url  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ["DEBUG"] = "0"
os.environ["DATABASE_URL"] = database_url("portal_bench_close")

import django  # noqa: E402


django.setup()

from django.db import connection, connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from portal.models import Organization  # noqa: E402

ACCOUNTS = int(os.environ.get("ACCOUNTS", "1000000"))
ORGANIZATIONS = int(os.environ.get("ORGANIZATIONS", "10"))
WORKERS = int(os.environ.get("WORKERS", str(os.cpu_count() or 1)))
PERIOD, NEXT = date(2026, 10, 1), date(2026, 11, 1)




def seed() -> list[int]:
    """Organizations, teams, policies, members and accounts in October, written in bulk with SQL
    (ledger entries and stored balances agree)."""
    per_org = ACCOUNTS // ORGANIZATIONS
    organizations = []
    with connection.cursor() as cursor:
        for number in range(ORGANIZATIONS):
            # Through the model, so the organization's defaults are whatever the model says.
            org = Organization.objects.create(name=f"Bench {number}", slug=f"bench-{number}", currency="USD",
                                              time_zone=["UTC", "Europe/Berlin", "America/New_York"][number % 3]).pk
            organizations.append(org)
            cursor.execute("INSERT INTO portal_team (organization_id, name, cost_centre, created_at) "
                           "VALUES (%s, 'Everyone', '', now()) RETURNING id", [org])
            team = cursor.fetchone()[0]
            cursor.execute("INSERT INTO allowances_allowancepolicy (organization_id, name, monthly_tokens, rollover_rule, "
                           "rollover_cap_percent, rollover_lifetime_periods, overage_rule, created_at) "
                           "VALUES (%s, 'Standard', 1000000, 'capped_percent', 20, 1, 'hard_stop', now()) RETURNING id", [org])
            policy = cursor.fetchone()[0]
            cursor.execute("INSERT INTO allowances_policyassignment (organization_id, policy_id, team_id, effective_from, "
                           "applied_immediately, created_at) VALUES (%s, %s, %s, '2026-01-01', false, now())",
                           [org, policy, team])
            cursor.execute("INSERT INTO portal_user (password, is_superuser, email, first_name, last_name, is_staff, "
                           "is_active, date_joined) SELECT '!', false, 'u' || i || '@' || %s || '.example', '', '', false, "
                           "true, now() FROM generate_series(1, %s) i", [org, per_org])
            cursor.execute("INSERT INTO portal_member (organization_id, user_id, team_id, is_owner, is_admin, is_hr, "
                           "is_approver, is_employee, is_active, joined_at) SELECT %s, id, %s, false, false, false, false, "
                           "true, true, now() FROM portal_user WHERE email LIKE %s", [org, team, f"%@{org}.example"])
            # Most members used part of October's million, some all of it, some nothing.
            cursor.execute("INSERT INTO allowances_account (organization_id, member_id, period_start, granted, held, used, "
                           "overdraft_limit, opened_at) SELECT %s, id, %s, 1000000, 0, (id %% 5) * 250000, 0, now() "
                           "FROM portal_member WHERE organization_id = %s", [org, PERIOD, org])
            cursor.execute("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, "
                           "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) "
                           "SELECT organization_id, id, 'grant', 1000000, 1000000, 0, 0, period_start, 'grant:' || period_start, "
                           "'', 'Standard: monthly allowance', '', now() FROM allowances_account WHERE organization_id = %s",
                           [org])
            cursor.execute("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, "
                           "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) "
                           "SELECT organization_id, id, 'usage', used, 0, 0, used, period_start, 'usage:bench', 'bench', '', "
                           "'', now() FROM allowances_account WHERE organization_id = %s AND used > 0", [org])
        cursor.execute("VACUUM ANALYZE") if connection.connection.autocommit else cursor.execute("ANALYZE")
        # The seed's own writes are flushed before the clock starts, as a month's are long before its close.
        cursor.execute("CHECKPOINT")
    return organizations


def close_organizations(organization_ids: list[int]) -> int:
    from allowances.closing import close_period

    connections.close_all()  # a fresh connection in each worker process
    closed = 0
    for organization in Organization.objects.filter(pk__in=organization_ids).order_by("pk"):
        closed += close_period(organization=organization, period=PERIOD, chunk_size=10_000)
    return closed


def main():
    create_database("portal_bench_close")
    organizations = seed()
    connections.close_all()
    shares = [organizations[i::WORKERS] for i in range(WORKERS)]
    close_began = timezone.now()
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        closed = sum(pool.map(close_organizations, shares))
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FILTER (WHERE period_start = %s), count(*) FROM allowances_account", [NEXT])
        moved, total = cursor.fetchone()
        # One close entry per account, each granting November's allowance (none missing or twice).
        cursor.execute("SELECT count(*) FROM allowances_ledgerentry WHERE period_start = %s AND created_at >= %s",
                       [PERIOD, close_began])
        written = cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM allowances_account a WHERE (SELECT count(*) FROM allowances_ledgerentry e "
                       "WHERE e.account_id = a.id AND e.period_start = %s AND e.kind = 'close' AND e.close_granted > 0) "
                       "<> 1", [PERIOD])
        duplicated = cursor.fetchone()[0]
    print(f"close.accounts: {closed} accounts")
    print(f"close.workers: {WORKERS} processes")
    print(f"close.seconds: {seconds:.1f} s")
    print(f"close.accounts_per_s: {closed / seconds:.0f} accounts/s")
    print(f"close.moved: {moved} of {total} accounts")
    print(f"close.duplicated_grants: {duplicated} accounts")
    print(f"close.entries_per_account: {written / max(closed, 1):.2f} entries")


if __name__ == "__main__":
    main()
