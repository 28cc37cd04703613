"""Reports at scale: one organization of 10,000 members with 10,000,000 usage records over 90 days.

Seeds set-based in SQL (generate_series), rolls the 90 days up as the hourly job does, then
measures:

- the value-per-token page as HR sees it (30 days, from the roll-ups), its p95 over REQUESTS
  requests, against the same figures summed from the usage records (the baseline: what the page
  would cost without roll-ups);
- the export of last month's benefit statements of every member (CSV and a ZIP of PDFs, the Celery
  task's service), in seconds, against the CSV alone.

Run with `make bench-reports` (a private durable PostgreSQL is started for it). RECORDS, MEMBERS,
DAYS and REQUESTS can be lowered for a quick run.
"""

import os
import statistics
import sys
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._database import create_database, database_url  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ["DEBUG"] = "0"
os.environ["DATABASE_URL"] = database_url("portal_bench_reports")

import django  # noqa: E402

django.setup()

from django.db import connection  # noqa: E402

RECORDS = int(os.environ.get("RECORDS", "10000000"))
MEMBERS = int(os.environ.get("MEMBERS", "10000"))
DAYS = int(os.environ.get("DAYS", "90"))
REQUESTS = int(os.environ.get("REQUESTS", "100"))
USAGE_ENTRIES = int(os.environ.get("USAGE_ENTRIES", "100"))  # ledger usage entries per member in the exported month
TEAMS = 20
ZONE = "Europe/Berlin"


def seed():
    from django.utils import timezone

    from allowances.periods import period_start_for, periods_after
    from portal.models import Organization

    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO portal_organization (name, slug, time_zone, currency, created_at, leaver_allowance) "
                       "VALUES ('Bench', 'bench', %s, 'EUR', now(), 'keep') RETURNING id", [ZONE])
        org = cursor.fetchone()[0]
        cursor.execute("INSERT INTO portal_team (organization_id, name, cost_centre, created_at) "
                       "SELECT %s, 'Team ' || t, 'CC-' || t, now() FROM generate_series(1, %s) t", [org, TEAMS])
        cursor.execute("INSERT INTO portal_user (password, is_superuser, email, first_name, last_name, is_staff, "
                       "is_active, date_joined) SELECT '!', false, 'u' || i || '@bench.example', 'Member', i::text, "
                       "false, true, now() FROM generate_series(1, %s) i", [MEMBERS])
        cursor.execute("INSERT INTO portal_member (organization_id, user_id, team_id, is_owner, is_admin, is_hr, "
                       "is_approver, is_employee, is_active, joined_at) "
                       "SELECT %s, u.id, (SELECT min(id) FROM portal_team WHERE organization_id = %s) + u.id %% %s, "
                       "u.email = 'u1@bench.example', false, u.email = 'u1@bench.example', false, true, true, now() "
                       "FROM portal_user u WHERE u.email LIKE '%%@bench.example'", [org, org, TEAMS])
        cursor.execute("INSERT INTO gateway_providerconnection (organization_id, name, kind, base_url, secret_ciphertext, "
                       "secret_last_four, connect_timeout, read_timeout, responses_api, is_active, created_at) "
                       "VALUES (%s, 'Sandbox', 'sandbox', '', '', '', 5, 60, false, true, now()) RETURNING id", [org])
        provider = cursor.fetchone()[0]
        for model_id, prices in (("mini", (0.15, 0.60, 0.075)), ("mid", (1.00, 4.00, 0.5)), ("big", (2.50, 10.00, 1.25))):
            cursor.execute("INSERT INTO allowances_catalogmodel (organization_id, model_id, display_name, connection_id, "
                           "upstream_model, max_output_tokens, input_multiplier, output_multiplier, cached_multiplier, "
                           "input_price_per_million, output_price_per_million, cached_price_per_million, is_active) "
                           "VALUES (%s, %s, %s, %s, '', 4096, 1, 1, 1, %s, %s, %s, true)",
                           [org, model_id, model_id, provider, *prices])
        cursor.execute("INSERT INTO reports_reportsettings (organization_id, per_member_views, small_prompt_tokens, "
                       "small_reply_tokens, economy_model_id, valuation_model_id, reconciliation_tolerance_percent, "
                       "reconciliation_tolerance_tokens, updated_at) SELECT %s, false, 2000, 500, id, id, 1, 1000, now() "
                       "FROM allowances_catalogmodel WHERE organization_id = %s AND model_id = 'mini'", [org, org])
        cursor.execute("SELECT min(id) FROM portal_member WHERE organization_id = %s", [org])
        first_member = cursor.fetchone()[0]
        # 10,000,000 requests over DAYS days up to now: a mix of models, sizes and outcomes.
        cursor.execute(
            "INSERT INTO gateway_usagerecord (organization_id, member_id, model, requested_model, endpoint, source, status, "
            "input_tokens, output_tokens, cached_tokens, charged_tokens, uncharged_tokens, cost, latency_ms, request_id, "
            "response_id, idempotency_key, detail, occurred_at) "
            "SELECT %(org)s, %(first)s + i %% %(members)s, m.model, '', 'chat', 'gateway', s.status, s.inp, s.outp, s.cached, "
            "s.inp + s.outp + s.cached, 0, (s.inp * m.p_in + s.outp * m.p_out + s.cached * m.p_cached) / 1000000.0, 100, "
            "'', '', '', '', now() - (i::float / %(records)s) * interval '1 day' * %(days)s "
            "FROM generate_series(1::bigint, %(records)s) i "
            "CROSS JOIN LATERAL (SELECT (ARRAY['mini', 'mid', 'big'])[1 + i %% 3] AS model, "
            "  (ARRAY[0.15, 1.00, 2.50])[1 + i %% 3] AS p_in, (ARRAY[0.60, 4.00, 10.00])[1 + i %% 3] AS p_out, "
            "  (ARRAY[0.075, 0.5, 1.25])[1 + i %% 3] AS p_cached) m "
            "CROSS JOIN LATERAL (SELECT CASE WHEN i %% 50 = 0 THEN 'refused' WHEN i %% 97 = 0 THEN 'upstream_error' "
            "  WHEN i %% 211 = 0 THEN 'no_usage' ELSE 'ok' END AS status, "
            "  CASE WHEN i %% 50 = 0 THEN 0 ELSE 200 + (i * 7919) %% 6000 END AS inp, "
            "  CASE WHEN i %% 50 = 0 OR i %% 211 = 0 THEN 0 ELSE 20 + (i * 104729) %% 1500 END AS outp, "
            "  CASE WHEN i %% 4 = 0 THEN (i * 31) %% 3000 ELSE 0 END AS cached) s",
            {"org": org, "first": first_member, "members": MEMBERS, "records": RECORDS, "days": DAYS})
    organization = Organization.objects.get(pk=org)
    exported = periods_after(period_start_for(organization), -1)
    with connection.cursor() as cursor:
        # Last month's ledger: the monthly grant, a bonus for one in ten, USAGE_ENTRIES usage entries each.
        cursor.execute("INSERT INTO allowances_account (organization_id, member_id, period_start, granted, held, used, "
                       "overdraft_limit, opened_at) SELECT %s, id, %s, 0, 0, 0, 0, now() FROM portal_member "
                       "WHERE organization_id = %s", [org, exported, org])
        entry = ("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, "
                 "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) ")
        cursor.execute(entry + "SELECT organization_id, id, 'grant', 2000000, 2000000, 0, 0, period_start, 'grant', '', "
                       "'', '', now() FROM allowances_account WHERE organization_id = %s", [org])
        cursor.execute(entry + "SELECT organization_id, id, 'bonus', 500000, 500000, 0, 0, period_start, 'bonus', '', "
                       "'', '', now() FROM allowances_account WHERE organization_id = %s AND id %% 10 = 0", [org])
        cursor.execute(entry + "SELECT a.organization_id, a.id, 'usage', 1000 + n, 0, 0, 1000 + n, a.period_start, "
                       "'usage:' || n, 'mini', '', '', now() FROM allowances_account a "
                       "CROSS JOIN generate_series(1, %s) n WHERE a.organization_id = %s", [USAGE_ENTRIES, org])
        cursor.execute("UPDATE allowances_account a SET granted = s.g, used = s.u FROM (SELECT account_id, "
                       "sum(granted_delta) g, sum(used_delta) u FROM allowances_ledgerentry WHERE organization_id = %s "
                       "GROUP BY account_id) s WHERE s.account_id = a.id", [org])
        cursor.execute("ANALYZE")
    return organization, exported, timezone


def rollup(organization):
    from gateway.rollups import rollup_days

    return rollup_days(organization=organization, days=DAYS + 1)


def page_p95(organization) -> tuple[float, float]:
    from django.test import Client

    from portal.models import Member
    from portal.tenancy import unscoped

    with unscoped():
        hr = Member.all_objects.select_related("user").get(organization=organization, user__email="u1@bench.example")
    client = Client()
    client.force_login(hr.user, backend="django.contrib.auth.backends.ModelBackend")
    url = f"/o/{organization.slug}/reports/insights/"
    for _ in range(5):  # warm up
        assert client.get(url).status_code == 200
    times = []
    for number in range(REQUESTS):
        params = {"days": 30} if number % 2 else {"days": 30, "team": "Team 3"}
        start = time.perf_counter()
        response = client.get(url, params)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    times.sort()
    return times[int(len(times) * 0.95) - 1], statistics.median(times)


def records_baseline(organization) -> float:
    """The page's sums straight from the records of the same 30 days (what roll-ups save)."""
    with connection.cursor() as cursor:
        start = time.perf_counter()
        cursor.execute(
            "SELECT model, count(*), sum(cost), count(*) FILTER (WHERE status = 'ok'), sum(input_tokens), "
            "sum(cached_tokens), count(*) FILTER (WHERE status = 'ok' AND input_tokens + cached_tokens <= 2000 "
            "AND output_tokens <= 500) FROM gateway_usagerecord WHERE organization_id = %s AND occurred_at >= %s "
            "GROUP BY model", [organization.pk, date.today() - timedelta(days=29)])
        cursor.fetchall()
        return (time.perf_counter() - start) * 1000


def export_seconds(organization, period) -> tuple[float, float, int]:
    from portal.tenancy import scope
    from reports import documents, selectors, services
    from reports.models import StatementExport

    with scope(organization):
        start = time.perf_counter()
        items = selectors.statements(organization=organization, period_start=period)
        documents.statements_csv(items)
        csv_only = time.perf_counter() - start
        export = StatementExport.objects.create(organization=organization, period_start=period)
        start = time.perf_counter()
        export = services.statement_export_run(statement_export_id=export.pk)
        seconds = time.perf_counter() - start
    assert export.state == "done", export.error
    return seconds, csv_only, export.done


def main():
    create_database("portal_bench_reports")
    start = time.perf_counter()
    organization, period, _ = seed()
    seeded = time.perf_counter() - start
    start = time.perf_counter()
    rows = rollup(organization)
    rolled = time.perf_counter() - start
    print(f"reports.seed: {seeded:.0f} s ({RECORDS:,} usage records, {MEMBERS:,} members)")
    print(f"reports.rollup_{DAYS}_days: {rolled:.0f} s ({rows:,} member roll-up rows)")
    p95, median = page_p95(organization)
    print(f"reports.insights_page_p95: {p95:.1f} ms (median {median:.1f} ms, {REQUESTS} requests, 30 days, from roll-ups)")
    print(f"reports.insights_from_records: {records_baseline(organization):.0f} ms (the same sums from the usage records)")
    seconds, csv_only, members = export_seconds(organization, period)
    print(f"reports.statement_export: {seconds:.1f} s ({members:,} members: CSV and ZIP of PDFs)")
    print(f"reports.statements_csv_only: {csv_only:.1f} s (the statements and their CSV, no PDFs)")


if __name__ == "__main__":
    main()
