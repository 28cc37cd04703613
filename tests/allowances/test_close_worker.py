"""The monthly period close run by real Celery worker processes on the Redis broker.

Every account's period is closed exactly once whatever runs the close: one worker, the same task
again, a worker killed half way (SIGKILL) and a new one sent the task again, two workers on the
same organization at once. "Exactly once" is checked against the ledger each account must end
with (the rollover, expiry and next grant of the policy, each with its idempotency key), the
stored balances, and `ledger.verify()`.

The workers run `celery -A portal worker --pool=solo` as child processes on the test database
(tests/support/celery_worker.py); tasks are sent through an app of the test's own, because the
test process's app runs tasks eagerly.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import allow_join_result
from django.db import connection

from allowances import closing, ledger
from allowances import services as allowance_services
from allowances.models import Account, LedgerEntry
from allowances.periods import next_period_start, period_bounds, period_start_for
from portal.celery import app as portal_celery_app
from portal.models import Organization
from portal.tenancy import scope
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory
from tests.support.celery_worker import WorkerPool, purge, sender_app, terminate_database_backends

pytestmark = pytest.mark.services

CLOSE_ORGANIZATION = "allowances.close_organization_periods"
CLOSE_DUE = "allowances.close_due_periods"
# Where `close_due_periods` queues the per-organization closes (.delay, no queue named).
DEFAULT_QUEUE = portal_celery_app.conf.task_default_queue
TIMEOUT = 120.0  # seconds for one task or one wait; a close of a few thousand accounts takes about a second
KILL_ACCOUNTS = 4 * closing.CHUNK_SIZE  # a worker is killed while closing these: four chunks
TWO_WORKER_ACCOUNTS = 3_000

MONTHLY = 100_000
ROLLOVER_CAP = 30_000  # capped rollover, for one period: unused tokens above the cap expire
USAGE_STEP = 10_000  # account i used (i % 10) * 10,000 tokens: from nothing to 90% of the month
POLICY_SINCE = datetime(2025, 1, 1, tzinfo=UTC)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def broker():
    """A Celery app of the test's own on the test broker (the test process's app is eager)."""
    app = sender_app()
    yield app
    app.close()


@pytest.fixture
def queue(broker):
    """A queue of this test's own, empty before and after."""
    name = f"close-test-{uuid.uuid4().hex[:10]}"
    purge(broker, name)
    yield name
    purge(broker, name)


@pytest.fixture
def workers(transactional_db, broker, tmp_path):
    """Start workers with workers.start(queue); all are stopped, and their database connections
    ended, before pytest-django flushes the test database (this fixture is torn down first)."""
    pool = WorkerPool(broker, tmp_path)
    yield pool
    pool.stop_all()
    terminate_database_backends()


# -- data ----------------------------------------------------------------------------------------


def previous_period(period: date) -> date:
    return date(period.year - (period.month == 1), (period.month - 2) % 12 + 1, 1)


def usage_for(index: int) -> int:
    return (index % 10) * USAGE_STEP


@dataclass
class Seeded:
    organization: Organization
    closed: date  # the period the accounts are in, which the close ends
    opened: date  # the period they must be in afterwards
    used: dict  # account id -> tokens used in the closed period

    @property
    def count(self) -> int:
        return len(self.used)


def make_organization(label: str, time_zone: str = "Europe/Berlin"):
    """An organization whose team is governed by a policy since 2025: 100,000 tokens a month,
    up to 30,000 unused tokens roll over for one period."""
    organization = OrganizationFactory(name=f"Close {label}", slug=f"close-{label}", time_zone=time_zone)
    team = TeamFactory(organization=organization, name=f"Team {label}")
    with scope(organization):
        policy = allowance_services.policy_create(
            organization=organization, actor=None, name="Standard", monthly_tokens=MONTHLY,
            rollover_rule="capped_tokens", rollover_cap_tokens=ROLLOVER_CAP)
        allowance_services.policy_assign(organization=organization, actor=None, policy=policy, team=team,
                                         immediately=True, at=POLICY_SINCE)
    return organization, team


def seed_through_services(label: str, count: int, *, time_zone: str = "Europe/Berlin",
                          period: date | None = None) -> Seeded:
    """Members opened through account_open at the first instant of `period` (default: the month
    before the organization's current one), so each got the whole monthly grant then; then usage."""
    organization, team = make_organization(label, time_zone)
    closed = period or previous_period(period_start_for(organization))
    begin = period_bounds(organization, closed)[0]
    used = {}
    with scope(organization):
        for index in range(count):
            member = MemberFactory(organization=organization, team=team)
            account = allowance_services.account_open(member=member, at=begin)
            assert (account.period_start, account.granted) == (closed, MONTHLY), "account_open did not seed as expected"
            if usage_for(index):
                ledger.post(account=account, kind=ledger.Kind.USAGE, tokens=usage_for(index),
                            used_delta=usage_for(index), idempotency_key=f"usage:seed:{account.pk}", reason="seeded")
            used[account.pk] = usage_for(index)
    return Seeded(organization, closed, next_period_start(closed), used)


def seed_in_bulk(label: str, count: int, *, time_zone: str = "Europe/Berlin", period: date | None = None) -> Seeded:
    """The same accounts as seed_through_services, written in a few SQL statements (as
    bench/ledger.py seeds): the grant and usage entries and the stored balances agree."""
    organization, team = make_organization(label, time_zone)
    closed = period or previous_period(period_start_for(organization))
    begin = period_bounds(organization, closed)[0]
    domain = f"{organization.slug}.example"
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO portal_user (password, is_superuser, email, first_name, last_name, is_staff, is_active, "
            "date_joined) SELECT '!', false, 'member' || i || '@' || %s, 'Test', 'Member', false, true, now() "
            "FROM generate_series(1, %s) i", [domain, count])
        cursor.execute(
            "INSERT INTO portal_member (organization_id, user_id, team_id, is_owner, is_admin, is_hr, is_approver, "
            "is_employee, is_active, joined_at) SELECT %s, id, %s, false, false, false, false, true, true, %s "
            "FROM portal_user WHERE email LIKE %s", [organization.pk, team.pk, begin, f"%@{domain}"])
        cursor.execute(
            "INSERT INTO allowances_account (organization_id, member_id, period_start, granted, held, used, "
            "overdraft_limit, opened_at) SELECT %s, id, %s, %s, 0, mod(row_number() OVER (ORDER BY id) - 1, 10) * %s, "
            "0, %s FROM portal_member WHERE organization_id = %s",
            [organization.pk, closed, MONTHLY, USAGE_STEP, begin, organization.pk])
        entry = ("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, "
                 "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) ")
        cursor.execute(
            entry + "SELECT organization_id, id, 'grant', granted, granted, 0, 0, period_start, "
            "'grant:' || period_start::text, '', 'Standard: monthly allowance', '', %s "
            "FROM allowances_account WHERE organization_id = %s", [begin, organization.pk])
        cursor.execute(
            entry + "SELECT organization_id, id, 'usage', used, 0, 0, used, period_start, 'usage:seed:' || id, '', "
            "'seeded', '', %s FROM allowances_account WHERE organization_id = %s AND used > 0",
            [begin, organization.pk])
        cursor.execute("ANALYZE")
    used = dict(Account.all_objects.filter(organization=organization).values_list("pk", "used"))
    assert len(used) == count
    return Seeded(organization, closed, next_period_start(closed), used)


# -- what the ledger must say ----------------------------------------------------------------------


def expected_close(used: int) -> tuple[int, int]:
    """(expired, rolled over) of an account that used `used` of its monthly grant."""
    unused = MONTHLY - used
    rolled = min(unused, ROLLOVER_CAP)
    return unused - rolled, rolled


def expected_entries(seeded: Seeded, account_id: int, *, closed: bool) -> list[tuple]:
    """(key, kind, tokens, granted, held, used, period, (expired, rolled over, tranches, granted)) of
    every entry the account must have (the close's parts on its one close entry)."""
    used = seeded.used[account_id]
    old, new = seeded.closed.isoformat(), seeded.opened.isoformat()
    no_parts = (None, None, None, None)
    rows = [(f"grant:{old}", "grant", MONTHLY, MONTHLY, 0, 0, old, no_parts)]
    if used:
        rows.append((f"usage:seed:{account_id}", "usage", used, 0, 0, used, old, no_parts))
    if closed:
        expired, rolled = expected_close(used)
        tranches = [(new, rolled)] if rolled else []
        rows.append((f"close:{old}", "close", MONTHLY - expired, MONTHLY - expired, 0, 0, old,
                     (expired, rolled, tranches, MONTHLY)))
    return sorted(rows)


def expected_account(seeded: Seeded, account_id: int, *, closed: bool) -> tuple:
    """(period, granted, held, used) stored on the account."""
    used = seeded.used[account_id]
    if not closed:
        return (seeded.closed, MONTHLY, 0, used)
    expired, _rolled = expected_close(used)
    return (seeded.opened, 2 * MONTHLY - expired, 0, used)  # available: this month's grant + what rolled over


def actual_entries(seeded: Seeded) -> dict[int, list[tuple]]:
    rows = defaultdict(list)
    for account_id, *row, expired, rolled, until, tokens, granted in LedgerEntry.all_objects.filter(
            organization=seeded.organization).values_list(
            "account_id", "idempotency_key", "kind", "tokens", "granted_delta", "held_delta", "used_delta",
            "period_start", "close_expired", "close_rolled_over", "close_rollover_until", "close_rollover_tokens",
            "close_granted"):
        tranches = None if until is None else [(day.isoformat(), amount) for day, amount in zip(until, tokens, strict=True)]
        rows[account_id].append((*row[:-1], row[-1].isoformat(), (expired, rolled, tranches, granted)))
    return {account_id: sorted(entries) for account_id, entries in rows.items()}


def actual_accounts(seeded: Seeded) -> dict[int, tuple]:
    """account id -> (period, granted, held, used) as stored."""
    return {pk: tuple(rest) for pk, *rest in Account.all_objects.filter(organization=seeded.organization).values_list(
        "pk", "period_start", "granted", "held", "used")}


def account_states(seeded: Seeded) -> dict[int, str]:
    """For each account: "open" (untouched), "closed" (exactly the full close) or "broken"."""
    entries, accounts = actual_entries(seeded), actual_accounts(seeded)
    states = {}
    for account_id in seeded.used:
        got = (entries.get(account_id, []), accounts.get(account_id))
        if got == (expected_entries(seeded, account_id, closed=True), expected_account(seeded, account_id, closed=True)):
            states[account_id] = "closed"
        elif got == (expected_entries(seeded, account_id, closed=False),
                     expected_account(seeded, account_id, closed=False)):
            states[account_id] = "open"
        else:
            states[account_id] = "broken"
    return states


def describe_broken(seeded: Seeded, states: dict[int, str], limit: int = 3) -> str:
    entries, accounts = actual_entries(seeded), actual_accounts(seeded)
    lines = []
    for account_id in [pk for pk, state in states.items() if state != "closed"][:limit]:
        lines.append(f"account {account_id} ({states[account_id]}): stored {accounts.get(account_id)}, "
                     f"expected closed {expected_account(seeded, account_id, closed=True)}\n"
                     f"  entries  {entries.get(account_id)}\n"
                     f"  expected {expected_entries(seeded, account_id, closed=True)}")
    return "\n".join(lines)


def assert_closed_exactly_once(seeded: Seeded) -> None:
    """Every account moved to the next period with exactly the close's entries, once; the ledger agrees."""
    states = account_states(seeded)
    not_closed = {pk: state for pk, state in states.items() if state != "closed"}
    assert not not_closed, (
        f"{len(not_closed)} of {seeded.count} accounts are not closed exactly once "
        f"({sum(s == 'open' for s in not_closed.values())} untouched, "
        f"{sum(s == 'broken' for s in not_closed.values())} with other entries or balances):\n"
        + describe_broken(seeded, states))
    grants = LedgerEntry.all_objects.filter(organization=seeded.organization, kind=LedgerEntry.Kind.CLOSE,
                                            idempotency_key=f"close:{seeded.closed}", close_granted=MONTHLY)
    assert grants.count() == seeded.count
    assert grants.values("account_id").distinct().count() == seeded.count
    assert ledger.verify() == []


def assert_untouched(seeded: Seeded) -> None:
    states = account_states(seeded)
    assert set(states.values()) == {"open"}, (
        f"accounts of {seeded.organization.slug} changed although nothing of theirs was due: "
        f"{sorted(set(states.values()))}\n" + describe_broken(seeded, states))


def moved(seeded: Seeded) -> int:
    return Account.all_objects.filter(organization=seeded.organization, period_start=seeded.opened).count()


def ledger_snapshot(seeded: Seeded) -> tuple:
    return (LedgerEntry.all_objects.count(), sorted(actual_accounts(seeded).items()),
            sorted(LedgerEntry.all_objects.values_list("pk", flat=True)))


# -- waiting ---------------------------------------------------------------------------------------


def result_of(async_result, pool: WorkerPool, timeout: float = TIMEOUT):
    """The task's return value; its exception if it raised; a clear failure with the workers' logs if it
    never finished."""
    # The test process runs no task, whatever Celery's process-wide flag says: eager tasks run at
    # once in a live server's threads can leave it set (each restores the value it found).
    try:
        with allow_join_result():
            return async_result.get(timeout=timeout, interval=0.1)
    except CeleryTimeoutError:
        raise AssertionError(f"task {async_result.id} did not finish within {timeout:.0f}s:\n{pool.describe()}") from None


def wait_until(condition, *, what: str, pool: WorkerPool, timeout: float = TIMEOUT, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}:\n{pool.describe()}")
        time.sleep(interval)


# -- tests -----------------------------------------------------------------------------------------


def test_a_worker_closes_every_account_of_the_organization_once(workers, broker, queue):
    seeded = seed_through_services("one", 25)
    bystander = seed_through_services("bystander", 3)  # also due, but the task is for one organization only
    assert seeded.opened == period_start_for(seeded.organization), "the seeded period should be last month"
    workers.start(queue)

    closed = result_of(broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue), workers)

    assert closed == seeded.count
    assert_closed_exactly_once(seeded)
    assert_untouched(bystander)


def test_running_the_close_again_changes_nothing(workers, broker, queue):
    seeded = seed_through_services("again", 20)
    workers.start(queue)
    assert result_of(broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue),
                     workers) == seeded.count
    assert_closed_exactly_once(seeded)
    before = ledger_snapshot(seeded)

    again = result_of(broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue), workers)

    assert again == 0
    assert ledger_snapshot(seeded) == before
    assert_closed_exactly_once(seeded)


def test_a_worker_killed_half_way_leaves_whole_accounts_and_a_new_worker_closes_the_rest(workers, broker, queue):
    # Several chunks (closing.CHUNK_SIZE accounts each), so that some are closed while others are not yet.
    seeded = seed_in_bulk("killed", KILL_ACCOUNTS)
    first = workers.start(queue)
    killed_task = broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue)

    # Kill it (SIGKILL: no warm shutdown) as soon as some accounts are closed and others are not.
    deadline = time.monotonic() + TIMEOUT
    while (done := moved(seeded)) == 0:
        assert first.alive(), f"the worker died on its own: {first.describe()}"
        assert time.monotonic() < deadline, f"no account closed after {TIMEOUT:.0f}s:\n{workers.describe()}"
        time.sleep(0.005)
    first.kill()
    closed_before_kill = moved(seeded)
    assert closed_before_kill < seeded.count, (
        f"the close finished before the worker was killed ({done} closed when seen, {closed_before_kill} after the "
        "kill): the test needs more accounts to cut it half way")
    assert not killed_task.ready(), (
        f"the task returned {killed_task.result!r} before the kill although {seeded.count - closed_before_kill} "
        "accounts were still due")

    # What the killed worker left: every account whole, either untouched or closed, the ledger consistent.
    states = account_states(seeded)
    assert "broken" not in states.values(), "a killed close left a half-closed account:\n" + describe_broken(seeded, states)
    assert sum(state == "closed" for state in states.values()) == closed_before_kill
    assert ledger.verify() == []

    workers.start(queue)
    rerun = result_of(broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue), workers)

    # acks_late: the killed task's message may be redelivered too (on Redis, after the visibility
    # timeout); if it ran again, what it closed counts with the rerun.
    redelivered = killed_task.result if killed_task.ready() else 0
    assert closed_before_kill + rerun + redelivered == seeded.count, (
        f"{closed_before_kill} closed before the kill, {rerun} by the rerun, {redelivered} by a redelivery; "
        f"{seeded.count} were due")
    assert_closed_exactly_once(seeded)


def test_two_workers_closing_one_organization_at_once_close_each_account_once(workers, broker, queue):
    seeded = seed_in_bulk("twice", TWO_WORKER_ACCOUNTS)
    workers.start(queue)
    workers.start(queue)

    tasks = [broker.send_task(CLOSE_ORGANIZATION, args=[seeded.organization.pk], queue=queue) for _ in range(2)]
    counts = [result_of(task, workers) for task in tasks]

    assert sum(counts) == seeded.count, f"the two tasks closed {counts} accounts; {seeded.count} were due"
    assert_closed_exactly_once(seeded)


def test_close_due_periods_through_the_worker_queues_the_organizations_whose_month_ended(workers, broker, queue):
    # The Kiritimati (UTC+14) organization's accounts are still in its last month: due. The UTC-12
    # organization's accounts are in the month that is current there: not due. (The worker closes
    # at the real moment; the in-process test below picks moments when only one of the months ended.)
    due = seed_in_bulk("due", 40, time_zone="Pacific/Kiritimati")
    not_yet = seed_through_services("not-yet", 5, time_zone="Etc/GMT+12",
                                    period=period_start_for(Organization(time_zone="Etc/GMT+12")))
    purge(broker, DEFAULT_QUEUE)
    try:
        workers.start(queue, DEFAULT_QUEUE)  # the per-organization closes are queued with .delay (the default queue)

        queued = result_of(broker.send_task(CLOSE_DUE, queue=queue), workers)

        assert queued == 1, f"close_due_periods queued {queued} organizations; only {due.organization.slug} was due"
        wait_until(lambda: moved(due) == due.count, what=f"all {due.count} accounts of the due organization are closed",
                   pool=workers)
        assert_closed_exactly_once(due)
        assert_untouched(not_yet)
    finally:
        purge(broker, DEFAULT_QUEUE)


def test_close_due_periods_closes_each_organization_when_its_own_month_ended():
    """In-process, at chosen instants around the end of October 2026 in UTC+14 and UTC-12."""
    october = date(2026, 10, 1)
    east = seed_in_bulk("east", 6, time_zone="Pacific/Kiritimati", period=october)  # UTC+14
    west = seed_in_bulk("west", 4, time_zone="Etc/GMT+12", period=october)  # UTC-12

    # 00:30 UTC on 1 November: 14:30 on 1 November in Kiritimati, 12:30 on 31 October at UTC-12.
    first = closing.close_due_periods(at=datetime(2026, 11, 1, 0, 30, tzinfo=UTC))
    assert (first.organizations, first.accounts_closed) == (1, east.count)
    assert first.periods == [(east.organization.slug, october, east.count)]
    assert_closed_exactly_once(east)
    assert_untouched(west)

    # 12:30 UTC: 00:30 on 1 November at UTC-12; Kiritimati has nothing left to close.
    second = closing.close_due_periods(at=datetime(2026, 11, 1, 12, 30, tzinfo=UTC))
    assert second.periods == [(west.organization.slug, october, west.count)]
    assert_closed_exactly_once(west)
    assert_closed_exactly_once(east)

    again = closing.close_due_periods(at=datetime(2026, 11, 1, 12, 30, tzinfo=UTC))
    assert (again.organizations, again.accounts_closed) == (0, 0)
