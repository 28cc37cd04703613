"""Group commit (gateway.batching) on real PostgreSQL: the gateway's holds and settlements posted
together in one transaction keep every promise of the ledger's single posts: no hold past a
balance or a key's cap, whatever shares a batch; a failing statement fails only its request; a
request cancelled while its batch is in flight leaves no open hold; a connection that dies under
a batch is replaced and what the batch posts is posted once."""

import asyncio
import random
import threading
from types import SimpleNamespace

import psycopg
import pytest
from django.utils import timezone

from allowances import ledger
from allowances import services as allowance_services
from allowances.ledger import verify
from allowances.models import Account, KeySpend, LedgerEntry
from apikeys.services import api_key_create
from gateway import batching, metering
from portal import async_db
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory
from tests.gateway.conftest import close_server_connections
from tests.gateway.test_async_path import run

pytestmark = pytest.mark.transactional

HOLD = 100  # tokens per hold
FITS = 5  # holds each account (or key cap) has room for
PER_ACCOUNT = 2 * FITS  # holds asked of each account: half of them fit
ACCOUNTS = 50  # 50 x 10 = 500 holds, 250 of which fit


@pytest.fixture(autouse=True)
def _group_commit(settings):
    settings.GATEWAY_GROUP_COMMIT = True
    yield
    close_server_connections()


@pytest.fixture
def batches(monkeypatch):
    """The statements each round trip carried: a list per batch posted together, [1] per statement alone."""
    sizes = []
    together, alone = batching._together, batching._alone

    async def counted_together(posts):
        sizes.append(len(posts))
        return await together(posts)

    async def counted_alone(post):
        sizes.append(1)
        return await alone(post)

    monkeypatch.setattr(batching, "_together", counted_together)
    monkeypatch.setattr(batching, "_alone", counted_alone)
    return sizes


def funded(org, count, *, label="gc"):
    """`count` members with an account and a key each: the even ones' accounts have room for FITS
    holds (their keys no cap), the odd ones' keys a cap of FITS holds (their accounts plenty)."""
    people = []
    with scope(org.organization):
        for number in range(count):
            member = MemberFactory(organization=org.organization, user__email=f"{label}{number}@a.example")
            account = allowance_services.account_open(member=member)
            capped = number % 2 == 1
            ledger.post(account=account, kind="bonus", tokens=HOLD * FITS * (100 if capped else 1),
                        idempotency_key="test:group-commit-funds")
            key, _secret = api_key_create(member=member, actor=member.user, name="gc", endpoints=["chat"],
                                          token_cap=HOLD * FITS if capped else None)
            people.append(SimpleNamespace(member=member, account=account, key=key))
    return people


def hold_statement(person, request_id, tokens=HOLD):
    return ledger.hold_statement(
        account=ledger.AccountRef(pk=person.account.pk, organization_id=person.account.organization_id),
        tokens=tokens, idempotency_key=request_id, model="fake-gpt", api_key_id=person.key.pk,
        spend_id=person.key.spend_id)


async def _posted(statements):
    """Run every statement at once through metering's path; each one's row, or its error."""
    return await asyncio.gather(*(metering._run(statement, orphan=metering._released_if_orphaned(statement))
                                  for statement in statements), return_exceptions=True)


def holds_of(person):
    with unscoped():
        return LedgerEntry.all_objects.filter(account_id=person.account.pk, kind="hold").count()


def open_holds():
    with unscoped():
        return LedgerEntry.all_objects.filter(kind="hold", closed_by__isnull=True).count()


def account_row(person):
    with unscoped():
        return Account.all_objects.values("granted", "held", "used").get(pk=person.account.pk)


@pytest.mark.parametrize(("batch_max", "loops"), [(1, 1), (2, 1), (7, 1), (500, 1), (7, 2), (500, 2)],
                         ids=["alone", "pairs", "sevens", "one-batch", "sevens-two-processes",
                              "one-batch-two-processes"])
def test_500_concurrent_holds_on_accounts_that_cover_half_grant_exactly_the_half_that_fits(
        org_a, batches, monkeypatch, batch_max, loops):
    monkeypatch.setattr(batching, "BATCH_MAX", batch_max)
    people = funded(org_a, ACCOUNTS)
    asked = [(person, f"gc-{index}-{n}") for index, person in enumerate(people) for n in range(PER_ACCOUNT)]
    random.Random(batch_max * 10 + loops).shuffle(asked)  # an account's holds land in one batch or in several
    shares = [asked[number::loops] for number in range(loops)]
    start = threading.Barrier(loops)
    outcomes = [None] * loops

    def one_process(number):
        async def scenario():
            statements = [hold_statement(person, request_id) for person, request_id in shares[number]]
            start.wait()
            return await _posted(statements)

        outcomes[number] = run(scenario())

    threads = [threading.Thread(target=one_process, args=(number,)) for number in range(loops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    rows = [row for share in outcomes for row in share]
    assert not [row for row in rows if isinstance(row, BaseException)]
    assert sum(row is not None for row in rows) == ACCOUNTS * FITS
    assert sum(batches) == len(asked)  # every statement went to the database once
    assert max(batches) == min(batch_max, len(asked) // loops)  # the first alone, then full batches
    for person in people:
        assert holds_of(person) == FITS, person.member
        assert account_row(person)["held"] == HOLD * FITS
        with unscoped():
            spend = KeySpend.all_objects.get(pk=person.key.spend_id)
        assert spend.held == HOLD * FITS
        assert spend.token_cap is None or spend.held <= spend.token_cap
    assert verify() == []


def test_a_batch_with_one_failing_statement_fails_only_that_request(org_a, batches):
    people = funded(org_a, 4)
    good = [hold_statement(people[number % 4], f"gc-good-{number}") for number in range(10)]
    # The settlement of a hold that is not there: the database refuses it (the foreign key of the
    # hold it closes, checked at commit: the batch's one commit fails, not a statement of it).
    missing = ledger.Hold(id=2**62, account_id=people[1].account.pk, organization_id=org_a.organization.pk,
                          tokens=HOLD, expires_at=timezone.now(), api_key_id=people[1].key.pk,
                          spend_id=people[1].key.spend_id)
    bad = ledger.settle_statement(hold=missing, used_tokens=10)
    statements = good[:6] + [bad] + good[6:]

    rows = run(_posted(statements))

    assert batches[0] == len(statements)  # posted as one batch first, then alone to find the failing one
    assert isinstance(rows[6], psycopg.IntegrityError), rows[6]
    others = rows[:6] + rows[7:]
    assert all(isinstance(row, tuple) for row in others), others
    # Two of the ten holds fall on each even account, three on each odd one: all fit.
    assert [holds_of(person) for person in people] == [3, 3, 2, 2]
    with unscoped():
        entries = LedgerEntry.all_objects.filter(kind="hold", account__member__in=[p.member for p in people])
        assert sorted(entries.values_list("id", flat=True)) == sorted(row[0] for row in others)
        assert not LedgerEntry.all_objects.filter(idempotency_key=f"settle:{missing.id}").exists()
    assert [account_row(person)["held"] for person in people] == [300, 300, 200, 200]
    assert verify() == []


async def _waiting_for_a_lock(pool, count=1):
    """Wait until `count` statements of the gateway wait for a row lock (a batch is in flight)."""
    for _ in range(500):
        async with pool.connection() as conn:
            waiting = await (await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'WITH entry AS%%'")).fetchone()
        if waiting[0] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no statement waits for the lock")


async def _locked(pool, person):
    """A transaction of the test's own holding the person's account row."""
    conn = await pool.getconn()
    await conn.execute("BEGIN")
    await conn.execute(f"SELECT id FROM {Account._meta.db_table} WHERE id = %s FOR UPDATE", [person.account.pk])
    return conn


async def _unlock(pool, conn):
    await conn.execute("ROLLBACK")
    await pool.putconn(conn)


async def _drained():
    """Wait until the loop's batcher has nothing queued or in flight."""
    batcher = batching._batchers[asyncio.get_running_loop()]
    for _ in range(500):
        if not batcher._queue and not batcher._posting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batcher did not drain")


def test_a_request_cancelled_while_its_batch_is_in_flight_leaves_no_open_hold(org_a, batches, monkeypatch):
    monkeypatch.setattr(batching, "IN_FLIGHT", 1)  # the second request's statement waits for the first batch
    first, second = funded(org_a, 2)
    before = open_holds()

    async def scenario():
        pool = await async_db.pool()
        locker_1, locker_2 = await _locked(pool, first), await _locked(pool, second)
        # The first batch (one statement, on the first account) waits for its lock; the next two
        # requests, on the second account, queue and become the second batch.
        alone = asyncio.ensure_future(_posted([hold_statement(first, "gc-cancel-1")]))
        await _waiting_for_a_lock(pool)
        together = [asyncio.ensure_future(_posted([hold_statement(second, f"gc-cancel-{n}")])) for n in (2, 3)]
        await asyncio.sleep(0.05)
        alone.cancel()  # its batch (of one) is in flight
        await _unlock(pool, locker_1)
        batcher = batching._batchers[asyncio.get_running_loop()]
        while batcher._queue:  # taken as the second batch once the first one ended
            await asyncio.sleep(0.01)
        await _waiting_for_a_lock(pool)  # the second batch is in flight now, waiting for the second account
        together[0].cancel()  # one of the two requests of a batch in flight
        await _unlock(pool, locker_2)
        kept = await together[1]
        await _drained()
        for task in (alone, together[0]):
            with pytest.raises(asyncio.CancelledError):
                await task
        return kept

    (kept,) = run(scenario())

    # The first request alone; the two others with the release of the first one's hold (queued as
    # its batch ended); then the release of the hold of the one cancelled in that batch.
    assert batches == [1, 3, 1]
    # The cancelled requests' holds were made, then released; the request still waiting has its own.
    with unscoped():
        made = {entry.idempotency_key: entry for entry in LedgerEntry.all_objects.filter(
            kind="hold", idempotency_key__startswith="hold:gc-cancel-")}
        assert set(made) == {"hold:gc-cancel-1", "hold:gc-cancel-2", "hold:gc-cancel-3"}
        released = LedgerEntry.all_objects.filter(kind="release", closes_hold__in=made.values())
        assert sorted(released.values_list("closes_hold__idempotency_key", flat=True)) == [
            "hold:gc-cancel-1", "hold:gc-cancel-2"]
    assert made["hold:gc-cancel-3"].pk == kept[0]
    assert open_holds() == before + 1  # the request still running
    assert account_row(first)["held"] == 0
    assert account_row(second)["held"] == HOLD
    assert verify() == []


def test_a_dead_connection_mid_batch_is_retried_once_and_metered_once(org_a, batches):
    people = funded(org_a, 3)
    statements = [hold_statement(person, f"gc-dead-{number}") for number, person in enumerate(people)]

    async def scenario():
        pool = await async_db.pool()
        locker = await _locked(pool, people[1])
        posting = asyncio.ensure_future(_posted(statements))
        await _waiting_for_a_lock(pool)
        async with pool.connection() as conn:  # the database ends the batch's session (a restart, a failover)
            ended = await (await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'WITH entry AS%%'")).fetchall()
        assert ended == [(True,)]
        await _waiting_for_a_lock(pool)  # run again on another connection, waiting for the same lock
        await _unlock(pool, locker)
        return await posting

    rows = run(scenario())

    assert batches == [3, 3]  # the batch, and once more
    assert all(isinstance(row, tuple) for row in rows), rows
    assert [holds_of(person) for person in people] == [1, 1, 1]
    assert [account_row(person)["held"] for person in people] == [HOLD] * 3
    assert verify() == []


def test_a_batch_whose_answer_was_lost_after_it_committed_is_metered_once(org_a, batches, monkeypatch):
    people = funded(org_a, 3)
    statements = [hold_statement(person, f"gc-lost-{number}") for number, person in enumerate(people)]
    together = batching._together
    lost = []

    async def committed_then_lost(posts):
        rows = await together(posts)
        if not lost:
            lost.append(rows)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows

    monkeypatch.setattr(batching, "_together", committed_then_lost)

    rows = run(_posted(statements))

    # The second run posted nothing (the holds exist): no row, and the caller's slow path finds them.
    assert rows == [None, None, None]
    assert [holds_of(person) for person in people] == [1, 1, 1]
    with scope(org_a.organization):
        found = [ledger.authorize(account=person.account, tokens=HOLD, idempotency_key=f"gc-lost-{number}",
                                  api_key_id=person.key.pk, spend_id=person.key.spend_id).id
                 for number, person in enumerate(people)]
    assert found == [row[0] for row in lost[0]]
    assert [holds_of(person) for person in people] == [1, 1, 1]
    assert [account_row(person)["held"] for person in people] == [HOLD] * 3
    assert verify() == []
