"""Telling people: the requester's email when a decision is made, each approver's email for a new
request in their queue, and the daily digest of what is still pending (Celery beat), once a day
per approver whatever reruns, also through a real worker process."""

import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from celery.result import allow_join_result
from django.conf import settings
from django.utils import timezone

from overage import notifications, services
from overage.models import ApproverDigest
from portal.tenancy import scope, unscoped
from tests.overage.conftest import AUTO_TOKENS, ask, build_overage_org, decide
from tests.support.celery_worker import WorkerPool, purge, sender_app, terminate_database_backends



def local(ovr, *args) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(ovr.organization.time_zone))


def digests() -> list[tuple]:
    with unscoped():
        return sorted(ApproverDigest.all_objects.values_list("member__user__email", "day", "pending"))


@pytest.mark.django_db
def test_the_decision_email_says_what_was_decided_by_whom_with_the_note(ovr, mailoutbox,
                                                                        django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        decide(ask(ovr.alice, 250_000, reason="Evaluation runs"), ovr.approver, tokens=100_000, note="Start here")
    [email] = [m for m in mailoutbox if m.to == ["alice@ovr.example"]]
    assert email.subject == f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Your request for 250,000 tokens was approved in part"
    assert "100,000 tokens were added to your allowance (of the 250,000 you asked for)" in email.body
    assert "Decided by Test " in email.body and "Note: Start here" in email.body
    assert f"http://{settings.HOST_PORT}/o/ovr/overage/" in email.body  # sent outside any request
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        decide(ask(ovr.alice, 5_000), ovr.approver, "reject")
    assert mailoutbox[-1].subject.endswith("was rejected") and "no tokens were added" in mailoutbox[-1].body


@pytest.mark.django_db
def test_the_digest_goes_to_each_approver_once_a_day_from_their_morning_with_their_queue(ovr, mailoutbox):
    engineering, research = ask(ovr.alice, 10_000), ask(ovr.carol, AUTO_TOKENS + 1)
    day = timezone.localdate() + timedelta(days=1)
    assert notifications.pending_digests_sent(at=local(ovr, day.year, day.month, day.day, 7, 59)) == 0
    morning = local(ovr, day.year, day.month, day.day, 8, 0)
    assert notifications.pending_digests_sent(at=morning) == 2
    assert digests() == [("approver@ovr.example", day, 2), ("eng-approver@ovr.example", day, 1)]
    by_recipient = {message.to[0]: message for message in mailoutbox}
    assert set(by_recipient) == {"approver@ovr.example", "eng-approver@ovr.example"}
    assert f"#{engineering.pk}" in by_recipient["eng-approver@ovr.example"].body
    assert f"#{research.pk}" not in by_recipient["eng-approver@ovr.example"].body  # not their team
    assert "2 overage requests waiting for you" in by_recipient["approver@ovr.example"].subject
    # Later the same day, or a second run at once: nothing more.
    assert notifications.pending_digests_sent(at=morning + timedelta(hours=5)) == 0
    assert len(mailoutbox) == 2
    # The next morning, with only Research's request left, only the approver who may decide it.
    decide(engineering, ovr.approver)
    assert notifications.pending_digests_sent(at=morning + timedelta(days=1)) == 1
    assert mailoutbox[-1].to == ["approver@ovr.example"]


@pytest.mark.django_db
def test_without_approvers_the_admins_and_owners_are_told(ovr, mailoutbox, django_capture_on_commit_callbacks):
    with scope(ovr.organization):
        for member in (ovr.approver, ovr.eng_approver):
            member.is_approver = False
            member.save()
        with django_capture_on_commit_callbacks(execute=True):
            ask(ovr.alice, 10_000)
    assert sorted(message.to[0] for message in mailoutbox) == ["admin@ovr.example", "owner@ovr.example"]


@pytest.mark.django_db
def test_the_beat_schedule_runs_the_digest_hourly():
    assert settings.CELERY_BEAT_SCHEDULE["overage-digests"]["task"] == "overage.send_pending_digests"


# -- through a real Celery worker -------------------------------------------------------------------------------


@pytest.fixture
def broker():
    app = sender_app()
    yield app
    app.close()


@pytest.fixture
def workers(transactional_db, broker, tmp_path):
    pool = WorkerPool(broker, tmp_path)
    yield pool
    pool.stop_all()
    terminate_database_backends()


def a_zone_past_its_morning() -> str:
    """A zone where it is between 08:00 and 23:00 now, so the worker's digest run is due there."""
    now = timezone.now()
    for offset in range(-12, 15):
        zone = f"Etc/GMT{'+' if offset <= 0 else '-'}{abs(offset)}"  # POSIX signs are reversed
        if 8 <= now.astimezone(ZoneInfo(zone)).hour < 23:
            return zone
    raise AssertionError("no zone is past 08:00")


@pytest.mark.services
def test_a_real_worker_sends_the_digest_once_and_the_decision_email(workers, broker):
    ovr = build_overage_org(slug="worker", time_zone=a_zone_past_its_morning())
    overage_request = ask(ovr.alice, 10_000)
    queue = f"overage-test-{uuid.uuid4().hex[:10]}"
    purge(broker, queue)
    worker = workers.start(queue)
    try:
        for _run in range(2):  # the second run finds today's digests sent
            result = broker.send_task("overage.send_pending_digests", queue=queue)
            with allow_join_result():  # see tests/allowances/test_close_worker.py result_of
                assert result.get(timeout=120) in (2, 0), workers.describe()
        assert [email for email, _day, _pending in digests()] == ["approver@worker.example",
                                                                  "eng-approver@worker.example"]
        decide(overage_request, ovr.approver)
        assert broker.send_task("overage.notify_decision", args=[overage_request.pk], queue=queue).get(
            timeout=120) == 1, workers.describe()
        # The worker prints its mail (the console backend): the digest and the decision, once each.
        log = worker.log_tail(50_000)
        assert log.count("1 overage request waiting for you") == 2, log
        assert log.count("Your request for 10,000 tokens was approved") == 1, log  # the header folds after it
    finally:
        purge(broker, queue)


@pytest.mark.django_db
def test_a_request_no_approver_may_decide_goes_to_the_admins_and_owners(ovr, mailoutbox,
                                                                        django_capture_on_commit_callbacks):
    """Both approvers approve for Engineering only; a Research request is the admins' to decide."""
    with scope(ovr.organization):
        services.approver_teams_set(organization=ovr.organization, actor=ovr.admin.user, approver=ovr.approver,
                                    teams=[ovr.engineering])
        with django_capture_on_commit_callbacks(execute=True):
            research = ask(ovr.carol, AUTO_TOKENS + 1)
    assert research.is_pending
    assert sorted(message.to[0] for message in mailoutbox) == ["admin@ovr.example", "owner@ovr.example"]
    mailoutbox.clear()
    day = timezone.localdate() + timedelta(days=1)
    assert notifications.pending_digests_sent(at=local(ovr, day.year, day.month, day.day, 9, 0)) == 2
    assert sorted((message.to[0], f"#{research.pk}" in message.body) for message in mailoutbox) == [
        ("admin@ovr.example", True), ("owner@ovr.example", True)]
