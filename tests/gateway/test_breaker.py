"""The spend-velocity breaker, through the gateway against the sandbox, with its rates in the
Redis `make test` starts: a runaway loop from one key trips it within the configured window and
nothing more passes; a burst below the limit does not trip; the key's owner (after a password
check) or an admin resumes it; the organization-wide breaker pauses every non-exempt key; a
member's hour over their normal trips; no breaker state crosses organizations; with Redis away
the gateway keeps serving. The tests count requests and tokens, never time."""

import httpx
import pytest
from django.core import mail

from allowances import services as allowance_services
from apikeys import services as api_key_services
from apikeys.models import ApiKey
from gateway import services as gateway_services
from gateway.models import BreakerTrip, UsageRecord
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.apikeys.test_pages import reauthenticate
from tests.gateway.records import last_record_id, records_after
from tests.support import services

pytestmark = [pytest.mark.transactional, pytest.mark.services]

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Write a short note."}], "max_tokens": 20}


def send(url, key):
    return httpx.post(url + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def one_request_charges(url, key) -> int:
    """What one sandbox request of BODY charges (its reply is deterministic), measured with no limit set."""
    record_id = last_record_id()
    assert send(url, key).status_code == 200
    [record] = records_after(record_id)
    assert record.charged_tokens > 0
    return record.charged_tokens


def set_limits(org, **limits):
    with scope(org.organization):
        gateway_services.breaker_settings_save(organization=org.organization, actor=org.members["admin"].user,
                                               **limits)


def loop(url, key, times) -> list[httpx.Response]:
    """A runaway agent: the same request again and again, each after the last one's answer."""
    return [send(url, key) for _ in range(times)]


def new_key(org, role="employee", name="agent", **kwargs):
    member = org.members[role]
    with scope(org.organization):
        return api_key_services.api_key_create(member=member, actor=member.user, name=name, endpoints=["chat"],
                                               **kwargs)


def served(responses) -> int:
    """How many answers came before the first refusal; every answer after it must be a refusal too."""
    statuses = [r.status_code for r in responses]
    passed = statuses.index(429) if 429 in statuses else len(statuses)
    assert set(statuses[:passed]) == {200} and set(statuses[passed:]) <= {429}, statuses
    return passed


@pytest.fixture
def sandboxed(org_a, gateway_url):
    """Org A's sandbox model gpt-test through the gateway; the employee's balance topped up."""
    with scope(org_a.organization):
        allowance_services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user,
                                        tokens=1_000_000, reason="breaker tests", member=org_a.members["employee"])
    org_a.url = gateway_url
    org_a.charge = one_request_charges(gateway_url, org_a.api_key_secret)
    return org_a


def test_a_runaway_loop_trips_the_keys_breaker_within_its_limit_and_nothing_more_passes(sandboxed):
    org, charge = sandboxed, sandboxed.charge
    limit = 5 * charge + charge // 2
    set_limits(org, key_per_minute=limit)
    _key, secret = new_key(org)
    mail.outbox.clear()

    responses = loop(org.url, secret, 15)

    # The sixth answer takes the rate past the limit; a minute boundary crossed meanwhile weighs the
    # past window a little less, which can let one more through, never more.
    assert served(responses) in (6, 7)
    refused = responses[-1].json()["error"]
    assert refused["code"] == "breaker_tripped" and responses[-1].headers["x-should-retry"] == "false"
    assert "paused by the spend-velocity breaker" in refused["message"]
    assert f"over the limit of {limit:,} tokens" in refused["message"] and "in the last minute" in refused["message"]
    assert f"/o/{org.slug}/keys/" in refused["message"]  # how to resume
    with unscoped():
        key = ApiKey.objects.get(name="agent")
        trip = BreakerTrip.objects.get(api_key=key)
        assert key.paused_at is not None and key.paused_by == trip
        assert (trip.scope, trip.window, trip.limit) == ("key", "minute", limit) and trip.rate > limit
        assert AuditLogEntry.objects.filter(action="breaker.tripped", object_id=str(trip.pk)).count() == 1
        # Refused before anything was held: the refusals left no usage.
        assert UsageRecord.objects.filter(api_key=key).count() == served(responses)
    recipients = {address for message in mail.outbox for address in message.to}
    assert {"employee@a.example", "admin@a.example", "owner@a.example"} <= recipients
    assert len(mail.outbox) == 2  # once, to the key's owner and to the admins
    # The fixture key of the same member is not paused by a key's breaker.
    assert send(org.url, org.api_key_secret).status_code == 200


def test_a_normal_burst_below_the_limit_does_not_trip(sandboxed):
    org, charge = sandboxed, sandboxed.charge
    set_limits(org, key_per_minute=10 * charge + charge // 2, member_per_hour=30 * charge)
    _key, secret = new_key(org)
    assert served(loop(org.url, secret, 9)) == 9
    with unscoped():
        assert not BreakerTrip.objects.filter(resumed_at=None).exists()
        assert ApiKey.objects.get(name="agent").paused_at is None


def test_the_owner_resumes_their_key_after_a_password_check_and_it_starts_from_nothing(sandboxed, login):
    org, charge = sandboxed, sandboxed.charge
    set_limits(org, key_per_minute=3 * charge + charge // 2)
    key, secret = new_key(org)
    assert served(loop(org.url, secret, 6)) in (4, 5)

    client = login(org.members["employee"])
    asked = client.post(f"/o/{org.slug}/keys/{key.pk}/resume/")
    assert asked.status_code == 302 and asked["Location"].startswith("/accounts/reauthenticate/")
    assert send(org.url, secret).status_code == 429  # not resumed without the password
    assert 'data-testid="key-paused"' in client.get(f"/o/{org.slug}/keys/").content.decode()

    reauthenticate(client, org)
    assert client.post(f"/o/{org.slug}/keys/{key.pk}/resume/").status_code == 302
    # Resumed at once (the cached identity is dropped) and with its rate forgotten: as many
    # requests pass as the first time before it trips again.
    assert served(loop(org.url, secret, 6)) in (4, 5)
    with unscoped():
        trips = list(BreakerTrip.objects.filter(api_key=key).order_by("id"))
        assert [t.resumed_by for t in trips] == [org.members["employee"].user, None]
        assert AuditLogEntry.objects.filter(action="breaker.resumed").count() == 1


def test_a_member_cannot_resume_a_member_wide_pause_an_admin_can(sandboxed, login):
    org, charge = sandboxed, sandboxed.charge
    set_limits(org, member_per_minute=3 * charge + charge // 2)
    key, secret = new_key(org)
    assert served(loop(org.url, secret, 6)) in (4, 5)
    # Every key of the member is paused, the fixture key too.
    assert send(org.url, org.api_key_secret).json()["error"]["code"] == "breaker_tripped"
    assert "the member's keys together" in send(org.url, secret).json()["error"]["message"]

    client = reauthenticate(login(org.members["employee"]), org)
    client.post(f"/o/{org.slug}/keys/{key.pk}/resume/")
    assert send(org.url, secret).status_code == 429

    with unscoped():
        trip = BreakerTrip.objects.get(resumed_at=None)
    admin = login(org.members["admin"])
    assert f"/settings/breaker/{trip.pk}/resume/" in admin.get(f"/o/{org.slug}/settings/breaker/").content.decode()
    assert admin.post(f"/o/{org.slug}/settings/breaker/{trip.pk}/resume/").status_code == 302
    assert send(org.url, secret).status_code == 200 and send(org.url, org.api_key_secret).status_code == 200
    assert admin.post(f"/o/{org.slug}/settings/breaker/{trip.pk}/resume/").status_code == 302  # a second time: nothing
    with unscoped():
        assert AuditLogEntry.objects.filter(action="breaker.resumed").count() == 1


def test_the_organization_breaker_pauses_every_key_but_the_exempt_ones(sandboxed, login):
    org, charge = sandboxed, sandboxed.charge
    with scope(org.organization):
        allowance_services.grant_create(organization=org.organization, actor=org.members["hr"].user,
                                        tokens=1_000_000, reason="breaker tests", member=org.members["hr"])
        allowance_services.grant_create(organization=org.organization, actor=org.members["hr"].user,
                                        tokens=1_000_000, reason="breaker tests", member=org.members["admin"])
    _hr_key, hr_secret = new_key(org, role="hr", name="hr tool")
    service_key, service_secret = new_key(org, role="admin", name="production service")
    admin = login(org.members["admin"])
    assert admin.post(f"/o/{org.slug}/keys/{service_key.pk}/breaker-exempt/", {"exempt": "1"}).status_code == 302
    set_limits(org, organization_per_minute=6 * charge + charge // 2)

    # Two members' agents together pass the organization's limit.
    statuses = [send(org.url, secret).status_code for _ in range(5) for secret in (org.api_key_secret, hr_secret)]
    assert statuses.count(200) in (7, 8) and statuses[-1] == 429

    for secret in (org.api_key_secret, hr_secret):
        error = send(org.url, secret).json()["error"]
        assert error["code"] == "breaker_tripped" and "the organization's keys together" in error["message"]
    assert send(org.url, service_secret).status_code == 200  # exempt
    with unscoped():
        trip = BreakerTrip.objects.get(resumed_at=None)
        assert trip.scope == "organization"
        paused = set(ApiKey.objects.filter(paused_by=trip).values_list("name", flat=True))
        assert paused == set(ApiKey.objects.filter(organization=org.organization, revoked_at=None,
                                                   breaker_exempt=False).values_list("name", flat=True))
        assert "production service" not in paused


def test_breaker_state_never_crosses_organizations(sandboxed, org_b):
    org, charge = sandboxed, sandboxed.charge
    set_limits(org, organization_per_minute=2 * charge + charge // 2, key_per_minute=2 * charge + charge // 2)
    set_limits(org_b, organization_per_minute=2 * charge + charge // 2, key_per_minute=2 * charge + charge // 2)
    with scope(org_b.organization):
        allowance_services.grant_create(organization=org_b.organization, actor=org_b.members["hr"].user,
                                        tokens=1_000_000, reason="breaker tests", member=org_b.members["employee"])
    # Org A's loop trips org A's breaker (its earlier request counted nothing: no limit was set).
    assert served(loop(org.url, org.api_key_secret, 5)) in (3, 4)
    # Org B's keys are untouched, and its own rates start from nothing: ids are not shared.
    assert served(loop(org.url, org_b.api_key_secret, 5)) in (3, 4)
    with unscoped():
        assert {t.organization_id for t in BreakerTrip.objects.filter(resumed_at=None)} == {
            org.organization.pk, org_b.organization.pk}
        assert ApiKey.objects.filter(organization=org_b.organization, paused_by__organization=org.organization
                                     ).count() == 0


def test_a_members_hour_far_over_their_normal_hour_trips(sandboxed):
    org, charge = sandboxed, sandboxed.charge
    from gateway.models import SpendNormal

    with unscoped():
        SpendNormal.objects.filter(member=org.members["employee"]).update(p95_hour_tokens=charge, active_hours=40)
    set_limits(org, member_normal_multiple=4)
    _key, secret = new_key(org)  # a new key: its identity carries the normal hour
    assert served(loop(org.url, secret, 8)) in (5, 6)  # the fifth takes the hour past 4 normal hours
    with unscoped():
        trip = BreakerTrip.objects.get(resumed_at=None)
    assert (trip.scope, trip.window, trip.limit_kind, trip.limit) == ("member", "hour", "relative", 4 * charge)


def test_the_normal_hour_is_the_95th_percentile_of_the_hours_with_usage(org_a):
    from datetime import timedelta

    from django.utils import timezone

    from gateway.models import SpendNormal

    now = timezone.now().replace(minute=30)
    employee = org_a.members["employee"]
    with scope(org_a.organization):
        UsageRecord.objects.all().delete()
        for hour in range(20):  # 20 hours of 100 tokens, one of 10,000
            UsageRecord.objects.create(organization=org_a.organization, member=employee, model="gpt-test",
                                       endpoint="chat", status="ok", charged_tokens=100 if hour else 10_000,
                                       occurred_at=now - timedelta(hours=hour + 1))
        UsageRecord.objects.create(organization=org_a.organization, member=employee, model="gpt-test",
                                   endpoint="chat", status="ok", charged_tokens=999_999,
                                   occurred_at=now - timedelta(days=8))  # older than the week
    gateway_services.spend_normals_refresh(now=now)
    with unscoped():
        normal = SpendNormal.objects.get(member=employee)
    assert (normal.p95_hour_tokens, normal.active_hours) == (100, 20)


def test_with_redis_away_the_gateway_keeps_serving_nothing_trips_and_a_pause_holds(sandboxed):
    org, charge = sandboxed, sandboxed.charge
    set_limits(org, key_per_minute=2 * charge + charge // 2)
    key, secret = new_key(org)
    assert served(loop(org.url, secret, 4)) in (3, 4)  # paused, in the database
    services.stop_redis()
    try:
        # No rates: the fixture key is neither counted nor tripped, and keeps being served...
        assert served(loop(org.url, org.api_key_secret, 5)) == 5
        # ...while the key paused before is still refused (read from the database).
        assert send(org.url, secret).json()["error"]["code"] == "breaker_tripped"
    finally:
        services.start_redis()
    with unscoped():
        assert list(BreakerTrip.objects.filter(resumed_at=None).values_list("api_key", flat=True)) == [key.pk]
