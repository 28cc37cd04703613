"""API key expiry reminders: the owner of a key that expires within 7 days gets one email for it,
and only for a key that can still be used (not revoked, not replaced by a rotation, owner active).
`ApiKey.expiry_reminded_at` claims the key, so reruns and concurrent runs never email twice."""

from datetime import timedelta
from datetime import timezone as dt_timezone

import django.core.mail
import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from apikeys import services
from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, ApiKey
from portal import services as portal_services
from portal.tenancy import scope, unscoped

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


def create(member, name: str, expires_at, actor=None):
    with scope(member.organization):
        key, _secret = services.api_key_create(member=member, actor=actor or member.user, name=name,
                                               expires_at=expires_at,
                                               endpoints=[e for e in ENDPOINTS if e not in ENDPOINT_ROLES])
    return key


def set_expiry(key: ApiKey, expires_at) -> None:
    with unscoped():
        ApiKey.all_objects.filter(pk=key.pk).update(expires_at=expires_at)


def reminded() -> dict:
    """{key name: expiry_reminded_at} of the keys that were claimed."""
    with unscoped():
        return dict(ApiKey.all_objects.exclude(expiry_reminded_at=None).values_list("name", "expiry_reminded_at"))


def reminder_for(mailoutbox, key: ApiKey):
    matching = [mail for mail in mailoutbox if f"“{key.name}”" in mail.subject]
    assert len(matching) == 1, f"{len(matching)} reminders for {key.name}"
    return matching[0]


def test_one_reminder_per_key_expiring_within_7_days(org_a, org_b, mailoutbox):
    at = timezone.now()
    employee, approver = org_a.members["employee"], org_a.members["approver"]
    soon = create(employee, "soon", at + 3 * DAY, actor=org_a.members["admin"].user)  # the owner is emailed
    edge = create(employee, "edge", at + 7 * DAY)  # exactly a week ahead: within
    create(employee, "later", at + 7 * DAY + timedelta(minutes=1))
    expired = create(employee, "expired", at + 3 * DAY)
    set_expiry(expired, at - timedelta(hours=1))
    expiring_now = create(employee, "expiring now", at + 3 * DAY)
    set_expiry(expiring_now, at)  # stops working at this very moment: too late to remind
    revoked = create(employee, "revoked", at + 2 * DAY)
    rotated = create(employee, "rotated", at + 2 * DAY)
    create(approver, "owner leaves", at + 2 * DAY)
    other_org = create(org_b.members["employee"], "other org", at + 5 * DAY)
    with scope(org_a.organization):
        services.api_key_revoke(key=revoked, actor=employee.user)
        successor, _secret = services.api_key_rotate(key=rotated, actor=employee.user)  # keeps the expiry
        portal_services.member_update(member=approver, actor_member=org_a.members["owner"], team=approver.team,
                                      is_active=False)
    assert successor.name == "rotated" and successor.expires_at == rotated.expires_at

    assert services.send_expiry_reminders(at=at) == 4
    # The rotated key's successor is the one in use: it is reminded, the replaced key is not.
    with unscoped():
        assert dict(ApiKey.all_objects.exclude(expiry_reminded_at=None).values_list("pk", "expiry_reminded_at")) == {
            soon.pk: at, edge.pk: at, successor.pk: at, other_org.pk: at}
    assert len(mailoutbox) == 4

    mail = reminder_for(mailoutbox, soon)
    assert mail.to == [employee.user.email]
    assert mail.subject == f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Your API key “soon” expires soon"
    assert f"{soon.display_prefix}…{soon.last_four}" in mail.body
    assert org_a.organization.name in mail.body
    assert f"{soon.expires_at.astimezone(dt_timezone.utc):%Y-%m-%d %H:%M} UTC" in mail.body
    assert f"http://{settings.HOST_PORT}" + reverse("key_list", kwargs={"org_slug": org_a.slug}) in mail.body

    assert f"{successor.display_prefix}…{successor.last_four}" in reminder_for(mailoutbox, successor).body
    assert f"…{rotated.last_four}" not in reminder_for(mailoutbox, successor).body

    mail = reminder_for(mailoutbox, other_org)
    assert mail.to == [org_b.members["employee"].user.email]
    assert org_b.organization.name in mail.body
    assert reverse("key_list", kwargs={"org_slug": org_b.slug}) in mail.body

    # The hourly rerun sends nothing more.
    assert services.send_expiry_reminders(at=at) == 0
    assert services.send_expiry_reminders(at=at + timedelta(seconds=30)) == 0
    assert len(mailoutbox) == 4


def test_a_key_is_reminded_once_it_comes_within_the_week(org_a, mailoutbox):
    at = timezone.now()
    key = create(org_a.members["employee"], "monthly", at + 10 * DAY)

    assert services.send_expiry_reminders(at=at) == 0
    assert services.send_expiry_reminders(at=at + 3 * DAY - timedelta(minutes=1)) == 0
    assert reminded() == {}
    assert services.send_expiry_reminders(at=at + 3 * DAY) == 1
    assert reminded() == {"monthly": at + 3 * DAY}
    assert services.send_expiry_reminders(at=at + 4 * DAY) == 0
    assert services.send_expiry_reminders(at=at + 9 * DAY) == 0
    assert [mail.to for mail in mailoutbox] == [[org_a.members["employee"].user.email]]
    assert "monthly" in mailoutbox[0].subject and key.last_four in mailoutbox[0].body


def test_keys_without_expiry_are_never_reminded(org_a, mailoutbox):
    assert org_a.api_key.expires_at is None
    assert services.send_expiry_reminders(at=timezone.now() + 365 * DAY) == 0
    assert mailoutbox == []


def test_two_runs_in_a_row_send_one_email(org_a, mailoutbox):
    at = timezone.now()
    create(org_a.members["employee"], "soon", at + 2 * DAY)
    assert [services.send_expiry_reminders(at=at), services.send_expiry_reminders(at=at)] == [1, 0]
    assert len(mailoutbox) == 1


def test_a_concurrent_run_never_emails_a_key_twice(org_a, org_b, mailoutbox, monkeypatch):
    """Two runs overlap: the second starts while the first is sending its first email, after the
    first listed the due keys. Each key is claimed by exactly one of them, so each is emailed once."""
    at = timezone.now()
    keys = [create(org_a.members["employee"], "first", at + 2 * DAY),
            create(org_b.members["employee"], "second", at + 3 * DAY),
            create(org_a.members["employee"], "third", at + 4 * DAY)]
    real_send_mail = django.core.mail.send_mail
    overlapping = []

    def send_mail_while_another_run_starts(*args, **kwargs):
        result = real_send_mail(*args, **kwargs)
        if not overlapping:
            overlapping.append("started")
            overlapping.append(services.send_expiry_reminders(at=at))
        return result

    monkeypatch.setattr(django.core.mail, "send_mail", send_mail_while_another_run_starts)
    first_run = services.send_expiry_reminders(at=at)

    assert overlapping == ["started", 2]
    assert first_run == 1
    assert sorted(mail.subject for mail in mailoutbox) == sorted(
        f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Your API key “{key.name}” expires soon" for key in keys)
    assert set(reminded()) == {"first", "second", "third"}


def test_task_runs_eagerly_and_is_scheduled(org_a, mailoutbox):
    from apikeys.tasks import send_expiry_reminders as task
    from portal.celery import app

    create(org_a.members["employee"], "soon", timezone.now() + 2 * DAY)
    assert task.delay().get() == 1
    assert task.delay().get() == 0
    assert len(mailoutbox) == 1

    schedule = settings.CELERY_BEAT_SCHEDULE["key-expiry-reminders"]
    assert schedule["task"] == task.name == "apikeys.send_expiry_reminders"
    assert schedule["task"] in app.tasks


def test_a_reminder_that_could_not_be_sent_is_tried_again_next_run(org_a, org_b, mailoutbox, monkeypatch):
    """A failing mail server for one owner neither loses that reminder nor stops the others."""
    at = timezone.now()
    create(org_a.members["employee"], "bounces", at + 2 * DAY)
    create(org_b.members["employee"], "fine", at + 3 * DAY)
    real_send_mail = django.core.mail.send_mail

    def send_mail_failing_once(*args, **kwargs):
        if "“bounces”" in kwargs["subject"] and not failed:
            failed.append(True)
            raise ConnectionRefusedError("mail server down")
        return real_send_mail(*args, **kwargs)

    failed = []
    monkeypatch.setattr(django.core.mail, "send_mail", send_mail_failing_once)
    assert services.send_expiry_reminders(at=at) == 1
    assert [mail.subject for mail in mailoutbox] == [
        f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Your API key “fine” expires soon"]
    assert set(reminded()) == {"fine"}

    assert services.send_expiry_reminders(at=at + timedelta(hours=1)) == 1
    assert len(mailoutbox) == 2
    assert set(reminded()) == {"fine", "bounces"}
