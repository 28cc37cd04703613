"""The allowances API under /api/v1/o/<slug>/: grants (single, bulk, revoke), policies, assignments,
balances, ledger entries and the catalog. A refused call is a 400 naming the field and changes nothing."""

import json

import jsonschema
import pytest

from allowances import ledger, services
from allowances.models import (
    Account,
    AllowancePolicy,
    LedgerEntry,
    PolicyAssignment,
)
from allowances.periods import next_period_start, period_bounds, period_start_for
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import snapshot
from tests.factories import MemberFactory, TeamFactory, UserFactory
from tests.gateway.test_ingest_schema import as_json_schema


# -- helpers ---------------------------------------------------------------------------------------------------


def api(org, rest=""):
    return f"/api/v1/o/{org.slug}/{rest}"


def send(client, method, path, body=None, **headers):
    if body is None:
        return getattr(client, method)(path, headers=headers)
    return getattr(client, method)(path, data=json.dumps(body), content_type="application/json", headers=headers)


def error(response, status) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    return response.json()


def ok(response, status=200):
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.json()



def available(member) -> int:
    with unscoped():
        account = Account.all_objects.filter(member=member).first()
    return account.available if account else 0


def use(member, tokens: int, *, model: str = "gpt-test") -> None:
    with scope(member.organization):
        account = Account.objects.get(member=member)
        hold = ledger.authorize(account=account, tokens=tokens, model=model, idempotency_key=f"use-{member.pk}-{tokens}")
        ledger.settle(hold=hold, used_tokens=tokens)


def audit(org, action):
    return list(AuditLogEntry.all_objects.filter(organization=org.organization, action=action).order_by("id"))


# -- grants ------------------------------------------------------------------------------------------------------


def grant_body(org, **overrides):
    return {"tokens": 1_000, "reason": "conference", "member": org.members["employee"].pk} | overrides


@pytest.mark.parametrize("tokens", [-5, 0, "abc", "1.5", 1.5, 10_000_000_001, "10000000001", 10**40, True, None, [],
                                    {"n": 1}], ids=repr)
def test_grant_with_bad_tokens_is_a_400_naming_tokens_and_changes_nothing(as_hr, org_a, tokens):
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, tokens=tokens)), 400)
    assert list(body) == ["tokens"], body
    assert snapshot() == before


def test_grant_without_tokens_is_a_400_naming_tokens(as_hr, org_a):
    before = snapshot()
    body = grant_body(org_a)
    del body["tokens"]
    assert "tokens" in error(send(as_hr, "post", api(org_a, "grants/"), body), 400)
    assert snapshot() == before


@pytest.mark.parametrize("reason", ["", "   "])
def test_grant_with_a_blank_reason_is_a_400_naming_reason(as_hr, org_a, reason):
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, reason=reason)), 400)
    assert list(body) == ["reason"], body
    assert snapshot() == before


def test_grant_to_another_organizations_member_is_a_400(as_hr, org_a, org_b):
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, member=org_b.members["employee"].pk)),
                 400)
    assert list(body) == ["member"]
    assert snapshot() == before


def test_grant_to_a_member_and_to_a_team(as_hr, org_a):
    employee = org_a.members["employee"]
    before = available(employee)
    created = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, tokens="75000")), 201)
    assert (created["tokens"], created["member"], created["team"], created["revoked_at"]) == (
        75_000, employee.pk, None, None)
    assert available(employee) == before + 75_000

    team_grant = ok(send(as_hr, "post", api(org_a, "grants/"),
                         {"tokens": 2_000, "reason": "team day", "team": org_a.team.pk}), 201)
    with unscoped():
        entries = LedgerEntry.all_objects.filter(reference=f"grant:{team_grant['id']}")
        assert sorted(e.account.member_id for e in entries) == sorted(m.pk for m in org_a.members.values())
        assert {(e.kind, e.tokens) for e in entries} == {("bonus", 2_000)}
    assert available(employee) == before + 77_000


def test_same_idempotency_key_grants_once(as_hr, org_a):
    employee = org_a.members["employee"]
    before, grants = available(employee), snapshot()["grants"]
    first = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a), **{"Idempotency-Key": "hr-sync-42"}), 201)
    second = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a), **{"Idempotency-Key": "hr-sync-42"}), 201)
    assert first == second
    assert snapshot()["grants"] == grants + 1
    assert available(employee) == before + 1_000
    # Another key is another grant.
    third = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a), **{"Idempotency-Key": "hr-sync-43"}), 201)
    assert third["id"] != first["id"] and available(employee) == before + 2_000


def test_revoke_through_the_api(as_hr, org_a):
    approver = org_a.members["approver"]
    created = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, member=approver.pk, tokens=6_000)), 201)
    revoked = ok(send(as_hr, "post", api(org_a, f"grants/{created['id']}/revoke/")))
    assert revoked["revoked_at"] is not None and available(approver) == 0
    assert [e.object_id for e in audit(org_a, "grant.revoked")] == [str(created["id"])]
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, f"grants/{created['id']}/revoke/")), 400)
    assert body == {"non_field_errors": ["This grant is already revoked."]}
    assert snapshot() == before


def test_revoking_a_partly_used_grant_through_the_api_names_the_member(as_hr, org_a):
    approver = org_a.members["approver"]
    created = ok(send(as_hr, "post", api(org_a, "grants/"), grant_body(org_a, member=approver.pk, tokens=6_000)), 201)
    use(approver, 1)
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, f"grants/{created['id']}/revoke/")), 400)
    assert "approver@a.example has already used part of this grant (5,999 of 6,000 tokens left)" in \
        body["non_field_errors"][0]
    assert snapshot() == before


def test_employees_cannot_grant_or_list_grants(as_employee, org_a):
    before = snapshot()
    error(send(as_employee, "post", api(org_a, "grants/"), grant_body(org_a)), 403)
    error(send(as_employee, "get", api(org_a, "grants/")), 403)
    error(send(as_employee, "post", api(org_a, "grants/bulk/"), {"grants": []}), 403)
    error(send(as_employee, "post", api(org_a, f"grants/{org_a.grant.pk}/revoke/")), 403)
    assert snapshot() == before


def test_another_organizations_grant_is_a_404(as_hr, org_a, org_b):
    before = snapshot()
    error(send(as_hr, "get", api(org_a, f"grants/{org_b.grant.pk}/")), 404)
    error(send(as_hr, "post", api(org_a, f"grants/{org_b.grant.pk}/revoke/")), 404)
    assert snapshot() == before


# -- bulk grants ---------------------------------------------------------------------------------------------------


def test_bulk_grants_all_good_are_all_granted(as_hr, org_a):
    employee, approver = org_a.members["employee"], org_a.members["approver"]
    before_employee, before_approver = available(employee), available(approver)
    rows = [{"email": "employee@a.example", "tokens": 1_000, "reason": "q1"},
            {"email": "APPROVER@a.example", "tokens": "2500", "reason": "q1"}]
    body = ok(send(as_hr, "post", api(org_a, "grants/bulk/"), {"grants": rows}, **{"Idempotency-Key": "bulk-1"}), 201)
    assert [(g["member"], g["tokens"], g["reason"]) for g in body] == [(employee.pk, 1_000, "q1"),
                                                                       (approver.pk, 2_500, "q1")]
    assert available(employee) == before_employee + 1_000
    assert available(approver) == before_approver + 2_500
    [logged] = audit(org_a, "grant_batch.applied")
    assert logged.data["rows"] == 2 and logged.data["tokens"] == 3_500
    # The same key again grants nothing more.
    after = snapshot()
    again = ok(send(as_hr, "post", api(org_a, "grants/bulk/"), {"grants": rows}, **{"Idempotency-Key": "bulk-1"}), 201)
    assert [g["id"] for g in again] == [g["id"] for g in body]
    assert snapshot() == after


@pytest.mark.parametrize("bad_row, message", [
    ({"email": "nobody@a.example", "tokens": 10, "reason": "x"}, "nobody@a.example is not an active member"),
    ({"email": "employee@b.example", "tokens": 10, "reason": "x"}, "employee@b.example is not an active member"),
    ({"email": "approver@a.example", "tokens": -10, "reason": "x"}, "tokens: Enter a positive number of tokens."),
    ({"email": "approver@a.example", "tokens": "abc", "reason": "x"}, "tokens: Enter a whole number of tokens."),
    ({"email": "approver@a.example", "tokens": 10_000_000_001, "reason": "x"}, "more than 10,000,000,000 tokens"),
    ({"email": "approver@a.example", "tokens": 10, "reason": ""}, "reason is empty"),
], ids=repr)
def test_bulk_grants_with_one_bad_row_is_a_400_naming_the_row_and_grants_nothing(as_hr, org_a, org_b, bad_row, message):
    rows = [{"email": "employee@a.example", "tokens": 1_000, "reason": "good"}, bad_row,
            {"email": "owner@a.example", "tokens": 1_000, "reason": "good"}]
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "grants/bulk/"), {"grants": rows}), 400)
    assert list(body) == ["grants"]
    [problem] = body["grants"]
    assert problem.startswith("row 2: ") and message in problem
    assert snapshot() == before


@pytest.mark.parametrize("payload", [{"grants": []}, {}, {"grants": "nope"}, {"grants": [{"tokens": 5}]}], ids=repr)
def test_bulk_grants_with_no_usable_list_is_a_400(as_hr, org_a, payload):
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "grants/bulk/"), payload), 400)
    assert "grants" in body
    assert snapshot() == before


# -- policies ------------------------------------------------------------------------------------------------------

GOOD_POLICY = {"name": "Research", "monthly_tokens": 2_000_000, "rollover_rule": "none", "overage_rule": "hard_stop"}
BAD_POLICIES = [
    ("capped tokens without a cap", {"rollover_rule": "capped_tokens"}, "rollover_cap_tokens"),
    ("capped tokens with a null cap", {"rollover_rule": "capped_tokens", "rollover_cap_tokens": None},
     "rollover_cap_tokens"),
    ("capped percent 0", {"rollover_rule": "capped_percent", "rollover_cap_percent": 0}, "rollover_cap_percent"),
    ("capped percent 150", {"rollover_rule": "capped_percent", "rollover_cap_percent": 150}, "rollover_cap_percent"),
    ("cap in tokens with rule none", {"rollover_cap_tokens": 1000}, "rollover_cap_tokens"),
    ("cap in tokens with rule all", {"rollover_rule": "all", "rollover_cap_tokens": 1000}, "rollover_cap_tokens"),
    ("auto approve without tokens", {"overage_rule": "auto_approve", "auto_approve_requests": 3}, "auto_approve_tokens"),
    ("auto approve without requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000},
     "auto_approve_requests"),
    ("auto approve 0 requests", {"overage_rule": "auto_approve", "auto_approve_tokens": 1000,
                                 "auto_approve_requests": 0}, "auto_approve_requests"),
    ("auto approve tokens with hard stop", {"auto_approve_tokens": 1000}, "auto_approve_tokens"),
    ("auto approve requests with hard stop", {"auto_approve_requests": 2}, "auto_approve_requests"),
    ("negative monthly", {"monthly_tokens": -1}, "monthly_tokens"),
    ("absurd monthly", {"monthly_tokens": 10_000_000_001}, "monthly_tokens"),
    ("monthly as text", {"monthly_tokens": "lots"}, "monthly_tokens"),
    ("lifetime 0", {"rollover_rule": "all", "rollover_lifetime_periods": 0}, "rollover_lifetime_periods"),
    ("lifetime 25", {"rollover_rule": "all", "rollover_lifetime_periods": 25}, "rollover_lifetime_periods"),
    ("lifetime 3 with rule none", {"rollover_lifetime_periods": 3}, "rollover_lifetime_periods"),
    ("unknown rollover rule", {"rollover_rule": "sometimes"}, "rollover_rule"),
    ("duplicate name", {"name": "STANDARD"}, "name"),
]


@pytest.mark.parametrize("overrides, field", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_contradictory_policy_is_a_400_naming_the_field_and_changes_nothing(as_hr, org_a, overrides, field):
    before = snapshot()
    body = error(send(as_hr, "post", api(org_a, "policies/"), GOOD_POLICY | overrides), 400)
    assert list(body) == [field], body
    assert snapshot() == before


@pytest.mark.parametrize("overrides, field", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_contradictory_policy_patch_is_a_400_naming_the_field_and_changes_nothing(as_hr, org_a, overrides, field):
    research = ok(send(as_hr, "post", api(org_a, "policies/"), GOOD_POLICY), 201)
    before = snapshot()
    body = error(send(as_hr, "patch", api(org_a, f"policies/{research['id']}/"), overrides | {"applies": "now"}), 400)
    assert list(body) == [field], body
    assert snapshot() == before


def test_policies_crud_for_hr(as_hr, org_a, org_b):
    listed = ok(send(as_hr, "get", api(org_a, "policies/")))
    assert [p["name"] for p in listed["results"]] == ["Standard"]

    created = ok(send(as_hr, "post", api(org_a, "policies/"), GOOD_POLICY | {
        "rollover_rule": "capped_tokens", "rollover_cap_tokens": "300000", "rollover_lifetime_periods": 2,
        "overage_rule": "auto_approve", "auto_approve_tokens": 50_000, "auto_approve_requests": 4}), 201)
    assert {k: created[k] for k in ("name", "monthly_tokens", "rollover_cap_tokens", "rollover_lifetime_periods",
                                    "auto_approve_tokens", "auto_approve_requests")} == {
        "name": "Research", "monthly_tokens": 2_000_000, "rollover_cap_tokens": 300_000,
        "rollover_lifetime_periods": 2, "auto_approve_tokens": 50_000, "auto_approve_requests": 4}
    assert audit(org_a, "policy.created")[-1].object_id == str(created["id"])

    fetched = ok(send(as_hr, "get", api(org_a, f"policies/{created['id']}/")))
    assert fetched == created

    patched = ok(send(as_hr, "patch", api(org_a, f"policies/{created['id']}/"), {"monthly_tokens": 3_000_000}))
    assert patched["monthly_tokens"] == 3_000_000 and patched["rollover_cap_tokens"] == 300_000
    assert audit(org_a, "policy.updated")[-1].data["applies"] == "from the next period"

    error(send(as_hr, "get", api(org_a, f"policies/{org_b.policy.pk}/")), 404)
    error(send(as_hr, "patch", api(org_a, f"policies/{org_b.policy.pk}/"), {"monthly_tokens": 1}), 404)
    with unscoped():
        assert AllowancePolicy.all_objects.get(pk=org_b.policy.pk).monthly_tokens == 1_000_000


def test_policy_patch_applied_now_adjusts_governed_members(as_hr, org_a):
    organization = org_a.organization
    team = TeamFactory(organization=organization, name="Now")
    member = MemberFactory(organization=organization, team=team, user=UserFactory(email="now@a.example"))
    research = ok(send(as_hr, "post", api(org_a, "policies/"), GOOD_POLICY), 201)
    ok(send(as_hr, "post", api(org_a, "assignments/"), {"policy": research["id"], "team": team.pk, "applies": "now"}),
       201)
    granted_now = available(member)
    assert 0 < granted_now <= 2_000_000
    ok(send(as_hr, "patch", api(org_a, f"policies/{research['id']}/"), {"monthly_tokens": 1_000, "applies": "now"}))
    assert available(member) < granted_now
    before = available(member)
    ok(send(as_hr, "patch", api(org_a, f"policies/{research['id']}/"), {"monthly_tokens": 9_000_000,
                                                                       "applies": "next"}))
    assert available(member) == before


def test_employees_cannot_use_the_policy_api(as_employee, org_a):
    before = snapshot()
    error(send(as_employee, "get", api(org_a, "policies/")), 403)
    error(send(as_employee, "get", api(org_a, f"policies/{org_a.policy.pk}/")), 403)
    error(send(as_employee, "post", api(org_a, "policies/"), GOOD_POLICY), 403)
    error(send(as_employee, "patch", api(org_a, f"policies/{org_a.policy.pk}/"), {"monthly_tokens": 5}), 403)
    error(send(as_employee, "delete", api(org_a, f"policies/{org_a.policy.pk}/")), 405)  # no such method at all
    error(send(as_employee, "post", api(org_a, "assignments/"), {"policy": org_a.policy.pk, "team": org_a.team.pk}), 403)
    assert snapshot() == before


# -- assignments -------------------------------------------------------------------------------------------------


def test_assignment_from_the_next_period_changes_nothing_now(as_hr, org_a):
    organization = org_a.organization
    team = TeamFactory(organization=organization, name="Later")
    member = MemberFactory(organization=organization, team=team)
    with scope(organization):
        services.grant_create(organization=organization, actor=org_a.members["hr"].user, tokens=700, reason="x",
                              member=member)
    before = snapshot()
    body = ok(send(as_hr, "post", api(org_a, "assignments/"), {"policy": org_a.policy.pk, "team": team.pk}), 201)
    after = snapshot()
    assert after["accounts"] == before["accounts"] and after["entries"] == before["entries"]
    start = next_period_start(period_start_for(organization))
    assert body["applied_immediately"] is False
    with unscoped():
        assignment = PolicyAssignment.all_objects.get(pk=body["id"])
    assert assignment.effective_from == period_bounds(organization, start)[0]
    assert available(member) == 700
    assert audit(org_a, "policy.assigned")[-1].object_id == str(body["id"])


@pytest.mark.parametrize("body, field", [
    ({"team": "TEAM", "member": "EMPLOYEE"}, "target"),
    ({"team": 99_999_999}, "team"),
    ({"member": 99_999_999}, "member"),
    ({"policy": 99_999_999, "team": "TEAM"}, "policy"),
    ({}, "target"),
], ids=repr)
def test_bad_assignments_are_400s_and_change_nothing(as_hr, org_a, body, field):
    named = {"TEAM": org_a.team.pk, "EMPLOYEE": org_a.members["employee"].pk}
    payload = {"policy": org_a.policy.pk} | {key: named.get(value, value) for key, value in body.items()}
    before = snapshot()
    answer = error(send(as_hr, "post", api(org_a, "assignments/"), payload), 400)
    assert field in answer, answer
    assert snapshot() == before


def test_assigning_another_organizations_policy_or_member_is_a_400(as_hr, org_a, org_b):
    before = snapshot()
    error(send(as_hr, "post", api(org_a, "assignments/"), {"policy": org_b.policy.pk, "team": org_a.team.pk}), 400)
    error(send(as_hr, "post", api(org_a, "assignments/"),
               {"policy": org_a.policy.pk, "member": org_b.members["employee"].pk, "applies": "now"}), 400)
    assert snapshot() == before


# -- balances and ledger entries -------------------------------------------------------------------------------------


def test_an_employee_sees_only_their_own_balance(as_employee, org_a, org_b):
    with scope(org_a.organization):
        services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user, tokens=321,
                              reason="someone else's", member=org_a.members["approver"])
    with unscoped():
        assert Account.all_objects.filter(organization=org_a.organization).count() == 2
    body = ok(send(as_employee, "get", api(org_a, "balances/")))
    assert body["count"] == 1
    [row] = body["results"]
    assert (row["member"], row["email"]) == (org_a.members["employee"].pk, "employee@a.example")
    assert (row["granted"], row["held"], row["used"], row["available"]) == (5_000, 1_000, 0, 4_000)


def test_hr_sees_every_balance_of_the_organization(as_hr, org_a, org_b):
    use(org_a.members["employee"], 1_500)
    body = ok(send(as_hr, "get", api(org_a, "balances/")))
    rows = {row["email"]: row for row in body["results"]}
    # HR's own account opens on the first look; the employee's exists already; nobody of org b is listed.
    assert set(rows) == {"employee@a.example", "hr@a.example"}
    assert (rows["employee@a.example"]["used"], rows["employee@a.example"]["available"]) == (1_500, 2_500)


def test_a_new_member_sees_their_opening_balance(login, org_a):
    organization = org_a.organization
    begin = period_bounds(organization, period_start_for(organization))[0]
    team = TeamFactory(organization=organization, name="Fresh")
    with scope(organization):
        services.policy_assign(organization=organization, actor=org_a.members["hr"].user, policy=org_a.policy,
                               team=team, immediately=True, at=begin)
    member = MemberFactory(organization=organization, team=team, joined_at=begin,
                           user=UserFactory(email="fresh@a.example"))
    [row] = ok(send(login(member), "get", api(org_a, "balances/")))["results"]
    assert (row["email"], row["granted"], row["available"]) == ("fresh@a.example", 1_000_000, 1_000_000)


def test_an_employee_sees_only_their_own_ledger_entries(as_employee, org_a, org_b):
    employee = org_a.members["employee"]
    with scope(org_a.organization):
        services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user, tokens=321,
                              reason="someone else's", member=org_a.members["approver"])
    mine = ok(send(as_employee, "get", api(org_a, "ledger-entries/")))
    with unscoped():
        expected = set(LedgerEntry.all_objects.filter(account__member=employee).values_list("id", flat=True))
    assert {row["id"] for row in mine["results"]} == expected and len(expected) == 2
    assert {row["member"] for row in mine["results"]} == {employee.pk}
    # Asking for someone else's entries still gives only one's own.
    other = ok(send(as_employee, "get", api(org_a, f"ledger-entries/?member={org_a.members['approver'].pk}")))
    assert {row["id"] for row in other["results"]} == expected


def test_hr_sees_all_ledger_entries_and_can_filter_by_member(as_hr, org_a, org_b):
    approver = org_a.members["approver"]
    with scope(org_a.organization):
        services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user, tokens=321,
                              reason="for the approver", member=approver)
    everyone = ok(send(as_hr, "get", api(org_a, "ledger-entries/")))
    with unscoped():
        expected = set(LedgerEntry.all_objects.filter(organization=org_a.organization).values_list("id", flat=True))
        approver_ids = set(LedgerEntry.all_objects.filter(account__member=approver).values_list("id", flat=True))
    assert {row["id"] for row in everyone["results"]} == expected
    filtered = ok(send(as_hr, "get", api(org_a, f"ledger-entries/?member={approver.pk}")))
    assert {row["id"] for row in filtered["results"]} == approver_ids and len(approver_ids) == 1
    assert filtered["results"][0]["reason"] == "for the approver" and filtered["results"][0]["tokens"] == 321
    by_kind = ok(send(as_hr, "get", api(org_a, "ledger-entries/?kind=hold")))
    assert [row["kind"] for row in by_kind["results"]] == ["hold"]
    # Another organization's member id filters to nothing rather than leaking.
    leaked = ok(send(as_hr, "get", api(org_a, f"ledger-entries/?member={org_b.members['employee'].pk}")))
    assert leaked["results"] == []
    # A filter the schema does not allow is refused, not ignored (it read as "everyone's entries").
    for junk in ("abc", "-1", "0", "9" * 40, "", "1.5", " 1"):
        assert list(error(as_hr.get(api(org_a, "ledger-entries/"), {"member": junk}), 400)) == ["member"], junk
    assert list(error(as_hr.get(api(org_a, "ledger-entries/"), {"kind": "nope\x00"}), 400)) == ["kind"]


def test_a_team_pools_entries_name_its_team_and_no_member_as_the_schema_says(as_hr, org_a):
    with scope(org_a.organization):
        services.transfer_settings_save(organization=org_a.organization, actor=None, enabled=True,
                                        same_team_only=True, team_pools=True)
        services.transfer_create(giver=org_a.members["employee"], receiver=services.TEAM_POOL, tokens=300,
                                 actor=None, idempotency_key="to-pool")
    rows = ok(send(as_hr, "get", api(org_a, "ledger-entries/?kind=transfer_in")))["results"]
    assert [(row["member"], row["team"], row["tokens"]) for row in rows] == [(None, org_a.team.pk, 300)]
    (given,) = ok(send(as_hr, "get", api(org_a, "ledger-entries/?kind=transfer_out")))["results"]
    assert (given["member"], given["team"]) == (org_a.members["employee"].pk, None)
    components = as_hr.get("/api/schema/", {"format": "json"}).json()["components"]
    schema = as_json_schema(components["schemas"]["LedgerEntry"]) | {"components": components}  # its $refs
    for row in (*rows, given):
        jsonschema.validate(row, schema)


# -- catalog -----------------------------------------------------------------------------------------------------

GOOD_MODEL = {"model_id": "claude-test", "display_name": "Claude test",
              "input_multiplier": "1", "output_multiplier": "3", "cached_multiplier": "0.1",
              "input_price_per_million": "3", "output_price_per_million": "15", "cached_price_per_million": "0.3"}


@pytest.mark.parametrize("role", ["employee", "approver", "hr", "admin"])
def test_any_member_can_read_the_catalog(login, org_a, org_b, role):
    body = ok(send(login(org_a.members[role]), "get", api(org_a, "models/")))
    assert [(m["model_id"], m["output_multiplier"]) for m in body["results"]] == [("gpt-test", "2.000")]


@pytest.mark.parametrize("role", ["employee", "approver", "hr"])
def test_only_admins_add_catalog_models(login, org_a, role):
    before = snapshot()
    error(send(login(org_a.members[role]), "post", api(org_a, "models/"), GOOD_MODEL | {"connection": org_a.provider_connection.pk}), 403)
    error(send(login(org_a.members[role]), "patch", api(org_a, f"models/{org_a.catalog_model.pk}/"),
               {"output_multiplier": "9"}), 403)
    assert snapshot() == before


def test_admin_adds_a_catalog_model(as_admin, org_a):
    created = ok(send(as_admin, "post", api(org_a, "models/"), GOOD_MODEL | {"connection": org_a.provider_connection.pk}), 201)
    assert (created["model_id"], created["output_multiplier"], created["is_active"]) == ("claude-test", "3.000", True)
    assert audit(org_a, "catalog_model.created")[-1].object_id == str(created["id"])


@pytest.mark.parametrize("overrides, field", [
    ({"input_multiplier": "-1"}, "input_multiplier"),
    ({"input_multiplier": "0"}, "input_multiplier"),
    ({"output_multiplier": "abc"}, "output_multiplier"),
    ({"input_price_per_million": "-1"}, "input_price_per_million"),
    ({"model_id": "gpt-test"}, "model_id"),
], ids=repr)
def test_bad_catalog_models_are_400s_naming_the_field(as_admin, org_a, overrides, field):
    before = snapshot()
    body = error(send(as_admin, "post", api(org_a, "models/"), GOOD_MODEL | {"connection": org_a.provider_connection.pk} | overrides), 400)
    assert field in body, body
    assert snapshot() == before
