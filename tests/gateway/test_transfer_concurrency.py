"""Transfers racing each other, their own retries and gateway requests, on real PostgreSQL: each
thread and the gateway's event loop have their own connections. No account goes below its limit,
no transfer is written on one side only or twice, the two accounts' granted tokens only move
between them, and the ledger verifies clean."""

import asyncio
import random

import httpx
import pytest
from django.core.exceptions import ValidationError

from allowances import ledger
from allowances import services as allowance_services
from allowances.models import Account, LedgerEntry, Transfer
from apikeys import services as api_key_services
from portal.tenancy import scope, unscoped
from tests.allowances.test_ledger_concurrency import run_together
from tests.factories import MemberFactory, UserFactory
from tests.gateway.test_overspend import assert_within_limits

pytestmark = pytest.mark.transactional

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Write a short note."}], "max_tokens": 40}


@pytest.fixture
def pair(org_a, gateway_url):
    """Two teammates with 3,000 tokens available each and a key each, transfers switched on."""
    organization = org_a.organization
    with scope(organization):
        allowance_services.transfer_settings_save(organization=organization, actor=None, enabled=True,
                                                  same_team_only=True)
        mate = MemberFactory(organization=organization, team=org_a.team, user=UserFactory(email="mate@a.example"))
        mate_account = allowance_services.account_open(member=mate)
        ledger.post(account=mate_account, kind="bonus", tokens=3_000, idempotency_key="test:mate-funds")
        ledger.release(hold=org_a.hold)
        ledger.post(account=org_a.account, kind="adjustment", tokens=-2_000, guard="zero",
                    idempotency_key="test:employee-down")
        _key, mate_key = api_key_services.api_key_create(member=mate, actor=mate.user, name="mate",
                                                         endpoints=["chat"])
    employee = org_a.members["employee"]
    return {"org": org_a, "url": gateway_url, "members": [employee, mate], "keys": [org_a.api_key_secret, mate_key],
            "accounts": [org_a.account.pk, mate_account.pk]}


def granted_and_available(account_ids):
    with unscoped():
        return {a.pk: (a.granted, a.available) for a in Account.objects.filter(pk__in=account_ids)}


async def _requests(url, keys, count):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        async def one(i):
            response = await client.post(url + "/chat/completions", json=BODY,
                                         headers={"Authorization": f"Bearer {keys[i % 2]}"})
            return response.status_code

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_transfers_and_gateway_requests_at_once_never_overspend_or_write_one_side(pair):
    org, members, accounts = pair["org"], pair["members"], pair["accounts"]
    before = granted_and_available(accounts)
    assert [before[pk][1] for pk in accounts] == [3_000, 3_000]
    rng = random.Random(18)
    sent = [(k % 2, rng.randrange(100, 1_500), f"race-{k}") for k in range(12)]
    plan = [transfer for transfer in sent for _retry in range(3)]  # each sent three times at once

    def transfer(i):
        if i == len(plan):  # one thread sends the gateway's requests meanwhile
            return asyncio.run(_requests(pair["url"], pair["keys"], 24))
        giver, tokens, key = plan[i]
        with scope(org.organization):
            try:
                return allowance_services.transfer_create(
                    giver=members[giver], receiver=members[1 - giver], tokens=tokens, actor=None,
                    idempotency_key=key)
            except ValidationError as refused:
                return refused

    results = run_together(len(plan) + 1, transfer)

    statuses = results[-1]
    assert set(statuses) <= {200, 429} and 200 in statuses
    made = {r.pk for r in results[:-1] if isinstance(r, Transfer)}
    assert made and all(isinstance(r, (Transfer, ValidationError)) for r in results[:-1])
    with unscoped():
        transfers = list(Transfer.objects.filter(organization=org.organization))
        assert {t.pk for t in transfers} == made  # a retried key made one transfer, not three
        for transfer in transfers:
            sides = sorted(LedgerEntry.objects.filter(reference=f"transfer:{transfer.pk}").values_list(
                "kind", "granted_delta", "account__member_id"))
            assert sides == sorted([("transfer_in", transfer.tokens, transfer.receiver_id),
                                    ("transfer_out", -transfer.tokens, transfer.giver_id)])
        assert not LedgerEntry.objects.filter(kind__in=["transfer_in", "transfer_out"]).exclude(
            reference__in=[f"transfer:{t.pk}" for t in transfers]).exists()
    after = granted_and_available(accounts)
    assert sum(g for g, _ in after.values()) == sum(g for g, _ in before.values())  # moved, never made
    assert all(available >= 0 for _, available in after.values())
    assert_within_limits()  # verify_ledger clean, no account below its limit
