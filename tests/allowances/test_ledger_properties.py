"""Random sequences of grants, holds, settles, releases, sweeps and period closes (hypothesis).

After every step the invariants of DESIGN.md hold: the stored balance equals the sum of the
entries; held equals the open holds; usage is counted once per hold whatever is retried;
available never drops below the approved overdraft, whatever a settlement reports;
closing a period twice changes nothing and never creates tokens; what lapses of the approved
overage at a close and what of it is billable never add up to more than was approved, and to
exactly that when no request is in flight.
"""

from datetime import date, timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from allowances import closing, ledger, selectors
from allowances import services as allowance_services
from allowances.models import Account, LedgerEntry
from allowances.periods import next_period_start
from portal.tenancy import scope
from tests.allowances.helpers import hold_is_open
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory

TOKENS = st.integers(min_value=1, max_value=2_000_000)
ROLLOVER_RULES = st.sampled_from([
    {"rollover_rule": "none"},
    {"rollover_rule": "all", "rollover_lifetime_periods": 2},
    {"rollover_rule": "capped_tokens", "rollover_cap_tokens": 500_000, "rollover_lifetime_periods": 3},
    {"rollover_rule": "capped_percent", "rollover_cap_percent": 20},
])
OVERAGE_RULES = st.sampled_from([{"overage_rule": "hard_stop"}, {"overage_rule": "request_approval"},
                                 {"overage_rule": "auto_approve", "auto_approve_tokens": 300_000,
                                  "auto_approve_requests": 2}])


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        self.organization = OrganizationFactory()
        self._scope = scope(self.organization)
        self._scope.__enter__()
        # What the model expects, independently of the database.
        self.used = 0
        self.open_holds: dict[int, ledger.Hold] = {}
        self.settled: set[int] = set()
        self.released: set[int] = set()
        self.holds_by_key: dict[str, ledger.Hold] = {}
        self.keys = 0

    def teardown(self):
        self._scope.__exit__(None, None, None)
        self._atomic.__exit__(RuntimeError, RuntimeError("roll back this example"), None)

    @initialize(rollover=ROLLOVER_RULES, overage=OVERAGE_RULES, monthly=st.integers(0, 5_000_000))
    def open_account(self, rollover, overage, monthly):
        team = TeamFactory(organization=self.organization)
        begin = timezone.now() - timedelta(days=400)
        self.member = MemberFactory(organization=self.organization, team=team, joined_at=begin)
        self.policy = allowance_services.policy_create(organization=self.organization, actor=None, name="P",
                                                       monthly_tokens=monthly, **rollover, **overage)
        allowance_services.policy_assign(organization=self.organization, actor=None, policy=self.policy, team=team,
                                         immediately=True, at=begin)
        self.account = allowance_services.account_open(member=self.member)

    # -- helpers --------------------------------------------------------------------------------

    def stored(self) -> Account:
        return Account.objects.get(pk=self.account.pk)

    def model_available(self) -> int:
        account = self.stored()
        return account.granted - self.used - sum(hold.tokens for hold in self.open_holds.values())

    # -- rules ----------------------------------------------------------------------------------

    @rule(tokens=TOKENS)
    def approve_overage(self, tokens):
        self.keys += 1
        ledger.post(account=self.account, kind=ledger.Kind.OVERAGE_GRANT, tokens=tokens,
                    idempotency_key=f"overage-request:{self.keys}", reference=f"overage-request:{self.keys}")

    @rule(tokens=TOKENS)
    def grant_bonus(self, tokens):
        allowance_services.grant_create(organization=self.organization, actor=None, tokens=tokens, reason="bonus",
                                        member=self.member)

    @rule(tokens=TOKENS, retry=st.booleans())
    def authorize(self, tokens, retry):
        if retry and self.holds_by_key:
            key = sorted(self.holds_by_key)[tokens % len(self.holds_by_key)]
        else:
            self.keys += 1
            key = f"request-{self.keys}"
        expected_ok = key in self.holds_by_key or self.model_available() - tokens >= -self.stored().overdraft_limit
        try:
            hold = ledger.authorize(account=self.account, tokens=tokens, idempotency_key=key)
        except ledger.InsufficientTokens:
            assert not expected_ok, "refused although the balance covered it"
            return
        assert expected_ok, "held although the balance did not cover it"
        if key in self.holds_by_key:
            assert hold == self.holds_by_key[key], "a retried authorization made a second hold"
            return
        self.holds_by_key[key] = hold
        self.open_holds[hold.id] = hold

    @precondition(lambda self: self.holds_by_key)
    @rule(data=st.data(), over=st.booleans())
    def settle(self, data, over):
        hold = data.draw(st.sampled_from(sorted(self.holds_by_key.values(), key=lambda h: h.id)))
        used = data.draw(st.integers(0, hold.tokens * 2 if over else hold.tokens))
        before = self.stored()
        ledger.settle(hold=hold, used_tokens=used)
        if hold.id in self.settled:
            return  # a retry: counted once already
        self.settled.add(hold.id)
        if hold.id in self.open_holds:
            del self.open_holds[hold.id]
            self.used += min(used, hold.tokens)  # what the hold does not cover is never charged
        else:
            # Released first (time-to-live passed): the late usage is charged as far as the limit allows.
            self.used += min(used, max(before.available + before.overdraft_limit, 0))

    @precondition(lambda self: self.holds_by_key)
    @rule(data=st.data())
    def release(self, data):
        hold = data.draw(st.sampled_from(sorted(self.holds_by_key.values(), key=lambda h: h.id)))
        ledger.release(hold=hold)
        if hold.id in self.open_holds:
            del self.open_holds[hold.id]
            self.released.add(hold.id)

    @rule()
    def sweep_expired_holds(self):
        ledger.release_expired_holds(now=timezone.now() + ledger.HOLD_TTL * 2)
        self.released |= set(self.open_holds)
        self.open_holds.clear()

    @rule(twice=st.booleans())
    def close_period(self, twice):
        before = self.stored()
        period = before.period_start
        assert closing.close_period(organization=self.organization, period=period) == 1
        after = self.stored()
        assert after.period_start == next_period_start(period)
        if twice:
            assert closing.close_period(organization=self.organization, period=period) == 0
            assert self.stored().granted == after.granted
        carried = after.available - self.policy.monthly_tokens
        assert 0 <= carried <= max(before.available, 0), "a period close created tokens"
        in_period = LedgerEntry.objects.filter(account=self.account, period_start=period)
        approved = sum(in_period.filter(kind=ledger.Kind.OVERAGE_GRANT, reference__startswith="overage-request:")
                       .values_list("tokens", flat=True))
        close = in_period.filter(kind=ledger.Kind.CLOSE)
        assert close.count() <= 1, "more than one close entry"
        lapsed = sum(close.values_list("close_overage_lapsed", flat=True))
        booked = sum(close.values_list("close_overage_billed", flat=True))  # usage recorded past the balance: billable too
        billed = sum(row.tokens for row in selectors.billable_overage(organization=self.organization, period=period))
        assert lapsed <= max(before.available, 0) and lapsed + billed <= approved + booked
        if before.held == 0:
            assert lapsed + billed == approved + booked, "approved overage neither lapsed nor billed"
        if self.policy.rollover_rule == "none":
            assert carried == 0
        assert after.held == before.held and after.used == before.used, "a close moved held or used tokens"

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def stored_balance_equals_the_entries(self):
        assert ledger.verify(organization_id=self.organization.pk) == []

    @invariant()
    def held_is_the_open_holds_and_used_is_counted_once(self):
        account = self.stored()
        assert account.held == sum(hold.tokens for hold in self.open_holds.values())
        assert account.used == self.used
        assert LedgerEntry.objects.filter(account=account, kind="hold").count() == len(self.holds_by_key)

    @invariant()
    def available_never_below_the_approved_overdraft(self):
        account = self.stored()
        assert account.available >= -account.overdraft_limit


@pytest.mark.django_db
def test_ledger_invariants_hold_for_random_operation_sequences():
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=60, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))


def test_period_dates_roll_over_the_year():
    assert next_period_start(date(2026, 12, 1)) == date(2027, 1, 1)
    assert next_period_start(date(2028, 1, 1)) == date(2028, 2, 1)


@pytest.mark.django_db
def test_the_sweeper_job_releases_only_holds_past_their_time_to_live():
    from allowances.tasks import release_expired_holds

    member = MemberFactory(organization=OrganizationFactory())
    with scope(member.organization):
        account = Account.objects.create(organization=member.organization, member=member, period_start=date(2026, 11, 1))
        ledger.post(account=account, kind=ledger.Kind.GRANT, tokens=10_000, idempotency_key="g")
        stale = ledger.authorize(account=account, tokens=3_000, idempotency_key="stale", ttl=timedelta(seconds=-1))
        fresh = ledger.authorize(account=account, tokens=2_000, idempotency_key="fresh")
    assert release_expired_holds() == 1
    assert release_expired_holds() == 0  # running it again releases nothing more
    assert not hold_is_open(stale.id) and hold_is_open(fresh.id)
    account.refresh_from_db()
    assert (account.held, account.available) == (2_000, 8_000)
