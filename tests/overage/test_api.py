"""Overage requests through the REST API: the same rules and role checks as the pages, typed input,
precise 4xx JSON answers that change nothing, and idempotent retries."""

import json

import pytest

from allowances.models import LedgerEntry
from apikeys import services as api_key_services
from overage import services
from overage.models import OverageRequest
from portal.tenancy import scope, unscoped
from tests.overage.conftest import AUTO_TOKENS, ask
from tests.overage.test_services import state

pytestmark = pytest.mark.django_db
State = OverageRequest.State


def api(ovr, path=""):
    return f"/api/v1/o/{ovr.slug}/overage-requests/{path}"


def send(client, method, path, body=None, **headers):
    if method == "get":
        return client.get(path, body or {}, **headers)
    return getattr(client, method)(path, data=json.dumps(body or {}), content_type="application/json", **headers)


def answer(response, status):
    assert response.status_code == status, response.content
    return response.json()


def test_a_member_asks_lists_and_cancels_their_own(ovr, login):
    client = login(ovr.alice)
    made = answer(send(client, "post", api(ovr), {"tokens": 250_000, "reason": "Evaluation runs", "model": "gpt-4o",
                                                  "project": "Launch"}), 201)
    assert {key: made[key] for key in ("tokens", "reason", "model", "project", "state", "email", "approved_tokens",
                                       "decided_by")} == {
        "tokens": 250_000, "reason": "Evaluation runs", "model": "gpt-4o", "project": "Launch", "state": "pending",
        "email": "alice@ovr.example", "approved_tokens": None, "decided_by": None}
    assert answer(send(client, "get", api(ovr, f"{made['id']}/")), 200) == made
    assert [r["id"] for r in answer(send(client, "get", api(ovr)), 200)["results"]] == [made["id"]]
    second = answer(send(client, "post", api(ovr), {"tokens": "5", "reason": "again"}), 409)
    assert "already have a pending request" in second["detail"]
    cancelled = answer(send(client, "post", api(ovr, f"{made['id']}/cancel/")), 200)
    assert (cancelled["state"], cancelled["decided_by"]) == ("cancelled", "alice@ovr.example")
    assert answer(send(client, "post", api(ovr, f"{made['id']}/cancel/")), 200)["state"] == "cancelled"  # again


def test_a_create_retried_with_its_idempotency_key_answers_the_first_request(ovr, login):
    client = login(ovr.alice)
    body = {"tokens": 1_000, "reason": "Evaluation runs"}
    first = answer(send(client, "post", api(ovr), body, HTTP_IDEMPOTENCY_KEY="call-1"), 201)
    assert answer(send(client, "post", api(ovr), body, HTTP_IDEMPOTENCY_KEY="call-1"), 200) == first
    with unscoped():
        assert OverageRequest.all_objects.filter(member=ovr.alice).count() == 1


def test_auto_approval_answers_the_approved_request(ovr, login):
    made = answer(send(login(ovr.carol), "post", api(ovr), {"tokens": AUTO_TOKENS, "reason": "r"}), 201)
    assert (made["state"], made["approved_tokens"], made["auto_approved"]) == ("approved", AUTO_TOKENS, True)


@pytest.mark.parametrize("body, field", [
    ({"tokens": -1, "reason": "r"}, "tokens"),
    ({"tokens": 0, "reason": "r"}, "tokens"),
    ({"tokens": 10_000_000_001, "reason": "r"}, "tokens"),
    ({"tokens": 1.5, "reason": "r"}, "tokens"),
    ({"tokens": "1.5", "reason": "r"}, "tokens"),
    ({"tokens": "-5", "reason": "r"}, "tokens"),
    ({"tokens": True, "reason": "r"}, "tokens"),
    ({"tokens": None, "reason": "r"}, "tokens"),
    ({"reason": "r"}, "tokens"),
    ({"tokens": 5, "reason": ""}, "reason"),
    ({"tokens": 5, "reason": "   "}, "reason"),
    ({"tokens": 5}, "reason"),
    ({"tokens": 5, "reason": 7}, "reason"),
    ({"tokens": 5, "reason": "r" * 1001}, "reason"),
    ({"tokens": 5, "reason": "r", "model": "not-ours"}, "model"),
])
def test_a_bad_request_is_a_400_naming_the_field_and_changes_nothing(ovr, login, body, field):
    before = state(ovr.organization)
    errors = answer(send(login(ovr.alice), "post", api(ovr), body), 400)
    assert list(errors) == [field], errors
    assert state(ovr.organization) == before


def test_approvers_decide_with_the_same_rules(ovr, login):
    overage_request = ask(ovr.alice, 250_000)
    decided = answer(send(login(ovr.approver), "post", api(ovr, f"{overage_request.pk}/decide/"),
                          {"decision": "approve", "tokens": "100000", "note": "Start here"}), 200)
    assert (decided["state"], decided["approved_tokens"], decided["decided_by"], decided["decision_note"]) == (
        "partially_approved", 100_000, "approver@ovr.example", "Start here")
    # The same decision again answers alike; another answers 409; nothing more is granted.
    again = answer(send(login(ovr.approver), "post", api(ovr, f"{overage_request.pk}/decide/"),
                        {"decision": "approve", "tokens": 100_000}), 200)
    assert again == decided
    before = state(ovr.organization)
    conflict = answer(send(login(ovr.eng_approver), "post", api(ovr, f"{overage_request.pk}/decide/"),
                           {"decision": "reject"}), 409)
    assert "no longer pending: it was approved in part by approver@ovr.example" in conflict["detail"]
    cancel = answer(send(login(ovr.alice), "post", api(ovr, f"{overage_request.pk}/cancel/")), 409)
    assert "no longer pending" in cancel["detail"]
    assert state(ovr.organization) == before
    with unscoped():
        assert LedgerEntry.all_objects.filter(idempotency_key=overage_request.ledger_key).count() == 1


@pytest.mark.parametrize("body, field", [
    ({"decision": "approve", "tokens": 250_001}, "tokens"),
    ({"decision": "approve", "tokens": 0}, "tokens"),
    ({"decision": "approve", "tokens": -10}, "tokens"),
    ({"decision": "approve", "tokens": 2.5}, "tokens"),
    ({"decision": "reject", "tokens": 10}, "tokens"),
    ({"decision": "yes"}, "decision"),
    ({}, "decision"),
    ({"decision": "approve", "note": "n" * 1001}, "note"),
])
def test_a_bad_decision_is_a_400_naming_the_field_and_changes_nothing(ovr, login, body, field):
    overage_request = ask(ovr.alice, 250_000)
    before = state(ovr.organization)
    errors = answer(send(login(ovr.approver), "post", api(ovr, f"{overage_request.pk}/decide/"), body), 400)
    assert list(errors) == [field], errors
    assert state(ovr.organization) == before


def test_who_may_decide_and_see(ovr, login):
    engineering, research = ask(ovr.alice, 10_000), ask(ovr.carol, AUTO_TOKENS + 1)
    own = ask(ovr.approver, 5_000)
    before = state(ovr.organization)
    # Employees may not decide (their role), nor anyone their own request.
    assert answer(send(login(ovr.bob), "post", api(ovr, f"{engineering.pk}/decide/"), {"decision": "approve"}),
                  403)["detail"] == "Your role in this organization does not allow this."
    refused = answer(send(login(ovr.approver), "post", api(ovr, f"{own.pk}/decide/"), {"decision": "approve"}), 403)
    assert refused["detail"] == "Nobody decides their own request: another approver will."
    # An approver limited to Engineering does not see Research's request.
    assert answer(send(login(ovr.eng_approver), "post", api(ovr, f"{research.pk}/decide/"), {"decision": "approve"}),
                  404)
    assert answer(send(login(ovr.eng_approver), "get", api(ovr, f"{research.pk}/")), 404)
    assert state(ovr.organization) == before
    # Lists: own requests for a member; own and decidable for approvers; filters by state, team, member.
    ids = lambda response: sorted(r["id"] for r in answer(response, 200)["results"])  # noqa: E731
    assert ids(send(login(ovr.bob), "get", api(ovr))) == []
    assert ids(send(login(ovr.eng_approver), "get", api(ovr))) == sorted([engineering.pk, own.pk])
    assert ids(send(login(ovr.admin), "get", api(ovr))) == sorted([engineering.pk, research.pk, own.pk])
    assert ids(send(login(ovr.admin), "get", api(ovr), {"team": ovr.research.pk})) == [research.pk]
    assert ids(send(login(ovr.admin), "get", api(ovr), {"member": ovr.alice.pk})) == [engineering.pk]
    assert ids(send(login(ovr.admin), "get", api(ovr), {"state": "approved"})) == []
    for query in ({"state": "maybe"}, {"team": "x"}, {"team": "0"}, {"member": "-1"}, {"limit": "0"}):
        assert send(login(ovr.admin), "get", api(ovr), query).status_code == 400, query


def test_an_employee_cannot_decide_even_a_request_they_can_see(ovr, login):
    own = ask(ovr.alice, 5_000)
    body = answer(send(login(ovr.alice), "post", api(ovr, f"{own.pk}/decide/"), {"decision": "approve"}), 403)
    assert body["detail"] == "Your role in this organization does not allow this."


def test_an_api_key_needs_the_overage_scope_and_acts_as_its_owner(ovr, client):
    with scope(ovr.organization):
        _key, with_scope = api_key_services.api_key_create(member=ovr.alice, actor=ovr.alice.user, name="agent",
                                                           endpoints=["overage_requests"])
        _key, without = api_key_services.api_key_create(member=ovr.alice, actor=ovr.alice.user, name="chat only",
                                                        endpoints=["chat"])
    refused = answer(send(client, "post", api(ovr), {"tokens": 5, "reason": "r"},
                          HTTP_AUTHORIZATION=f"Bearer {without}"), 403)
    assert "scopes do not include overage_requests" in refused["detail"]
    made = answer(send(client, "post", api(ovr), {"tokens": 5, "reason": "From my agent"},
                       HTTP_AUTHORIZATION=f"Bearer {with_scope}"), 201)
    assert made["email"] == "alice@ovr.example"


def test_the_schema_types_the_operations(client, ovr):
    schema = client.get("/api/schema/?format=json").json()
    operations = schema["paths"]["/api/v1/o/{org_slug}/overage-requests/"]
    create = operations["post"]
    assert {"201", "200", "400", "409"} <= set(create["responses"])
    request_body = schema["components"]["schemas"]["OverageRequestRequest"]
    assert request_body["properties"]["tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1,
                                                                "maximum": 10_000_000_000}
    decide = schema["paths"]["/api/v1/o/{org_slug}/overage-requests/{overage_request_id}/decide/"]["post"]
    assert "409" in decide["responses"]
    decision = schema["components"]["schemas"]["DecisionRequest"]["properties"]["decision"]["$ref"].rsplit("/", 1)[1]
    assert schema["components"]["schemas"][decision]["enum"] == ["approve", "reject"]
    listed = {parameter["name"] for parameter in operations["get"]["parameters"]}
    assert {"state", "team", "member", "limit", "offset"} <= listed


def test_a_decision_names_the_amount_it_decided_on_and_a_changed_request_is_a_409(ovr, login):
    overage_request = ask(ovr.alice, 250_000)
    with scope(ovr.organization):
        services.overage_request_update(overage_request=overage_request, actor_member=ovr.alice, tokens=300_000,
                                        reason=overage_request.reason)
    before = state(ovr.organization)
    conflict = answer(send(login(ovr.approver), "post", api(ovr, f"{overage_request.pk}/decide/"),
                           {"decision": "approve", "asked_tokens": 250_000}), 409)
    assert "changed to 300,000 tokens" in conflict["detail"]
    assert state(ovr.organization) == before
    decided = answer(send(login(ovr.approver), "post", api(ovr, f"{overage_request.pk}/decide/"),
                          {"decision": "approve", "asked_tokens": 300_000}), 200)
    assert (decided["state"], decided["approved_tokens"]) == ("approved", 300_000)
