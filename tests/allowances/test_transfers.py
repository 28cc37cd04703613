"""Transfers between members: one ledger operation on both accounts (never one side without the
other), idempotent by key, audited; the rules (off by default, same team or any, a maximum per
period, only unused base allowance, never approved overage) enforced with clear errors; shown on
both dashboards and in HR's report; and what is billable overage stays what it was."""

import pytest
from django.core.exceptions import ValidationError

from allowances import ledger
from allowances import services as allowance_services
from allowances.models import Account, LedgerEntry, Transfer
from allowances.selectors import billable_overage, transferable
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance, snapshot
from tests.factories import MemberFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def teammates(org_a):
    """Transfers on, same team only. The employee (5,000 granted, 1,000 held) and a teammate with
    an account of their own; an approver in another team."""
    with scope(org_a.organization):
        allowance_services.transfer_settings_save(organization=org_a.organization, actor=org_a.members["admin"].user,
                                                  enabled=True, same_team_only=True)
        teammate = MemberFactory(organization=org_a.organization, team=org_a.team,
                                 user=UserFactory(email="teammate@a.example"))
        allowance_services.account_open(member=teammate)
    org_a.teammate = teammate
    return org_a


def give(org, tokens, key="t1", giver=None, receiver=None, **kwargs):
    giver = giver or org.members["employee"]
    with scope(org.organization):
        return allowance_services.transfer_create(giver=giver, receiver=receiver or org.teammate, tokens=tokens,
                                                  actor=giver.user, idempotency_key=key, **kwargs)


def test_a_transfer_moves_tokens_off_one_account_onto_the_other_once(teammates):
    employee, teammate = teammates.members["employee"], teammates.teammate
    before = balance(employee), balance(teammate)
    transfer = give(teammates, 1_500, note="for the demo")
    assert balance(employee) == (before[0][0] - 1_500, *before[0][1:])
    assert balance(teammate) == (before[1][0] + 1_500, *before[1][1:])
    assert give(teammates, 1_500, note="for the demo") == transfer  # a retry: the same transfer, nothing moves
    assert balance(employee)[0] == before[0][0] - 1_500
    with unscoped():
        entries = list(LedgerEntry.objects.filter(reference=f"transfer:{transfer.pk}").order_by("id"))
        assert [(e.kind, e.granted_delta, e.account.member_id) for e in entries] == [
            ("transfer_out", -1_500, employee.pk), ("transfer_in", 1_500, teammate.pk)]
        audit = AuditLogEntry.objects.get(action="transfer.created")
        assert audit.data["tokens"] == 1_500 and audit.data["receiver"] == "teammate@a.example"
    assert ledger.verify() == []


def test_only_unused_base_allowance_is_given_never_held_tokens_or_approved_overage(teammates):
    employee = teammates.members["employee"]
    with scope(teammates.organization):
        ledger.post(account=teammates.account, kind="overage_grant", tokens=10_000, idempotency_key="overage:test")
        assert transferable(account=Account.objects.get(pk=teammates.account.pk)) == 4_000
    before = snapshot()
    with pytest.raises(ValidationError) as raised:
        give(teammates, 4_001)
    assert "at most 4,000 tokens" in raised.value.message_dict["tokens"][0]
    assert "approved overage" in raised.value.message_dict["tokens"][0]
    assert snapshot() == before
    give(teammates, 4_000)
    assert balance(employee) == (5_000 + 10_000 - 4_000, 1_000, 0)
    with pytest.raises(ValidationError):
        give(teammates, 1, key="t2")  # all that is left is the overage


@pytest.mark.parametrize("change, field, message", [
    ({"enabled": False, "same_team_only": True}, None, "switched off"),
    ({"enabled": True, "same_team_only": True, "max_per_period": 1_000}, "tokens", "At most 1,000 tokens"),
])
def test_the_rules_refuse_with_a_clear_error_and_change_nothing(teammates, change, field, message):
    with scope(teammates.organization):
        allowance_services.transfer_settings_save(organization=teammates.organization,
                                                  actor=teammates.members["admin"].user, **change)
    if field:
        give(teammates, 600, key="first")
    before = snapshot()
    with pytest.raises(ValidationError) as raised:
        give(teammates, 600)
    text = raised.value.message_dict[field][0] if field else " ".join(raised.value.messages)
    assert message in text
    assert snapshot() == before


@pytest.mark.parametrize("tokens", [0, -5, "1.5", "lots", 10**11])
def test_a_bad_amount_is_a_field_error(teammates, tokens):
    with pytest.raises(ValidationError) as raised:
        give(teammates, tokens)
    assert "tokens" in raised.value.message_dict


def test_receivers_are_active_members_of_the_team_unless_any_team_is_allowed(teammates, org_b):
    outsider_team = teammates.members["approver"]
    with scope(teammates.organization):
        from portal.models import Team

        other = Team.objects.create(organization=teammates.organization, name="Elsewhere")
        outsider_team.team = other
        outsider_team.save()
    for receiver, message in ((outsider_team, "your own team"), (teammates.members["employee"], "yourself"),
                              (org_b.members["employee"], "active member of the organization"),
                              ("nobody", "active member of the organization")):
        with pytest.raises(ValidationError) as raised:
            give(teammates, 10, receiver=receiver)
        assert message in raised.value.message_dict["receiver"][0]
    with scope(teammates.organization):
        allowance_services.transfer_settings_save(organization=teammates.organization, actor=None, enabled=True,
                                                  same_team_only=False)
    assert give(teammates, 10, receiver=outsider_team).receiver == outsider_team


def test_transfers_make_no_usage_billable_that_was_not_and_hide_none_that_was(teammates):
    """The giver gave base allowance: their usage past what is left of it uses their overage
    (billable), as it would have; the receiver's use of it is base (not billable)."""
    employee, teammate = teammates.members["employee"], teammates.teammate
    with scope(teammates.organization):
        teammate_account = teammate.account
        ledger.post(account=teammate_account, kind="overage_grant", tokens=500, idempotency_key="overage:mate")
        give(teammates, 2_000)
        # The teammate uses the 2,000 received (base: nothing billable), then 300 more of their overage.
        hold = ledger.authorize(account=teammate_account, tokens=2_000, idempotency_key="mate-use")
        ledger.settle(hold=hold, used_tokens=2_000, model="gpt-test")
        period = teammates.account.period_start
        assert billable_overage(organization=teammates.organization, period=period, member=teammate) == []
        hold = ledger.authorize(account=teammate_account, tokens=300, idempotency_key="mate-more")
        ledger.settle(hold=hold, used_tokens=300, model="gpt-test")
        assert [row.tokens for row in billable_overage(organization=teammates.organization, period=period,
                                                       member=teammate)] == [300]
        # The employee uses all that is left to them (2,000 after the fixture hold's 1,000): base.
        ledger.release(hold=teammates.hold)
        hold = ledger.authorize(account=teammates.account, tokens=3_000, idempotency_key="emp-use")
        ledger.settle(hold=hold, used_tokens=3_000, model="gpt-test")
        assert billable_overage(organization=teammates.organization, period=period, member=employee) == []


def test_both_dashboards_show_the_transfer_and_hr_sees_the_report(teammates, login):
    give(teammates, 1_234, note="thanks")
    client = login(teammates.members["employee"])
    page = client.get(f"/o/{teammates.slug}/").content.decode()
    assert 'data-testid="transfers"' in page and "teammate@a.example" in page
    page = login(teammates.teammate).get(f"/o/{teammates.slug}/").content.decode()
    assert "employee@a.example" in page and "+" in page
    report = login(teammates.members["hr"]).get(f"/o/{teammates.slug}/transfers/report/").content.decode()
    assert "1 transfer," in report and "teammate@a.example" in report and "thanks" in report


def test_the_transfer_page_gives_and_shows_field_errors(teammates, login):
    client = login(teammates.members["employee"])
    page = client.get(f"/o/{teammates.slug}/transfers/")
    assert page.status_code == 200 and "teammate@a.example" in page.content.decode()
    refused = client.post(f"/o/{teammates.slug}/transfers/", {"receiver": teammates.teammate.pk, "tokens": "9000",
                                                             "idempotency_key": "form-1"})
    assert refused.status_code == 400 and "at most 4,000 tokens" in refused.context["form"].errors["tokens"][0]
    done = client.post(f"/o/{teammates.slug}/transfers/", {"receiver": teammates.teammate.pk, "tokens": "900",
                                                          "idempotency_key": "form-2"})
    assert done.status_code == 302
    again = client.post(f"/o/{teammates.slug}/transfers/", {"receiver": teammates.teammate.pk, "tokens": "900",
                                                           "idempotency_key": "form-2"})  # the form resubmitted
    assert again.status_code == 302
    with unscoped():
        assert Transfer.objects.filter(organization=teammates.organization).count() == 1


def test_the_rules_page_saves_with_field_errors(teammates, login):
    admin = login(teammates.members["admin"])
    bad = admin.post(f"/o/{teammates.slug}/settings/transfers/", {"enabled": "on", "max_per_period": "-1"})
    assert bad.status_code == 400 and "max_per_period" in bad.context["form"].errors
    assert admin.post(f"/o/{teammates.slug}/settings/transfers/", {"max_per_period": "5000"}).status_code == 302
    with pytest.raises(ValidationError) as raised:
        give(teammates, 10)
    assert "switched off" in " ".join(raised.value.messages)


def test_transferred_tokens_roll_over_as_base_allowance_and_a_second_close_changes_nothing():
    from datetime import date, timedelta

    from allowances.periods import next_period_start
    from tests.allowances.test_closing import begin_of, build_org, close, ledger_snapshot, stored, use

    period = date(2026, 10, 1)
    org = build_org("UTC", period, members=2, rollover_rule="all")
    giver, receiver = org.members
    with scope(org.organization):
        allowance_services.transfer_settings_save(organization=org.organization, actor=org.actor, enabled=True,
                                                  same_team_only=True)
        allowance_services.transfer_create(giver=giver, receiver=receiver, tokens=300_000, actor=giver.user,
                                           idempotency_key="before-the-close")
    use(org.accounts[1], 1_200_000, "spent-the-gift")  # more than their own 1,000,000: not billable, it was given
    at = begin_of("UTC", next_period_start(period)) + timedelta(hours=1)
    close(at, org.organization)
    first = ledger_snapshot(org.organization)
    close(at, org.organization)
    assert ledger_snapshot(org.organization) == first
    # Everything unused rolls over: the giver's 700,000 and the receiver's 100,000, each on top of the new month.
    assert [stored(account).available for account in org.accounts] == [1_700_000, 1_100_000]
    with scope(org.organization):
        assert billable_overage(organization=org.organization, period=period) == []
