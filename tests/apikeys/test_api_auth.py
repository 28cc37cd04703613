"""API keys authenticating REST API calls: scopes, the owner's own rows only, other organizations, and every
way a key stops working (expiry, revocation, a deactivated owner, rotation), each refused on the very next
request even though the key's identity is cached (every test warms the cache with a successful call first)."""

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apikeys import services
from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, ApiKey
from portal import services as portal_services
from portal import shared_cache
from portal.tenancy import scope, unscoped


@pytest.fixture(autouse=True)
def policy_in_force(request):
    """The fixtures assign the team's policy from the next period; make it govern now, so that every
    member's account opens with a monthly grant (rows for the key to read, or not)."""
    for name in ("org_a", "org_b"):
        if name in request.fixturenames:
            org = request.getfixturevalue(name)
            with scope(org.organization):
                org.assignment.effective_from = timezone.now() - timedelta(days=1)
                org.assignment.save()


def api(org, rest):
    return f"/api/v1/o/{org.slug}/{rest}"


def bearer(secret):
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def get(client, org, rest, secret, **extra):
    return client.get(api(org, rest), **bearer(secret), **extra)


def ok(response):
    assert response.status_code == 200, (response.status_code, response.content[:300])
    return response.json()


def refused(response, status, *fragments) -> str:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail
    return detail


def mint(member, **overrides):
    arguments = {"name": "tool", "endpoints": ["usage_read"]} | overrides
    with scope(member.organization):
        return services.api_key_create(member=member, actor=member.user, **arguments)


def stored(key) -> ApiKey:
    with unscoped():
        return ApiKey.objects.get(pk=key.pk)


def warm(client, org, secret):
    """A successful call: the key's identity is now cached."""
    ok(get(client, org, "balances/", secret))
    assert shared_cache.get(services.cache_key(secret[4:16])) is not None


# -- what a key may read ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["bearer", "lowercase bearer", "x-api-key"])
def test_usage_read_key_reads_its_owners_balance(client, org_a, header):
    secret = org_a.api_key_secret
    extra = {"bearer": bearer(secret), "lowercase bearer": {"HTTP_AUTHORIZATION": f"bearer {secret}"},
             "x-api-key": {"HTTP_X_API_KEY": secret}}[header]
    body = ok(client.get(api(org_a, "balances/"), **extra))
    employee = org_a.members["employee"]
    assert [(row["member"], row["email"]) for row in body["results"]] == [(employee.pk, employee.user.email)]
    entries = ok(client.get(api(org_a, "ledger-entries/"), **extra))["results"]
    assert entries and {row["member"] for row in entries} == {employee.pk}


def test_a_key_of_an_hr_member_still_reads_only_its_owners_rows(client, org_a, login):
    hr, employee = org_a.members["hr"], org_a.members["employee"]
    _, secret = mint(hr)
    balances = ok(get(client, org_a, "balances/", secret))["results"]
    assert [row["member"] for row in balances] == [hr.pk]
    entries = ok(get(client, org_a, "ledger-entries/", secret))["results"]
    assert entries and {row["member"] for row in entries} == {hr.pk}
    # Even when asking for someone else's entries by id.
    entries = ok(get(client, org_a, f"ledger-entries/?member={employee.pk}", secret))["results"]
    assert employee.pk not in {row["member"] for row in entries}

    # The same HR member through a browser session sees everyone: the narrowing is the key's doing.
    login(hr)
    everyone = ok(client.get(api(org_a, "balances/")))["results"]
    assert {hr.pk, employee.pk} <= {row["member"] for row in everyone}
    entries = ok(client.get(api(org_a, f"ledger-entries/?member={employee.pk}")))["results"]
    assert entries and {row["member"] for row in entries} == {employee.pk}


def test_a_key_without_usage_read_is_refused_naming_the_scope(client, org_a):
    _, secret = mint(org_a.members["employee"], endpoints=["chat", "messages", "embeddings"])
    for rest in ("balances/", "ledger-entries/"):
        refused(get(client, org_a, rest, secret), 403, "This API key's scopes do not include usage_read.")


OTHER_ROUTES = ["teams/", "members/", "invitations/", "audit-log/", "policies/", "assignments/", "grants/", "models/"]


@pytest.mark.parametrize("role", ["owner", "admin", "hr"])
def test_a_key_reaches_no_other_api_route_whatever_its_owners_roles(client, org_a, role):
    member = org_a.members[role]
    allowed = [e for e in ENDPOINTS if e not in ENDPOINT_ROLES or member.has_any_role(ENDPOINT_ROLES[e])]
    _, secret = mint(member, endpoints=allowed)
    ok(get(client, org_a, "balances/", secret))  # the key itself works
    routes = OTHER_ROUTES + [f"members/{member.pk}/", f"teams/{org_a.team.pk}/", f"policies/{org_a.policy.pk}/",
                             f"grants/{org_a.grant.pk}/", f"models/{org_a.catalog_model.pk}/"]
    for rest in routes:
        refused(get(client, org_a, rest, secret), 403, "This API key's scopes do not include this endpoint.")
    writes = [("post", "grants/", {"tokens": 1, "reason": "x", "member_id": member.pk}),
              ("post", "teams/", {"name": "by key"}),
              ("patch", f"members/{org_a.members['employee'].pk}/", {"is_active": False}),
              ("post", f"grants/{org_a.grant.pk}/revoke/", {}),
              ("post", "policies/", {"name": "by key", "monthly_tokens": 5})]
    for method, rest, body in writes:
        response = getattr(client, method)(api(org_a, rest), data=body, content_type="application/json",
                                           **bearer(secret))
        refused(response, 403, "scopes do not include")
    # A key's usage_read scope does not make balances writable either: the API has no such method.
    refused(client.post(api(org_a, "balances/"), data={}, content_type="application/json", **bearer(secret)), 405,
            'Method "POST" not allowed.')


def test_the_same_member_with_a_session_reaches_those_routes(client, org_a, login):
    """Control for the test above: the 403s come from the key, not from the owner's roles."""
    login(org_a.members["admin"])
    for rest in OTHER_ROUTES:
        ok(client.get(api(org_a, rest)))


def test_a_key_cannot_reach_another_organization(client, org_a, org_b, login):
    for rest in ("balances/", "ledger-entries/", "members/", "no-such-route/"):
        response = get(client, org_b, rest, org_a.api_key_secret)
        assert response.status_code == 404, (rest, response.content)
        assert response.json() == {"detail": "Not found."}
    response = client.get("/api/v1/o/no-such-org/balances/", **bearer(org_a.api_key_secret))
    assert response.status_code == 404
    ok(get(client, org_b, "balances/", org_b.api_key_secret))
    # A browser session of an org_b member next to the key does not lend it access to org_b.
    login(org_b.members["owner"])
    ok(client.get(api(org_b, "balances/")))
    response = get(client, org_b, "balances/", org_a.api_key_secret)
    assert response.status_code == 404 and response.json() == {"detail": "Not found."}


def test_last_used_at_is_set_on_use(client, org_a):
    key, secret = mint(org_a.members["employee"])
    assert stored(key).last_used_at is None
    before = timezone.now()
    ok(get(client, org_a, "balances/", secret))
    used = stored(key).last_used_at
    assert used is not None and before <= used <= timezone.now()
    refused(get(client, org_a, "teams/", secret), 403)  # a refused scope still authenticated
    assert stored(key).last_used_at >= used


def test_a_refused_key_does_not_update_last_used_at(client, org_a):
    key, secret = mint(org_a.members["employee"], allowed_cidrs=["10.0.0.0/8"])
    refused(get(client, org_a, "balances/", secret, REMOTE_ADDR="192.0.2.1"), 401)
    assert stored(key).last_used_at is None


# -- expiry ------------------------------------------------------------------------------------------------------


def test_setting_expires_at_in_the_past_refuses_the_next_request(client, org_a):
    key, secret = mint(org_a.members["employee"], expires_at=timezone.now() + timedelta(days=1))
    warm(client, org_a, secret)
    with scope(org_a.organization):
        key = ApiKey.objects.get(pk=key.pk)
        key.expires_at = timezone.now() - timedelta(seconds=1)
        key.save()
    refused(get(client, org_a, "balances/", secret), 401, "API key refused", "expired")


def test_a_key_is_refused_once_its_expiry_passes_without_any_write(client, org_a, monkeypatch):
    expires = timezone.now() + timedelta(minutes=5)
    _, secret = mint(org_a.members["employee"], expires_at=expires)
    warm(client, org_a, secret)
    ok(get(client, org_a, "balances/", secret))
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=6))
    refused(get(client, org_a, "balances/", secret), 401, "expired")


def test_the_fixture_keys_do_not_expire(client, org_a):
    assert stored(org_a.api_key).expires_at is None
    ok(get(client, org_a, "balances/", org_a.api_key_secret))


# -- revocation ------------------------------------------------------------------------------------------------


def test_revocation_by_service_takes_effect_on_the_next_request(client, org_a):
    employee = org_a.members["employee"]
    key, secret = mint(employee)
    warm(client, org_a, secret)
    ok(get(client, org_a, "ledger-entries/", secret))
    with scope(org_a.organization):
        services.api_key_revoke(key=key, actor=employee.user)
    refused(get(client, org_a, "balances/", secret), 401, "API key refused: this API key was revoked.")
    refused(get(client, org_a, "ledger-entries/", secret), 401, "revoked")


def test_revocation_on_the_page_takes_effect_on_the_next_request(client, org_a, login):
    employee = org_a.members["employee"]
    key, secret = mint(employee)
    api_client = client.__class__()  # the tool using the key, separate from the browser
    warm(api_client, org_a, secret)
    browser = login(employee)
    response = browser.post(f"/o/{org_a.slug}/keys/{key.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == f"/o/{org_a.slug}/keys/"
    refused(get(api_client, org_a, "balances/", secret), 401, "revoked")
    ok(get(api_client, org_a, "balances/", org_a.api_key_secret))  # the member's other key still works


def test_deactivating_the_owner_revokes_the_key_from_the_next_request(client, org_a):
    owner, employee = org_a.members["owner"], org_a.members["employee"]
    warm(client, org_a, org_a.api_key_secret)
    with scope(org_a.organization):
        portal_services.member_update(member=employee, actor_member=owner, team=employee.team, is_active=False)
    refused(get(client, org_a, "balances/", org_a.api_key_secret), 401, "API key refused: this API key was revoked.")
    # Active again, the leaver's old key stays revoked.
    with scope(org_a.organization):
        portal_services.member_update(member=employee, actor_member=owner, team=employee.team, is_active=True)
    refused(get(client, org_a, "balances/", org_a.api_key_secret), 401, "API key refused: this API key was revoked.")


def test_changing_the_owners_roles_keeps_the_key_narrow(client, org_a):
    owner, employee = org_a.members["owner"], org_a.members["employee"]
    warm(client, org_a, org_a.api_key_secret)
    with scope(org_a.organization):
        portal_services.member_update(member=employee, actor_member=owner, team=employee.team, roles=["hr"])
    rows = ok(get(client, org_a, "balances/", org_a.api_key_secret))["results"]
    assert [row["member"] for row in rows] == [employee.pk]
    refused(get(client, org_a, "members/", org_a.api_key_secret), 403)


# -- rotation --------------------------------------------------------------------------------------------------


def test_rotation_new_secret_works_at_once_old_until_the_grace_ends(client, org_a):
    employee = org_a.members["employee"]
    key, old_secret = mint(employee)
    warm(client, org_a, old_secret)
    with scope(org_a.organization):
        new_key, new_secret = services.api_key_rotate(key=key, actor=employee.user, grace_hours=2)
    ok(get(client, org_a, "balances/", new_secret))
    ok(get(client, org_a, "balances/", old_secret))  # still in its grace period
    ok(get(client, org_a, "ledger-entries/", old_secret))

    with scope(org_a.organization):
        old = ApiKey.objects.get(pk=key.pk)
        old.works_until = timezone.now() - timedelta(seconds=1)
        old.save()
    refused(get(client, org_a, "balances/", old_secret), 401, "rotated out")
    ok(get(client, org_a, "balances/", new_secret))
    assert stored(new_key).last_used_at is not None


def test_rotation_without_grace_refuses_the_old_secret_at_once(client, org_a):
    employee = org_a.members["employee"]
    key, old_secret = mint(employee)
    warm(client, org_a, old_secret)
    with scope(org_a.organization):
        _, new_secret = services.api_key_rotate(key=key, actor=employee.user, grace_hours=0)
    refused(get(client, org_a, "balances/", old_secret), 401, "rotated out")
    ok(get(client, org_a, "balances/", new_secret))


def test_the_grace_period_ends_by_itself(client, org_a, monkeypatch):
    employee = org_a.members["employee"]
    key, old_secret = mint(employee)
    with scope(org_a.organization):
        _, new_secret = services.api_key_rotate(key=key, actor=employee.user, grace_hours=1)
    warm(client, org_a, old_secret)
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=61))
    refused(get(client, org_a, "balances/", old_secret), 401, "rotated out")
    ok(get(client, org_a, "balances/", new_secret))


def test_a_grace_over_24_hours_is_refused_and_the_key_keeps_working(client, org_a):
    employee = org_a.members["employee"]
    key, secret = mint(employee)
    with scope(org_a.organization), pytest.raises(ValidationError) as caught:
        services.api_key_rotate(key=key, actor=employee.user, grace_hours=25)
    assert "grace_hours" in caught.value.message_dict
    assert stored(key).rotated_to is None and stored(key).works_until is None
    ok(get(client, org_a, "balances/", secret))


# -- IP ranges ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, allowed", [
    ("203.0.113.9", True), ("203.0.113.255", True), ("203.0.114.1", False), ("198.51.100.7", False),
    ("2001:db8:1::5", True), ("2001:db9::1", False), ("::1", False),
])
def test_ip_ranges(client, org_a, address, allowed):
    _, secret = mint(org_a.members["employee"], allowed_cidrs=["203.0.113.0/24", "2001:db8::/32"])
    response = get(client, org_a, "balances/", secret, REMOTE_ADDR=address)
    if allowed:
        ok(response)
    else:
        refused(response, 401, f"requests from {address} are outside the key's allowed IP ranges")


def test_ip_range_check_also_applies_once_cached(client, org_a):
    _, secret = mint(org_a.members["employee"], allowed_cidrs=["10.0.0.0/8"])
    ok(get(client, org_a, "balances/", secret, REMOTE_ADDR="10.2.3.4"))
    refused(get(client, org_a, "balances/", secret, REMOTE_ADDR="11.2.3.4"), 401, "11.2.3.4")
    ok(get(client, org_a, "balances/", secret, REMOTE_ADDR="10.9.9.9"))


def test_a_key_without_ranges_works_from_anywhere(client, org_a):
    for address in ("192.0.2.1", "2001:db8::1"):
        ok(get(client, org_a, "balances/", org_a.api_key_secret, REMOTE_ADDR=address))
