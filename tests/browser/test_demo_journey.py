"""The foundation's 'done when': the demo HR user logs in and sees the organization's members."""

from django.core.management import call_command

from portal.demo import DEMO_PASSWORD


def test_demo_hr_logs_in_and_sees_members(portal_server, page, log_in):
    call_command("seed_demo", stdout=open("/dev/null", "w"))
    log_in("hr@acme.example", DEMO_PASSWORD)
    assert page.url.endswith("/o/acme/")
    page.click("text=Members")
    page.wait_for_selector("[data-testid=member-row]")
    rows = page.locator("[data-testid=member-row]")
    assert rows.count() == 6
    assert "alice@acme.example" in page.content()
    assert "dave@globex.example" not in page.content()

    # The htmx search narrows the list without a page load.
    page.fill("#q", "bob")
    page.wait_for_function("document.querySelectorAll('[data-testid=member-row]').length === 1")
    assert "bob@acme.example" in rows.first.inner_text()
