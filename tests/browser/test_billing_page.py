"""The billing page in headless Chromium, against localstripe: an owner sets billing up and adds a
(test) card, sees this month's billable consumption by team and model, and after the close the
settlement in the history, paid, with its invoice; employees and approvers are refused."""

import re

from playwright.sync_api import expect

from tests.billing.conftest import ALICE_BEYOND, CAROL_BEYOND, EXPECTED, build_billed, close
from tests.billing.conftest import stripe_server  # noqa: F401  (the fixture)
from tests.factories import PASSWORD


def _money(minor: int) -> str:
    return f"{minor / 100:,.2f} USD"


def test_an_owner_sets_up_billing_and_follows_the_settlement(portal_server, page, log_in, stripe_server):  # noqa: F811
    billed = build_billed()
    page.set_default_timeout(15_000)
    log_in(billed.owner.user.email, PASSWORD)
    page.goto(f"{portal_server.url}/o/{billed.slug}/billing/")
    expect(page.get_by_role("heading", name="Set up billing")).to_be_visible()
    rows = page.get_by_test_id("current-row")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text(f"{ALICE_BEYOND:,}")
    expect(rows.nth(1)).to_contain_text(f"{CAROL_BEYOND:,}")
    expect(page.get_by_test_id("current-total")).to_have_text(_money(sum(EXPECTED.values())))

    page.get_by_label("Billing email").fill("not an email")
    page.get_by_role("button", name="Set up billing").click()
    expect(page.locator(".errorlist")).to_contain_text("Enter an email address")
    page.get_by_label("Billing email").fill("finance@bil.example")
    page.get_by_role("button", name="Set up billing").click()
    expect(page.locator(".messages")).to_contain_text("Billing is set up")
    expect(page.get_by_role("heading", name="Billing details")).to_be_visible()

    page.get_by_label(re.compile("Test card")).select_option("pm_card_visa")
    page.get_by_role("button", name="Add the card").click()
    expect(page.get_by_test_id("card")).to_have_text(re.compile(r"ending 4242$"))

    close(billed)  # the month ends: the close settles it
    page.reload()
    history = page.get_by_test_id("settlement-row")
    expect(history).to_have_count(1)
    expect(history.get_by_test_id("settlement-status")).to_have_text("Paid")
    expect(history).to_contain_text(_money(sum(EXPECTED.values())))
    expect(history).to_contain_text(f"Engineering: {ALICE_BEYOND:,} tokens, {_money(EXPECTED['Engineering'])}")
    expect(history).to_contain_text(re.compile(r"Invoice\s+in_"))
    with page.expect_download() as download:
        history.get_by_role("link", name="Chargeback CSV").click()
    assert download.value.suggested_filename == f"chargeback-{billed.slug}-{billed.period:%Y-%m}.csv"

    for who in (billed.alice, billed.approver):
        page.context.clear_cookies()
        log_in(who.user.email, PASSWORD)
        response = page.goto(f"{portal_server.url}/o/{billed.slug}/billing/")
        assert response.status == 403
        page.goto(f"{portal_server.url}/o/{billed.slug}/")
        expect(page.locator("nav.orgnav")).not_to_contain_text("Billing")
