"""The allowances 'done when', end to end in a real browser.

HR creates a policy and assigns it to a team immediately, grants a member a bonus; the member then
sees exactly what the ledger holds for them, with the bonus in their history and their usage in
the chart and the per-model table.
"""

import re
from datetime import datetime
from zoneinfo import ZoneInfo

from django.core.management import call_command
from django.utils import timezone
from playwright.sync_api import expect

from allowances import ledger
from allowances.models import Account
from portal.demo import DEMO_PASSWORD
from portal.models import Member
from portal.tenancy import unscoped

HR, CAROL = "hr@acme.example", "carol@acme.example"
BONUS, BONUS_REASON = 250_000, "Thanks for the launch week"
USED = 37_500  # what the gateway settles for carol's request (less than it held)


def _carol_account():
    with unscoped():
        return Account.objects.select_related("organization").get(
            member=Member.objects.get(organization__slug="acme", user__email=CAROL))


def _field(page, label):
    # Django renders form labels with a ":" suffix.
    return page.get_by_label(f"{label}:", exact=True)


def test_hr_sets_policy_and_bonus_and_member_sees_the_ledger(portal_server, page, log_in, screenshot):
    call_command("seed_demo", stdout=open("/dev/null", "w"))
    page.set_default_timeout(10_000)  # every page here is server-rendered and quick; fail fast

    # -- 1. HR creates the policy through the form and assigns it to Research immediately.
    log_in(HR, DEMO_PASSWORD)
    expect(page).to_have_url(re.compile(r"/o/acme/$"))
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Policies").click()
    expect(page.get_by_role("heading", name="Allowance policies")).to_be_visible()

    _field(page, "Name").fill("Focus")
    _field(page, "Monthly tokens").fill("8000000")
    _field(page, "Rollover rule").select_option(
        label="Rolls over up to a percentage of the monthly amount")
    _field(page, "Rollover cap (% of the monthly amount)").fill("25")
    _field(page, "Overage rule").select_option(label="Hard stop at the allowance")
    page.get_by_role("button", name="Create policy").click()

    expect(page.locator(".messages .success")).to_contain_text("Policy Focus created")
    focus_row = page.locator("[data-testid=policy-row]", has_text="Focus")
    expect(focus_row).to_have_count(1)
    expect(focus_row).to_contain_text("8M")
    expect(focus_row).to_contain_text("Rolls over up to a percentage of the monthly amount (25%)")
    expect(focus_row).to_contain_text("Hard stop at the allowance")

    page.get_by_role("link", name="Assign a policy").click()
    expect(page.get_by_role("heading", name="Assign a policy")).to_be_visible()
    _field(page, "Policy").select_option(label="Focus")
    _field(page, "Team").select_option(label="Research")
    page.get_by_role("radio", name=re.compile(r"^Immediately: top the rest of this period")).check()
    # HR must be told what "Immediately" does to this month before committing to it.
    expect(page.get_by_text("“Immediately” tops the rest of this period up or down pro rata to the days left"))\
        .to_be_visible()
    page.get_by_role("button", name="Assign").click()

    expect(page.locator(".messages .success")).to_contain_text("Focus assigned to Research")
    assignment = page.locator("table tr", has_text="team Research").filter(has_text="Focus")
    expect(assignment).to_contain_text("(immediately, pro rata)")

    # -- 2. HR grants carol a bonus from the Grants page.
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Grants").click()
    expect(page.get_by_role("heading", name="Grants", exact=True)).to_be_visible()
    _field(page, "Tokens").fill(str(BONUS))
    _field(page, "Reason").fill(BONUS_REASON)
    _field(page, "Member").select_option(label=CAROL)
    page.get_by_role("button", name="Grant", exact=True).click()

    expect(page.locator(".messages .success")).to_contain_text(f"Granted {BONUS:,} tokens to {CAROL}")
    grant_row = page.locator("[data-testid=grant-row]", has_text=BONUS_REASON)
    expect(grant_row).to_have_count(1)
    expect(grant_row).to_contain_text(CAROL)
    expect(grant_row.locator(".tokens")).to_have_attribute("title", f"{BONUS:,} tokens")

    # -- 3. Carol makes a request through the gateway's ledger calls (hold, then settle), on top
    # of the usage the demo gave her.
    demo_used = _carol_account().used
    with unscoped():
        demo_sonnet = sum(_carol_account().entries.filter(model="claude-sonnet").values_list("used_delta", flat=True))
    hold = ledger.authorize(account=_carol_account(), tokens=50_000, idempotency_key="browser-journey-1",
                            model="claude-sonnet")
    ledger.settle(hold=hold, used_tokens=USED)

    # HR logs out through the user menu; carol logs in.
    page.locator("details.switcher summary", has_text=HR).click()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("link", name="Log in")).to_be_visible()
    log_in(CAROL, DEMO_PASSWORD)
    expect(page).to_have_url(re.compile(r"/o/acme/$"))
    expect(page.get_by_role("heading", name="My allowance")).to_be_visible()

    # The Available figure is the ledger's number, exactly (the tooltip carries the unrounded value).
    account = _carol_account()
    assert account.held == 0 and account.used == demo_used + USED
    available = page.locator("[data-testid=available] .tokens")
    expect(available).to_have_attribute("title", f"{account.available:,} tokens")
    # ...and that number includes the bonus: one bonus entry, and the stored balance is the sum of the entries.
    with unscoped():
        bonus_entries = list(account.entries.filter(kind="bonus").values_list("tokens", "reason"))
        assert ledger.verify(organization_id=account.organization_id) == []
    assert bonus_entries == [(BONUS, BONUS_REASON)]
    bonus_row = page.locator("[data-testid=history-row]", has_text="Bonus grant")
    expect(bonus_row).to_have_count(1)
    expect(bonus_row).to_contain_text(BONUS_REASON)
    expect(bonus_row.locator(".tokens")).to_have_attribute("title", f"+{BONUS:,} tokens")  # a grant: signed +
    # The immediate assignment moved carol from Research (20M) to Focus (8M) pro rata, visibly.
    expect(page.locator("main > p.muted").first).to_contain_text("policy Focus (8M a month)")
    expect(page.locator("[data-testid=history-row]", has_text="Adjustment")).to_contain_text(
        "Policy Focus applied immediately")

    # Today's bar (in the organization's time zone) carries the settled usage (the tooltip says so,
    # exactly); the bars add up to what the period used.
    zone = ZoneInfo("Europe/Berlin")
    today = timezone.now().astimezone(zone).date()
    today_begins = datetime.combine(today, datetime.min.time(), tzinfo=zone)
    with unscoped():
        used_today = sum(account.entries.filter(created_at__gte=today_begins).values_list("used_delta", flat=True))
        used_in_period = sum(account.entries.filter(period_start=account.period_start).values_list("used_delta", flat=True))
    assert used_today >= USED
    chart = page.locator("[data-testid=usage-chart] svg")
    expect(chart).to_be_visible()
    tips = chart.locator("g.bar title").all_text_contents()
    assert f"{today:%a %b} {today.day}: {used_today:,} tokens used" in tips, tips
    assert sum(int(re.search(r": ([\d,]+) tokens used", tip).group(1).replace(",", "")) for tip in tips
               if "tokens used" in tip) == used_in_period
    expect(page.locator("[data-testid=used] .tokens")).to_have_attribute("title", f"{used_in_period:,} tokens")

    by_model = page.locator(".card", has=page.get_by_role("heading", name="By model"))
    sonnet = by_model.locator("tbody tr", has_text="claude-sonnet")
    expect(sonnet).to_have_count(1)
    expect(sonnet.locator(".tokens")).to_have_attribute("title", f"{demo_sonnet + USED:,} tokens")

    # -- 4. A screenshot for a human look at the layout.
    screenshot(page, "allowance-dashboard")
