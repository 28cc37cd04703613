"""The dashboards as people see them in Chromium, on the demo's data: the employee's gauge, charts
and low-balance banner; HR's and the admins' overview with its team and model breakdowns and
balances; and every page of every role's navigation on a phone, without horizontal scrolling.
Screenshots of the main pages go to the test artifacts folder (see conftest)."""

import csv
import io
import re

import pytest
from django.core.management import call_command
from playwright.sync_api import expect

from portal.demo import DEMO_PASSWORD

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
LOW_EMPLOYEE = "bob@acme.example"  # the demo's employee near the limit (allowances.demo.DEMO_USAGE)
ROLES = {"employee": "alice@acme.example", "approver": "approver@acme.example", "hr": "hr@acme.example",
         "owner": "owner@acme.example"}


@pytest.fixture
def demo(portal_server):
    call_command("seed_demo", stdout=open("/dev/null", "w"))
    return portal_server


@pytest.fixture
def signed_in(browser, demo):
    """signed_in(email, viewport): a new browser context logged in through the login form."""
    contexts = []

    def _signed_in(email, viewport=DESKTOP):
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{demo.url}/accounts/login/")
        page.fill("input[name=login]", email)
        page.fill("input[name=password]", DEMO_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r"/o/acme/$"))
        return page

    yield _signed_in
    for context in contexts:
        context.close()


def chart_dates(chart) -> list[str]:
    return [text for text in chart.locator(".axis.x text").all_text_contents() if re.fullmatch(r"[A-Z][a-z]{2} \d+", text)]


def test_the_employee_sees_the_gauge_the_charts_and_the_low_balance_banner(signed_in, screenshot):
    page = signed_in(LOW_EMPLOYEE)
    gauge = page.get_by_test_id("gauge")
    expect(gauge).to_have_attribute("data-level", "low")
    expect(gauge.locator(".gauge")).to_have_attribute("aria-label", re.compile(r"^Used [\d,]+, held [\d,]+, left [\d,]+ of [\d,]+ tokens"))
    used_width = gauge.locator(".gauge > .gauge-used").evaluate("e => e.getBoundingClientRect().width")
    whole = gauge.locator(".gauge").evaluate("e => e.getBoundingClientRect().width")
    assert 0.7 * whole < used_width < whole  # most of it used: the bar says so at a glance

    banner = page.get_by_role("alert").filter(has_text="Your allowance is running low")
    expect(banner).to_be_visible()
    expect(banner.get_by_test_id("request-more")).to_have_attribute("href", "/o/acme/overage/new/")

    chart = page.get_by_test_id("usage-chart").locator("svg")
    expect(chart).to_be_visible()
    expect(chart).to_have_attribute("role", "img")
    expect(chart.locator(".axis.y text").first).to_be_visible()  # a y axis with token amounts
    assert chart_dates(chart), "no dates on the x axis"
    marks = chart.locator("text.mark").all_text_contents()  # today, or the run-out day when it is today
    assert marks and set(marks) <= {"today", "runs out"}, marks
    tips = chart.locator("g.bar title").all_text_contents()
    assert any(re.fullmatch(r"\w{3} \w{3} \d+: [\d,]+ tokens used", tip) for tip in tips), tips
    if page.get_by_test_id("run-out").inner_text().startswith("At this pace you run out on"):
        expect(chart.locator("text.mark", has_text="runs out")).to_have_count(1)
    expect(page.get_by_test_id("model-chart").locator("svg")).to_be_visible()
    expect(page.locator("[data-testid=history-row] .amount-minus").first).to_be_visible()  # usage, signed
    screenshot(page, "employee-dashboard-low-balance")


def test_hr_sees_the_overview_by_team_and_model_and_drills_down_from_the_balances(signed_in, screenshot):
    page = signed_in(ROLES["hr"])
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Overview").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.get_by_test_id("org-gauge")).to_be_visible()
    teams = page.get_by_test_id("team-table").locator("tbody tr td:first-child").all_inner_texts()
    assert sorted(teams) == ["Engineering", "Research"]
    models = page.get_by_test_id("model-table").locator("tbody tr td:first-child").all_inner_texts()
    assert {"gpt-4o", "claude-sonnet"} <= set(models)
    for testid in ("team-chart", "org-model-chart", "time-chart"):
        chart = page.get_by_test_id(testid).locator("svg")
        expect(chart).to_be_visible()
    assert chart_dates(page.get_by_test_id("time-chart")), "the time chart has no dated axis"
    expect(page.get_by_test_id("team-chart").locator("title", has_text="Engineering: ")).to_have_count(1)
    expect(page.get_by_test_id("attention-row").filter(has_text=LOW_EMPLOYEE)).to_have_count(1)
    screenshot(page, "hr-overview")

    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Balances").click()
    page.get_by_label("Balance").select_option("low")
    page.get_by_role("button", name="Filter").click()
    rows = page.get_by_test_id("balance-row")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(LOW_EMPLOYEE)
    exported = page.request.get(page.url.split("?")[0] + page.get_by_test_id("balances-csv").get_attribute("href"))
    table = list(csv.reader(io.StringIO(exported.text())))
    assert [row[0] for row in table[1:]] == [LOW_EMPLOYEE] and table[1][-1] == "low"
    page.get_by_role("columnheader", name="Left").get_by_role("link").click()
    expect(page).to_have_url(re.compile(r"sort=left"))
    screenshot(page, "hr-balances-low")
    page.get_by_role("link", name=LOW_EMPLOYEE).click()
    expect(page.get_by_role("heading", name=LOW_EMPLOYEE)).to_be_visible()
    expect(page.get_by_test_id("gauge")).to_have_attribute("data-level", "low")
    expect(page.get_by_text("demo key")).to_be_visible()


def test_an_admin_sees_the_overview_and_a_styled_403_with_a_way_back(signed_in, demo, screenshot):
    page = signed_in(ROLES["owner"])
    page.goto(f"{demo.url}/o/acme/overview/")
    expect(page.get_by_test_id("team-chart").locator("svg")).to_be_visible()
    expect(page.get_by_test_id("org-model-chart").locator("svg")).to_be_visible()
    screenshot(page, "admin-overview")
    employee = signed_in(ROLES["employee"])
    response = employee.goto(f"{demo.url}/o/acme/overview/")
    assert response.status == 403
    expect(employee.get_by_test_id("error-page")).to_contain_text("not open to you")
    employee.get_by_role("link", name="Back to my allowance").click()
    expect(employee.get_by_test_id("gauge")).to_be_visible()
    missing = employee.goto(f"{demo.url}/o/acme/no-such-page/")
    assert missing.status == 404
    screenshot(employee, "not-found")


@pytest.mark.parametrize("role", list(ROLES))
def test_on_a_phone_no_page_of_the_navigation_scrolls_sideways(signed_in, demo, screenshot, role):
    page = signed_in(ROLES[role], viewport=PHONE)
    nav = page.get_by_role("navigation", name="Organization")
    expect(nav).to_be_hidden()  # collapsed behind the menu button
    page.get_by_test_id("menu-toggle").click()
    expect(nav).to_be_visible()
    screenshot(page, f"phone-{role}-menu")
    links = nav.locator("a").evaluate_all("links => links.map(a => [a.textContent.trim(), a.getAttribute('href')])")
    assert len(links) >= 3
    too_wide = {}
    for name, href in links:
        response = page.goto(f"{demo.url}{href}")
        assert response.status == 200, (name, href, response.status)
        width = page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")
        if width > PHONE["width"]:
            too_wide[name] = width
        if name in ("My allowance", "Overview", "Balances", "API keys", "Approvals"):
            screenshot(page, f"phone-{role}-{name}")
    assert too_wide == {}, f"pages wider than {PHONE['width']} px: {too_wide}"


def test_the_policy_form_shows_only_the_fields_of_the_rules_chosen(signed_in, demo):
    page = signed_in(ROLES["hr"])
    page.goto(f"{demo.url}/o/acme/policies/")
    form = page.locator("form.card").last
    cap, percent = form.get_by_label("Rollover cap (tokens)"), form.get_by_label("Rollover cap (% of the monthly amount)")
    lives, auto = form.get_by_label("Rolled-over tokens live for (periods)"), form.get_by_label(
        "Auto-approved overage per period (tokens)")
    form.get_by_label("Rollover rule").select_option("none")
    form.get_by_label("Overage rule").select_option("hard_stop")
    for field in (cap, percent, lives, auto):
        expect(field).to_be_hidden()
    form.get_by_label("Rollover rule").select_option("capped_tokens")
    expect(cap).to_be_visible()
    expect(lives).to_be_visible()
    expect(percent).to_be_hidden()
    form.get_by_label("Overage rule").select_option("auto_approve")
    expect(auto).to_be_visible()
    # A typed amount with separators, a field error under its field: the page keeps the fields in view.
    form.get_by_label("Name").fill("Interns")
    form.get_by_label("Monthly tokens").fill("1,000,000")
    cap.fill("lots")
    form.get_by_role("button").click()
    error = page.locator(".field", has=page.get_by_label("Rollover cap (tokens)")).locator(".errorlist")
    expect(error).to_be_visible()
    expect(page.get_by_label("Monthly tokens")).to_have_value("1,000,000")
