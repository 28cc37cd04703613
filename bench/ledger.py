"""Ledger throughput: authorize+settle pairs per second through the project's ledger functions,
against the same database work done by hand-written SQL, in one run on one PostgreSQL server.

Two cases, 8 worker processes each: every request on one hot account, and requests spread over
10,000 accounts. The baseline does, for each authorize and each settle, one conditional UPDATE
plus one INSERT in its own transaction, straight through psycopg.

Run with `make bench-ledger` (a private durable PostgreSQL is started for it).
"""

import multiprocessing
import os
import random
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._database import create_database, database_url  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ["DEBUG"] = "0"
os.environ["DATABASE_URL"] = database_url("portal_bench")

import django  # noqa: E402


django.setup()

import psycopg  # noqa: E402
from django.db import connection, connections  # noqa: E402

from allowances import ledger  # noqa: E402
from allowances.models import Account, LedgerEntry  # noqa: E402
from portal.models import Organization  # noqa: E402

WORKERS = 8
SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))
ACCOUNTS = 10_000
HOLD, USED = 100, 60




def seed_accounts() -> list[tuple[int, int]]:
    """10,000 members with funded accounts, written in bulk (grant entries and balances agree)."""
    with connection.cursor() as cursor:
        org = Organization.objects.create(name="Bench", slug="bench", time_zone="UTC", currency="USD").pk
        cursor.execute("INSERT INTO portal_user (password, is_superuser, email, first_name, last_name, is_staff, is_active, date_joined) "
                       "SELECT '!', false, 'u' || i || '@bench.example', '', '', false, true, now() FROM generate_series(1, %s) i", [ACCOUNTS])
        cursor.execute("INSERT INTO portal_member (organization_id, user_id, is_owner, is_admin, is_hr, is_approver, is_employee, is_active, joined_at) "
                       "SELECT %s, id, false, false, false, false, true, true, now() FROM portal_user", [org])
        cursor.execute("INSERT INTO allowances_account (organization_id, member_id, period_start, granted, held, used, overdraft_limit, opened_at) "
                       "SELECT %s, id, date_trunc('month', now())::date, 1000000000000, 0, 0, 0, now() FROM portal_member", [org])
        cursor.execute("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, held_delta, used_delta, "
                       "period_start, idempotency_key, model, reason, reference, created_at) "
                       "SELECT organization_id, id, 'grant', granted, granted, 0, 0, period_start, 'grant:bench', '', 'bench', '', now() "
                       "FROM allowances_account")
        cursor.execute("ANALYZE")
    return list(Account.all_objects.order_by("pk").values_list("pk", "organization_id"))


def project_pair(account_id, org_id):
    account = Account(pk=account_id, organization_id=org_id)
    hold = ledger.authorize(account=account, tokens=HOLD, idempotency_key=uuid.uuid4().hex, model="bench")
    ledger.settle(hold=hold, used_tokens=USED)


RAW_UPDATE_HOLD = ("UPDATE allowances_account SET held = held + %s WHERE id = %s "
                   "AND granted - used - held - %s >= -overdraft_limit")
RAW_UPDATE_SETTLE = "UPDATE allowances_account SET held = held - %s, used = used + %s WHERE id = %s"
RAW_INSERT = ("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, held_delta, "
              "used_delta, period_start, idempotency_key, closes_hold_id, expires_at, model, reason, reference, created_at) "
              "VALUES (%s, %s, %s, %s, 0, %s, %s, %s, %s, %s, now() + interval '15 minutes', 'bench', '', '', now()) RETURNING id")


def raw_pair(conn, period, account_id, org_id):
    # authorize: one conditional UPDATE plus one INSERT, its own transaction
    cur = conn.execute(RAW_UPDATE_HOLD, (HOLD, account_id, HOLD))
    if cur.rowcount != 1:
        raise RuntimeError("raw hold refused")
    hold_id = conn.execute(RAW_INSERT, (org_id, account_id, "hold", HOLD, HOLD, 0, period, uuid.uuid4().hex, None)).fetchone()[0]
    conn.commit()
    # settle: one UPDATE plus one INSERT, its own transaction
    conn.execute(RAW_UPDATE_SETTLE, (HOLD, USED, account_id))
    conn.execute(RAW_INSERT, (org_id, account_id, "usage", USED, -HOLD, USED, period, uuid.uuid4().hex, hold_id))
    conn.commit()


def worker(mode, accounts, seed, deadline, counter):
    connections.close_all()
    rng = random.Random(seed)
    done = 0
    if mode == "raw":
        conn = psycopg.connect(os.environ["DATABASE_URL"])
        period = conn.execute("SELECT period_start FROM allowances_account LIMIT 1").fetchone()[0]
        while time.monotonic() < deadline:
            raw_pair(conn, period, *rng.choice(accounts))
            done += 1
        conn.close()
    else:
        while time.monotonic() < deadline:
            project_pair(*rng.choice(accounts))
            done += 1
        connections.close_all()
    with counter.get_lock():
        counter.value += done


def measure(mode, accounts, seconds) -> float:
    connections.close_all()
    counter = multiprocessing.Value("q", 0)
    start = time.monotonic() + 0.5  # let every worker start before the clock runs
    deadline = start + seconds
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=worker, args=(mode, accounts, i, deadline, counter)) for i in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return counter.value / seconds


def main():
    create_database("portal_bench")
    accounts = seed_accounts()
    hot = accounts[:1]
    # Warm both paths (caches, prepared plans) before measuring.
    for _ in range(50):
        project_pair(*hot[0])
    connections.close_all()
    for case, subset in (("hot", hot), ("spread", accounts)):
        # raw, project, project, raw: the ledger table grows as it runs, so neither side always
        # measures against the bigger table.
        half = SECONDS / 2
        raw_first = measure("raw", subset, half)
        project = (measure("project", subset, half) + measure("project", subset, half)) / 2
        raw = (raw_first + measure("raw", subset, half)) / 2
        print(f"ledger.{case}_rps: {project:.0f} ops/s")
        print(f"ledger.{case}_raw_rps: {raw:.0f} ops/s")
        print(f"ledger.{case}_ratio: {project / raw:.2f}")
    problems = ledger.verify()
    print(f"ledger.verify_problems: {len(problems)} accounts")
    print(f"ledger.entries: {LedgerEntry.all_objects.count()} rows")


if __name__ == "__main__":
    main()
