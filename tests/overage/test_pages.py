"""The overage pages: asking (prefilled from the gateway's link), following and cancelling one's
requests, the approvers' queue and decisions, the admins' settings, and the dashboard's entry."""

import html
import re

import pytest
from django.urls import reverse
from django.utils.html import strip_tags

from allowances import ledger
from allowances.models import Account, LedgerEntry
from overage import services
from overage.models import ApproverTeam, OverageRequest
from portal.tenancy import scope, unscoped
from tests.overage.conftest import AUTO_TOKENS, MONTHLY, ask, decide
from tests.overage.test_services import state

pytestmark = pytest.mark.django_db
State = OverageRequest.State


def url(ovr, name, **kwargs):
    return reverse(name, kwargs={"org_slug": ovr.slug, **kwargs})


def text(response) -> str:
    return html.unescape(response.content.decode())


def plain(response) -> str:
    """What a person reads: the page without its markup."""
    return re.sub(r"\s+", " ", html.unescape(strip_tags(response.content.decode())))


def form_errors(response) -> dict:
    return {name: list(errors) for name, errors in response.context["form"].errors.items()}


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# -- asking ----------------------------------------------------------------------------------------------------


def test_the_form_is_prefilled_from_the_gateways_link(ovr, login):
    response = login(ovr.alice).get(url(ovr, "overage_request_new"), {"tokens": "123456", "model": "gpt-4o"})
    assert response.status_code == 200
    form = response.context["form"]
    assert (form.initial["tokens"], form.initial["model"]) == ("123456", "gpt-4o")
    page = text(response)
    assert 'value="123456"' in page and '<option value="gpt-4o" selected>' in page
    # What is not an amount is not put in the form.
    odd = login(ovr.alice).get(url(ovr, "overage_request_new"), {"tokens": "-5", "model": "x" * 200})
    assert "tokens" not in odd.context["form"].initial and "model" not in odd.context["form"].initial


def test_asking_through_the_form_and_following_the_request(ovr, login):
    client = login(ovr.alice)
    page = client.get(url(ovr, "overage_request_new"))
    token = page.context["form"].initial["form_token"]
    body = {"tokens": "250000", "reason": "Evaluation runs", "model": "gpt-4o", "project": "Launch",
            "form_token": token}
    response = client.post(url(ovr, "overage_request_new"), body, follow=True)
    assert response.redirect_chain[-1][0] == url(ovr, "overage_request_list")
    assert "Request for 250,000 tokens sent to the approvers." in messages_of(response)
    assert client.post(url(ovr, "overage_request_new"), body).status_code == 302  # the double click
    with unscoped():
        [made] = OverageRequest.all_objects.filter(member=ovr.alice)
    assert (made.tokens, made.reason, made.model, made.project, made.state) == (250_000, "Evaluation runs", "gpt-4o",
                                                                                "Launch", State.PENDING)
    listed = text(client.get(url(ovr, "overage_request_list")))
    assert "Evaluation runs" in listed and ">Pending<" in listed
    # A second request asks to change the first.
    response = client.get(url(ovr, "overage_request_new"))
    assert response.status_code == 200 and response.context["editing"] == made
    assert response.context["form"].initial["tokens"] == 250_000
    assert 'data-testid="already-pending"' in text(response)
    assert f'action="{url(ovr, "overage_request_edit", overage_request_id=made.pk)}"' in text(response)
    response = client.post(url(ovr, "overage_request_edit", overage_request_id=made.pk),
                           {"tokens": "300000", "reason": "More runs", "model": ""}, follow=True)
    assert "Request changed." in messages_of(response)
    response = client.post(url(ovr, "overage_request_new"), body | {"form_token": "another"}, follow=True)
    assert response.redirect_chain[-1][0] == url(ovr, "overage_request_edit", overage_request_id=made.pk)
    assert any("already have a pending request" in message for message in messages_of(response))
    # Cancelled: its state shows, and a new one may be asked.
    response = client.post(url(ovr, "overage_request_cancel", overage_request_id=made.pk), follow=True)
    assert f"Request #{made.pk} cancelled." in messages_of(response)
    assert ">Cancelled<" in text(response)
    assert client.get(url(ovr, "overage_request_new")).status_code == 200


@pytest.mark.parametrize("field, value, message", [
    ("tokens", "-1", "Enter a positive number of tokens."),
    ("tokens", "0", "Enter a positive number of tokens."),
    ("tokens", "99999999999999", "That is more than 10,000,000,000 tokens; check the number."),
    ("tokens", "12.5", "Enter a whole number of tokens."),
    ("tokens", "a lot", "Enter a whole number of tokens."),
    ("reason", "", "Say what the tokens are for: the approver decides on it."),
    ("model", "not-ours", "Select a valid choice. not-ours is not one of the available choices."),
])
def test_a_bad_request_is_a_400_with_the_field_error_and_nothing_changes(ovr, login, field, value, message):
    before = state(ovr.organization)
    body = {"tokens": "1000", "reason": "Evaluation runs", "model": "", "form_token": "t"} | {field: value}
    response = login(ovr.alice).post(url(ovr, "overage_request_new"), body)
    assert response.status_code == 400
    assert form_errors(response) == {field: [message]}
    assert state(ovr.organization) == before


def test_under_hard_stop_the_page_explains_and_offers_no_form(ovr, login):
    with scope(ovr.organization):
        ovr.standard.overage_rule = "hard_stop"
        ovr.standard.save()
    response = login(ovr.alice).get(url(ovr, "overage_request_new"))
    page = text(response)
    assert 'data-testid="overage-refused"' in page and 'data-testid="overage-form"' not in page
    assert "does not allow overage" in page and "hr@ovr.example" in page
    before = state(ovr.organization)
    refused = login(ovr.alice).post(url(ovr, "overage_request_new"), {"tokens": "5", "reason": "r", "form_token": "t"})
    assert refused.status_code == 400 and "does not allow overage" in text(refused)
    assert state(ovr.organization) == before


def test_someone_elses_request_is_not_found(ovr, login):
    theirs = ask(ovr.bob)
    client = login(ovr.alice)
    for name in ("overage_request_edit", "overage_request_cancel"):
        assert client.post(url(ovr, name, overage_request_id=theirs.pk)).status_code == 404
    with unscoped():
        assert OverageRequest.all_objects.get(pk=theirs.pk).is_pending


# -- the queue ---------------------------------------------------------------------------------------------------


def test_the_queue_shows_what_a_decision_needs_oldest_first_with_the_count_in_the_menu(ovr, login):
    older, newer = ask(ovr.alice, 100_000), ask(ovr.carol, AUTO_TOKENS + 1, model="gpt-4o")
    response = login(ovr.approver).get(url(ovr, "approval_queue"))
    assert response.status_code == 200
    page = text(response)
    assert re.findall(r'data-testid="queue-item" data-request="(\d+)"', page) == [str(older.pk), str(newer.pk)]
    assert re.search(r'data-testid="approvals-count"[^>]*>2<', page)
    for testid in ("ctx-allowance", "ctx-used", "ctx-burn", "ctx-run-out", "ctx-cost", "ctx-models", "ctx-previous"):
        assert page.count(f'data-testid="{testid}"') == 2, testid
    assert "1M a month (Standard)" in plain(response) and "1M a month (Research)" in plain(response)
    # Only Engineering for the approver limited to it; nothing at all for employees.
    limited = text(login(ovr.eng_approver).get(url(ovr, "approval_queue")))
    assert re.findall(r'data-request="(\d+)"', limited) == [str(older.pk)]
    assert login(ovr.eng_approver).get(url(ovr, "approval_detail", overage_request_id=newer.pk)).status_code == 404
    assert login(ovr.bob).get(url(ovr, "approval_queue")).status_code == 403
    assert 'data-testid="approvals-count"' not in text(login(ovr.bob).get(url(ovr, "dashboard")))


def test_an_approver_approves_part_with_a_note_and_the_requester_sees_it(ovr, login):
    overage_request = ask(ovr.alice, 250_000)
    client = login(ovr.approver)
    detail = client.get(url(ovr, "approval_detail", overage_request_id=overage_request.pk))
    assert detail.status_code == 200 and 'data-testid="decision-form"' in text(detail)
    response = client.post(url(ovr, "approval_detail", overage_request_id=overage_request.pk),
                           {"decision": "approve", "tokens": "100000", "note": "Start with this"}, follow=True)
    assert response.redirect_chain[-1][0] == url(ovr, "approval_queue")
    assert f"Request #{overage_request.pk} approved in part: 100,000 tokens granted." in messages_of(response)
    with unscoped():
        assert Account.all_objects.get(member=ovr.alice).available == MONTHLY + 100_000
    mine = plain(login(ovr.alice).get(url(ovr, "overage_request_list")))
    assert "Approved in part" in mine and "Start with this" in mine and "by approver@ovr.example" in mine
    # The same page again: a decided request is shown, not decided twice.
    again = login(ovr.approver).post(url(ovr, "approval_detail", overage_request_id=overage_request.pk),
                                     {"decision": "reject"}, follow=True)
    assert any("no longer pending: it was approved in part" in message for message in messages_of(again))
    with unscoped():
        assert LedgerEntry.all_objects.filter(idempotency_key=overage_request.ledger_key).count() == 1


@pytest.mark.parametrize("body, field, message", [
    ({"decision": "approve", "tokens": "250001"}, "tokens",
     "At most the 250,000 tokens asked for; approve those in full or part of them."),
    ({"decision": "approve", "tokens": "-3"}, "tokens", "Enter a positive number of tokens."),
    ({"decision": "approve", "tokens": "1.5"}, "tokens", "Enter a whole number of tokens."),
    ({"decision": "perhaps"}, "decision", "Select a valid choice. perhaps is not one of the available choices."),
])
def test_a_bad_decision_is_a_400_with_the_field_error_and_nothing_changes(ovr, login, body, field, message):
    overage_request = ask(ovr.alice, 250_000)
    before = state(ovr.organization)
    response = login(ovr.approver).post(url(ovr, "approval_detail", overage_request_id=overage_request.pk), body)
    assert response.status_code == 400 and form_errors(response) == {field: [message]}
    assert state(ovr.organization) == before


def test_nobody_finds_their_own_request_in_the_queue(ovr, login):
    own = ask(ovr.approver, 10_000)
    client = login(ovr.approver)
    assert f'data-request="{own.pk}"' not in text(client.get(url(ovr, "approval_queue")))
    assert client.post(url(ovr, "approval_detail", overage_request_id=own.pk), {"decision": "approve"}).status_code == 404
    with unscoped():
        assert OverageRequest.all_objects.get(pk=own.pk).is_pending


def test_approving_the_selected_requests_together(ovr, login):
    first, second = ask(ovr.alice, 10_000), ask(ovr.bob, 20_000)
    left = ask(ovr.carol, AUTO_TOKENS + 1)
    response = login(ovr.approver).post(url(ovr, "approvals_approve"),
                                        {"overage_requests": [first.pk, second.pk], "note": "Both fine"}, follow=True)
    assert f"Approved 2 requests in full: #{first.pk}, #{second.pk}." in messages_of(response)
    with unscoped():
        states = dict(OverageRequest.all_objects.values_list("pk", "state"))
    assert (states[first.pk], states[second.pk], states[left.pk]) == (State.APPROVED, State.APPROVED, State.PENDING)
    # What the approver may not decide is not a choice.
    refused = login(ovr.eng_approver).post(url(ovr, "approvals_approve"), {"overage_requests": [left.pk]}, follow=True)
    assert any("not one of the available choices" in message for message in messages_of(refused))
    assert login(ovr.approver).post(url(ovr, "approvals_approve"), {}, follow=True).status_code == 200


# -- settings --------------------------------------------------------------------------------------------------------


def test_admins_set_the_cap_and_the_teams_approvers_approve_for(ovr, login):
    client = login(ovr.admin)
    assert client.get(url(ovr, "approval_settings")).status_code == 200
    response = client.post(url(ovr, "approval_settings"), {"form": "cap", "cap_tokens": "5000000"}, follow=True)
    assert "The organization's overage cap is saved." in messages_of(response)
    bad = client.post(url(ovr, "approval_settings"), {"form": "cap", "cap_tokens": "-5"})
    assert bad.status_code == 400 and "Tokens cannot be negative." in text(bad)
    response = client.post(url(ovr, "approval_settings"), {"form": "teams", "approver": ovr.approver.pk,
                                                           "teams": [ovr.research.pk]}, follow=True)
    assert "Saved the teams approver@ovr.example approves for." in messages_of(response)
    with scope(ovr.organization):
        assert list(ApproverTeam.objects.filter(member=ovr.approver).values_list("team_id", flat=True)) == [
            ovr.research.pk]
        assert services.selectors.cap_of(organization=ovr.organization) == 5_000_000
    for who in (ovr.approver, ovr.hr, ovr.alice):
        assert login(who).get(url(ovr, "approval_settings")).status_code == 403


# -- the dashboard ---------------------------------------------------------------------------------------------------


def entry(response) -> str:
    match = re.search(r'<div class="card overage-entry[^"]*" data-testid="overage-entry" data-level="(\w+)"', text(response))
    assert match, "no overage entry on the dashboard"
    return match.group(1)


def test_the_dashboard_always_offers_more_tokens_and_prominently_when_the_balance_is_low(ovr, login):
    client = login(ovr.bob)
    response = client.get(url(ovr, "dashboard"))
    assert entry(response) == "ok" and 'data-testid="request-more"' in text(response)
    with unscoped():
        account = Account.all_objects.get(member=ovr.bob)
    with scope(ovr.organization):
        ledger.settle(hold=ledger.authorize(account=account, tokens=MONTHLY, idempotency_key="all"), used_tokens=MONTHLY)
    response = client.get(url(ovr, "dashboard"))
    assert entry(response) == "exhausted"
    assert 'class="button" data-testid="request-more"' in text(response)
    assert "Your allowance is used up for this period." in text(response)


def test_the_dashboard_shows_the_pending_request_then_the_decision_until_dismissed(ovr, login):
    overage_request = ask(ovr.alice, 40_000)
    client = login(ovr.alice)
    assert f"Request #{overage_request.pk} for 40k tokens is waiting for an approver." in plain(
        client.get(url(ovr, "dashboard")))
    decide(overage_request, ovr.approver, note="Enjoy")
    response = client.get(url(ovr, "dashboard"))
    assert "was approved in full: 40k tokens added by approver@ovr.example" in plain(response)
    assert "Enjoy" in plain(response)
    assert 'data-testid="overage-status"' in text(response)  # the overage of the month: granted, used, left
    client.post(url(ovr, "overage_notices_dismiss"))
    assert 'data-testid="overage-notice"' not in text(client.get(url(ovr, "dashboard")))


def test_the_pages_decide_only_the_amount_they_showed(ovr, login):
    """The detail page and the queue send the amount they showed; the requester raised it since."""
    one, other = ask(ovr.alice, 10_000), ask(ovr.bob, 20_000)
    client = login(ovr.approver)
    detail = text(client.get(url(ovr, "approval_detail", overage_request_id=one.pk)))
    assert 'name="asked_tokens" value="10000"' in detail
    assert f'name="asked-{other.pk}" value="20000"' in text(client.get(url(ovr, "approval_queue")))
    with scope(ovr.organization):
        for request, member in ((one, ovr.alice), (other, ovr.bob)):
            services.overage_request_update(overage_request=request, actor_member=member, tokens=900_000,
                                            reason=request.reason)
    before = state(ovr.organization)
    response = client.post(url(ovr, "approval_detail", overage_request_id=one.pk),
                           {"decision": "approve", "asked_tokens": "10000"}, follow=True)
    assert any("changed to 900,000 tokens" in message for message in messages_of(response))
    response = client.post(url(ovr, "approvals_approve"),
                           {"overage_requests": [other.pk], f"asked-{other.pk}": "20000"}, follow=True)
    assert any(f"#{other.pk} was not approved: The request was changed to 900,000" in message
               for message in messages_of(response))
    tampered = client.post(url(ovr, "approval_detail", overage_request_id=one.pk),
                           {"decision": "approve", "asked_tokens": "lots"}, follow=True)
    assert tampered.status_code == 200 and any("changed to 900,000" in m for m in messages_of(tampered))
    assert state(ovr.organization) == before
