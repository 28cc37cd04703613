"""Team pools through the gateway (uvicorn, the sandbox provider, the official openai SDK): a member
whose own balance is spent is served from the team pool in one hold and charged to it, a member
with their own balance left is not, pools off refuses as before; and on real PostgreSQL,
transfers (member to member and to the pool) racing gateway requests that draw on the pool never
overspend either account, never write one side of a transfer without the other, and leave every
hold closed and the ledger verifying clean."""

import asyncio
import random

import httpx
import openai
import pytest
from django.core.exceptions import ValidationError

from allowances import ledger
from allowances import services as allowance_services
from allowances.models import TEAM_POOL, Account, LedgerEntry, Transfer
from apikeys import services as api_key_services
from gateway.models import UsageRecord
from portal.tenancy import scope, unscoped
from tests.allowances.test_ledger_concurrency import run_together
from tests.factories import MemberFactory, UserFactory
from tests.gateway.test_overspend import assert_within_limits

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Write a short note."}]


@pytest.fixture
def pooled(org_a, gateway_url):
    """Transfers and team pools on; a teammate (10,000 tokens, a key of their own) gave 3,000 to
    the team's pool; the fixture employee's own balance is spent (nothing held, nothing left)."""
    organization = org_a.organization
    with scope(organization):
        allowance_services.transfer_settings_save(organization=organization, actor=None, enabled=True,
                                                  same_team_only=True, team_pools=True)
        mate = MemberFactory(organization=organization, team=org_a.team, user=UserFactory(email="mate@a.example"))
        mate_account = allowance_services.account_open(member=mate)
        ledger.post(account=mate_account, kind="bonus", tokens=10_000, idempotency_key="test:mate-funds")
        allowance_services.transfer_create(giver=mate, receiver=TEAM_POOL, tokens=3_000, actor=mate.user,
                                           idempotency_key="test:to-pool")
        ledger.release(hold=org_a.hold)
        spent = Account.objects.get(pk=org_a.account.pk).available
        ledger.post(account=org_a.account, kind="adjustment", tokens=-spent, guard="zero",
                    idempotency_key="test:employee-spent")
        _key, mate_key = api_key_services.api_key_create(member=mate, actor=mate.user, name="mate",
                                                         endpoints=["chat"])
        pool = Account.objects.get(team=org_a.team)
    return {"org": org_a, "url": gateway_url, "mate": mate, "mate_key": mate_key, "pool": pool.pk,
            "accounts": [org_a.account.pk, mate_account.pk, pool.pk]}


def buckets(account_id):
    with unscoped():
        account = Account.all_objects.get(pk=account_id)
    return account.granted, account.held, account.used


def test_a_member_with_a_spent_allowance_is_served_from_the_pool(pooled):
    own_before, pool_before = buckets(pooled["accounts"][0]), buckets(pooled["pool"])
    client = openai.OpenAI(api_key=pooled["org"].api_key_secret, base_url=pooled["url"], max_retries=0)
    reply = client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=40)
    assert reply.choices[0].message.content
    with unscoped():
        record = UsageRecord.all_objects.filter(source="gateway", status="ok").latest("id")
        hold = LedgerEntry.all_objects.filter(account_id=pooled["accounts"][0], kind="hold").latest("id")
        pool_hold = LedgerEntry.all_objects.get(pk=hold.pool_hold_id)
    assert record.charged_tokens > 0 and record.member_id == pooled["org"].members["employee"].pk
    assert (hold.tokens, pool_hold.account_id) == (0, pooled["pool"])  # one hold: nothing of theirs, the pool's
    assert buckets(pooled["accounts"][0]) == own_before  # nothing of their own moved
    assert buckets(pooled["pool"]) == (pool_before[0], 0, pool_before[2] + record.charged_tokens)
    assert_within_limits()


def test_a_member_with_their_own_balance_left_is_not_served_from_the_pool(pooled):
    pool_before = buckets(pooled["pool"])
    client = openai.OpenAI(api_key=pooled["mate_key"], base_url=pooled["url"], max_retries=0)
    client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=40)
    assert buckets(pooled["pool"]) == pool_before
    with unscoped():
        hold = LedgerEntry.all_objects.filter(account__member=pooled["mate"], kind="hold").latest("id")
    assert hold.pool_hold_id is None and hold.tokens > 0
    assert_within_limits()


def test_with_team_pools_off_a_spent_allowance_is_refused_and_the_pool_untouched(pooled):
    with scope(pooled["org"].organization):
        allowance_services.transfer_settings_save(organization=pooled["org"].organization, actor=None, enabled=True,
                                                  same_team_only=True, team_pools=False)
    pool_before = buckets(pooled["pool"])
    client = openai.OpenAI(api_key=pooled["org"].api_key_secret, base_url=pooled["url"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=40)
    assert refused.value.body["code"] == "insufficient_quota"
    assert buckets(pooled["pool"]) == pool_before
    assert_within_limits()


def test_a_request_larger_than_own_balance_and_pool_together_is_refused_naming_both(pooled):
    client = openai.OpenAI(api_key=pooled["org"].api_key_secret, base_url=pooled["url"], max_retries=0)
    with unscoped():  # leave the pool 10 tokens
        ledger.post(account=Account.all_objects.get(pk=pooled["pool"]), kind="adjustment", tokens=-2_990,
                    guard="zero", idempotency_key="test:pool-down")
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=40)
    assert "remaining balance is 10 tokens" in refused.value.body["message"]
    assert buckets(pooled["pool"])[1:] == (0, 0)
    assert_within_limits()


async def _requests(url, keys, count):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=count)) as client:
        async def one(i):
            response = await client.post(url + "/chat/completions", headers={"Authorization": f"Bearer {keys[i % 2]}"},
                                         json={"model": "gpt-test", "messages": PROMPT, "max_tokens": 40})
            return response.status_code

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_transfers_to_the_pool_and_requests_drawing_on_it_at_once_never_overspend(pooled):
    org, mate = pooled["org"], pooled["mate"]
    employee = org.members["employee"]
    with scope(org.organization):  # the employee can give a little too (and then draws on the pool)
        ledger.post(account=org.account, kind="bonus", tokens=600, idempotency_key="test:employee-some")
    with unscoped():
        before = {a.pk: a.granted for a in Account.all_objects.filter(pk__in=pooled["accounts"])}
    rng = random.Random(18)
    sent = [(rng.choice([employee, mate]), rng.choice([TEAM_POOL, "member"]), rng.randrange(50, 900), f"race-{k}")
            for k in range(12)]
    plan = [transfer for transfer in sent for _retry in range(3)]  # each sent three times at once

    def work(i):
        if i == len(plan):  # one thread sends the gateway's requests meanwhile, from both keys
            return asyncio.run(_requests(pooled["url"], [org.api_key_secret, pooled["mate_key"]], 24))
        giver, to, tokens, key = plan[i]
        receiver = TEAM_POOL if to == TEAM_POOL else (mate if giver == employee else employee)
        with scope(org.organization):
            try:
                return allowance_services.transfer_create(giver=giver, receiver=receiver, tokens=tokens, actor=None,
                                                          idempotency_key=key)
            except ValidationError as refused:
                return refused

    results = run_together(len(plan) + 1, work)

    statuses = results[-1]
    assert set(statuses) <= {200, 429} and 200 in statuses
    made = {r.pk for r in results[:-1] if isinstance(r, Transfer)}
    assert made and all(isinstance(r, (Transfer, ValidationError)) for r in results[:-1])
    with unscoped():
        transfers = list(Transfer.all_objects.filter(organization=org.organization).exclude(idempotency_key="test:to-pool"))
        assert {t.pk for t in transfers} == made  # a retried key made one transfer, not three
        assert any(t.to_pool for t in transfers)
        for transfer in transfers:
            receiving = pooled["pool"] if transfer.to_pool else Account.all_objects.get(member=transfer.receiver).pk
            sides = sorted(LedgerEntry.all_objects.filter(reference=f"transfer:{transfer.pk}").values_list(
                "kind", "granted_delta", "account_id"))
            assert sides == sorted([("transfer_in", transfer.tokens, receiving),
                                    ("transfer_out", -transfer.tokens,
                                     Account.all_objects.get(member=transfer.giver).pk)])
        after = {a.pk: a for a in Account.all_objects.filter(pk__in=pooled["accounts"])}
        drawn = LedgerEntry.all_objects.filter(account_id=pooled["pool"], kind="usage").count()
        open_holds = LedgerEntry.all_objects.filter(kind="hold", closed_by__isnull=True).exclude(
            idempotency_key="hold:fixture-hold").count()
    assert sum(a.granted for a in after.values()) == sum(before.values())  # moved, never made
    assert all(a.available >= 0 and a.held == 0 for a in after.values())  # every request's hold closed
    assert drawn > 0 and open_holds == 0
    assert_within_limits()  # verify_ledger clean (both parts of every pooled hold), no account below its limit
