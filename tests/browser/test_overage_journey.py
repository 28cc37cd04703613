"""Issue 13's journey end to end in headless Chromium, on the demo, with the gateway served alongside.

Bob (Engineering, whose policy sends overage requests to an approver) works through the gateway
with his demo key until his allowance cannot cover the next request; the 429's link opens the
request form filled in with what that request was short of and its model; he asks for more. The
approver finds it in the queue with what a decision needs and approves part of it. Bob's next
call goes through, and what it used beyond his allowance comes out of the overage grant: his
dashboard and the ledger show it, it is billable, and the emails went out.
"""

import re
from io import StringIO
from urllib.parse import urlsplit

import openai
from django.core import mail
from django.core.management import call_command
from playwright.sync_api import expect

from allowances import ledger
from allowances.models import Account, LedgerEntry
from allowances.selectors import billable_overage
from overage.models import OverageRequest
from portal.demo import DEMO_PASSWORD
from portal.tenancy import scope, unscoped

BOB, APPROVER = "bob@acme.example", "approver@acme.example"
PROMPT = [{"role": "user", "content": "Summarise the migration plan for the documentation site, step by step."}]
SCREENSHOT = "/tmp/overage-queue.png"


def _account() -> Account:
    with unscoped():
        return Account.all_objects.select_related("organization", "member").get(
            member__user__email=BOB, organization__slug="acme")


def _field(page, label):
    return page.get_by_label(f"{label}:", exact=True)


def _log_out(page, email):
    page.locator("details.switcher summary", has_text=email).click()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("link", name="Log in")).to_be_visible()


def test_a_refused_employee_asks_an_approver_approves_part_and_the_next_call_uses_the_overage(
        portal_server, page, log_in):
    output = StringIO()
    call_command("seed_demo", stdout=output)
    secret = re.search(rf"^api key for {re.escape(BOB)}: (\S+)$", output.getvalue(), re.MULTILINE).group(1)
    page.set_default_timeout(10_000)
    gateway = openai.OpenAI(api_key=secret, base_url=f"{portal_server.url}/v1", max_retries=0)

    def call(prompt=PROMPT):
        return gateway.chat.completions.create(model="gpt-4o", messages=prompt, max_tokens=200)

    # -- 1. Bob works until his allowance cannot cover the next request (earlier in the month he
    # used all but 20,000 tokens of it).
    account = _account()
    with scope(account.organization):
        earlier = account.available - 20_000
        ledger.settle(hold=ledger.authorize(account=account, tokens=earlier, idempotency_key="earlier-this-month",
                                            model="gpt-4o-mini"), used_tokens=earlier)
    calls, message = 0, None
    while message is None:
        assert calls < 300, "the gateway never refused"
        try:
            call()
            calls += 1
        except openai.RateLimitError as refused:
            message = refused.message
    left = _account().available
    assert calls > 1 and 0 <= left < 20_000
    link = re.search(r"Request more at (\S+)", message).group(1)
    assert link.startswith(f"{portal_server.url}/o/acme/overage/new/?")  # the server's own port, not 8000
    requested = int(re.search(r"may use up to ([\d,]+) tokens", message).group(1).replace(",", ""))
    shortfall = requested - left

    # -- 2. He follows the link: the form is filled in with the shortfall and the model; he asks for more.
    log_in(BOB, DEMO_PASSWORD)
    parts = urlsplit(link)
    page.goto(f"{portal_server.url}{parts.path}?{parts.query}")
    expect(page.get_by_role("heading", name="Request more tokens")).to_be_visible()
    expect(_field(page, "Tokens")).to_have_value(str(shortfall))
    expect(_field(page, "Model (optional)")).to_have_value("gpt-4o")
    asked = 80_000
    _field(page, "Tokens").fill(str(asked))
    _field(page, "Reason").fill("Finishing the documentation migration")
    page.get_by_role("button", name="Send the request").click()
    expect(page.locator(".messages .success")).to_contain_text(f"Request for {asked:,} tokens sent to the approvers.")
    row = page.locator("[data-testid=overage-row]", has_text="Finishing the documentation migration")
    expect(row.locator("[data-testid=overage-state]")).to_have_text("Pending")
    with unscoped():
        overage_request = OverageRequest.all_objects.get(member__user__email=BOB, state="pending")
    assert (overage_request.tokens, overage_request.model) == (asked, "gpt-4o")
    assert any(message.to == [APPROVER] and f"{BOB} asks for {asked:,}" in message.subject for message in mail.outbox)
    _log_out(page, BOB)

    # -- 3. The approver sees it in the queue with its context and approves part, with a note.
    log_in(APPROVER, DEMO_PASSWORD)
    nav = page.get_by_role("navigation", name="Organization")
    expect(page.locator("[data-testid=approvals-count]")).to_have_text("3")  # the demo's two and Bob's
    nav.get_by_role("link", name="Approvals").click()
    item = page.locator("[data-testid=queue-item]", has_text=BOB)
    expect(item).to_have_count(1)
    expect(page.locator("[data-testid=queue-item]").last).to_contain_text(BOB)  # the newest, so the last
    expect(item.locator("[data-testid=ctx-allowance]")).to_contain_text("5M a month (Standard)")
    expect(item.locator("[data-testid=ctx-used]")).to_contain_text("used")
    expect(item.locator("[data-testid=ctx-models]")).to_contain_text("gpt-4o")
    expect(item.locator("[data-testid=ctx-cost]")).to_contain_text("EUR")
    expect(item.locator("[data-testid=ctx-previous]")).to_contain_text("1 rejected")  # the demo's
    page.screenshot(path=SCREENSHOT, full_page=True)
    item.get_by_role("link", name="Decide").click()
    approved = 40_000
    _field(page, "Approve only (tokens)").fill(str(approved))
    _field(page, "Note (optional)").fill("Half of it now")
    page.get_by_role("button", name="Approve").click()
    expect(page.locator(".messages .success")).to_contain_text(
        f"Request #{overage_request.pk} approved in part: {approved:,} tokens granted.")
    expect(page.locator("[data-testid=queue-item]", has_text=BOB)).to_have_count(0)
    _log_out(page, APPROVER)

    # -- 4. Bob's next call goes through, a longer one: what is left of his allowance covers only the
    # first part of it, the rest comes out of the overage grant.
    used_before = _account().used
    call([{"role": "user", "content": "Review this paragraph: " + " ".join(["docs"] * (left // 5 + 50))}])
    account = _account()
    used = account.used - used_before
    assert used > left
    assert account.available == left + approved - used
    with scope(account.organization):
        billed = billable_overage(organization=account.organization, period=account.period_start, member=account.member)
        entries = list(LedgerEntry.objects.filter(account=account).order_by("-id").values_list("kind", "tokens")[:3])
    assert [(row.model, row.tokens) for row in billed] == [("gpt-4o", used - left)]
    assert entries[0] == ("usage", used) and ("overage_grant", approved) in entries
    assert ledger.verify(organization_id=account.organization_id) == []

    # -- 5. The dashboard shows the decision and the overage, and the email reached him.
    log_in(BOB, DEMO_PASSWORD)
    expect(page.get_by_role("heading", name="My allowance")).to_be_visible()
    notice = page.locator("[data-testid=overage-notice]").first  # the newest; the demo's rejection below it
    expect(notice).to_contain_text(f"was approved in part: {approved // 1000}k tokens added by {APPROVER}")
    expect(notice).to_contain_text("Half of it now")
    expect(page.locator("[data-testid=overage-used] .tokens")).to_have_attribute("title", f"{used - left:,} tokens")
    expect(page.locator("[data-testid=available] .tokens")).to_have_attribute("title", f"{account.available:,} tokens")
    expect(page.locator("[data-testid=history-row]", has_text="Overage grant")).to_contain_text(
        f"Overage request #{overage_request.pk} approved in part")
    [decision_email] = [message for message in mail.outbox
                        if message.to == [BOB] and f"{asked:,} tokens was approved in part" in message.subject]
    assert f"{approved:,} tokens were added" in decision_email.body and "Half of it now" in decision_email.body
