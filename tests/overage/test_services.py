"""The rules of overage requests, in the services that pages, API and tasks share.

Asking (the policy decides whether one may, and under auto_approve approves at once within its
tokens and requests a month), one pending request per member, deciding (never one's own, only
for one's teams, within the organization's cap), and what each outcome does to the ledger.
"""

from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.http import Http404

from allowances import closing, ledger
from allowances.models import Account, LedgerEntry
from allowances.periods import period_bounds, period_start_for
from allowances.selectors import billable_overage
from overage import selectors, services
from overage.models import ApproverTeam, OverageRequest
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.overage.conftest import AUTO_TOKENS, MONTHLY, ask, decide

pytestmark = pytest.mark.django_db
State = OverageRequest.State
Kind = LedgerEntry.Kind


def account_of(member) -> Account:
    with unscoped():
        return Account.all_objects.get(member=member)


def grants_of(member) -> list[tuple]:
    with unscoped():
        return list(LedgerEntry.all_objects.filter(account__member=member, kind=Kind.OVERAGE_GRANT).order_by("id")
                    .values_list("tokens", "idempotency_key"))


def state(organization) -> dict:
    """What a refused call must leave alone."""
    with unscoped():
        return {
            "requests": sorted(OverageRequest.all_objects.filter(organization=organization).values_list(
                "id", "state", "tokens", "approved_tokens", "decided_by", "reason", "model")),
            "entries": LedgerEntry.all_objects.filter(organization=organization).count(),
            "audit": AuditLogEntry.all_objects.filter(organization=organization).count(),
        }


def audited(organization, action) -> list:
    with unscoped():
        return list(AuditLogEntry.all_objects.filter(organization=organization, action=action).order_by("id"))


# -- asking ------------------------------------------------------------------------------------------------------


def test_a_request_under_request_approval_waits_for_the_approvers_who_are_told(
        ovr, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        overage_request = ask(ovr.alice, 250_000, model="gpt-4o", project="Launch")
    assert (overage_request.state, overage_request.tokens, overage_request.model, overage_request.project) == (
        State.PENDING, 250_000, "gpt-4o", "Launch")
    assert overage_request.period_start == period_start_for(ovr.organization)
    assert grants_of(ovr.alice) == []
    assert [entry.object_id for entry in audited(ovr.organization, "overage_request.created")] == [
        str(overage_request.pk)]
    # Both approvers may decide an Engineering request; admins are told only when there are no approvers.
    assert sorted(message.to[0] for message in mailoutbox) == ["approver@ovr.example", "eng-approver@ovr.example"]
    assert "250,000 tokens" in mailoutbox[0].body and f"/o/ovr/approvals/{overage_request.pk}/" in mailoutbox[0].body


def test_a_research_request_is_not_emailed_to_the_approver_of_engineering_only(
        ovr, mailoutbox, django_capture_on_commit_callbacks):
    with scope(ovr.organization):  # past what the policy approves at once, so it waits
        overage_request, _ = services.overage_request_create(member=ovr.carol, actor=ovr.carol.user,
                                                             tokens=AUTO_TOKENS + 1, reason="r")
    assert overage_request.is_pending
    with django_capture_on_commit_callbacks(execute=True):
        ask(ovr.dave, AUTO_TOKENS + 1)
    assert [message.to[0] for message in mailoutbox] == ["approver@ovr.example"]


def test_under_hard_stop_or_without_a_policy_there_is_nothing_to_ask_and_the_answer_says_whom_to_ask(ovr):
    with scope(ovr.organization):
        ovr.standard.overage_rule = "hard_stop"
        ovr.standard.save()
    before = state(ovr.organization)
    with pytest.raises(ValidationError) as refused:
        ask(ovr.alice)
    message = " ".join(refused.value.messages)
    assert "Standard stops at the allowance: it does not allow overage" in message and "hr@ovr.example" in message
    with pytest.raises(ValidationError) as refused:
        ask(ovr.hr)  # no team, no policy
    assert "No allowance policy governs you yet" in " ".join(refused.value.messages)
    assert state(ovr.organization) == before


def test_one_pending_request_per_member_and_the_database_holds_it_too(ovr):
    first = ask(ovr.alice, 100_000)
    with pytest.raises(services.OverageConflict) as conflict:
        ask(ovr.alice, 5_000)
    assert conflict.value.overage_request == first and f"#{first.pk}" in str(conflict.value)
    with unscoped(), pytest.raises(IntegrityError), transaction.atomic():
        OverageRequest.all_objects.create(organization=ovr.organization, member=ovr.alice, tokens=1, reason="sneaky",
                                          period_start=first.period_start)
    ask(ovr.bob)  # another member's request is their own
    decide(first, ovr.approver, "reject")
    assert ask(ovr.alice, 5_000).is_pending  # once decided, a new one may be asked


def test_a_create_retried_with_its_key_is_the_same_request(ovr):
    with scope(ovr.organization):
        first, created = services.overage_request_create(member=ovr.alice, actor=ovr.alice.user, tokens=10_000,
                                                         reason="r", idempotency_key="form-1")
        again, created_again = services.overage_request_create(member=ovr.alice, actor=ovr.alice.user, tokens=10_000,
                                                               reason="r", idempotency_key="form-1")
    assert (created, created_again, again.pk) == (True, False, first.pk)
    assert len(audited(ovr.organization, "overage_request.created")) == 1


def test_members_ask_for_themselves_only(ovr):
    with scope(ovr.organization), pytest.raises(PermissionDenied):
        services.overage_request_create(member=ovr.alice, actor=ovr.bob.user, tokens=1, reason="for alice")


@pytest.mark.parametrize("field, value, message", [
    ("tokens", -5, "Enter a positive number of tokens."),
    ("tokens", 0, "Enter a positive number of tokens."),
    ("tokens", 10_000_000_001, "That is more than 10,000,000,000 tokens; check the number."),
    ("tokens", "1.5", "Enter a whole number of tokens."),
    ("tokens", 2.5, "Enter a whole number of tokens."),
    ("tokens", "lots", "Enter a whole number of tokens."),
    ("tokens", "", "Enter a whole number of tokens."),
    ("tokens", True, "Enter a whole number of tokens."),
    ("tokens", None, "Enter a whole number of tokens."),
    ("reason", "", "Say what the tokens are for: the approver decides on it."),
    ("reason", "   \n", "Say what the tokens are for: the approver decides on it."),
    ("reason", "x" * 1001, "At most 1,000 characters."),
    ("model", "not-in-the-catalog", "Choose one of the organization's models, or none."),
    ("model", "gpt-4o" + "x" * 200, "Choose one of the organization's models, or none."),
    ("project", "p" * 201, "At most 200 characters."),
])
def test_bad_input_is_a_field_error_and_changes_nothing(ovr, field, value, message):
    before = state(ovr.organization)
    arguments = {"tokens": 10_000, "reason": "A bigger evaluation run", "model": "", "project": ""} | {field: value}
    with scope(ovr.organization), pytest.raises(ValidationError) as refused:
        services.overage_request_create(member=ovr.alice, actor=ovr.alice.user, **arguments)
    assert refused.value.message_dict == {field: [message]}
    assert state(ovr.organization) == before


def test_the_requester_changes_or_cancels_a_pending_request_and_nobody_else_can(ovr):
    overage_request = ask(ovr.alice, 100_000)
    with scope(ovr.organization):
        changed = services.overage_request_update(overage_request=overage_request, actor_member=ovr.alice,
                                                  tokens=150_000, reason="More runs", model="gpt-4o")
        assert (changed.tokens, changed.reason, changed.model, changed.state) == (150_000, "More runs", "gpt-4o",
                                                                                  State.PENDING)
        for who in (ovr.bob, ovr.approver):
            with pytest.raises(PermissionDenied):
                services.overage_request_cancel(overage_request=overage_request, actor_member=who)
        cancelled, changed_now = services.overage_request_cancel(overage_request=overage_request,
                                                                 actor_member=ovr.alice)
        again, changed_again = services.overage_request_cancel(overage_request=overage_request, actor_member=ovr.alice)
        assert (cancelled.state, changed_now, again.state, changed_again) == (State.CANCELLED, True, State.CANCELLED,
                                                                              False)
        assert cancelled.decided_by == ovr.alice.user
        with pytest.raises(services.OverageConflict):
            services.overage_request_update(overage_request=overage_request, actor_member=ovr.alice, tokens=1,
                                            reason="r")
    before = state(ovr.organization)
    with pytest.raises(services.OverageConflict) as conflict:
        decide(overage_request, ovr.approver)
    assert "no longer pending: it was cancelled" in str(conflict.value)
    assert state(ovr.organization) == before


# -- auto-approval ------------------------------------------------------------------------------------------------


def test_auto_approval_approves_at_once_up_to_the_policys_tokens_and_requests_per_period(
        ovr, mailoutbox, django_capture_on_commit_callbacks):
    available = account_of(ovr.carol).available
    with django_capture_on_commit_callbacks(execute=True):
        first = ask(ovr.carol, 200_000)
    assert (first.state, first.approved_tokens, first.auto_approved, first.decided_by) == (State.APPROVED, 200_000,
                                                                                            True, None)
    assert "Approved at once: Research approves up to 300,000 tokens in 2 requests a month" in first.decision_note
    assert account_of(ovr.carol).available == available + 200_000
    assert [m.to for m in mailoutbox] == [["carol@ovr.example"]] and "approved" in mailoutbox[0].subject

    beyond_tokens = ask(ovr.carol, 100_001)  # 300,001 in the month: beyond the tokens
    assert beyond_tokens.is_pending and not beyond_tokens.auto_approved
    decide(beyond_tokens, ovr.approver, "reject")
    second = ask(ovr.carol, 100_000)  # exactly the tokens, and the second request
    assert second.auto_approved and second.is_approved
    beyond_count = ask(ovr.carol, 1)  # the third request of the month: beyond the count
    assert beyond_count.is_pending
    assert grants_of(ovr.carol) == [(200_000, first.ledger_key), (100_000, second.ledger_key)]
    assert len(audited(ovr.organization, "overage_request.auto_approved")) == 2


def test_auto_approval_counts_each_member_on_their_own(ovr):
    assert ask(ovr.carol, AUTO_TOKENS).auto_approved
    assert ask(ovr.dave, AUTO_TOKENS).auto_approved


def test_an_auto_approval_the_organizations_cap_cannot_take_goes_to_the_approvers(ovr):
    with scope(ovr.organization):
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=50_000)
    overage_request = ask(ovr.carol, 60_000)
    assert overage_request.is_pending and grants_of(ovr.carol) == []


def test_an_edit_that_now_fits_the_policy_is_approved_at_once(ovr):
    overage_request = ask(ovr.carol, AUTO_TOKENS + 1)
    with scope(ovr.organization):
        changed = services.overage_request_update(overage_request=overage_request, actor_member=ovr.carol,
                                                  tokens=AUTO_TOKENS, reason="Less will do")
    assert changed.auto_approved and changed.approved_tokens == AUTO_TOKENS


# -- deciding ------------------------------------------------------------------------------------------------------


def test_approving_in_full_grants_the_tokens_once_and_tells_the_requester(
        ovr, mailoutbox, django_capture_on_commit_callbacks):
    overage_request = ask(ovr.alice, 250_000)
    available = account_of(ovr.alice).available
    with django_capture_on_commit_callbacks(execute=True):
        decided = decide(overage_request, ovr.approver, note="Go ahead")
    assert (decided.state, decided.approved_tokens, decided.decided_by, decided.decision_note) == (
        State.APPROVED, 250_000, ovr.approver.user, "Go ahead")
    assert account_of(ovr.alice).available == available + 250_000
    with unscoped():
        entry = LedgerEntry.all_objects.get(kind=Kind.OVERAGE_GRANT, account__member=ovr.alice)
    assert (entry.tokens, entry.idempotency_key, entry.reference, entry.actor) == (
        250_000, f"overage-request:{overage_request.pk}", f"overage-request:{overage_request.pk}", ovr.approver.user)
    assert [message.to for message in mailoutbox] == [["alice@ovr.example"]]
    assert "approved in full" in mailoutbox[0].subject and "Go ahead" in mailoutbox[0].body
    [logged] = audited(ovr.organization, "overage_request.approved")
    assert (logged.actor, logged.data["approved_tokens"]) == (ovr.approver.user, 250_000)
    assert ledger.verify(organization_id=ovr.organization.pk) == []


def test_approving_in_part_and_rejecting(ovr):
    part = decide(ask(ovr.alice, 250_000), ovr.approver, tokens="100000", note="Start with this")
    assert (part.state, part.approved_tokens) == (State.PARTIALLY_APPROVED, 100_000)
    assert grants_of(ovr.alice) == [(100_000, part.ledger_key)]
    full_by_amount = decide(ask(ovr.alice, 5_000), ovr.approver, tokens=5_000)
    assert full_by_amount.state == State.APPROVED
    rejected = decide(ask(ovr.bob, 9_000), ovr.approver, "reject", note="Not this month")
    assert (rejected.state, rejected.approved_tokens, rejected.decision_note) == (State.REJECTED, None,
                                                                                 "Not this month")
    assert grants_of(ovr.bob) == []


def test_nobody_decides_their_own_request(ovr):
    overage_request = ask(ovr.approver, 10_000)
    before = state(ovr.organization)
    with pytest.raises(PermissionDenied, match="Nobody decides their own request"):
        decide(overage_request, ovr.approver)
    assert state(ovr.organization) == before
    with scope(ovr.organization):
        assert overage_request not in selectors.approval_queue(member=ovr.approver)
        with pytest.raises(Http404):
            selectors.approval_get(member=ovr.approver, overage_request_id=overage_request.pk)
    assert decide(overage_request, ovr.eng_approver).is_approved  # another approver may


def test_an_admin_cannot_decide_their_own_request_either(ovr):
    with scope(ovr.organization):
        ovr.research_policy.overage_rule, ovr.research_policy.auto_approve_tokens = "request_approval", None
        ovr.research_policy.auto_approve_requests = None
        ovr.research_policy.save()
        member = ovr.carol
        member.is_admin = True
        member.save()
    overage_request = ask(member, 10_000)
    with pytest.raises(PermissionDenied, match="Nobody decides their own request"):
        decide(overage_request, member)


def test_employees_and_hr_do_not_decide(ovr):
    overage_request = ask(ovr.alice)
    for who in (ovr.bob, ovr.hr):
        with pytest.raises(PermissionDenied, match="Only approvers and admins"):
            decide(overage_request, who)
        with scope(ovr.organization):
            assert not selectors.approval_queue(member=who).exists()


def test_an_approver_limited_to_teams_sees_and_decides_only_their_teams(ovr):
    engineering = ask(ovr.alice, 50_000)
    research = ask(ovr.carol, AUTO_TOKENS + 1)
    with scope(ovr.organization):
        assert list(selectors.approval_queue(member=ovr.eng_approver)) == [engineering]
        assert list(selectors.approval_queue(member=ovr.approver)) == [engineering, research]  # no teams set: all
        assert list(selectors.approval_queue(member=ovr.admin)) == [engineering, research]
        with pytest.raises(Http404):
            selectors.approval_get(member=ovr.eng_approver, overage_request_id=research.pk)
        assert research not in selectors.request_list(member=ovr.eng_approver)
        assert selectors.request_list(member=ovr.alice).get() == engineering  # members see their own
    before = state(ovr.organization)
    with pytest.raises(PermissionDenied, match="other teams"):
        decide(research, ovr.eng_approver)
    assert state(ovr.organization) == before
    assert decide(engineering, ovr.eng_approver).is_approved
    # Admins set the teams; an approver's teams only ever narrow what they see.
    with scope(ovr.organization):
        services.approver_teams_set(organization=ovr.organization, actor=ovr.admin.user, approver=ovr.eng_approver,
                                    teams=[ovr.research])
        assert list(selectors.approval_queue(member=ovr.eng_approver)) == [research]
        services.approver_teams_set(organization=ovr.organization, actor=ovr.admin.user, approver=ovr.eng_approver,
                                    teams=[])
        assert not ApproverTeam.objects.filter(member=ovr.eng_approver).exists()
        assert list(selectors.approval_queue(member=ovr.eng_approver)) == [research]  # all teams again
    assert [e.data["teams"] for e in audited(ovr.organization, "approver_teams.updated")] == [
        [["Engineering"], ["Research"]], [["Research"], []]]


def test_approver_teams_are_refused_for_admins_and_teams_of_another_organization(ovr, org_b):
    with scope(ovr.organization):
        for approver, teams, field in ((ovr.admin, [], "approver"), (ovr.alice, [], "approver"),
                                       (ovr.approver, [org_b.team], "teams")):
            with pytest.raises(ValidationError) as refused:
                services.approver_teams_set(organization=ovr.organization, actor=ovr.admin.user, approver=approver,
                                            teams=teams)
            assert list(refused.value.message_dict) == [field]


@pytest.mark.parametrize("decision, tokens, field, message", [
    ("approve", 250_001, "tokens", "At most the 250,000 tokens asked for; approve those in full or part of them."),
    ("approve", 0, "tokens", "Enter a positive number of tokens."),
    ("approve", -1, "tokens", "Enter a positive number of tokens."),
    ("approve", "12.5", "tokens", "Enter a whole number of tokens."),
    ("approve", "many", "tokens", "Enter a whole number of tokens."),
    ("reject", 10, "tokens", "A rejection grants no tokens: leave the amount empty."),
    ("maybe", None, "decision", "Approve or reject."),
])
def test_a_bad_decision_is_a_field_error_and_changes_nothing(ovr, decision, tokens, field, message):
    overage_request = ask(ovr.alice, 250_000)
    before = state(ovr.organization)
    with pytest.raises(ValidationError) as refused:
        decide(overage_request, ovr.approver, decision, tokens=tokens)
    assert refused.value.message_dict == {field: [message]}
    with pytest.raises(ValidationError) as refused:
        decide(overage_request, ovr.approver, note="n" * 1001)
    assert list(refused.value.message_dict) == ["note"]
    assert state(ovr.organization) == before


def test_a_decided_request_is_decided_once_and_the_same_decision_again_changes_nothing(ovr):
    overage_request = ask(ovr.alice, 250_000)
    with scope(ovr.organization):
        decided, first = services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                                         decision="approve", tokens=120_000)
        again, second = services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                                         decision="approve", tokens=120_000)
    assert (first, second, again.approved_tokens) == (True, False, 120_000)
    before = state(ovr.organization)
    for who, decision, tokens in ((ovr.approver, "reject", None), (ovr.approver, "approve", None),
                                  (ovr.eng_approver, "approve", 120_000)):
        with pytest.raises(services.OverageConflict, match="no longer pending: it was approved in part by "
                                                           "approver@ovr.example"):
            decide(overage_request, who, decision, tokens=tokens)
    assert state(ovr.organization) == before
    assert grants_of(ovr.alice) == [(120_000, overage_request.ledger_key)]


def test_the_organizations_cap_refuses_an_approval_past_it_naming_the_room_left(ovr):
    with scope(ovr.organization):
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=500_000)
    decide(ask(ovr.alice, 400_000), ovr.approver)
    bobs = ask(ovr.bob, 200_000)
    before = state(ovr.organization)
    with pytest.raises(ValidationError) as refused:
        decide(bobs, ovr.approver)
    period = period_start_for(ovr.organization)
    assert refused.value.message_dict == {"tokens": [
        f"The organization's cap of 500,000 approved overage tokens a month has 100,000 tokens left for {period:%B %Y}."]}
    assert state(ovr.organization) == before
    assert decide(bobs, ovr.approver, tokens=100_000).state == State.PARTIALLY_APPROVED  # what the room allows
    with scope(ovr.organization):
        assert selectors.cap_room(organization=ovr.organization, period=period) == 0
        # Rejections and cancellations take no room; a lower cap refuses every approval.
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=0)
    with pytest.raises(ValidationError, match="has 0 tokens left"):
        decide(ask(ovr.alice, 1), ovr.approver)
    assert [e.data for e in audited(ovr.organization, "overage_settings.updated")] == [
        {"cap_tokens": [None, 500_000]}, {"cap_tokens": [500_000, 0]}]


@pytest.mark.parametrize("cap, message", [(-1, "Tokens cannot be negative."), ("1e3", "Enter a whole number of tokens."),
                                          (10**11, "That is more than 10,000,000,000 tokens; check the number.")])
def test_a_bad_cap_is_refused(ovr, cap, message):
    with scope(ovr.organization), pytest.raises(ValidationError) as refused:
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=cap)
    assert refused.value.message_dict == {"cap_tokens": [message]}
    assert audited(ovr.organization, "overage_settings.updated") == []


def test_approving_several_at_once_goes_oldest_first_and_refuses_what_the_cap_cannot_take(ovr):
    with scope(ovr.organization):
        services.overage_settings_update(organization=ovr.organization, actor=ovr.admin.user, cap_tokens=300_000)
    older, newer, third = ask(ovr.alice, 200_000), ask(ovr.bob, 150_000), ask(ovr.dave, AUTO_TOKENS + 5)
    with scope(ovr.organization):
        outcome = services.overage_requests_approve(overage_requests=[third, newer, older], actor_member=ovr.approver,
                                                    note="Batch")
    assert [r.pk for r in outcome.approved] == [older.pk]
    assert [(r.pk, "has 100,000 tokens left" in why) for r, why in outcome.refused] == [(newer.pk, True),
                                                                                      (third.pk, True)]
    with scope(ovr.organization):
        assert OverageRequest.objects.get(pk=older.pk).decision_note == "Batch"
        assert OverageRequest.objects.get(pk=newer.pk).is_pending


# -- the period ----------------------------------------------------------------------------------------------------


def test_a_request_still_pending_when_its_period_closes_lapses_with_a_note(ovr):
    overage_request = ask(ovr.alice, 50_000)
    period = overage_request.period_start
    next_month = period_bounds(ovr.organization, period)[1]
    with scope(ovr.organization):
        closing.close_due_periods(at=next_month, organization=ovr.organization)
        lapsed = OverageRequest.objects.get(pk=overage_request.pk)
    assert (lapsed.state, lapsed.approved_tokens) == (State.LAPSED, None)
    assert lapsed.decision_note == (f"Still pending when {period:%B %Y} closed: ask again if you still need tokens "
                                    "this month.")
    assert lapsed.decided_at is not None and lapsed.decided_by is None


def test_a_request_whose_month_ended_before_the_close_ran_cannot_be_decided(ovr):
    overage_request = ask(ovr.alice, 50_000)
    after_the_month = period_bounds(ovr.organization, overage_request.period_start)[1] + timedelta(minutes=5)
    before = state(ovr.organization)
    with scope(ovr.organization), pytest.raises(services.OverageConflict, match="has ended: it lapses"):
        services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                        decision="approve", at=after_the_month)
    with scope(ovr.organization), pytest.raises(services.OverageConflict, match="still being closed"):
        services.overage_request_create(member=ovr.bob, actor=ovr.bob.user, tokens=5, reason="r", at=after_the_month)
    assert state(ovr.organization) == before


def test_approved_overage_is_used_last_the_unused_part_lapses_and_the_used_part_is_billable_by_model(ovr):
    """Alice has her month's 1,000,000 and 300,000 approved; she uses 1,100,000 (the last 200,000 on
    gpt-4o): 100,000 of the overage is used, billable to gpt-4o, and 200,000 lapse at the close."""
    decide(ask(ovr.alice, 300_000), ovr.approver)
    account = account_of(ovr.alice)
    with scope(ovr.organization):
        for key, tokens, model in (("a", 900_000, "gpt-4o-mini"), ("b", 200_000, "gpt-4o")):
            hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key, model=model)
            ledger.settle(hold=hold, used_tokens=tokens)
        period = account.period_start
        assert [(row.email, row.team, row.model, row.tokens) for row in billable_overage(
            organization=ovr.organization, period=period)] == [("alice@ovr.example", "Engineering", "gpt-4o", 100_000)]
        status = selectors.overage_status(account=account_of(ovr.alice))
        assert (status.granted, status.billable_used, status.left) == (300_000, 100_000, 200_000)
        closing.close_due_periods(at=period_bounds(ovr.organization, period)[1], organization=ovr.organization)
    with unscoped():
        close = LedgerEntry.all_objects.get(account=account, kind=Kind.CLOSE)
    assert (close.close_overage_lapsed, close.close_overage_billed, close.period_start) == (200_000, 0, period)
    with scope(ovr.organization):
        assert [row.tokens for row in billable_overage(organization=ovr.organization, period=period)] == [100_000]
    assert account_of(ovr.alice).available == MONTHLY  # the next month starts with its own grant only
    assert ledger.verify(organization_id=ovr.organization.pk) == []


def test_the_balance_level_makes_the_request_link_prominent(ovr):
    account = account_of(ovr.bob)
    with scope(ovr.organization):
        assert selectors.overage_status(account=account).level == "ok"
        hold = ledger.authorize(account=account, tokens=MONTHLY - 150_000, idempotency_key="most")
        assert selectors.overage_status(account=account_of(ovr.bob)).level == "low"  # under a fifth left
        ledger.settle(hold=hold, used_tokens=MONTHLY - 150_000)
        ledger.settle(hold=ledger.authorize(account=account, tokens=150_000, idempotency_key="rest"),
                      used_tokens=150_000)
        assert selectors.overage_status(account=account_of(ovr.bob)).level == "exhausted"


def test_decisions_show_as_notices_until_dismissed(ovr):
    decide(ask(ovr.alice, 10_000), ovr.approver, note="Enjoy")
    with scope(ovr.organization):
        [notice] = selectors.overage_status(account=account_of(ovr.alice)).notices
        assert notice.decision_note == "Enjoy"
        assert services.overage_notices_dismiss(member=ovr.alice) == 1
        assert selectors.overage_status(account=account_of(ovr.alice)).notices == []


def test_the_context_of_a_request_is_what_a_decision_needs(ovr):
    decide(ask(ovr.alice, 10_000), ovr.approver, "reject")
    account = account_of(ovr.alice)
    with scope(ovr.organization):
        ledger.settle(hold=ledger.authorize(account=account, tokens=400_000, idempotency_key="u", model="gpt-4o"),
                      used_tokens=400_000)
    overage_request = ask(ovr.alice, 500_000, model="gpt-4o")
    with scope(ovr.organization):
        context = selectors.request_context(overage_request=overage_request)
    assert context.allowance == MONTHLY and context.granted_this_period == MONTHLY
    assert (context.board.used_this_period, context.board.account.available) == (400_000, 600_000)
    assert context.board.by_model == [("gpt-4o", 400_000)]
    assert context.board.burn_per_day > 0
    assert context.outcomes == {"Rejected": 1} and [r.state for r in context.previous] == [State.REJECTED]
    # 500,000 allowance tokens of gpt-4o (x5): 100,000 input tokens at 2.50 or output tokens at 10.00 per million.
    assert (str(context.cost_low), str(context.cost_high), context.currency) == ("0.25", "1.00", "USD")


# -- a decision against a request changed meanwhile -------------------------------------------------------------


def change(overage_request, member, tokens):
    with scope(member.organization):
        return services.overage_request_update(overage_request=overage_request, actor_member=member, tokens=tokens,
                                               reason=overage_request.reason)


def test_a_decision_on_the_amount_seen_is_refused_once_the_requester_changed_it(ovr):
    overage_request = ask(ovr.alice, 200_000)
    change(overage_request, ovr.alice, 400_000)  # after the approver opened it at 200,000
    before = state(ovr.organization)
    with scope(ovr.organization), pytest.raises(services.OverageConflict, match="changed to 400,000 tokens"):
        services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                        decision="approve", asked_tokens=200_000)
    assert state(ovr.organization) == before
    assert decide(overage_request, ovr.approver, asked_tokens=400_000).approved_tokens == 400_000


def test_a_part_approval_larger_than_the_lowered_request_is_a_field_error(ovr):
    """The approver loaded 200,000 and approves 150,000 of it; meanwhile it was lowered to 100,000."""
    overage_request = ask(ovr.alice, 200_000)
    change(overage_request, ovr.alice, 100_000)
    before = state(ovr.organization)
    with scope(ovr.organization), pytest.raises(ValidationError) as refused:
        services.overage_request_decide(overage_request=overage_request, actor_member=ovr.approver,
                                        decision="approve", tokens=150_000)
    assert "At most the 100,000 tokens asked for" in refused.value.message_dict["tokens"][0]
    assert state(ovr.organization) == before


def test_the_batch_refuses_what_was_changed_since_the_queue_showed_it(ovr):
    kept, changed = ask(ovr.alice, 10_000), ask(ovr.bob, 20_000)
    change(changed, ovr.bob, 90_000)
    with scope(ovr.organization):
        outcome = services.overage_requests_approve(overage_requests=[kept, changed], actor_member=ovr.approver,
                                                    asked_tokens={kept.pk: 10_000, changed.pk: 20_000})
    assert [r.pk for r in outcome.approved] == [kept.pk]
    assert [(r.pk, "changed to 90,000 tokens" in why) for r, why in outcome.refused] == [(changed.pk, True)]
    assert grants_of(ovr.bob) == []


def test_the_close_audits_each_request_it_lapses(ovr):
    overage_request = ask(ovr.alice, 50_000)
    next_month = period_bounds(ovr.organization, overage_request.period_start)[1]
    with scope(ovr.organization):
        closing.close_due_periods(at=next_month, organization=ovr.organization)
        closing.close_due_periods(at=next_month, organization=ovr.organization)  # a rerun audits nothing more
    [entry] = audited(ovr.organization, "overage_request.lapsed")
    assert (entry.object_type, entry.object_id, entry.actor_id) == ("overage.overagerequest", str(overage_request.pk),
                                                                    None)
    assert entry.data == {"tokens": 50_000, "period": overage_request.period_start.isoformat()}
