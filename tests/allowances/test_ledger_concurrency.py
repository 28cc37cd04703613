"""The ledger under real concurrency, on PostgreSQL: each thread has its own database connection."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.management import call_command
from django.db import connection

from allowances import ledger
from allowances.models import Account, LedgerEntry
from portal.tenancy import unscoped
from tests.factories import MemberFactory

pytestmark = pytest.mark.transactional

HOLD = 1_000


def funded_account(tokens: int) -> Account:
    member = MemberFactory()
    with unscoped():
        account = Account.objects.create(organization=member.organization, member=member, period_start="2026-11-01")
        ledger.post(account=account, kind=ledger.Kind.GRANT, tokens=tokens, idempotency_key="grant:test")
    return account


def run_together(count: int, work):
    """Run work(i) in `count` threads released at the same instant; close each thread's connection."""
    barrier = threading.Barrier(count)

    def task(i):
        try:
            barrier.wait()
            return work(i)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(task, range(count)))


def outcome(call):
    try:
        return call()
    except ledger.InsufficientTokens as refused:
        return refused


def test_200_concurrent_authorizations_take_exactly_what_the_balance_covers():
    account = funded_account(100 * HOLD)
    results = run_together(200, lambda i: outcome(
        lambda: ledger.authorize(account=account, tokens=HOLD, idempotency_key=f"request-{i}")))

    holds = [r for r in results if isinstance(r, ledger.Hold)]
    refused = [r for r in results if isinstance(r, ledger.InsufficientTokens)]
    assert len(holds) == 100 and len(refused) == 100
    assert all(r.requested == HOLD and r.available < HOLD for r in refused)
    account.refresh_from_db()
    assert account.held == 100 * HOLD and account.available == 0
    assert LedgerEntry.all_objects.filter(account=account, kind="hold").count() == 100
    call_command("verify_ledger")


def test_concurrent_holds_never_go_below_the_approved_overdraft():
    account = funded_account(10 * HOLD)
    Account.all_objects.filter(pk=account.pk).update(overdraft_limit=5 * HOLD)
    results = run_together(40, lambda i: outcome(
        lambda: ledger.authorize(account=account, tokens=HOLD, idempotency_key=f"r{i}")))
    assert sum(isinstance(r, ledger.Hold) for r in results) == 15
    account.refresh_from_db()
    assert account.available == -5 * HOLD
    call_command("verify_ledger")


def test_retries_of_one_authorization_racing_each_other_hold_once():
    account = funded_account(100 * HOLD)
    holds = run_together(50, lambda i: ledger.authorize(account=account, tokens=HOLD, idempotency_key="same-request"))
    assert len({hold.id for hold in holds}) == 1
    account.refresh_from_db()
    assert account.held == HOLD
    call_command("verify_ledger")


def test_settles_and_releases_racing_on_one_hold_close_it_exactly_once():
    account = funded_account(100 * HOLD)
    hold = ledger.authorize(account=account, tokens=HOLD, idempotency_key="in-flight")
    # Half the threads settle (the request finished), half release (the sweeper or a disconnect).
    run_together(40, lambda i: ledger.settle(hold=hold, used_tokens=400) if i % 2 else ledger.release(hold=hold))
    closing = LedgerEntry.all_objects.filter(closes_hold_id=hold.id)
    assert closing.count() == 1
    account.refresh_from_db()
    assert account.held == 0
    # Either it was settled (400 used) or released first, and then the late settle still counts once.
    assert account.used == 400
    assert LedgerEntry.all_objects.filter(account=account, kind="usage").count() == 1
    call_command("verify_ledger")


def test_many_requests_settling_concurrently_leave_exact_totals():
    account = funded_account(1_000 * HOLD)

    def request(i):
        hold = ledger.authorize(account=account, tokens=HOLD, idempotency_key=f"q{i}")
        ledger.settle(hold=hold, used_tokens=i)  # some use less than the hold, none more
        ledger.settle(hold=hold, used_tokens=i)  # a client retry changes nothing
        return i

    used = sum(run_together(60, request))
    account.refresh_from_db()
    assert (account.used, account.held) == (used, 0)
    assert account.available == 1_000 * HOLD - used
    call_command("verify_ledger")
