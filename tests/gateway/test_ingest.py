"""The REST API of organizations that run their own gateway: usage ingest (POST /api/v1/usage), holds
(POST /api/v1/authorize) and their settlement (POST /api/v1/settle).

A batch is one SQL statement (the ledger's set of posts): every answer is checked against the rows
it must leave behind, the account buckets, the key spend counters and `ledger.verify()`.
"""

import json
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from allowances import services as allowance_services
from allowances.ledger import verify
from allowances.models import Account, KeySpend, LedgerEntry
from apikeys import services as api_key_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance

INGEST, AUTHORIZE, SETTLE = "/api/v1/usage", "/api/v1/authorize", "/api/v1/settle"
EMPLOYEE = "employee@a.example"
MODEL = "gpt-test"  # multipliers: input 1, output 2, cached 0.5


# -- helpers -------------------------------------------------------------------------------------------


def mint_gateway_key(member, **overrides):
    arguments = {"name": "ingest", "endpoints": ["usage_write"]} | overrides
    with scope(member.organization):
        return api_key_services.api_key_create(member=member, actor=member.user, **arguments)


@pytest.fixture
def gateway_key(org_a):
    """The secret of an org A admin's key with the usage_write scope."""
    _key, secret = mint_gateway_key(org_a.members["admin"])
    return secret


def bearer(secret):
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def send(client, path, body, secret=None, **extra):
    headers = bearer(secret) if secret else {}
    return client.post(path, data=body, content_type="application/json", **headers, **extra)


def ingest(client, secret, events):
    response = send(client, INGEST, {"events": events}, secret)
    assert response.status_code == 200, (response.status_code, response.content[:500])
    return response.json()


def event(key, **fields):
    return {"idempotency_key": key, "member": EMPLOYEE, "model": MODEL, "input_tokens": 10} | fields


def weighted(input_tokens=0, output_tokens=0, cached_tokens=0):
    """gpt-test's charge, rounded up: input x1, output x2, cached x0.5."""
    halves = 2 * input_tokens + 4 * output_tokens + cached_tokens
    return -(-halves // 2)


def refused_json(response, status):
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    return response.json()


def ingest_records(organization=None):
    with unscoped():
        records = UsageRecord.all_objects.filter(source=UsageRecord.Source.INGEST)
        if organization is not None:
            records = records.filter(organization=organization)
        return list(records.order_by("id"))


def key_spend(key) -> KeySpend:
    with unscoped():
        return KeySpend.all_objects.get(pk=key.spend_id)


def everything() -> dict:
    """Every row these endpoints may write, across all organizations."""
    with unscoped():
        return {
            "accounts": sorted(Account.all_objects.values_list("id", "granted", "held", "used")),
            "spends": sorted(KeySpend.all_objects.values_list("id", "period_start", "held", "used")),
            "entries": sorted(LedgerEntry.all_objects.values_list("id", flat=True)),
            "records": sorted(UsageRecord.all_objects.values_list("id", flat=True)),
        }


# -- recording usage -----------------------------------------------------------------------------------


def test_recorded_events_debit_exactly_the_weighted_tokens(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    occurred = "2025-01-15T10:00:00+02:00"
    events = [
        event("e-1", input_tokens=10, output_tokens=5, cached_tokens=3, timestamp=occurred),  # 10 + 10 + 1.5
        event("e-2", input_tokens=7),
        event("e-3", input_tokens=0, cached_tokens=1),  # half a token: rounded up
        event("e-4", member="EMPLOYEE@A.example ", input_tokens=4, output_tokens=1),  # email in any case
    ]
    charges = [weighted(10, 5, 3), weighted(7), weighted(0, 0, 1), weighted(4, 1)]
    assert charges == [22, 7, 1, 6]

    answer = ingest(client, gateway_key, events)

    assert answer["recorded"] == 4 and answer["duplicates"] == 0 and answer["rejected"] == 0
    assert answer["results"] == [
        {"index": i, "idempotency_key": f"e-{i + 1}", "status": "recorded", "charged_tokens": charge}
        for i, charge in enumerate(charges)]
    assert balance(employee) == (granted, held, used + sum(charges))

    records = ingest_records(org_a.organization)
    assert [(r.idempotency_key, r.member_id, r.api_key_id, r.model, r.input_tokens, r.output_tokens, r.cached_tokens,
             r.charged_tokens, r.status) for r in records] == [
        (f"e-{i + 1}", employee.pk, None, MODEL, e["input_tokens"], e.get("output_tokens", 0),
         e.get("cached_tokens", 0), charge, UsageRecord.Status.OK)
        for i, (e, charge) in enumerate(zip(events, charges))]
    assert records[0].occurred_at == parse_datetime(occurred)
    with unscoped():
        entries = list(LedgerEntry.all_objects.filter(account=org_a.account, kind=LedgerEntry.Kind.USAGE)
                       .order_by("id").values_list("idempotency_key", "tokens", "used_delta", "held_delta",
                                                   "granted_delta", "model"))
    assert entries == [(f"ingest:e-{i + 1}", charge, charge, 0, 0, MODEL) for i, charge in enumerate(charges)]
    assert verify() == []


def test_usage_is_recorded_even_beyond_the_balance(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    answer = ingest(client, gateway_key, [event("big", input_tokens=granted * 3)])
    assert answer["results"][0]["status"] == "recorded"
    assert balance(employee) == (granted, held, used + granted * 3)
    assert verify() == []


def test_a_batch_names_each_bad_event_and_applies_the_good_ones(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    spend_before = key_spend(org_a.api_key).used
    future = (timezone.now() + timedelta(days=1)).isoformat()
    batch = [
        event("good-1", input_tokens=3, output_tokens=2),                                   # 0
        event("bad-model", model="no-such-model"),                                          # 1
        event("bad-member", member="nobody@a.example"),                                     # 2
        event("bad-negative", input_tokens=-1),                                             # 3
        event("bad-both", api_key=org_a.api_key.display_prefix),                            # 4
        {"idempotency_key": "bad-neither", "model": MODEL, "input_tokens": 1},              # 5
        event("bad-timestamp", timestamp="yesterday"),                                      # 6
        event("bad-future", timestamp=future),                                              # 7
        "not an event",                                                                     # 8
        {"idempotency_key": "good-2", "api_key": org_a.api_key.display_prefix, "model": MODEL,
         "input_tokens": 5, "cached_tokens": 4},                                            # 9
        event("bad-naive-time", timestamp="2025-01-15T10:00:00"),                           # 10
        {"idempotency_key": "bad-no-input", "member": EMPLOYEE, "model": MODEL},            # 11
        {"member": EMPLOYEE, "model": MODEL, "input_tokens": 1},                            # 12
        event("k" * 201),                                                                   # 13
        event("bad-output", output_tokens="12"),                                            # 14
        event("bad-cached", cached_tokens=True),                                            # 15
        event("bad-null-member", member=None),                                              # 16
        {"idempotency_key": "bad-unknown-key", "api_key": "tap_nosuchkey000", "model": MODEL,
         "input_tokens": 1},                                                                # 17
        event("bad-too-many", input_tokens=10**9 + 1),                                      # 18
        event("   "),                                                                       # 19
    ]
    expected_errors = {
        1: {"model"}, 2: {"member"}, 3: {"input_tokens"}, 4: {"member"}, 5: {"member"}, 6: {"timestamp"},
        7: {"timestamp"}, 8: {"event"}, 10: {"timestamp"}, 11: {"input_tokens"}, 12: {"idempotency_key"},
        13: {"idempotency_key"}, 14: {"output_tokens"}, 15: {"cached_tokens"}, 16: {"member"}, 17: {"api_key"},
        18: {"input_tokens"}, 19: {"idempotency_key"},
    }

    answer = ingest(client, gateway_key, batch)

    results = answer["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    assert answer["recorded"] == 2 and answer["rejected"] == len(expected_errors) and answer["duplicates"] == 0
    for index, fields in expected_errors.items():
        result = results[index]
        assert result["status"] == "rejected", (index, result)
        assert set(result["errors"]) == fields, (index, result)
        assert all(isinstance(message, str) and message for message in result["errors"].values()), result
        assert "charged_tokens" not in result
        expected_key = batch[index].get("idempotency_key") if isinstance(batch[index], dict) else None
        assert result["idempotency_key"] == expected_key, (index, result)
    assert "future" in results[7]["errors"]["timestamp"].lower()
    good_1, good_2 = weighted(3, 2), weighted(5, 0, 4)
    assert results[0] == {"index": 0, "idempotency_key": "good-1", "status": "recorded", "charged_tokens": good_1}
    assert results[9] == {"index": 9, "idempotency_key": "good-2", "status": "recorded", "charged_tokens": good_2}

    assert balance(employee) == (granted, held, used + good_1 + good_2)
    assert [r.idempotency_key for r in ingest_records()] == ["good-1", "good-2"]
    assert key_spend(org_a.api_key).used == spend_before + good_2
    assert verify() == []


def test_a_batch_of_only_bad_events_changes_nothing(client, org_a, gateway_key):
    before = everything()
    answer = ingest(client, gateway_key, [event("x", model="nope"), event("y", member="ghost@a.example")])
    assert (answer["recorded"], answer["duplicates"], answer["rejected"]) == (0, 0, 2)
    assert everything() == before


def test_the_same_key_twice_in_a_batch_counts_once(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    answer = ingest(client, gateway_key, [event("twice", input_tokens=10), event("other", input_tokens=1),
                                          event("twice", input_tokens=999)])
    assert [r["status"] for r in answer["results"]] == ["recorded", "recorded", "duplicate"]
    assert "charged_tokens" not in answer["results"][2] and "errors" not in answer["results"][2]
    assert answer["results"][2]["idempotency_key"] == "twice"
    assert (answer["recorded"], answer["duplicates"], answer["rejected"]) == (2, 1, 0)
    assert balance(employee) == (granted, held, used + 11)
    assert [(r.idempotency_key, r.input_tokens) for r in ingest_records()] == [("twice", 10), ("other", 1)]
    assert verify() == []


def test_a_resent_batch_is_all_duplicates_and_moves_nothing(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    batch = [event(f"r-{i}", input_tokens=i + 1) for i in range(5)] + [
        {"idempotency_key": "r-key", "api_key": org_a.api_key.display_prefix, "model": MODEL, "input_tokens": 9}]
    first = ingest(client, gateway_key, batch)
    assert first["recorded"] == len(batch)
    after_first = everything()
    balance_after_first, spend_after_first = balance(employee), key_spend(org_a.api_key).used

    again = ingest(client, gateway_key, batch)

    assert (again["recorded"], again["duplicates"], again["rejected"]) == (0, len(batch), 0)
    assert again["results"] == [{"index": i, "idempotency_key": e["idempotency_key"], "status": "duplicate"}
                                for i, e in enumerate(batch)]
    assert everything() == after_first
    assert balance(employee) == balance_after_first
    assert key_spend(org_a.api_key).used == spend_after_first

    # A retry that also carries new events records only those.
    granted, held, used = balance(employee)
    mixed = ingest(client, gateway_key, [batch[0], event("r-new", input_tokens=4), batch[5]])
    assert [r["status"] for r in mixed["results"]] == ["duplicate", "recorded", "duplicate"]
    assert balance(employee) == (granted, held, used + 4)
    assert len(ingest_records()) == len(batch) + 1
    assert verify() == []


def test_a_retried_event_with_other_numbers_is_still_a_duplicate(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    ingest(client, gateway_key, [event("same", input_tokens=10)])
    state = balance(employee)
    answer = ingest(client, gateway_key, [event("same", input_tokens=500)])
    assert answer["results"][0]["status"] == "duplicate"
    assert balance(employee) == state
    assert [r.input_tokens for r in ingest_records()] == [10]


def test_an_event_naming_a_key_moves_its_spend_counter(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    key = org_a.api_key
    granted, held, used = balance(employee)
    spend = key_spend(key)
    spend_used, spend_held = spend.used, spend.held

    answer = ingest(client, gateway_key, [
        {"idempotency_key": "by-key", "api_key": key.display_prefix, "model": MODEL, "input_tokens": 20,
         "output_tokens": 5},
        event("by-member", input_tokens=7),  # the member, not the key: the key's counter stays
    ])

    charged = weighted(20, 5)
    assert [r["status"] for r in answer["results"]] == ["recorded", "recorded"]
    assert answer["results"][0]["charged_tokens"] == charged
    spend = key_spend(key)
    assert (spend.used, spend.held) == (spend_used + charged, spend_held)
    with unscoped():
        assert spend.period_start == Account.all_objects.get(pk=org_a.account.pk).period_start
    assert balance(employee) == (granted, held, used + charged + 7)
    by_key, by_member = ingest_records()
    assert (by_key.api_key_id, by_key.member_id) == (key.pk, employee.pk)
    assert (by_member.api_key_id, by_member.member_id) == (None, employee.pk)
    with unscoped():
        entry = LedgerEntry.all_objects.get(idempotency_key="ingest:by-key")
    assert (entry.api_key_id, entry.account_id, entry.used_delta) == (key.pk, org_a.account.pk, charged)
    assert verify() == []


def test_a_member_without_an_account_is_rejected(client, org_a, gateway_key):
    before = everything()
    answer = ingest(client, gateway_key, [event("no-account", member="hr@a.example")])
    assert answer["results"][0]["status"] == "rejected"
    assert set(answer["results"][0]["errors"]) == {"member"}
    assert everything() == before


def test_a_thousand_events_are_accepted(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    answer = ingest(client, gateway_key, [event(f"k-{i}", input_tokens=1) for i in range(1000)])
    assert (answer["recorded"], answer["duplicates"], answer["rejected"]) == (1000, 0, 0)
    assert balance(employee) == (granted, held, used + 1000)
    assert len(ingest_records()) == 1000
    assert verify() == []


def test_more_than_a_thousand_events_is_refused_whole(client, org_a, gateway_key):
    before = everything()
    response = send(client, INGEST, {"events": [event(f"k-{i}", input_tokens=1) for i in range(1001)]}, gateway_key)
    body = refused_json(response, 413)
    assert "1000" in str(body) or "1,000" in str(body)
    assert everything() == before


@pytest.mark.parametrize("body", [{}, {"events": []}, {"events": "not a list"}, {"events": {"a": 1}},
                                  {"events": None}, [event("x")]],
                         ids=["missing", "empty", "string", "object", "null", "bare-list"])
def test_a_body_without_a_list_of_events_is_a_400(client, org_a, gateway_key, body):
    before = everything()
    response = send(client, INGEST, body, gateway_key)
    assert "events" in refused_json(response, 400)
    assert everything() == before


def test_malformed_json_is_a_400(client, org_a, gateway_key):
    response = client.post(INGEST, data="{not json", content_type="application/json", **bearer(gateway_key))
    refused_json(response, 400)


# -- who may call ------------------------------------------------------------------------------------------

GATEWAY_PATHS = [INGEST, AUTHORIZE, SETTLE]


@pytest.mark.parametrize("path", GATEWAY_PATHS)
def test_no_key_is_a_401(client, org_a, path):
    before = everything()
    body = refused_json(send(client, path, {"events": [event("x")]}), 401)
    assert body["detail"]
    assert everything() == before


@pytest.mark.parametrize("path", GATEWAY_PATHS)
def test_a_logged_in_admin_without_a_key_is_a_401(client, org_a, path):
    client.force_login(org_a.members["admin"].user, backend="django.contrib.auth.backends.ModelBackend")
    refused_json(send(client, path, {"events": [event("x")]}), 401)


@pytest.mark.parametrize("path", GATEWAY_PATHS)
def test_an_unknown_key_is_a_401(client, org_a, gateway_key, path):
    forged = gateway_key[:-4] + ("aaaa" if not gateway_key.endswith("aaaa") else "bbbb")
    refused_json(send(client, path, {"events": [event("x")]}, forged), 401)


@pytest.mark.parametrize("path", GATEWAY_PATHS)
def test_a_key_without_usage_write_is_a_403(client, org_a, path):
    before = everything()
    body = refused_json(send(client, path, {"events": [event("x")]}, org_a.api_key_secret), 403)
    assert "usage_write" in body["detail"]
    assert everything() == before


def test_an_admins_key_without_usage_write_is_a_403(client, org_a):
    _key, secret = mint_gateway_key(org_a.members["admin"], endpoints=["usage_read"])
    body = refused_json(send(client, INGEST, {"events": [event("x")]}, secret), 403)
    assert "usage_write" in body["detail"]


def test_a_revoked_gateway_key_is_a_401(client, org_a):
    admin = org_a.members["admin"]
    key, secret = mint_gateway_key(admin)
    ingest(client, secret, [event("before-revoke")])
    with scope(org_a.organization):
        api_key_services.api_key_revoke(key=key, actor=admin.user)
    before = everything()
    refused_json(send(client, INGEST, {"events": [event("after-revoke")]}, secret), 401)
    assert everything() == before


@pytest.mark.parametrize("role", ["employee", "hr", "approver"])
def test_only_admins_may_mint_a_usage_write_key(org_a, role):
    with pytest.raises(ValidationError) as refused:
        mint_gateway_key(org_a.members[role])
    assert "endpoints" in refused.value.message_dict


def test_an_owners_usage_write_key_works_and_x_api_key_is_accepted(client, org_a):
    _key, secret = mint_gateway_key(org_a.members["owner"])
    response = client.post(INGEST, data={"events": [event("owner-1")]}, content_type="application/json",
                           HTTP_X_API_KEY=secret)
    assert response.status_code == 200, response.content
    assert response.json()["recorded"] == 1


# -- other organizations -----------------------------------------------------------------------------------


def test_usage_for_another_organizations_member_or_key_is_rejected(client, org_a, org_b, gateway_key):
    b_employee = org_b.members["employee"]
    b_balance, b_spend = balance(b_employee), key_spend(org_b.api_key)
    a_before = balance(org_a.members["employee"])
    with unscoped():
        b_entries = LedgerEntry.all_objects.filter(organization=org_b.organization).count()
        b_records = UsageRecord.all_objects.filter(organization=org_b.organization).count()

    answer = ingest(client, gateway_key, [
        event("b-by-email", member=b_employee.user.email),
        {"idempotency_key": "b-by-key", "api_key": org_b.api_key.display_prefix, "model": MODEL, "input_tokens": 5},
        {"idempotency_key": "b-by-bare-key", "api_key": org_b.api_key.public_id, "model": MODEL, "input_tokens": 5},
    ])

    assert [r["status"] for r in answer["results"]] == ["rejected"] * 3
    assert set(answer["results"][0]["errors"]) == {"member"}
    assert set(answer["results"][1]["errors"]) == {"api_key"}
    assert set(answer["results"][2]["errors"]) == {"api_key"}
    assert balance(b_employee) == b_balance
    assert balance(org_a.members["employee"]) == a_before
    spend = key_spend(org_b.api_key)
    assert (spend.used, spend.held, spend.period_start) == (b_spend.used, b_spend.held, b_spend.period_start)
    with unscoped():
        assert LedgerEntry.all_objects.filter(organization=org_b.organization).count() == b_entries
        assert UsageRecord.all_objects.filter(organization=org_b.organization).count() == b_records
    assert ingest_records() == []
    assert verify() == []


def test_idempotency_keys_are_per_organization(client, org_a, org_b, gateway_key):
    """Org B's gateway may use the same event ids as org A's: each is recorded in its own organization."""
    _key, b_secret = mint_gateway_key(org_b.members["admin"])
    a_answer = ingest(client, gateway_key, [event("shared-id", input_tokens=3)])
    b_answer = ingest(client, b_secret, [event("shared-id", member="employee@b.example", input_tokens=4)])
    assert a_answer["results"][0]["status"] == b_answer["results"][0]["status"] == "recorded"
    assert [(r.organization_id, r.input_tokens) for r in ingest_records()] == [
        (org_a.organization.pk, 3), (org_b.organization.pk, 4)]
    assert verify() == []


# -- holds: authorize and settle ------------------------------------------------------------------------------


def authorize(client, secret, **fields):
    body = {"idempotency_key": "req-1", "member": EMPLOYEE, "model": MODEL, "input_tokens": 100,
            "max_output_tokens": 50} | fields
    return send(client, AUTHORIZE, body, secret)


def settle(client, secret, hold_id, **fields):
    return send(client, SETTLE, {"hold_id": hold_id, "input_tokens": 80, "output_tokens": 30} | fields, secret)


def test_authorize_then_settle(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    started = timezone.now()

    response = authorize(client, gateway_key, ttl_seconds=120)

    assert response.status_code == 201, response.content
    hold = response.json()
    assert set(hold) == {"hold_id", "tokens", "expires_at", "model"}
    assert hold["tokens"] == 100 * 1 + 50 * 2
    assert hold["model"] == MODEL
    expires_at = parse_datetime(hold["expires_at"])
    assert started + timedelta(seconds=119) <= expires_at <= timezone.now() + timedelta(seconds=121)
    assert balance(employee) == (granted, held + 200, used)
    with unscoped():
        entry = LedgerEntry.all_objects.get(pk=hold["hold_id"])
    assert (entry.kind, entry.account_id, entry.tokens, entry.held_delta, entry.model) == (
        LedgerEntry.Kind.HOLD, org_a.account.pk, 200, 200, MODEL)

    response = settle(client, gateway_key, hold["hold_id"], cached_tokens=10)

    assert response.status_code == 200, response.content
    charged = weighted(80, 30, 10)
    assert response.json() == {"hold_id": hold["hold_id"], "charged_tokens": charged, "status": "settled"}
    assert balance(employee) == (granted, held, used + charged)
    (record,) = ingest_records()
    assert (record.member_id, record.model, record.input_tokens, record.output_tokens, record.cached_tokens,
            record.charged_tokens) == (employee.pk, MODEL, 80, 30, 10, charged)
    assert verify() == []


def team_pool(org):
    """Team pools on, and a teammate of the employee gives 3,000 to the team's pool; the pool's account."""
    from allowances.models import TEAM_POOL
    from tests.factories import MemberFactory, UserFactory

    with scope(org.organization):
        allowance_services.transfer_settings_save(organization=org.organization, actor=None, enabled=True,
                                                  same_team_only=True, team_pools=True)
        mate = MemberFactory(organization=org.organization, team=org.team, user=UserFactory(email="mate@a.example"))
        allowance_services.grant_create(organization=org.organization, actor=None, tokens=5_000, reason="to give",
                                        member=mate)
        allowance_services.transfer_create(giver=mate, receiver=TEAM_POOL, tokens=3_000, actor=None,
                                           idempotency_key="to-pool")
        return Account.objects.get(team=org.team)


def pool_buckets(pool):
    with unscoped():
        return Account.all_objects.values_list("granted", "held", "used").get(pk=pool.pk)


def test_authorize_takes_the_team_pool_after_the_members_own_balance_and_settle_charges_both(client, org_a,
                                                                                                gateway_key):
    employee = org_a.members["employee"]
    pool = team_pool(org_a)
    granted, held, used = balance(employee)  # 4,000 of their own left
    response = authorize(client, gateway_key, input_tokens=100, max_output_tokens=2_000)
    assert response.status_code == 201, response.content
    hold = response.json()
    assert hold["tokens"] == 4_100
    assert balance(employee) == (granted, held + 4_000, used)
    response = settle(client, gateway_key, hold["hold_id"], input_tokens=100, output_tokens=2_000)
    assert response.json() == {"hold_id": hold["hold_id"], "charged_tokens": 4_100, "status": "settled"}
    again = settle(client, gateway_key, hold["hold_id"], input_tokens=100, output_tokens=2_000)
    assert again.json()["charged_tokens"] == 4_100 and again.json()["status"] != "settled"
    pool.refresh_from_db()
    assert balance(employee) == (granted, held, used + 4_000) and (pool.held, pool.used) == (0, 100)
    assert [r.charged_tokens for r in ingest_records()] == [4_100]
    assert verify() == []


def test_the_pools_part_of_a_hold_is_no_hold_to_settle(client, org_a, gateway_key):
    pool = team_pool(org_a)
    employee = org_a.members["employee"]
    response = authorize(client, gateway_key, input_tokens=100, max_output_tokens=2_000)  # 100 from the pool
    assert response.status_code == 201, response.content
    with unscoped():
        pool_part = LedgerEntry.all_objects.get(pk=response.json()["hold_id"]).pool_hold_id
    assert pool_part is not None
    before = (balance(employee), pool_buckets(pool))
    answer = settle(client, gateway_key, pool_part)
    assert "hold_id" in refused_json(answer, 404)
    with unscoped():
        assert not LedgerEntry.all_objects.filter(closes_hold_id__in=[response.json()["hold_id"], pool_part]).exists()
    assert (balance(employee), pool_buckets(pool)) == before
    assert ingest_records() == [] and verify() == []


def test_authorize_retry_returns_the_same_hold_and_holds_once(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    first = authorize(client, gateway_key, idempotency_key="retry-me")
    assert first.status_code == 201, first.content
    again = authorize(client, gateway_key, idempotency_key="retry-me")
    assert again.status_code == 201, again.content
    assert again.json()["hold_id"] == first.json()["hold_id"]
    assert again.json()["tokens"] == first.json()["tokens"]
    assert balance(employee) == (granted, held + first.json()["tokens"], used)
    other = authorize(client, gateway_key, idempotency_key="another-request")
    assert other.json()["hold_id"] != first.json()["hold_id"]
    assert balance(employee) == (granted, held + 2 * first.json()["tokens"], used)
    assert verify() == []


def test_settle_retry_charges_nothing_more(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    hold = authorize(client, gateway_key).json()
    first = settle(client, gateway_key, hold["hold_id"], input_tokens=10, output_tokens=10)
    assert first.json() == {"hold_id": hold["hold_id"], "charged_tokens": 30, "status": "settled"}
    after = everything(), balance(employee)

    again = settle(client, gateway_key, hold["hold_id"], input_tokens=500, output_tokens=500)

    assert again.status_code == 200, again.content
    assert again.json() == {"hold_id": hold["hold_id"], "charged_tokens": 30, "status": "already_settled"}
    assert (everything(), balance(employee)) == after
    assert verify() == []


def test_authorize_and_settle_with_a_key_move_its_spend_counter(client, org_a, gateway_key):
    key = org_a.api_key
    before = key_spend(key)
    body = {"idempotency_key": "keyed", "api_key": key.display_prefix, "model": MODEL, "input_tokens": 10,
            "max_output_tokens": 10}
    response = send(client, AUTHORIZE, body, gateway_key)
    assert response.status_code == 201, response.content
    hold = response.json()
    spend = key_spend(key)
    assert spend.held == (before.held if before.period_start == spend.period_start else 0) + 30
    response = settle(client, gateway_key, hold["hold_id"], input_tokens=5, output_tokens=5)
    assert response.json()["charged_tokens"] == 15
    spend_after = key_spend(key)
    assert (spend_after.held, spend_after.used) == (spend.held - 30, spend.used + 15)
    (record,) = ingest_records()
    assert record.api_key_id == key.pk
    assert verify() == []


def test_authorize_rounds_a_fractional_charge_up(client, org_a, gateway_key):
    with scope(org_a.organization):
        allowance_services.catalog_model_create(
            organization=org_a.organization, actor=org_a.members["hr"].user, model_id="frac", display_name="Frac",
            connection=org_a.provider_connection, input_multiplier="0.3", output_multiplier="1.7",
            cached_multiplier="0.25")
    response = authorize(client, gateway_key, model="frac", input_tokens=11, max_output_tokens=3)
    assert response.status_code == 201, response.content
    assert response.json()["tokens"] == 9  # ceil(3.3 + 5.1)
    answer = ingest(client, gateway_key, [event("frac-1", model="frac", input_tokens=1, output_tokens=1,
                                                 cached_tokens=1)])
    assert answer["results"][0]["charged_tokens"] == 3  # ceil(0.3 + 1.7 + 0.25)


def test_authorize_beyond_the_balance_is_a_429_and_holds_nothing(client, org_a, gateway_key):
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    available = granted - held - used
    before = everything()

    response = authorize(client, gateway_key, input_tokens=available + 1, max_output_tokens=0)

    body = refused_json(response, 429)
    assert body["detail"]
    assert everything() == before
    # Exactly the balance still fits.
    fits = authorize(client, gateway_key, idempotency_key="fits", input_tokens=available, max_output_tokens=0)
    assert fits.status_code == 201, fits.content
    assert balance(employee) == (granted, held + available, used)
    assert verify() == []


def test_settle_of_another_organizations_hold_is_a_404(client, org_a, org_b, gateway_key):
    b_before = balance(org_b.members["employee"])
    with unscoped():
        b_entries = LedgerEntry.all_objects.filter(organization=org_b.organization).count()
    response = settle(client, gateway_key, org_b.hold.id)
    body = refused_json(response, 404)
    assert "hold_id" in body
    assert balance(org_b.members["employee"]) == b_before
    with unscoped():
        assert LedgerEntry.all_objects.filter(organization=org_b.organization).count() == b_entries
        assert LedgerEntry.all_objects.filter(closes_hold_id=org_b.hold.id).count() == 0
    assert verify() == []


def test_settle_of_no_hold_is_a_404(client, org_a, gateway_key):
    with unscoped():
        grant_entry = LedgerEntry.all_objects.filter(organization=org_a.organization).exclude(
            kind=LedgerEntry.Kind.HOLD).first()
    before = everything()
    refused_json(settle(client, gateway_key, 10**9), 404)
    refused_json(settle(client, gateway_key, grant_entry.pk), 404)
    assert everything() == before


def test_authorize_for_another_organizations_member_or_key_is_a_400(client, org_a, org_b, gateway_key):
    before = everything()
    response = authorize(client, gateway_key, member="employee@b.example")
    assert "member" in refused_json(response, 400)
    body = {"idempotency_key": "b-key", "api_key": org_b.api_key.display_prefix, "model": MODEL, "input_tokens": 1,
            "max_output_tokens": 1}
    assert "api_key" in refused_json(send(client, AUTHORIZE, body, gateway_key), 400)
    assert everything() == before


@pytest.mark.parametrize("change", [{"model": "nope"}, {"input_tokens": -1}, {"max_output_tokens": "x"},
                                    {"member": "ghost@a.example"}, {"ttl_seconds": 0}],
                         ids=["model", "negative", "not-a-number", "unknown-member", "ttl"])
def test_authorize_with_bad_fields_is_a_400(client, org_a, gateway_key, change):
    before = everything()
    body = refused_json(authorize(client, gateway_key, **change), 400)
    assert set(change) <= set(body), body
    assert everything() == before


# -- the OpenAPI schema ---------------------------------------------------------------------------------------


def test_the_endpoints_are_in_the_openapi_schema(client, db):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content[:300]
    schema = response.json()
    for path in GATEWAY_PATHS:
        assert "post" in schema["paths"][path], path
    components = schema["components"]["schemas"]
    usage_body = schema["paths"][INGEST]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "events" in usage_body["properties"]  # stated inline: no serializer parses it (see gateway/api.py)
    authorize_body = schema["paths"][AUTHORIZE]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"idempotency_key", "model", "input_tokens", "max_output_tokens"} <= set(
        components[authorize_body["$ref"].rsplit("/", 1)[-1]]["properties"])
    assert "201" in schema["paths"][AUTHORIZE]["post"]["responses"]
    assert "200" in schema["paths"][SETTLE]["post"]["responses"]
    # The default rendering is YAML.
    yaml_response = client.get("/api/schema/")
    assert yaml_response.status_code == 200
    assert b"/api/v1/usage:" in yaml_response.content


# -- answers the product once got wrong ---------------------------------------------------------------------


def test_an_impossible_calendar_date_is_a_rejected_event_not_a_crash(client, org_a, gateway_key):
    """A well-formed but impossible time (30 February) must be rejected like any other bad
    timestamp; the good events of the batch still apply."""
    client.raise_request_exception = False
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    response = send(client, INGEST, {"events": [event("ok", input_tokens=5),
                                                event("feb-30", timestamp="2025-02-30T10:00:00Z")]}, gateway_key)
    assert response.status_code == 200, (response.status_code, response.content[:300])
    results = response.json()["results"]
    assert results[0]["status"] == "recorded"
    assert results[1]["status"] == "rejected" and set(results[1]["errors"]) == {"timestamp"}
    assert balance(employee) == (granted, held, used + 5)


def test_the_longest_allowed_idempotency_key_is_recorded(client, org_a, gateway_key):
    """Keys of 1 to MAX_EVENT_KEY characters are accepted and recorded (the ledger entry's own key,
    `ingest:` + key, must fit its column too); one character more is a rejected event."""
    from gateway.services import MAX_EVENT_KEY

    client.raise_request_exception = False
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    response = send(client, INGEST, {"events": [event("k" * MAX_EVENT_KEY, input_tokens=5),
                                                event("j" * (MAX_EVENT_KEY + 1), input_tokens=5)]}, gateway_key)
    assert response.status_code == 200, (response.status_code, response.content[:300])
    first, second = response.json()["results"]
    assert first["status"] == "recorded"
    assert second["status"] == "rejected" and set(second["errors"]) == {"idempotency_key"}
    assert balance(employee) == (granted, held, used + 5)
    assert verify() == []


def test_an_event_id_that_looks_like_a_settlement_does_not_block_settling(client, org_a, gateway_key):
    """The gateway's own event ids and the portal's settlement records must not share one namespace:
    an ingested event whose id happens to be `settle:<n>` must not break the settlement of hold n."""
    client.raise_request_exception = False
    employee = org_a.members["employee"]
    hold = authorize(client, gateway_key).json()
    answer = ingest(client, gateway_key, [event(f"settle:{hold['hold_id']}", input_tokens=5)])
    assert answer["results"][0]["status"] == "recorded"
    granted, held, used = balance(employee)

    response = settle(client, gateway_key, hold["hold_id"], input_tokens=10, output_tokens=0)

    assert response.status_code == 200, (response.status_code, response.content[:300])
    assert response.json()["status"] == "settled"
    assert balance(employee) == (granted, held - hold["tokens"], used + 10)
    assert verify() == []


def test_a_settlement_does_not_swallow_an_event_with_a_lookalike_id(client, org_a, gateway_key):
    """The reverse order: after hold n is settled, a new event with id `settle:<n>` is new usage."""
    employee = org_a.members["employee"]
    hold = authorize(client, gateway_key).json()
    assert settle(client, gateway_key, hold["hold_id"]).status_code == 200
    granted, held, used = balance(employee)
    answer = ingest(client, gateway_key, [event(f"settle:{hold['hold_id']}", input_tokens=5)])
    assert answer["results"][0]["status"] == "recorded", answer
    assert balance(employee) == (granted, held, used + 5)


@pytest.mark.parametrize("field", ["idempotency_key", "member", "api_key", "model", "timestamp"])
@pytest.mark.parametrize("bad", [r"\u0000", r"\ud800"], ids=["nul", "lone-surrogate"])
def test_text_the_database_cannot_store_is_a_rejected_event_not_a_crash(client, org_a, gateway_key, field, bad):
    """JSON can carry a NUL character or half a surrogate pair; PostgreSQL cannot store or compare
    the first and UTF-8 cannot encode the second. The event is rejected, its neighbours apply."""
    client.raise_request_exception = False
    employee = org_a.members["employee"]
    granted, held, used = balance(employee)
    broken = {"idempotency_key": "broken", "member": EMPLOYEE, "model": MODEL, "input_tokens": 7} | (
        {"api_key": "tap_"} if field == "api_key" else {})
    if field == "api_key":
        del broken["member"]
    broken[field] = f"x{{BAD}}y"
    body = ('{"events": [' + json.dumps(event("fine", input_tokens=5)) + ", "
            + json.dumps(broken).replace("{BAD}", bad) + "]}")

    response = client.post(INGEST, data=body, content_type="application/json", **bearer(gateway_key))

    assert response.status_code == 200, (response.status_code, response.content[:300])
    first, second = response.json()["results"]
    assert first["status"] == "recorded"
    assert second["status"] == "rejected" and list(second["errors"]) == [field], second
    assert balance(employee) == (granted, held, used + 5)
    assert verify() == []
