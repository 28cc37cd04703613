"""Team pools at the ledger: a member's hold takes their own base allowance first, then the team
pool, then their approved overage, in one statement; settling charges the member's part first and
closes both parts at once, as releasing and the expiry sweeper do; retries change nothing; the
pool never goes below zero and nothing drawn from it is billable; at the close a pool's balance
expires; transfers to the pool follow the transfer rules."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from allowances import ledger
from allowances import services as allowance_services
from allowances.closing import close_period
from allowances.models import Account, LedgerEntry, Transfer
from allowances.selectors import billable_overage, team_pool, transferable, usage_by_day
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance, hold_is_open, snapshot
from tests.factories import MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

POOL = allowance_services.TEAM_POOL


@pytest.fixture
def pooled(org_a):
    """Transfers and team pools on. The employee has 5,000 granted and 1,000 held (4,000 left); a
    teammate gives 3,000 to the team's pool."""
    with scope(org_a.organization):
        allowance_services.transfer_settings_save(organization=org_a.organization, actor=org_a.members["admin"].user,
                                                  enabled=True, same_team_only=True, team_pools=True)
        teammate = MemberFactory(organization=org_a.organization, team=org_a.team,
                                 user=UserFactory(email="teammate@a.example"))
        allowance_services.account_open(member=teammate)
        allowance_services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user,
                                        tokens=10_000, reason="to give", member=teammate)
        allowance_services.transfer_create(giver=teammate, receiver=POOL, tokens=3_000, actor=teammate.user,
                                           idempotency_key="to-pool")
    org_a.teammate = teammate
    with unscoped():
        org_a.pool = Account.all_objects.get(team=org_a.team)
        org_a.account = Account.all_objects.get(pk=org_a.account.pk)
    return org_a


def pool_balance(org):
    with unscoped():
        pool = Account.all_objects.get(pk=org.pool.pk)
    return pool.granted, pool.held, pool.used


def hold(org, tokens, key="r1", **kwargs):
    with scope(org.organization):
        return ledger.authorize(account=org.account, tokens=tokens, idempotency_key=key,
                                pool_account_id=org.pool.pk, **kwargs)


def test_a_transfer_to_the_pool_moves_base_allowance_onto_the_teams_account_audited(pooled):
    transfer = Transfer.all_objects.get(organization=pooled.organization, idempotency_key="to-pool")
    assert transfer.pool_team == pooled.team and transfer.receiver is None
    assert pool_balance(pooled) == (3_000, 0, 0)
    with unscoped():
        entries = list(LedgerEntry.all_objects.filter(reference=f"transfer:{transfer.pk}").order_by("id"))
        assert [(e.kind, e.granted_delta, e.account_id) for e in entries] == [
            ("transfer_out", -3_000, Account.all_objects.get(member=pooled.teammate).pk),
            ("transfer_in", 3_000, pooled.pool.pk)]
        audit = AuditLogEntry.all_objects.get(action="transfer.created")
        assert audit.data["pool_team"] == pooled.team.name and audit.data["receiver"] is None
    with scope(pooled.organization):  # a retry gives nothing more
        again = allowance_services.transfer_create(giver=pooled.teammate, receiver=POOL, tokens=3_000,
                                                   actor=pooled.teammate.user, idempotency_key="to-pool")
    assert again == transfer and pool_balance(pooled) == (3_000, 0, 0)
    assert ledger.verify() == []


def test_the_pool_is_drawn_only_after_the_members_own_balance(pooled):
    small = hold(pooled, 2_500, key="small")  # the member's own 4,000 cover it
    assert small.pool_hold_id is None and small.tokens == 2_500
    assert balance(pooled.members["employee"]) == (5_000, 3_500, 0) and pool_balance(pooled) == (3_000, 0, 0)
    big = hold(pooled, 2_500, key="big")  # 1,500 left of their own, the pool the rest
    assert (big.tokens, big.own_tokens, big.pool_tokens) == (2_500, 1_500, 1_000)
    assert balance(pooled.members["employee"]) == (5_000, 5_000, 0) and pool_balance(pooled) == (3_000, 1_000, 0)
    whole = hold(pooled, 2_000, key="whole")  # nothing of their own left: all from the pool, a zero own part
    assert (whole.own_tokens, whole.pool_tokens) == (0, 2_000)
    assert pool_balance(pooled) == (3_000, 3_000, 0)
    before = snapshot()
    with pytest.raises(ledger.InsufficientTokens) as refused:
        hold(pooled, 1, key="none left")  # never below zero on either account
    assert refused.value.available == 0 and snapshot() == before
    assert ledger.verify() == []


def test_settling_charges_the_members_part_first_then_the_pools_and_closes_both_once(pooled):
    taken = hold(pooled, 6_000)  # 4,000 own, 2,000 pool
    with scope(pooled.organization):
        posted = ledger.settle(hold=taken, used_tokens=5_000)
        assert ledger.settle(hold=taken, used_tokens=5_000).created is False  # a retry
        assert ledger.settled_tokens(hold=taken) == 5_000
    assert posted.created
    assert balance(pooled.members["employee"]) == (5_000, 1_000, 4_000)
    assert pool_balance(pooled) == (3_000, 0, 1_000)
    assert not hold_is_open(taken.id) and not hold_is_open(taken.pool_hold_id)
    with unscoped():
        assert LedgerEntry.all_objects.get(pk=posted.entry_id).reason == "and 1,000 tokens from the team pool"
    with scope(pooled.organization):
        assert ledger.release(hold=taken) is None  # closed: nothing more moves
    assert pool_balance(pooled) == (3_000, 0, 1_000)
    assert ledger.verify() == []


def test_each_part_is_charged_at_most_its_hold(pooled):
    taken = hold(pooled, 6_000)
    with scope(pooled.organization):
        ledger.settle(hold=taken, used_tokens=3_000)  # within the member's part: the pool pays nothing
    assert balance(pooled.members["employee"]) == (5_000, 1_000, 3_000) and pool_balance(pooled) == (3_000, 0, 0)
    again = hold(pooled, 4_000, key="r2")  # the 1,000 left of their own, 3,000 of the pool
    assert (again.own_tokens, again.pool_tokens) == (1_000, 3_000)
    with scope(pooled.organization):
        ledger.settle(hold=again, used_tokens=99_999)  # more than the hold: each part capped at its own
    assert balance(pooled.members["employee"]) == (5_000, 1_000, 4_000) and pool_balance(pooled) == (3_000, 0, 3_000)
    assert ledger.verify() == []


def test_a_release_and_the_sweeper_give_both_parts_back(pooled):
    released, expired = hold(pooled, 5_000, key="released"), None
    with scope(pooled.organization):
        ledger.release(hold=released, reason="client went away")
    assert balance(pooled.members["employee"])[1] == 1_000 and pool_balance(pooled) == (3_000, 0, 0)
    expired = hold(pooled, 5_000, key="expired", ttl=timedelta(seconds=-1))
    assert ledger.release_expired_holds(now=timezone.now()) >= 1
    assert not hold_is_open(expired.id) and not hold_is_open(expired.pool_hold_id)
    assert pool_balance(pooled) == (3_000, 0, 0)
    assert ledger.verify() == []


def test_usage_after_the_sweeper_released_is_charged_to_the_member_then_the_pool(pooled):
    taken = hold(pooled, 5_000, ttl=timedelta(seconds=-1))
    ledger.release_expired_holds(now=timezone.now())
    with scope(pooled.organization):
        posted = ledger.settle(hold=taken, used_tokens=4_500)
        assert ledger.settle(hold=taken, used_tokens=4_500).created is False
        assert ledger.settled_tokens(hold=taken) == 4_500
    assert posted.created
    assert balance(pooled.members["employee"]) == (5_000, 1_000, 4_000) and pool_balance(pooled) == (3_000, 0, 500)
    assert ledger.verify() == []


def test_approved_overage_is_drawn_after_the_pool_and_pool_usage_is_never_billable(pooled):
    with scope(pooled.organization):
        ledger.settle(hold=pooled.hold, used_tokens=1_000)  # the fixture's hold: all their base used but 4,000
        ledger.post(account=pooled.account, kind="overage_grant", tokens=10_000, idempotency_key="overage:test")
        # The member's own base allowance is what they could give (the same rule, selectors.transferable).
        assert transferable(account=Account.objects.get(pk=pooled.account.pk)) == 4_000
    first = hold(pooled, 4_001, key="just past it")  # one token past their base: from the pool, not the overage
    assert (first.own_tokens, first.pool_tokens) == (4_000, 1)
    with scope(pooled.organization):
        ledger.release(hold=first)
    taken = hold(pooled, 8_000)  # 4,000 own base, 3,000 pool, 1,000 of the approved overage
    assert (taken.own_tokens, taken.pool_tokens) == (5_000, 3_000)
    with scope(pooled.organization):
        ledger.settle(hold=taken, used_tokens=8_000)
        period = pooled.account.period_start
        billable = billable_overage(organization=pooled.organization, period=period)
    assert sum(row.tokens for row in billable) == 1_000  # only the overage the member used
    assert ledger.verify() == []


def base_left_and_approved_overage(org):
    """The fixture's hold settled at 1,000, so 4,000 of the member's base is left, and 10,000 of approved overage."""
    with scope(org.organization):
        ledger.settle(hold=org.hold, used_tokens=1_000)
        ledger.post(account=org.account, kind="overage_grant", tokens=10_000, idempotency_key="overage:test")


def billable_tokens(org):
    with scope(org.organization):
        return sum(row.tokens for row in billable_overage(organization=org.organization,
                                                          period=org.account.period_start))


def test_settling_less_than_a_hold_with_overage_charges_base_then_pool_then_overage(pooled):
    base_left_and_approved_overage(pooled)
    taken = hold(pooled, 8_000)  # 4,000 own base, 3,000 pool, 1,000 own overage
    assert (taken.own_tokens, taken.pool_tokens, taken.base_tokens) == (5_000, 3_000, 4_000)
    with scope(pooled.organization):
        found = ledger.hold_find(organization_id=pooled.organization.pk, hold_id=taken.id)
    assert found == taken  # the settle API and retries rebuild the base share too
    with scope(pooled.organization):
        ledger.settle(hold=found, used_tokens=5_000)  # less than the worst case
    # 4,000 of the member's base, then the pool's 1,000: nothing billable, the overage untouched.
    assert billable_tokens(pooled) == 0
    assert balance(pooled.members["employee"])[2] == 5_000 and pool_balance(pooled) == (3_000, 0, 1_000)
    again = hold(pooled, 9_000, key="r2")  # no base left: 2,000 pool, 7,000 overage
    assert (again.own_tokens, again.pool_tokens, again.base_tokens) == (7_000, 2_000, 0)
    with scope(pooled.organization):
        ledger.settle(hold=again, used_tokens=3_000)
    assert pool_balance(pooled) == (3_000, 0, 3_000) and billable_tokens(pooled) == 1_000
    assert ledger.verify() == []


def test_usage_after_the_sweeper_released_charges_base_then_pool_then_overage(pooled):
    base_left_and_approved_overage(pooled)
    taken = hold(pooled, 8_000, ttl=timedelta(seconds=-1))
    ledger.release_expired_holds(now=timezone.now())
    with scope(pooled.organization):
        ledger.settle(hold=taken, used_tokens=5_000)
        assert ledger.settle(hold=taken, used_tokens=5_000).created is False
        assert ledger.settled_tokens(hold=taken) == 5_000
    assert billable_tokens(pooled) == 0
    assert balance(pooled.members["employee"])[2] == 5_000 and pool_balance(pooled) == (3_000, 0, 1_000)
    late = hold(pooled, 3_000, key="late", ttl=timedelta(seconds=-1))  # the pool's 2,000, then 1,000 overage
    ledger.release_expired_holds(now=timezone.now())
    with scope(pooled.organization):
        ledger.settle(hold=late, used_tokens=2_500)
    assert pool_balance(pooled) == (3_000, 0, 3_000) and billable_tokens(pooled) == 500
    assert ledger.verify() == []


def test_a_key_cap_bounds_the_whole_pooled_request(pooled):
    with scope(pooled.organization):
        pooled.api_key.spend.token_cap = 5_000
        pooled.api_key.spend.save()
        with pytest.raises(ledger.KeyCapExceeded):
            ledger.authorize(account=pooled.account, tokens=5_001, idempotency_key="capped",
                             api_key_id=pooled.api_key.pk, spend_id=pooled.api_key.spend_id,
                             pool_account_id=pooled.pool.pk)
        taken = ledger.authorize(account=pooled.account, tokens=5_000, idempotency_key="capped",
                                 api_key_id=pooled.api_key.pk, spend_id=pooled.api_key.spend_id,
                                 pool_account_id=pooled.pool.pk)
        assert taken.pool_tokens == 1_000
        pooled.api_key.spend.refresh_from_db()
        assert pooled.api_key.spend.held == 5_000
        ledger.settle(hold=taken, used_tokens=4_200)
        pooled.api_key.spend.refresh_from_db()
        assert (pooled.api_key.spend.held, pooled.api_key.spend.used) == (0, 4_200)
    assert ledger.verify() == []


def test_a_retried_pooled_hold_is_the_same_hold(pooled):
    first = hold(pooled, 6_000)
    entries = LedgerEntry.all_objects.count()
    assert hold(pooled, 6_000) == first and LedgerEntry.all_objects.count() == entries


def test_routing_with_a_pool_takes_the_economy_hold_when_only_it_fits(pooled):
    economy = ledger.Economy(tokens=6_000, model="economy", below_percent=1)
    taken = hold(pooled, 9_000, model="premium", economy=economy)  # 7,000 fit with the pool: the economy one
    assert (taken.model, taken.tokens, taken.pool_tokens) == ("economy", 6_000, 2_000)
    assert ledger.verify() == []


def test_at_the_close_the_pools_balance_expires_and_open_holds_are_carried(pooled):
    taken = hold(pooled, 5_000)  # 1,000 of the pool held over the close
    period = pooled.pool.period_start
    with unscoped():
        for _ in range(2):  # a second close changes nothing
            close_period(organization=pooled.organization, period=period)
        pool = Account.all_objects.get(pk=pooled.pool.pk)
        closes = LedgerEntry.all_objects.filter(account=pool, kind="close")
        expired = list(closes.values_list("close_expired", "close_rolled_over", "close_granted"))
    assert pool.period_start > period and expired == [(2_000, 0, 0)]  # one close entry: no rollover, no grant
    assert (pool.granted, pool.held, pool.used) == (1_000, 1_000, 0)  # what is held stays for its request
    with scope(pooled.organization):
        ledger.settle(hold=taken, used_tokens=5_000)
    assert pool_balance(pooled)[1] == 0 and ledger.verify() == []


def test_giving_to_the_pool_follows_the_rules(pooled):
    employee = pooled.members["employee"]
    before = snapshot()
    with scope(pooled.organization):
        with pytest.raises(ValidationError) as raised:
            allowance_services.transfer_create(giver=employee, receiver=POOL, tokens=4_001, actor=employee.user,
                                               idempotency_key="too-much")
        assert "at most 4,000 tokens" in raised.value.message_dict["tokens"][0]
        loner = MemberFactory(organization=pooled.organization, team=None, user=UserFactory(email="loner@a.example"))
        with pytest.raises(ValidationError) as raised:
            allowance_services.transfer_create(giver=loner, receiver=POOL, tokens=1, actor=loner.user,
                                               idempotency_key="no-team")
        assert "no team" in raised.value.message_dict["receiver"][0]
        allowance_services.transfer_settings_save(organization=pooled.organization, actor=pooled.members["admin"].user,
                                                  enabled=True, same_team_only=True, team_pools=False)
        with pytest.raises(ValidationError) as raised:
            allowance_services.transfer_create(giver=employee, receiver=POOL, tokens=1, actor=employee.user,
                                               idempotency_key="pools-off")
        assert "Team pools are switched off" in raised.value.message_dict["receiver"][0]
    assert snapshot()["entries"] == before["entries"] and snapshot()["accounts"] == before["accounts"]


def test_a_pool_belongs_to_a_team_of_its_own_organization(pooled, org_b):
    with unscoped(), pytest.raises(IntegrityError, match="pool_team_in_organization"), transaction.atomic():
        with connection.cursor() as cursor:  # checked at commit, which a test never reaches: ask now
            cursor.execute("SET CONSTRAINTS pool_team_in_organization IMMEDIATE")
        Account.all_objects.create(organization=pooled.organization, team=org_b.team,
                                   period_start=pooled.pool.period_start)
    with unscoped(), pytest.raises(IntegrityError), transaction.atomic():
        Account.all_objects.create(organization=pooled.organization, period_start=pooled.pool.period_start)
    with unscoped(), pytest.raises(IntegrityError), transaction.atomic():
        team = TeamFactory(organization=pooled.organization, name="Overdrawn")
        Account.all_objects.create(organization=pooled.organization, team=team, overdraft_limit=1,
                                   period_start=pooled.pool.period_start)


def test_a_hold_taken_without_a_key_names_its_member_as_the_pools_drawer(pooled):
    employee = pooled.members["employee"]
    taken = hold(pooled, 5_000)  # by member, as the authorize API takes it by email: no key
    with scope(pooled.organization):
        ledger.settle(hold=taken, used_tokens=5_000)  # 1,000 from the pool
        board = team_pool(member=employee)
        today = usage_by_day(organization=pooled.organization, member=employee,
                             since=timezone.now().date() - timedelta(days=1))
    assert [(row["email"], row["tokens"], row["member_id"]) for row in board["drawn"]] == [
        ("employee@a.example", 1_000, employee.pk)]
    assert board["mine_drawn"] == 1_000
    assert sum(row[3] for row in today) == 5_000 and {row[1] for row in today} == {pooled.team.name}


def test_verify_names_a_pool_hold_of_no_members_hold_and_a_pool_below_zero(pooled):
    taken = hold(pooled, 5_000)  # a pooled hold as the ledger makes it: clean
    assert ledger.verify() == []
    with scope(pooled.organization):  # written past the ledger's rules, as only a bug could
        stray = ledger.post(account=pooled.pool, kind="hold", tokens=10, idempotency_key="stray",
                            expires_at=timezone.now())
    assert [(p["account_id"], p["entry_id"]) for p in ledger.verify()] == [(pooled.pool.pk, stray.entry_id)]
    with scope(pooled.organization):
        ledger.release(hold=ledger.Hold(id=stray.entry_id, account_id=pooled.pool.pk, organization_id=pooled.organization.pk,
                                        tokens=10, expires_at=timezone.now()))
        ledger.settle(hold=taken, used_tokens=5_000)
        assert ledger.verify() == []
        ledger.post(account=pooled.pool, kind="usage", tokens=2_500, idempotency_key="overdrawn")
    (problem,) = ledger.verify(organization_id=pooled.organization.pk)
    assert problem["account_id"] == pooled.pool.pk and "below zero (-500 tokens" in problem["problem"]
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", stdout=StringIO(), stderr=err)
    assert err.getvalue() == f"account {pooled.pool.pk}: {problem['problem']}\n"


@pytest.mark.transactional
def test_concurrent_pooled_holds_never_overspend_the_member_or_the_pool(pooled):
    """24 holds of 400 at once on 4,000 of the member's own and 3,000 of the pool: exactly 17 fit
    (the 18th would need 200 of the member's own, which is gone), each locked in id order with the
    teammates' transfers to the pool running meanwhile; then settled and released at once."""
    from tests.allowances.test_ledger_concurrency import run_together

    def work(i):
        with scope(pooled.organization):
            if i >= 24:  # the teammate gives to the pool meanwhile: at most 4 more holds fit
                return allowance_services.transfer_create(giver=pooled.teammate, receiver=POOL, tokens=400,
                                                          actor=None, idempotency_key=f"more-{i}")
            try:
                return ledger.authorize(account=pooled.account, tokens=400, idempotency_key=f"race-{i}",
                                        pool_account_id=pooled.pool.pk)
            except ledger.InsufficientTokens as refused:
                return refused

    results = run_together(28, work)
    holds = [r for r in results[:24] if isinstance(r, ledger.Hold)]
    pool = Account.all_objects.get(pk=pooled.pool.pk)
    assert pool.granted == 3_000 + 4 * 400
    assert 17 <= len(holds) <= 21 and sum(h.pool_tokens for h in holds) == pool.held <= pool.granted
    assert sum(h.own_tokens for h in holds) == 4_000 and balance(pooled.members["employee"])[1] == 5_000
    assert ledger.verify() == []

    def close(i):
        with scope(pooled.organization):
            if i % 2:
                return ledger.settle(hold=holds[i], used_tokens=300)
            return ledger.release(hold=holds[i], reason="done")

    run_together(len(holds), close)
    assert pool_balance(pooled)[1] == 0 and balance(pooled.members["employee"])[1] == 1_000  # the fixture's hold
    assert ledger.verify() == []


def test_the_pages_give_to_the_pool_with_field_errors_and_show_it(pooled, login):
    client = login(pooled.members["employee"])
    page = client.get(f"/o/{pooled.slug}/transfers/").content.decode()
    assert "The Team a team pool" in page and 'data-testid="team-pool"' in page
    refused = client.post(f"/o/{pooled.slug}/transfers/", {"receiver": POOL, "tokens": "9000", "idempotency_key": "f1"})
    assert refused.status_code == 400 and "at most 4,000 tokens" in refused.context["form"].errors["tokens"][0]
    wrong = client.post(f"/o/{pooled.slug}/transfers/", {"receiver": "team", "tokens": "9", "idempotency_key": "f2"})
    assert wrong.status_code == 400 and "receiver" in wrong.context["form"].errors
    done = client.post(f"/o/{pooled.slug}/transfers/", {"receiver": POOL, "tokens": "900", "note": "for the sprint",
                                                        "idempotency_key": "f3"})
    assert done.status_code == 302 and pool_balance(pooled) == (3_900, 0, 0)
    dashboard = client.get(f"/o/{pooled.slug}/").content.decode()
    assert "the Team a team pool" in dashboard and "for the sprint" in dashboard
    team_page = login(pooled.teammate).get(f"/o/{pooled.slug}/transfers/pool/").content.decode()
    assert "employee@a.example" in team_page and "teammate@a.example" in team_page and "3,900" in team_page
    report = login(pooled.members["hr"]).get(f"/o/{pooled.slug}/transfers/report/").content.decode()
    assert 'data-testid="pool-totals"' in report and "Team a" in report and "3,900" in report


def test_a_member_outside_the_team_sees_no_pool_and_cannot_give_to_one(pooled, login, org_a):
    loner = MemberFactory(organization=pooled.organization, team=None, user=UserFactory(email="solo@a.example"))
    client = login(loner)
    assert "You are in no team" in client.get(f"/o/{pooled.slug}/transfers/pool/").content.decode()
    refused = client.post(f"/o/{pooled.slug}/transfers/", {"receiver": POOL, "tokens": "1", "idempotency_key": "x"})
    assert refused.status_code == 400 and "receiver" in refused.context["form"].errors


def test_the_rules_page_switches_team_pools(pooled, login):
    admin = login(pooled.members["admin"])
    assert admin.post(f"/o/{pooled.slug}/settings/transfers/", {"enabled": "on", "same_team_only": "on"}).status_code == 302
    with unscoped():
        from allowances.models import TransferSettings

        assert TransferSettings.objects.get(organization=pooled.organization).team_pools is False
        assert AuditLogEntry.objects.filter(action="transfer_settings.updated").latest("id").data["team_pools"]
