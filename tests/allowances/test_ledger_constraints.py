"""The database itself keeps each ledger entry on an account of the entry's own organization (PostgreSQL)."""

import pytest
from django.db import IntegrityError, connection, transaction

from allowances import ledger
from allowances.models import Account, LedgerEntry
from portal.tenancy import unscoped
from tests.factories import MemberFactory

pytestmark = pytest.mark.postgres

INSERT = (f"INSERT INTO {LedgerEntry._meta.db_table} (organization_id, account_id, kind, tokens, granted_delta, "
          "held_delta, used_delta, period_start, idempotency_key, model, reason, reference, created_at) "
          "VALUES (%s, %s, 'bonus', 5, 5, 0, 0, '2026-11-01', %s, '', '', '', now())")


def account_of_new_member() -> Account:
    member = MemberFactory()
    with unscoped():
        return Account.objects.create(organization=member.organization, member=member, period_start="2026-11-01")


def insert_checked_now(organization_id: int, account_id: int, key: str) -> None:
    # The key is checked at commit (deferred, like Django's own); the test's transaction never
    # commits, so ask for the check at once.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ledger_account_in_organization IMMEDIATE")
        cursor.execute(INSERT, [organization_id, account_id, key])


def test_an_entry_on_its_own_organizations_account_is_accepted():
    account = account_of_new_member()
    insert_checked_now(account.organization_id, account.pk, "same-org")
    with unscoped():
        assert LedgerEntry.all_objects.filter(account=account, idempotency_key="same-org").exists()


def test_an_entry_naming_another_organizations_account_is_refused():
    mine, theirs = account_of_new_member(), account_of_new_member()
    assert mine.organization_id != theirs.organization_id
    with pytest.raises(IntegrityError, match="ledger_account_in_organization"):
        insert_checked_now(mine.organization_id, theirs.pk, "cross-org")
    with unscoped():
        assert not LedgerEntry.all_objects.filter(idempotency_key="cross-org").exists()


def test_an_entry_naming_no_account_is_refused():
    account = account_of_new_member()
    with pytest.raises(IntegrityError, match="ledger_account_in_organization"):
        insert_checked_now(account.organization_id, account.pk + 10_000, "no-account")


def test_the_ledger_writes_through_the_key_as_before():
    account = account_of_new_member()
    with unscoped():
        ledger.post(account=account, kind=ledger.Kind.GRANT, tokens=100, idempotency_key="grant:checked")
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # fire the deferred checks of the post above
        account.refresh_from_db()
    assert account.granted == 100
    assert ledger.verify(organization_id=account.organization_id) == []
