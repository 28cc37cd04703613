"""Usage alerts: a member who passes 80% and then 100% of the tokens granted into their open period
gets one alert per threshold per period, on their dashboard and by email (sent after commit).

The conftest's org A employee has 5,000 tokens granted in the current period (a bonus; the team
policy only starts next period) and a 1,000-token hold, so 4,000 used is exactly 80% and 5,000
exactly 100%. Usage is booked through the ledger (authorize, then settle), as the gateway does.
"""

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.urls import reverse

from allowances import closing, ledger, selectors
from allowances import services as allowance_services
from allowances.alerts import send_usage_alerts
from allowances.models import Account, LedgerEntry, UsageAlert
from allowances.periods import next_period_start, period_bounds
from portal import services as portal_services
from portal.tenancy import scope, unscoped
from tests.factories import MemberFactory, UserFactory

pytestmark = pytest.mark.django_db

_NOTICE = re.compile(r'<p class="notice" data-testid="usage-alert">(.*?)</p>', re.S)
_TOKENS = re.compile(r'title="([\d,]+) tokens"')


# -- helpers ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def run(django_capture_on_commit_callbacks):
    """send_usage_alerts() with its after-commit emails delivered, as in production."""

    def _run(**kwargs) -> int:
        with django_capture_on_commit_callbacks(execute=True):
            return send_usage_alerts(**kwargs)

    return _run


def use(account: Account, tokens: int, key: str) -> None:
    """A request through the gateway: hold the tokens, then settle exactly that usage."""
    with scope(account.organization):
        hold = ledger.authorize(account=account, tokens=tokens, idempotency_key=key)
        ledger.settle(hold=hold, used_tokens=tokens)


def alerts(account=None, organization=None) -> list[tuple]:
    with unscoped():
        rows = UsageAlert.all_objects.all()
        if account is not None:
            rows = rows.filter(account=account)
        if organization is not None:
            rows = rows.filter(organization=organization)
        return sorted(rows.values_list("account_id", "period_start", "threshold", "used", "allowance"))


def fresh(account: Account) -> Account:
    with unscoped():
        return Account.all_objects.select_related("organization", "member").get(pk=account.pk)


def notices(response) -> list[str]:
    assert response.status_code == 200
    return _NOTICE.findall(response.content.decode())


def dashboard_url(org) -> str:
    return reverse("dashboard", kwargs={"org_slug": org.slug})


# -- thresholds ------------------------------------------------------------------------------------------------------


def test_below_80_percent_nothing_is_created_or_sent(org_a, run, mailoutbox):
    use(org_a.account, 3_999, "almost")  # 79.98% of 5,000

    assert run() == 0
    assert alerts() == []
    assert mailoutbox == []


def test_crossing_80_then_100_percent_alerts_once_per_threshold(org_a, run, mailoutbox):
    account = org_a.account
    period = account.period_start
    employee = org_a.members["employee"]

    use(account, 4_000, "first")  # exactly 80%
    assert run() == 1
    assert alerts() == [(account.pk, period, 80, 4_000, 5_000)]
    with unscoped():
        assert UsageAlert.all_objects.get().organization_id == org_a.organization.pk
    (mail,) = mailoutbox
    assert mail.to == [employee.user.email]
    assert mail.subject == f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}You have used 80% of your token allowance"
    assert "4,000 of 5,000 tokens" in mail.body
    assert org_a.organization.name in mail.body
    assert f"{period:%B %Y}" in mail.body
    assert f"http://{settings.HOST_PORT}" + dashboard_url(org_a) in mail.body

    # Just under 100% is still only the 80% alert (released the fixture's hold, so the hold fits).
    with scope(org_a.organization):
        ledger.settle(hold=org_a.hold, used_tokens=999)  # 4,999 used
    assert run() == 0
    assert len(mailoutbox) == 1

    use(account, 1, "last-token")  # 5,000: exactly 100%
    assert run() == 1
    assert alerts() == [(account.pk, period, 80, 4_000, 5_000), (account.pk, period, 100, 5_000, 5_000)]
    assert len(mailoutbox) == 2, "the 80% email must not be repeated"
    second = mailoutbox[1]
    assert second.to == [employee.user.email]
    assert second.subject == f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}You have used all of your token allowance"
    assert "5,000 of 5,000 tokens" in second.body

    # The beat job runs every few minutes: a rerun finds both alerts there and sends nothing.
    assert run() == 0
    assert run() == 0
    assert len(alerts()) == 2
    assert len(mailoutbox) == 2


def test_emails_go_out_only_when_the_transaction_commits(org_a, django_capture_on_commit_callbacks, mailoutbox):
    with scope(org_a.organization):
        ledger.release(hold=org_a.hold)
    use(org_a.account, 4_500, "ninety-percent")
    with django_capture_on_commit_callbacks() as callbacks:
        assert send_usage_alerts() == 1
        assert mailoutbox == [], "the email must wait for the commit of the alert"
    assert len(callbacks) == 1
    callbacks[0]()
    (mail,) = mailoutbox
    assert "4,500 of 5,000 tokens" in mail.body


def test_usage_past_100_percent_at_once_records_both_thresholds(org_a, run, mailoutbox):
    with scope(org_a.organization):
        # Usage reported by the organization's own gateway is a fact, even beyond the allowance.
        ledger.post(account=org_a.account, kind=ledger.Kind.USAGE, tokens=6_000, used_delta=6_000,
                    idempotency_key="ingest:beyond")
    assert run() == 2
    assert [row[2:] for row in alerts()] == [(80, 6_000, 5_000), (100, 6_000, 5_000)]
    (mail,) = mailoutbox  # one email, for the highest threshold, with the share really used
    assert mail.subject.endswith("You have used all of your token allowance")
    assert "6,000 of 5,000 tokens (120%)" in mail.body
    assert run() == 0


def test_the_email_states_the_share_really_used_not_the_threshold(org_a, run, mailoutbox, login):
    with scope(org_a.organization):
        ledger.settle(hold=org_a.hold, used_tokens=999)
    use(org_a.account, 4_000, "jump")  # 4,999 of 5,000 in one step: past 80%, not yet 100%
    assert run() == 1
    assert [row[2:] for row in alerts()] == [(80, 4_999, 5_000)]
    (mail,) = mailoutbox
    assert mail.subject.endswith("You have used 99.98% of your token allowance")
    assert "4,999 of 5,000 tokens (99.98%)" in mail.body and "80%" not in mail.body
    (notice,) = notices(login(org_a.members["employee"]).get(dashboard_url(org_a)))
    assert "You have used 99.98% of your allowance" in notice


def test_a_new_period_alerts_again(org_a, run, mailoutbox):
    account = org_a.account
    old_period = account.period_start
    use(account, 4_000, "old-period")
    assert run() == 1

    # The month ends: the close opens the next period, with the team policy's 1,000,000 tokens.
    new_period = next_period_start(old_period)
    closing.close_due_periods(at=period_bounds(org_a.organization, new_period)[0] + timedelta(hours=2))
    account = fresh(account)
    assert account.period_start == new_period
    with scope(org_a.organization):  # the close entry of the old period opened it with the grant
        assert selectors.granted_in_period(account=account, period=new_period) == 1_000_000
    with unscoped():
        assert not LedgerEntry.all_objects.filter(account=account, period_start=new_period).exists()

    # Nothing used yet in the new period: last period's 80% does not carry over, nor shows.
    assert run() == 0
    with scope(org_a.organization):
        assert selectors.dashboard(account=account, at=period_bounds(org_a.organization, new_period)[0]
                                   + timedelta(days=2)).alerts == []
    use(account, 799_999, "new-period-a")
    assert run() == 0
    use(account, 1, "new-period-b")  # 800,000 of the new period's 1,000,000
    assert run() == 1
    assert alerts() == [(account.pk, old_period, 80, 4_000, 5_000), (account.pk, new_period, 80, 800_000, 1_000_000)]
    assert len(mailoutbox) == 2
    assert "800,000 of 1,000,000 tokens" in mailoutbox[1].body
    assert f"{new_period:%B %Y}" in mailoutbox[1].body
    assert run() == 0


# -- who is alerted --------------------------------------------------------------------------------------------------


def test_inactive_members_are_skipped(org_a, run, mailoutbox):
    employee = org_a.members["employee"]
    use(org_a.account, 4_000, "eighty")
    with scope(org_a.organization):
        portal_services.member_update(member=employee, actor_member=org_a.members["owner"], team=employee.team,
                                      is_active=False)
    assert run() == 0
    assert alerts() == []
    assert mailoutbox == []

    with scope(org_a.organization):
        portal_services.member_update(member=employee, actor_member=org_a.members["owner"], team=employee.team,
                                      is_active=True)
    assert run() == 1
    assert [mail.to for mail in mailoutbox] == [[employee.user.email]]


def test_accounts_with_no_allowance_are_skipped(org_a, run, mailoutbox):
    organization = org_a.organization
    # A member with no policy in force and no grant: an account with nothing granted in the period.
    newcomer = MemberFactory(organization=organization, team=None, user=UserFactory(email="newcomer-member@a.example"))
    with scope(organization):
        empty = allowance_services.account_open(member=newcomer)
        assert empty.granted == 0
        # Usage is recorded whatever it costs (e.g. reported by the ingest API).
        ledger.post(account=empty, kind=LedgerEntry.Kind.USAGE, tokens=50, used_delta=50, idempotency_key="ingest-1")
    use(org_a.account, 4_000, "eighty")  # the job does run: the employee is alerted

    assert run() == 1
    assert alerts(account=empty) == []
    assert [mail.to for mail in mailoutbox] == [[org_a.members["employee"].user.email]]


def test_other_organizations_are_not_affected(org_a, org_b, run, mailoutbox, login):
    use(org_a.account, 4_000, "a-eighty")
    use(org_b.account, 100, "b-little")

    assert run() == 1
    assert alerts(organization=org_b.organization) == []
    assert [mail.to for mail in mailoutbox] == [[org_a.members["employee"].user.email]]
    assert org_b.organization.name not in mailoutbox[0].body
    assert notices(login(org_b.members["employee"]).get(dashboard_url(org_b))) == []

    # Org B's own employee crossing 80% is alerted in org B, with org B's page.
    use(org_b.account, 3_900, "b-eighty")
    assert run() == 1
    assert alerts(organization=org_b.organization) == [(org_b.account.pk, org_b.account.period_start, 80, 4_000, 5_000)]
    assert len(alerts(organization=org_a.organization)) == 1
    mail = mailoutbox[1]
    assert mail.to == [org_b.members["employee"].user.email]
    assert org_b.organization.name in mail.body
    assert f"http://{settings.HOST_PORT}" + dashboard_url(org_b) in mail.body
    assert notices(login(org_a.members["employee"]).get(dashboard_url(org_a)))  # still A's own notice


# -- dashboard -------------------------------------------------------------------------------------------------------


def test_dashboard_shows_the_highest_alert_of_the_period(org_a, run, login):
    employee = org_a.members["employee"]
    client = login(employee)
    assert notices(client.get(dashboard_url(org_a))) == []

    use(org_a.account, 4_000, "eighty")
    run()
    (notice,) = notices(client.get(dashboard_url(org_a)))
    assert "You have used 80% of your allowance for this period" in notice
    assert _TOKENS.findall(notice) == ["4,000", "5,000"]

    with scope(org_a.organization):
        ledger.settle(hold=org_a.hold, used_tokens=1_000)
    run()
    (notice,) = notices(client.get(dashboard_url(org_a)))  # only the highest threshold is shown
    assert "You have used all of your allowance for this period" in notice
    assert "80%" not in notice
    assert _TOKENS.findall(notice) == ["5,000", "5,000"]

    # The notice is the member's own: HR's dashboard in the same organization has none.
    assert notices(login(org_a.members["hr"]).get(dashboard_url(org_a))) == []


# -- the job ---------------------------------------------------------------------------------------------------------


def test_task_runs_eagerly_and_is_scheduled(org_a, mailoutbox, django_capture_on_commit_callbacks):
    from allowances.tasks import send_usage_alerts as task
    from portal.celery import app

    use(org_a.account, 4_000, "eighty")
    with django_capture_on_commit_callbacks(execute=True):
        result = task.delay()
    assert result.get() == 1
    assert len(alerts()) == 1
    assert len(mailoutbox) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert task.delay().get() == 0
    assert len(mailoutbox) == 1

    schedule = settings.CELERY_BEAT_SCHEDULE["usage-alerts"]
    assert schedule["task"] == task.name == "allowances.send_usage_alerts"
    assert schedule["task"] in app.tasks
