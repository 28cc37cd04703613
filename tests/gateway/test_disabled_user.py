"""A user account disabled (User.is_active false) by platform staff, in the Django admin or a shell:
from the very next request their keys are refused by the gateway and the REST API in every
organization, their sessions reach no page, and their open holds are released. Enabled again, the
keys work again, as a re-activated member's do; the ended sessions and released holds stay ended."""

import json

import httpx
import pytest
from django.contrib.auth import SESSION_KEY
from django.contrib.sessions.models import Session
from django.test import Client

from allowances import ledger
from allowances import services as allowance_services
from allowances.models import LedgerEntry
from apikeys import services as api_key_services
from gateway.models import UsageRecord
from portal import shared_cache
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import balance
from tests.factories import PASSWORD, MemberFactory, UserFactory

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Hi"}]
REFUSAL = "API key refused: the key owner's user account is disabled."


def chat(metered, secret):
    return httpx.post(f"{metered.url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      content=json.dumps({"model": "fake-gpt", "messages": PROMPT}).encode(), timeout=30)


def api_balances(metered, org, secret):
    """The REST API on the same live server as the gateway."""
    return httpx.get(f"{metered.url.removesuffix('/v1')}/api/v1/o/{org.slug}/balances/",
                     headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def cached_identity(secret):
    return shared_cache.get(api_key_services.cache_key(api_key_services.presented(secret).public_id))


def set_active_in_the_admin(user, active: bool):
    """What platform staff do: the Django admin's change form for the user, with Active (un)ticked."""
    staff = Client()
    staff.force_login(UserFactory(is_staff=True, is_superuser=True), backend="django.contrib.auth.backends.ModelBackend")
    data = {"email": user.email, "first_name": user.first_name, "last_name": user.last_name,
            "date_joined_0": f"{user.date_joined:%Y-%m-%d}", "date_joined_1": f"{user.date_joined:%H:%M:%S}",
            "last_login_0": "", "last_login_1": ""} | ({"is_active": "on"} if active else {})
    response = staff.post(f"/admin/portal/user/{user.pk}/change/", data)
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    user.refresh_from_db()
    assert user.is_active is active


def set_active_in_a_shell(user, active: bool):
    user.is_active = active
    user.save()


HOW = {"admin": set_active_in_the_admin, "shell": set_active_in_a_shell}


@pytest.fixture
def second_organization(metered, org_b):
    """The employee of org A is also a member of org B, with a key, tokens and an open hold there."""
    user = metered.member.user
    with scope(org_b.organization):
        member = MemberFactory(organization=org_b.organization, team=org_b.team, user=user)
        allowance_services.grant_create(organization=org_b.organization, actor=org_b.members["hr"].user,
                                        tokens=2_000, reason="welcome", member=member)
        account = allowance_services.account_open(member=member)
        hold = ledger.authorize(account=account, tokens=300, idempotency_key="b-hold")
        _, secret = api_key_services.api_key_create(member=member, actor=user, name="b key",
                                                    endpoints=["chat", "usage_read"])
    return org_b, member, hold, secret


def logged_in_client(user) -> Client:
    client = Client()
    assert client.post("/accounts/login/", {"login": user.email, "password": PASSWORD}).status_code == 302
    return client


def sessions_of(user) -> list[Session]:
    return [s for s in Session.objects.all() if s.get_decoded().get(SESSION_KEY) == str(user.pk)]


def release_of(hold_id: int) -> LedgerEntry | None:
    with unscoped():
        return LedgerEntry.all_objects.filter(closes_hold_id=hold_id).first()


@pytest.mark.parametrize("how", list(HOW))
def test_a_disabled_users_keys_are_refused_on_the_next_request_in_every_organization(
        metered, second_organization, how):
    org_b, _member_b, _hold_b, secret_b = second_organization
    user = metered.member.user
    assert chat(metered, metered.key).status_code == 200
    assert api_balances(metered, metered.org, metered.key).status_code == 200
    assert api_balances(metered, org_b, secret_b).status_code == 200
    assert cached_identity(metered.key).refused is None  # the identity is in the shared cache now
    assert cached_identity(secret_b).refused is None

    HOW[how](user, False)

    assert cached_identity(metered.key) is None and cached_identity(secret_b) is None  # dropped at once
    response = chat(metered, metered.key)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == REFUSAL
    for org, secret in ((metered.org, metered.key), (org_b, secret_b)):
        response = api_balances(metered, org, secret)
        assert (response.status_code, response.json()["detail"]) == (401, REFUSAL)
    models = httpx.get(f"{metered.url}/models", headers={"Authorization": f"Bearer {metered.key}"}, timeout=30)
    assert models.status_code == 401
    assert len(metered.upstream.requests) == 1  # nothing after the disabling reached the provider

    # A colleague's key is not affected.
    colleague = metered.org.members["hr"]
    with scope(metered.org.organization):
        allowance_services.grant_create(organization=metered.org.organization, actor=colleague.user, tokens=5_000,
                                        reason="welcome", member=colleague)
        _, colleague_secret = api_key_services.api_key_create(member=colleague, actor=colleague.user, name="hr key",
                                                              endpoints=["chat"])
    assert chat(metered, colleague_secret).status_code == 200


@pytest.mark.parametrize("how", list(HOW))
def test_a_disabled_users_sessions_end_and_holds_are_released_in_every_organization(
        metered, second_organization, how):
    org_b, member_b, hold_b, _secret_b = second_organization
    user = metered.member.user
    phone, laptop = logged_in_client(user), logged_in_client(user)
    colleague = metered.org.members["hr"]
    colleague_browser = logged_in_client(colleague.user)
    for client in (phone, laptop):
        assert client.get(f"/o/{metered.org.slug}/").status_code == 200
    fixture_hold = metered.org.hold
    with scope(metered.org.organization):
        allowance_services.grant_create(organization=metered.org.organization, actor=colleague.user, tokens=100,
                                        reason="welcome", member=colleague)
        colleague_hold = ledger.authorize(account=allowance_services.account_open(member=colleague), tokens=10,
                                          idempotency_key="colleague-hold")
    assert balance(metered.member)[1] == fixture_hold.tokens == 1_000
    assert balance(member_b)[1] == hold_b.tokens == 300
    assert len(sessions_of(user)) == 2

    HOW[how](user, False)

    assert sessions_of(user) == []
    for client in (phone, laptop):
        response = client.get(f"/o/{metered.org.slug}/")
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert colleague_browser.get(f"/o/{metered.org.slug}/").status_code == 200
    assert release_of(colleague_hold.id) is None and balance(colleague)[1] == 10
    # Every open hold of the user's accounts is released, in both organizations, through the ledger.
    assert balance(metered.member)[1] == 0 and balance(member_b)[1] == 0
    for hold in (fixture_hold, hold_b):
        release = release_of(hold.id)
        assert release.kind == LedgerEntry.Kind.RELEASE and release.reason == "the user account was disabled"
    assert ledger.verify() == []
    # The password no longer logs them in.
    client = Client()
    client.post("/accounts/login/", {"login": user.email, "password": PASSWORD})
    assert client.session.get(SESSION_KEY) is None


@pytest.mark.parametrize("how", list(HOW))
def test_enabled_again_the_keys_work_but_ended_sessions_revoked_keys_and_released_holds_stay_ended(
        metered, second_organization, how):
    """Like a re-activated member: the keys were only refused, not revoked, so they work again. A key
    revoked meanwhile stays revoked, a released hold is not taken again, and the old sessions are gone:
    the person logs in afresh."""
    org_b, _member_b, _hold_b, secret_b = second_organization
    user = metered.member.user
    browser = logged_in_client(user)
    with scope(metered.org.organization):
        revoked, revoked_secret = api_key_services.api_key_create(member=metered.member, actor=user, name="old tool",
                                                                  endpoints=["chat"])
    assert chat(metered, metered.key).status_code == 200
    assert chat(metered, revoked_secret).status_code == 200

    HOW[how](user, False)
    assert chat(metered, metered.key).status_code == 401
    with scope(metered.org.organization):
        api_key_services.api_key_revoke(key=revoked, actor=metered.org.members["admin"].user)
    entries_while_disabled = LedgerEntry.all_objects.count()
    HOW[how](user, True)

    assert LedgerEntry.all_objects.count() == entries_while_disabled  # enabling moves no tokens
    assert release_of(metered.org.hold.id) is not None and balance(metered.member)[1] == 0
    assert chat(metered, metered.key).status_code == 200
    assert api_balances(metered, metered.org, metered.key).status_code == 200
    assert api_balances(metered, org_b, secret_b).status_code == 200
    response = chat(metered, revoked_secret)
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    response = browser.get(f"/o/{metered.org.slug}/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert logged_in_client(user).get(f"/o/{metered.org.slug}/").status_code == 200
    assert ledger.verify() == []


def test_a_request_in_flight_when_the_user_is_disabled_is_charged_once_for_what_it_used(metered):
    """Its hold is released with the others; the usage it then reports is still recorded, once."""
    metered.upstream.behaviour.chunk_delay = 0.1
    granted, _held, used = balance(metered.member)
    body = {"model": "fake-gpt", "messages": PROMPT, "stream": True}
    lines = []
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", metered.url + "/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {metered.key}"}) as response:
            assert response.status_code == 200
            stream = response.iter_lines()
            while len([line for line in lines if line.startswith("data:")]) < 2:
                lines.append(next(stream))
            assert balance(metered.member)[1] > metered.org.hold.tokens  # the request holds tokens now
            set_active_in_a_shell(metered.member.user, False)
            assert balance(metered.member)[1] == 0
            lines.extend(stream)
    assert "data: [DONE]" in lines  # the stream ran to its end

    with unscoped():
        record = UsageRecord.all_objects.filter(member=metered.member).latest("pk")
    assert record.charged_tokens > 0
    assert balance(metered.member) == (granted, 0, used + record.charged_tokens)
    with unscoped():
        hold = LedgerEntry.all_objects.filter(account__member=metered.member, kind=LedgerEntry.Kind.HOLD).latest("pk")
        assert release_of(hold.pk).reason == "the user account was disabled"
        usage = LedgerEntry.all_objects.get(account=hold.account, idempotency_key=f"settle:{hold.pk}")
    assert (usage.kind, usage.used_delta, usage.held_delta) == (LedgerEntry.Kind.USAGE, record.charged_tokens, 0)
    assert ledger.verify() == []
