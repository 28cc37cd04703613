"""The database keeps each ledger entry on an account, and each usage record on a member, of the
row's own organization (two-column foreign keys, portal.composite_keys)."""

import pytest
from django.db import IntegrityError, connection, transaction

from allowances import ledger
from allowances.models import Account, LedgerEntry
from gateway.models import UsageRecord
from portal.tenancy import unscoped
from tests.factories import MemberFactory

pytestmark = pytest.mark.django_db

LEDGER_ENTRY = (f"INSERT INTO {LedgerEntry._meta.db_table} (organization_id, account_id, kind, tokens, granted_delta, "
                "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) "
                "VALUES (%s, %s, 'bonus', 5, 5, 0, 0, '2026-11-01', %s, '', '', '', now())")
USAGE_RECORD = (f"INSERT INTO {UsageRecord._meta.db_table} (organization_id, member_id, model, endpoint, source, "
                "status, input_tokens, output_tokens, cached_tokens, charged_tokens, cost, latency_ms, request_id, "
                "idempotency_key, detail, occurred_at) "
                "VALUES (%s, %s, 'm', 'chat', 'ingest', 'ok', 1, 0, 0, 1, 0, 0, '', %s, '', now())")
# (insert, constraint, the parent row's id for a member)
TABLES = {
    "ledger entry": (LEDGER_ENTRY, "ledger_account_in_organization", lambda member: member.account.pk),
    "usage record": (USAGE_RECORD, "usage_record_member_in_organization", lambda member: member.pk),
}


@pytest.fixture(params=list(TABLES))
def table(request):
    return TABLES[request.param]


def member_with_account():
    member = MemberFactory()
    with unscoped():
        Account.objects.create(organization=member.organization, member=member, period_start="2026-11-01")
    return member


def insert_checked_now(sql: str, constraint: str, organization_id: int, parent_id: int, key: str) -> None:
    # The key is checked at commit (deferred, like Django's own); a test's transaction never
    # commits, so ask for the check at once.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET CONSTRAINTS {constraint} IMMEDIATE")
        cursor.execute(sql, [organization_id, parent_id, key])


def test_a_row_of_its_own_organizations_parent_is_accepted(table):
    sql, constraint, parent = table
    member = member_with_account()
    insert_checked_now(sql, constraint, member.organization_id, parent(member), "same-org")


def test_a_row_naming_another_organizations_parent_is_refused(table):
    sql, constraint, parent = table
    mine, theirs = member_with_account(), member_with_account()
    assert mine.organization_id != theirs.organization_id
    with pytest.raises(IntegrityError, match=constraint):
        insert_checked_now(sql, constraint, mine.organization_id, parent(theirs), "cross-org")


def test_a_row_naming_no_parent_is_refused(table):
    sql, constraint, parent = table
    member = member_with_account()
    with pytest.raises(IntegrityError, match=constraint):
        insert_checked_now(sql, constraint, member.organization_id, parent(member) + 10_000, "no-parent")


def test_the_ledger_writes_through_the_key_as_before():
    member = member_with_account()
    with unscoped():
        account = member.account
        ledger.post(account=account, kind=ledger.Kind.GRANT, tokens=100, idempotency_key="grant:checked")
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # fire the deferred checks of the post above
        account.refresh_from_db()
    assert account.granted == 100
    assert ledger.verify(organization_id=account.organization_id) == []
