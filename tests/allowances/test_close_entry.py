"""A period close is one ledger entry per account that carries its parts; closes of the old shape
(an entry per part, in the closed and the next period) still read the same everywhere."""

import re
from datetime import date

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils.html import strip_tags

from allowances import closing, ledger, selectors
from allowances.closing_sql import close_key
from allowances.models import Account, LedgerEntry
from portal.tenancy import scope
from reports import selectors as report_selectors
from tests.allowances.test_closing import build_org, closed, open_account, rows, stored, use, utc
from tests.factories import MemberFactory

pytestmark = pytest.mark.django_db

Kind = LedgerEntry.Kind
OCTOBER, NOVEMBER, DECEMBER, JANUARY = date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1)


def close_row(account, period) -> tuple:
    """The account's close entry of `period` as test_closing's `rows` shows it."""
    [row] = [row for row in rows(account) if row[1] == Kind.CLOSE and row[0] == period]
    return row


def close_entries(account) -> list[LedgerEntry]:
    return list(LedgerEntry.all_objects.filter(account_id=account.pk, kind=Kind.CLOSE).order_by("period_start"))


def test_one_entry_per_account_carries_each_kind_of_part_and_an_account_with_none_gets_none():
    org = build_org("UTC", NOVEMBER, members=4, monthly_tokens=100_000, rollover_rule="capped_tokens",
                    rollover_cap_tokens=30_000, rollover_lifetime_periods=2, overage_rule="request_approval")
    rolling, lapsing, billed, idle = org.accounts
    with scope(org.organization):
        ledger.post(account=lapsing, kind=Kind.OVERAGE_GRANT, tokens=50_000, idempotency_key="overage-request:1",
                    reference="overage-request:1")
        ledger.post(account=billed, kind=Kind.USAGE, tokens=130_000, used_delta=130_000, idempotency_key="ingested")
    use(rolling, 40_000, "rolling")
    use(lapsing, 120_000, "lapsing")  # the allowance, then 20,000 of the overage
    # No policy (no team) and nothing on the account: the close has nothing to book.
    nobody = open_account(MemberFactory(organization=org.organization, team=None), at=utc(2026, 11, 10))

    assert closing.close_period(organization=org.organization, period=NOVEMBER) == 5
    policy = f"policy:{org.policy.pk}"
    assert close_row(rolling, NOVEMBER) == closed(NOVEMBER, expired=30_000, rolled={JANUARY: 30_000}, granted=100_000,
                                       reference=policy)
    assert close_row(lapsing, NOVEMBER) == closed(NOVEMBER, lapsed=30_000, granted=100_000, reference=policy)
    assert close_row(billed, NOVEMBER) == closed(NOVEMBER, billed=30_000, granted=100_000, reference=policy)
    assert close_row(idle, NOVEMBER) == closed(NOVEMBER, expired=70_000, rolled={JANUARY: 30_000}, granted=100_000,
                                     reference=policy)
    assert close_entries(nobody) == [] and stored(nobody).period_start == DECEMBER
    for account in org.accounts:
        [entry] = close_entries(account)
        assert (entry.idempotency_key, entry.period_start, entry.held_delta, entry.used_delta) == (
            close_key(NOVEMBER), NOVEMBER, 0, 0)
        assert entry.tokens == entry.granted_delta
        assert stored(account).period_start == DECEMBER

    # December: the rolling account uses nothing, so all of December's grant is unused; November's
    # tranche lives on (until January) beside December's, and next the older one expires.
    assert closing.close_period(organization=org.organization, period=DECEMBER) == 5
    assert close_row(rolling, DECEMBER) == closed(DECEMBER, expired=70_000, rolled={JANUARY: 30_000, date(2027, 2, 1): 30_000},
                                       granted=100_000, reference=policy)
    assert closing.close_period(organization=org.organization, period=JANUARY) == 5
    assert close_row(rolling, JANUARY) == closed(JANUARY, expired=70_000, rollover_expired=30_000,
                                       rolled={date(2027, 2, 1): 30_000, date(2027, 3, 1): 30_000}, granted=100_000,
                                       reference=policy)
    assert [len(close_entries(account)) for account in org.accounts] == [3, 3, 3, 3]
    assert ledger.verify() == []
    call_command("verify_ledger")


_INSERT = ("INSERT INTO allowances_ledgerentry (organization_id, account_id, kind, tokens, granted_delta, held_delta, "
           "used_delta, period_start, idempotency_key, model, reason, reference, created_at, close_overage_billed, "
           "close_overage_lapsed, close_expired, close_rollover_expired, close_rolled_over, close_granted, "
           "close_rollover_until, close_rollover_tokens) VALUES (%(org)s, %(account)s, %(kind)s, %(tokens)s, "
           "%(tokens)s, 0, 0, '2026-11-01', %(key)s, '', '', '', now(), %(billed)s, %(lapsed)s, %(expired)s, 0, "
           "%(rolled)s, %(granted)s, %(until)s::date[], %(tranches)s::bigint[])")


@pytest.mark.parametrize("change, why", [
    ({}, None),  # the valid entry the others spoil
    ({"tokens": 71_000}, "its tokens are not the sum of its parts"),
    ({"expired": -10_000, "tokens": 100_000}, "a negative part"),
    ({"until": ["2026-12-01", "2027-01-01"]}, "a tranche without an amount"),
    ({"tranches": [0], "rolled": 0}, "a tranche of nothing"),
    ({"until": None, "tranches": None, "rolled": 0}, "no tranches at all"),
    ({"kind": "grant"}, "parts on an entry of another kind"),
])
def test_the_database_refuses_a_close_entry_whose_parts_do_not_sum_to_its_deltas(org_a, change, why):
    account = Account.all_objects.get(member=org_a.members["employee"])
    params = {"org": account.organization_id, "account": account.pk, "kind": "close", "key": "close:test",
              "tokens": 70_000, "billed": 10_000, "lapsed": 20_000, "expired": 20_000, "rolled": 30_000,
              "granted": 100_000, "until": ["2026-12-01"], "tranches": [30_000]} | change
    before = (stored(account).granted, LedgerEntry.all_objects.count())
    if why is None:
        with connection.cursor() as cursor:
            cursor.execute(_INSERT, params)
        assert LedgerEntry.all_objects.filter(account_id=account.pk, kind=Kind.CLOSE).count() == 1
        return
    with pytest.raises(IntegrityError, match="ledger_close_parts"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_INSERT, params)
    assert (stored(account).granted, LedgerEntry.all_objects.count()) == before, why


def test_verify_names_a_close_entry_whose_tranches_do_not_sum_to_what_it_rolled_over(org_a):
    account = Account.all_objects.get(member=org_a.members["employee"])
    with connection.cursor() as cursor:
        cursor.execute(_INSERT, {"org": account.organization_id, "account": account.pk, "kind": "close",
                                 "key": "close:test", "tokens": 0, "billed": 0, "lapsed": 0, "expired": 0,
                                 "rolled": 25_000, "granted": 0, "until": ["2026-12-01"], "tranches": [30_000]})
        [entry_id] = LedgerEntry.all_objects.filter(account_id=account.pk, kind=Kind.CLOSE).values_list("id", flat=True)
    assert ledger.verify() == [{"account_id": account.pk, "entry_id": entry_id,
                                "problem": "close entry rolls over 25000 but its tranches sum to another amount"}]


def old_shape_close(account, *, policy_pk: int) -> None:
    """October closed as closes did before the close entry, an entry per part: of 800,000 unused,
    500,000 expired and 300,000 rolled over (usable through December); November's grant."""
    with scope(account.organization):
        for kind, tokens, key, period, reason, reference in (
                (Kind.EXPIRY, 500_000, f"close:{OCTOBER}:expire:base", OCTOBER,
                 "Unused this period beyond what Standard rolls over", ""),
                (Kind.ROLLOVER_OUT, 300_000, f"close:{OCTOBER}:out:{DECEMBER}", OCTOBER,
                 f"Rolls over (usable until the period of {DECEMBER})", f"rollover-until:{DECEMBER}"),
                (Kind.ROLLOVER_IN, 300_000, f"open:{NOVEMBER}:in:{DECEMBER}", NOVEMBER, "Rolled over from last period",
                 f"rollover-until:{DECEMBER}"),
                (Kind.GRANT, 1_000_000, f"grant:{NOVEMBER}", NOVEMBER, "Standard: monthly allowance",
                 f"policy:{policy_pk}")):
            # The old close posted its entries with their periods; the period on the account moved with them.
            Account.all_objects.filter(pk=account.pk).update(period_start=period)
            ledger.post(account=stored(account), kind=kind, tokens=tokens, idempotency_key=key, reason=reason,
                        reference=reference)


def test_a_close_of_the_old_shape_still_reads_and_the_next_close_carries_its_tranche(login):
    org = build_org("UTC", OCTOBER, monthly_tokens=1_000_000, rollover_rule="capped_tokens",
                    rollover_cap_tokens=300_000, rollover_lifetime_periods=2)
    [account] = org.accounts
    use(account, 200_000, "october")
    old_shape_close(account, policy_pk=org.policy.pk)
    assert stored(account).period_start == NOVEMBER and stored(account).available == 1_300_000
    assert ledger.verify() == []

    with scope(org.organization):
        board = selectors.dashboard(account=stored(account), at=utc(2026, 11, 5))
        # The card lists the old close's entries; November was granted its grant and the tranche.
        assert sorted((line.kind, line.tokens, line.reason) for line in board.last_close) == [
            (Kind.EXPIRY, 500_000, "Unused this period beyond what Standard rolls over"),
            (Kind.ROLLOVER_OUT, 300_000, f"Rolls over (usable until the period of {DECEMBER})")]
        assert board.granted_this_period == 1_300_000
        statement = report_selectors.statement(member=org.members[0], period_start=OCTOBER)
        assert [(line.line, line.tokens) for line in statement.lines if line.tokens] == [
            ("granted", 1_000_000), ("rolled_over", -300_000), ("used", -200_000), ("expired", -500_000)]
        assert report_selectors.statement(member=org.members[0], period_start=NOVEMBER).tokens("rolled_over") == 300_000

    # November closes with the new close: it uses nothing, so its grant is the youngest and unused
    # (300,000 of it rolls over, capped); October's tranche lives through December.
    closing.close_period(organization=org.organization, period=NOVEMBER)
    policy = f"policy:{org.policy.pk}"
    assert close_row(account, NOVEMBER) == closed(NOVEMBER, expired=700_000, rolled={DECEMBER: 300_000, JANUARY: 300_000},
                                       granted=1_000_000, reference=policy)
    assert stored(account).available == 1_600_000
    with scope(org.organization):
        november = report_selectors.statement(member=org.members[0], period_start=NOVEMBER)
        # In: the old close's rollover in (300,000); out: both tranches (600,000).
        assert (november.tokens("granted"), november.tokens("rolled_over"), november.tokens("expired")) == (
            1_000_000, -300_000, -700_000)
        december = report_selectors.statement(member=org.members[0], period_start=DECEMBER)
        assert (december.tokens("granted"), december.tokens("rolled_over")) == (1_000_000, 600_000)
        assert DECEMBER in report_selectors.statement_periods(organization=org.organization, member=org.members[0])
        board = selectors.dashboard(account=stored(account), at=utc(2026, 12, 3))
        assert board.granted_this_period == 1_600_000
        assert sorted((line.kind, line.tokens) for line in board.last_close) == [
            (Kind.EXPIRY, 700_000), (Kind.ROLLOVER_OUT, 300_000), (Kind.ROLLOVER_OUT, 300_000)]

    # The member's history lists both shapes: the old entries, and the close entry with its parts.
    page = login(org.members[0]).get(reverse("dashboard", kwargs={"org_slug": org.organization.slug}))
    history = [strip_tags(row) for row in re.findall(r'<tr data-testid="history-row">(.*?)</tr>', page.content.decode(),
                                                      re.S)]
    [shown] = [row for row in history if "Period close" in row]
    assert "November 2026 closed" in shown and "Rollover out" in shown and re.search(r"Expiry\s+700k", shown)
    assert any("Rollover in" in row for row in history) and any("Expiry" in row for row in history)
    assert ledger.verify() == []
    call_command("verify_ledger")


def test_billable_overage_reads_the_billed_part_of_a_close_entry_and_the_old_overage_grant():
    org = build_org("UTC", NOVEMBER, members=2, monthly_tokens=100_000)
    new, old = org.accounts
    with scope(org.organization):
        for account in (new, old):
            ledger.post(account=account, kind=Kind.USAGE, tokens=130_000, used_delta=130_000, model="m",
                        idempotency_key="ingested")
        # A close of the old shape booked the 30,000 past the balance as an overage grant of its own.
        ledger.post(account=old, kind=Kind.OVERAGE_GRANT, tokens=30_000, idempotency_key=f"close:{NOVEMBER}:overage",
                    reference=f"overage:{NOVEMBER}")
        Account.all_objects.filter(pk=old.pk).update(period_start=DECEMBER)
    closing.close_period(organization=org.organization, period=NOVEMBER)
    assert close_entries(new)[0].close_overage_billed == 30_000
    with scope(org.organization):
        billed = {row.member_id: row.tokens for row in selectors.billable_overage(organization=org.organization,
                                                                                 period=NOVEMBER)}
    assert billed == {new.member_id: 30_000, old.member_id: 30_000}
    assert ledger.verify() == []


def test_a_close_run_again_on_accounts_it_closed_books_nothing_twice():
    """Even if an account were found in the closed period again, its close entry's key (account,
    close:<period>) lets no second one in, so nothing is booked twice."""
    org = build_org("UTC", NOVEMBER, members=3, monthly_tokens=100_000, rollover_rule="all")
    use(org.accounts[0], 10_000, "some")
    assert closing.close_period(organization=org.organization, period=NOVEMBER, chunk_size=2) == 3
    entries = sorted(LedgerEntry.all_objects.values_list("id", "account_id", "kind", "granted_delta"))
    balances = sorted(Account.all_objects.values_list("id", "granted", "held", "used"))
    Account.all_objects.filter(organization=org.organization).update(period_start=NOVEMBER)
    assert closing.close_period(organization=org.organization, period=NOVEMBER, chunk_size=2) == 3
    assert sorted(LedgerEntry.all_objects.values_list("id", "account_id", "kind", "granted_delta")) == entries
    assert sorted(Account.all_objects.values_list("id", "granted", "held", "used")) == balances
    assert {stored(account).period_start for account in org.accounts} == {DECEMBER}
    assert ledger.verify() == []
