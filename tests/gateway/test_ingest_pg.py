"""Usage ingest's set-based PostgreSQL path under concurrency: one SQL statement per batch, the
accounts (and key spend counters) locked in id order first. Batches sent at the same moment must
count every event exactly once, never deadlock, and leave a ledger that adds up."""

import math
import threading
from collections import Counter, defaultdict
from decimal import ROUND_HALF_UP, Decimal

import httpx
import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from allowances import services as allowance_services
from allowances.ledger import verify
from allowances.models import Account, KeySpend, LedgerEntry
from apikeys import services as api_key_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, UserFactory
from tests.support.fake_upstream import ServerThread

pytestmark = pytest.mark.transactional

INGEST, AUTHORIZE, SETTLE = "/api/v1/usage", "/api/v1/authorize", "/api/v1/settle"
MODEL = "gpt-test"  # input x1, output x2, cached x0.5
ACCOUNTS = 20


def charge(e) -> int:
    halves = 2 * e["input_tokens"] + 4 * e.get("output_tokens", 0) + e.get("cached_tokens", 0)
    return -(-halves // 2)


@pytest.fixture
def crowd(org_a):
    """Org A with 20 more members, each with an open account, and an admin's usage_write key."""
    organization, admin = org_a.organization, org_a.members["admin"]
    emails = []
    with scope(organization):
        for i in range(ACCOUNTS):
            member = MemberFactory(organization=organization, team=org_a.team,
                                   user=UserFactory(email=f"crowd{i:02d}@a.example"))
            allowance_services.account_open(member=member)
            emails.append(member.user.email)
        _key, secret = api_key_services.api_key_create(member=admin, actor=admin.user, name="ingest",
                                                       endpoints=["usage_write"])
    return org_a, emails, secret


def used_by_email() -> dict:
    with unscoped():
        return dict(Account.all_objects.values_list("member__user__email", "used"))


def run_together(*jobs):
    """Run each job(client) in its own thread with its own client and connection, released at the same
    moment; the answers in order, and every exception any thread raised."""
    barrier = threading.Barrier(len(jobs))
    answers, errors = [None] * len(jobs), []

    def worker(index, job):
        try:
            client = Client()
            barrier.wait(timeout=30)
            answers[index] = job(client)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a request never finished (deadlock?)"
    return answers, errors


def sender(secret, events):
    def job(client):
        response = client.post(INGEST, data={"events": events}, content_type="application/json",
                               HTTP_AUTHORIZATION=f"Bearer {secret}")
        return response.status_code, response.json()

    return job


def batch(prefix, emails, count, *, key_prefix=None):
    """`count` events spread over the members in the given order (and every 7th, from the fourth on,
    through the fixture employee's key)."""
    events = []
    for i in range(count):
        e = {"idempotency_key": f"{prefix}-{i}", "model": MODEL, "input_tokens": 1 + i % 13,
             "output_tokens": i % 5, "cached_tokens": i % 3}
        if key_prefix is not None and i % 7 == 3:
            e["api_key"] = key_prefix
        else:
            e["member"] = emails[i % len(emails)]
        events.append(e)
    return events


def expected_used(events, employee_email) -> Counter:
    totals = Counter()
    for e in events:
        totals[e.get("member", employee_email)] += charge(e)
    return totals


def test_a_batch_is_applied_in_a_fixed_number_of_statements(crowd):
    """The set-based path: 20 or 500 events over the same accounts cost the same round trips."""
    org, emails, secret = crowd
    client = Client()

    def measured(events):
        with CaptureQueriesContext(connection) as queries:
            status, body = sender(secret, events)(client)
        assert status == 200 and body["recorded"] == len(events), body
        return len(queries)

    measured(batch("warm", emails, 20, key_prefix=org.api_key.display_prefix))
    small = measured(batch("small", emails, 20, key_prefix=org.api_key.display_prefix))
    large = measured(batch("large", emails, 500, key_prefix=org.api_key.display_prefix))
    assert large == small, (small, large)
    assert large <= 15, large
    assert verify() == []


@pytest.mark.parametrize("order", ["same order", "reversed order"])
def test_the_same_batch_sent_twice_at_once_is_recorded_once(crowd, order):
    org, emails, secret = crowd
    employee = org.members["employee"]
    events = batch("dup", emails, 500, key_prefix=org.api_key.display_prefix)
    second = events if order == "same order" else list(reversed(events))
    used_before = used_by_email()
    spend_before = KeySpend.all_objects.get(pk=org.api_key.spend_id).used

    answers, errors = run_together(sender(secret, events), sender(secret, second))

    assert errors == [], errors
    assert [status for status, _ in answers] == [200, 200], answers
    # Every event is recorded by exactly one of the two batches, a duplicate in the other.
    statuses = defaultdict(list)
    for _status, body in answers:
        assert body["rejected"] == 0
        for result in body["results"]:
            statuses[result["idempotency_key"]].append(result["status"])
    assert len(statuses) == 500
    assert all(sorted(s) == ["duplicate", "recorded"] for s in statuses.values()), statuses
    assert sum(body["recorded"] for _, body in answers) == 500
    assert sum(body["duplicates"] for _, body in answers) == 500

    with unscoped():
        records = UsageRecord.all_objects.filter(organization=org.organization, source=UsageRecord.Source.INGEST)
        assert records.count() == 500
        assert sorted(records.values_list("idempotency_key", flat=True)) == sorted(e["idempotency_key"] for e in events)
        assert LedgerEntry.all_objects.filter(idempotency_key__startswith="ingest:dup-").count() == 500
        spend_after = KeySpend.all_objects.get(pk=org.api_key.spend_id).used
    totals = expected_used(events, employee.user.email)
    used_after = used_by_email()
    for email, total in totals.items():
        assert used_after[email] - used_before[email] == total, email
    assert spend_after - spend_before == sum(charge(e) for e in events if "api_key" in e)
    assert verify() == []


def test_retries_racing_in_both_orders_count_each_event_once(crowd):
    """A gateway that retries a batch, re-chunked in another order, while the first attempt still
    runs: four copies (two in each order) at once, over several rounds, each event counted once."""
    org, emails, secret = crowd
    employee_email = org.members["employee"].user.email
    for round_ in range(3):
        events = batch(f"race{round_}", emails, 500, key_prefix=org.api_key.display_prefix)
        used_before = used_by_email()
        copies = [events, events[::-1], events, events[250:] + events[:250]]

        answers, errors = run_together(*(sender(secret, copy) for copy in copies))

        assert errors == [], (round_, errors)
        assert [status for status, _ in answers] == [200] * 4, answers
        assert sum(body["recorded"] for _, body in answers) == 500
        assert sum(body["duplicates"] for _, body in answers) == 3 * 500
        used_after = used_by_email()
        for email, total in expected_used(events, employee_email).items():
            assert used_after[email] - used_before[email] == total, (round_, email)
    with unscoped():
        assert UsageRecord.all_objects.filter(source=UsageRecord.Source.INGEST).count() == 3 * 500
    assert verify() == []


class _RollBack(Exception):
    pass


def test_a_batch_and_its_reversed_retry_stalled_mid_insert_do_not_deadlock(crowd):
    """Force the overlap the accounts' row locks exist for: another transaction holds the middle
    event's usage record (uncommitted) while a batch and its reversed retry arrive. Without the
    accounts locked first, each would insert half the events and then wait for the other's half."""
    org, emails, secret = crowd
    events = batch("stall", emails, 500, key_prefix=org.api_key.display_prefix)
    middle = events[250]["idempotency_key"]
    holding, release, blocker_errors = threading.Event(), threading.Event(), []

    def blocker():
        try:
            with transaction.atomic():
                UsageRecord.all_objects.create(
                    organization=org.organization, member=org.members["employee"], model=MODEL, endpoint="ingest",
                    source=UsageRecord.Source.INGEST, status=UsageRecord.Status.OK, idempotency_key=middle)
                holding.set()
                release.wait(timeout=60)
                raise _RollBack
        except _RollBack:
            pass
        except BaseException as error:  # noqa: BLE001 - reported by the test
            blocker_errors.append(error)
        finally:
            holding.set()
            connection.close()

    def watcher():
        """Let the blocker go once both requests are waiting on a lock (or after 10 seconds)."""
        try:
            for _ in range(200):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
                    if cursor.fetchone()[0] >= 2:
                        break
                threading.Event().wait(0.05)
        finally:
            release.set()
            connection.close()

    threads = [threading.Thread(target=blocker), threading.Thread(target=watcher)]
    threads[0].start()
    assert holding.wait(timeout=30)
    threads[1].start()
    answers, errors = run_together(sender(secret, events), sender(secret, events[::-1]))
    for thread in threads:
        thread.join(timeout=60)

    assert blocker_errors == [] and errors == [], (blocker_errors, errors)
    assert [status for status, _ in answers] == [200, 200], answers
    assert sum(body["recorded"] for _, body in answers) == 500
    assert sum(body["duplicates"] for _, body in answers) == 500
    with unscoped():
        assert UsageRecord.all_objects.filter(idempotency_key__startswith="stall-").count() == 500
    assert verify() == []


def test_batches_over_the_same_accounts_in_opposite_orders_do_not_deadlock(crowd):
    org, emails, secret = crowd
    forward = batch("fwd", emails, 400, key_prefix=org.api_key.display_prefix)
    # The same accounts, first met in the opposite order.
    backward = batch("bwd", list(reversed(emails)), 400, key_prefix=org.api_key.display_prefix)
    used_before = used_by_email()

    answers, errors = run_together(sender(secret, forward), sender(secret, backward),
                                   sender(secret, forward[200:] + forward[:200]))

    assert errors == [], errors
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert answers[1][1]["recorded"] == 400
    assert answers[0][1]["recorded"] + answers[2][1]["recorded"] == 400
    with unscoped():
        assert UsageRecord.all_objects.filter(source=UsageRecord.Source.INGEST).count() == 800
    totals = expected_used(forward, org.members["employee"].user.email) + expected_used(
        backward, org.members["employee"].user.email)
    used_after = used_by_email()
    for email, total in totals.items():
        assert used_after[email] - used_before[email] == total, email
    assert verify() == []


def test_ingest_alongside_holds_and_settlements_on_the_same_accounts(crowd):
    """Batches lock all their accounts; authorize and settle lock one: run together, nothing deadlocks
    and every hold, settlement and event is counted once."""
    org, emails, secret = crowd
    events = batch("mix", emails, 300)
    used_before = used_by_email()

    def holds(reverse):
        def job(client):
            charged = 0
            for i, email in enumerate(reversed(emails) if reverse else emails):
                auth = client.post(AUTHORIZE, data={"idempotency_key": f"h-{reverse}-{i}", "member": email,
                                                    "model": MODEL, "input_tokens": 1, "max_output_tokens": 0},
                                   content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")
                if auth.status_code == 429:
                    continue  # the new accounts may hold nothing: the race is what is under test
                assert auth.status_code == 201, auth.content
                done = client.post(SETTLE, data={"hold_id": auth.json()["hold_id"], "input_tokens": 3,
                                                 "output_tokens": 1},
                                   content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}")
                assert done.status_code == 200, done.content
                charged += done.json()["charged_tokens"]
            return charged

        return job

    answers, errors = run_together(sender(secret, events), holds(False), holds(True), sender(secret, events[::-1]))

    assert errors == [], errors
    assert answers[0][0] == answers[3][0] == 200
    assert answers[0][1]["recorded"] + answers[3][1]["recorded"] == 300
    with unscoped():
        settled = sum(UsageRecord.all_objects.filter(idempotency_key__startswith="settle:").values_list(
            "charged_tokens", flat=True))
    assert settled == answers[1] + answers[2]
    used_after = used_by_email()
    assert sum(used_after.values()) - sum(used_before.values()) == sum(charge(e) for e in events) + settled
    assert verify() == []


def test_every_value_reaches_the_rows_exactly(org_a):
    """The batch travels to PostgreSQL as one JSON document: keys with quotes, backslashes,
    placeholders and non-ASCII characters, times with offsets and microseconds, the largest token
    counts and costs far below a millionth come out in the rows as sent, in the batch's order."""
    organization, admin = org_a.organization, org_a.members["admin"]
    prices = (Decimal("0.1234"), Decimal("0.5"), Decimal("99999999.9999"))
    with scope(organization):
        allowance_services.catalog_model_create(
            organization=organization, actor=admin.user, model_id="priced", display_name="Priced",
            connection=org_a.provider_connection, input_multiplier="0.3", output_multiplier="1.7",
            cached_multiplier="0.25", input_price_per_million=str(prices[0]),
            output_price_per_million=str(prices[1]), cached_price_per_million=str(prices[2]))
        _key, secret = api_key_services.api_key_create(member=admin, actor=admin.user, name="ingest",
                                                       endpoints=["usage_write"])
    keys = ["zz-last-sorted-first", 'quote " and \\ backslash', "it's %(events)s %s {}", "ünïcödé ✓ 🙂 中文",
            "a" * 150, "0", "-"]
    times = ["2025-01-15T10:00:00.123456+05:30", "2025-01-15T10:00:00Z", "1999-12-31T23:59:59.999999-11:00",
             None, "2025-06-01T00:00:00+00:00", "2025-01-15T10:00:00.5-00:30", None]
    # Costs below a millionth, one exactly half of it, and one of 21 digits (more than a float keeps).
    counts = [(7, 0, 0), (0, 1, 0), (0, 0, 1), (10**9, 10**9, 10**9), (1, 3, 0), (0, 0, 0), (123456, 0, 10**9 - 1)]
    events = []
    for i, (key, at, (input_tokens, output_tokens, cached_tokens)) in enumerate(zip(keys, times, counts)):
        e = {"idempotency_key": key, "model": "priced", "input_tokens": input_tokens, "output_tokens": output_tokens,
             "cached_tokens": cached_tokens}
        e |= {"api_key": org_a.api_key.display_prefix} if i % 2 else {"member": org_a.members["employee"].user.email}
        if at is not None:
            e["timestamp"] = at
        events.append(e)
    started = timezone.now()

    status, body = sender(secret, events)(Client())

    assert status == 200 and body["recorded"] == len(events), body
    with unscoped():
        records = list(UsageRecord.all_objects.filter(organization=organization, model="priced").order_by("id"))
        entries = list(LedgerEntry.all_objects.filter(organization=organization, model="priced").order_by("id"))
    assert [r.idempotency_key for r in records] == keys
    assert [e.idempotency_key for e in entries] == [f"ingest:{key}" for key in keys]
    for record, entry, e, at in zip(records, entries, events, times):
        sent = (e["input_tokens"], e["output_tokens"], e["cached_tokens"])
        assert (record.input_tokens, record.output_tokens, record.cached_tokens) == sent, record
        weighted = math.ceil(Decimal("0.3") * sent[0] + Decimal("1.7") * sent[1] + Decimal("0.25") * sent[2])
        assert record.charged_tokens == entry.used_delta == entry.tokens == weighted, record
        cost = sum(n * price for n, price in zip(sent, prices)) / 10**6
        assert record.cost == cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP), (record, cost)
        if at is None:
            assert started <= record.occurred_at <= timezone.now()
        else:
            assert record.occurred_at == parse_datetime(at)
        assert (record.api_key_id, entry.api_key_id) == ((org_a.api_key.pk,) * 2 if "api_key" in e else (None, None))
        assert record.member_id == org_a.members["employee"].pk
    assert verify() == []


def server_backends() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                       "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        return {pid for (pid,) in cursor.fetchall()}


def test_under_asgi_api_requests_reuse_their_database_connection(crowd):
    """Served by uvicorn, as in production: batches answer as through the test client, and one after
    another they share a connection (a connection per request was a third of a batch's time). A
    connection lost between requests (a database restart) is replaced before the next request uses it."""
    from portal.asgi import application

    org, emails, secret = crowd
    seen = set()
    try:
        with ServerThread(application) as server, httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as http:
            for round_ in range(8):
                events = batch(f"asgi{round_}", emails, 50, key_prefix=org.api_key.display_prefix)
                answer = http.post(INGEST, json={"events": events + [events[0]]})
                assert answer.status_code == 200, answer.text[:300]
                body = answer.json()
                assert (body["recorded"], body["duplicates"], body["rejected"]) == (50, 1, 0), body
                seen |= server_backends()
            assert len(seen) <= 2, seen  # one per thread of the pool that served them, not one per request
            assert http.post(INGEST, json={"events": []}).status_code == 400
            assert http.post(INGEST, json={"events": []}, headers={"Authorization": "Bearer tap_nope"}).status_code == 401

            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                               [list(server_backends())])
            statuses = [http.post(INGEST, json={"events": batch(f"after{i}", emails, 5)}).status_code
                        for i in range(3)]
            assert statuses == [200, 200, 200], statuses  # each thread's dead connection is replaced first
    finally:
        with connection.cursor() as cursor:  # the server's threads are gone; end their sessions
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()")
    with unscoped():
        assert UsageRecord.all_objects.filter(idempotency_key__startswith="asgi").count() == 8 * 50
    assert verify() == []


def test_usage_records_carry_only_the_indexes_their_reads_need(org_a):
    """Each index costs every ingested event an insert: usage records keep the unique key and the
    three (column, time) indexes, the key's only where one is set, the Responses API's ids only
    where one is set (never by the ingest), and look-ups by organization, member or key (lists,
    PROTECT and cascade checks) still find an index."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                       [UsageRecord._meta.db_table])
        indexes = dict(cursor.fetchall())
    assert set(indexes) == {f"{UsageRecord._meta.db_table}_pkey", "usage_record_idempotency_key_unique",
                            "usage_org_time", "usage_member_time", "usage_key_time", "usage_response_id"}, indexes
    assert "WHERE (api_key_id IS NOT NULL)" in indexes["usage_key_time"]
    assert "WHERE (NOT ((response_id)::text = ''::text))" in indexes["usage_response_id"]
    with unscoped(), connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        try:
            for column, index in (("organization_id", "usage_"), ("member_id", "usage_member_time"),
                                  ("api_key_id", "usage_key_time")):
                cursor.execute(f"EXPLAIN SELECT id FROM {UsageRecord._meta.db_table} WHERE {column} = %s", [1])
                plan = "\n".join(row[0] for row in cursor.fetchall())
                assert "Seq Scan" not in plan and f"using {index}" in plan.lower(), (column, plan)
        finally:
            cursor.execute("RESET enable_seqscan")
