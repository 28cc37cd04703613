"""Exactly once on real PostgreSQL, each thread on its own connection: two approvers approving one
request at the same instant, the same decision retried at once, an approval racing the
requester's cancel, approvals racing past the organization's cap, a member asking twice at once.
Whatever the interleaving, a request is decided once, granted at most once, and the ledger
verifies."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import connection

from allowances import closing
from allowances.models import LedgerEntry
from allowances.periods import period_bounds
from overage import services
from overage.models import OverageRequest
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.overage.conftest import ask, build_overage_org

pytestmark = pytest.mark.transactional
State = OverageRequest.State


@pytest.fixture
def ovr(transactional_db):
    return build_overage_org(slug="race")


def run_together(count: int, work):
    """work(i) in `count` threads released at once, each in the organization's scope (a thread
    starts with none) and closing its own connection."""
    barrier = threading.Barrier(count)

    def task(i):
        try:
            barrier.wait()
            return work(i)
        except (services.OverageConflict, ValidationError) as refused:
            return refused
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(task, range(count)))


def in_scope(organization, call):
    with scope(organization):
        return call()


def grants(overage_request) -> int:
    with unscoped():
        return LedgerEntry.all_objects.filter(kind=LedgerEntry.Kind.OVERAGE_GRANT,
                                              idempotency_key=overage_request.ledger_key).count()


def audit_count(action) -> int:
    with unscoped():
        return AuditLogEntry.all_objects.filter(action=action).count()


@pytest.mark.parametrize("repeat", range(3))
def test_two_approvers_approving_one_request_at_once_make_one_decision_and_one_grant(ovr, repeat):
    overage_request = ask(ovr.alice, 200_000)
    approvers = [ovr.approver, ovr.eng_approver]
    results = run_together(2, lambda i: in_scope(ovr.organization, lambda: services.overage_request_decide(
        overage_request=overage_request, actor_member=approvers[i], decision="approve",
        tokens=[150_000, 200_000][i])))
    decided = [result for result in results if isinstance(result, tuple)]
    conflicts = [result for result in results if isinstance(result, services.OverageConflict)]
    assert len(decided) == 1 and len(conflicts) == 1, results
    [(winner, _)] = decided
    assert "no longer pending" in str(conflicts[0])
    with unscoped():
        stored = OverageRequest.all_objects.get(pk=overage_request.pk)
    assert (stored.decided_by_id, stored.approved_tokens) == (winner.decided_by_id, winner.approved_tokens)
    assert grants(overage_request) == 1
    assert audit_count(f"overage_request.{stored.state}") == 1
    call_command("verify_ledger")


def test_the_same_decision_retried_at_once_decides_once_and_answers_each_retry_alike(ovr):
    overage_request = ask(ovr.alice, 200_000)
    results = run_together(6, lambda i: in_scope(ovr.organization, lambda: services.overage_request_decide(
        overage_request=overage_request, actor_member=ovr.approver, decision="approve", tokens=120_000)))
    assert sorted(changed for _decided, changed in results) == [False] * 5 + [True]
    assert {(decided.state, decided.approved_tokens) for decided, _ in results} == {(State.PARTIALLY_APPROVED,
                                                                                      120_000)}
    assert grants(overage_request) == 1 and audit_count("overage_request.partially_approved") == 1
    call_command("verify_ledger")


def test_an_approval_racing_the_requesters_cancel_ends_in_one_state(ovr):
    for attempt in range(4):
        overage_request = ask(ovr.bob, 10_000 + attempt)
        calls = [lambda: services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                                         decision="approve"),
                 lambda: services.overage_request_cancel(overage_request=overage_request, actor_member=ovr.bob)]
        results = run_together(2, lambda i: in_scope(ovr.organization, calls[i]))
        with unscoped():
            stored = OverageRequest.all_objects.get(pk=overage_request.pk)
        assert stored.state in (State.APPROVED, State.CANCELLED)
        assert grants(overage_request) == (1 if stored.state == State.APPROVED else 0)
        assert sum(isinstance(result, services.OverageConflict) for result in results) == 1
    call_command("verify_ledger")


def test_approvals_racing_each_other_never_pass_the_organizations_cap(ovr):
    with scope(ovr.organization):
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=250_000)
    requests = [ask(member, 100_000) for member in (ovr.alice, ovr.bob, ovr.approver)]
    requests.append(ask(ovr.carol, 300_001))  # past Research's auto-approval: pending
    deciders = [ovr.eng_approver, ovr.eng_approver, ovr.eng_approver, ovr.approver]
    results = run_together(4, lambda i: in_scope(ovr.organization, lambda: services.overage_request_decide(
        overage_request=requests[i], actor_member=deciders[i], decision="approve", tokens=100_000)))
    approved = [result for result in results if isinstance(result, tuple)]
    refused = [result for result in results if isinstance(result, ValidationError)]
    assert len(approved) == 2 and len(refused) == 2, results
    assert all("has 50,000 tokens left" in " ".join(error.messages) for error in refused)
    with unscoped():
        total = sum(OverageRequest.all_objects.filter(state__in=OverageRequest.APPROVED_STATES)
                    .values_list("approved_tokens", flat=True))
    assert total == 200_000
    call_command("verify_ledger")


def test_a_member_asking_twice_at_once_gets_one_pending_request(ovr):
    results = run_together(4, lambda i: in_scope(ovr.organization, lambda: services.overage_request_create(
        member=ovr.alice, actor=ovr.alice.user, tokens=1_000 + i, reason=f"try {i}")))
    made = [result for result in results if isinstance(result, tuple)]
    assert len(made) == 1 and sum(isinstance(r, services.OverageConflict) for r in results) == 3
    with unscoped():
        assert OverageRequest.all_objects.filter(member=ovr.alice, state=State.PENDING).count() == 1


def test_auto_approvals_asked_at_once_stay_within_the_policys_tokens(ovr):
    """Dave asks four times at once under Research (300,000 a month in two requests); each one
    finds the one before it decided, so exactly the policy's tokens are approved at once."""
    def one(i):
        created, _ = services.overage_request_create(member=ovr.dave, actor=ovr.dave.user, tokens=150_000,
                                                     reason=f"burst {i}")
        if created.is_pending:
            services.overage_request_cancel(overage_request=created, actor_member=ovr.dave)
        return created
    run_together(4, lambda i: in_scope(ovr.organization, lambda: one(i)))
    with unscoped():
        auto = list(OverageRequest.all_objects.filter(member=ovr.dave, auto_approved=True).values_list(
            "approved_tokens", flat=True))
    # The first two to take the account's lock fit the policy; every later one finds them approved.
    assert sorted(auto) == [150_000, 150_000]
    call_command("verify_ledger")


def test_a_decision_racing_the_period_close_is_made_before_it_or_finds_the_request_lapsed(transactional_db):
    """Both lock the account first (the close a chunk of them, in id order), so they wait for each
    other instead of deadlocking; the request ends approved (and its unused overage lapses) or lapsed."""
    for attempt in range(3):
        ovr = build_overage_org(slug=f"race-close-{attempt}")
        overage_request = ask(ovr.alice, 100_000)
        period = overage_request.period_start
        end = period_bounds(ovr.organization, period)[1]
        calls = [lambda: services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                                         decision="approve", at=end - timedelta(seconds=1)),
                 lambda: closing.close_period(organization=ovr.organization, period=period)]
        results = run_together(2, lambda i: in_scope(ovr.organization, calls[i]))
        with unscoped():
            stored = OverageRequest.all_objects.get(pk=overage_request.pk)
            lapsed = list(LedgerEntry.all_objects.filter(account__member=ovr.alice, period_start=period,
                                                         kind=LedgerEntry.Kind.CLOSE, close_overage_lapsed__gt=0)
                          .values_list("close_overage_lapsed", flat=True))
        if stored.state == State.APPROVED:
            assert grants(overage_request) == 1 and lapsed == [100_000]
        else:
            assert stored.state == State.LAPSED and isinstance(results[0], services.OverageConflict)
            assert grants(overage_request) == 0 and lapsed == []
    call_command("verify_ledger")


def test_a_create_retried_while_the_first_is_being_made_answers_the_first(transactional_db):
    """Four sends of one request with one Idempotency-Key at once (a client retrying on a timeout):
    one request, and every send answers it, none 409."""
    ovr = build_overage_org(slug="retry-create")
    answers = run_together(4, lambda i: in_scope(ovr.organization, lambda: services.overage_request_create(
        member=ovr.alice, actor=ovr.alice.user, tokens=70_000, reason="one ask", idempotency_key="retry-1")))
    assert all(isinstance(result, tuple) for result in answers), answers
    assert len({created.pk for created, _new in answers}) == 1
    assert sorted(new for _created, new in answers) == [False, False, False, True]
