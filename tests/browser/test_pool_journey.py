"""Team pools end to end in headless Chromium, on the demo, with the gateway served alongside.

The owner switches transfers and team pools on. Bob (Engineering) gives part of his allowance to
the Engineering pool. Alice, his teammate, has spent her base allowance (the demo leaves her only
approved overage, which is billed): her next call through the gateway is served from the pool,
before her overage, her own account untouched. Both dashboards show it: Bob's the tokens he gave
the pool and who drew on it, Alice's the pool and what she drew from it.
"""

import re
from io import StringIO

import openai
from django.core.management import call_command
from playwright.sync_api import expect

from allowances import ledger
from allowances.models import Account, LedgerEntry
from allowances.selectors import transferable
from portal.demo import DEMO_PASSWORD
from portal.tenancy import scope, unscoped
from tests.browser.test_overage_journey import _log_out

OWNER, ALICE, BOB = "owner@acme.example", "alice@acme.example", "bob@acme.example"
GIVEN = 50_000


def _account(**owner) -> Account:
    with unscoped():
        return Account.all_objects.select_related("organization").get(organization__slug="acme", **owner)


def test_a_member_gives_to_the_pool_and_a_teammate_with_a_spent_allowance_is_served_from_it(
        portal_server, page, log_in, screenshot):
    output = StringIO()
    call_command("seed_demo", stdout=output)
    secret = re.search(rf"^api key for {re.escape(ALICE)}: (\S+)$", output.getvalue(), re.MULTILINE).group(1)
    page.set_default_timeout(10_000)

    # -- 1. The owner switches transfers and team pools on.
    log_in(OWNER, DEMO_PASSWORD)
    page.goto(f"{portal_server.url}/o/acme/settings/transfers/")
    page.get_by_label("Members may give allowance to each other").check()
    page.get_by_label("Team pools").check()
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".messages .success")).to_contain_text("Transfer rules saved.")
    _log_out(page, OWNER)

    # -- 2. Bob gives part of his allowance to the Engineering pool.
    log_in(BOB, DEMO_PASSWORD)
    page.goto(f"{portal_server.url}/o/acme/transfers/")
    page.get_by_label("Give to").select_option(label="The Engineering team pool")
    page.get_by_label("Tokens").fill(f"{GIVEN:,}")
    page.get_by_label("Note").fill("for the release week")
    page.get_by_role("button", name="Give").click()
    expect(page.locator(".messages .success")).to_contain_text(f"{GIVEN:,} tokens given to the Engineering team pool.")
    pool = _account(team__name="Engineering")
    assert (pool.granted, pool.used) == (GIVEN, 0)
    _log_out(page, BOB)

    # -- 3. Alice's base allowance is spent (what she has left is approved overage); her next call
    # is served from the pool, not from her overage.
    alice_before = _account(member__user__email=ALICE)
    with scope(alice_before.organization):
        assert transferable(account=alice_before) == 0 < alice_before.available
    gateway = openai.OpenAI(api_key=secret, base_url=f"{portal_server.url}/v1", max_retries=0)
    reply = gateway.chat.completions.create(model="gpt-4o-mini", max_tokens=200,
                                            messages=[{"role": "user", "content": "Draft the release notes."}])
    assert reply.choices[0].message.content
    pool, alice_after = _account(team__name="Engineering"), _account(member__user__email=ALICE)
    drawn = pool.used
    assert drawn > 0 and pool.held == 0 and pool.available == GIVEN - drawn
    assert (alice_after.granted, alice_after.held, alice_after.used) == (
        alice_before.granted, alice_before.held, alice_before.used)
    with unscoped():
        assert LedgerEntry.all_objects.filter(account=pool, kind="usage", used_delta=drawn,
                                              api_key__member__user__email=ALICE).exists()
    assert ledger.verify(organization_id=pool.organization_id) == []

    # -- 4. Alice's dashboard shows the pool and what she drew from it.
    log_in(ALICE, DEMO_PASSWORD)
    page.goto(f"{portal_server.url}/o/acme/")
    card = page.locator("[data-testid=team-pool]")
    expect(card).to_contain_text("The Engineering team pool")
    expect(card.locator("[data-testid=pool-mine-drawn]")).to_be_visible()
    expect(card).to_contain_text(BOB)
    screenshot(page, "pool-dashboard-alice")
    _log_out(page, ALICE)

    # -- 5. Bob's dashboard shows what he gave the pool and who drew on it.
    log_in(BOB, DEMO_PASSWORD)
    page.goto(f"{portal_server.url}/o/acme/")
    transfers = page.locator("[data-testid=transfers]")
    expect(transfers).to_contain_text("the Engineering team pool")
    expect(transfers).to_contain_text("for the release week")
    expect(page.locator("[data-testid=team-pool] [data-testid=pool-drawn]")).to_contain_text(ALICE)
    page.goto(f"{portal_server.url}/o/acme/transfers/pool/")
    expect(page.locator("[data-testid=team-pool]")).to_contain_text(BOB)
    screenshot(page, "pool-page-bob")
