"""The key services: what is stored when a key is minted (only an HMAC of the secret, nowhere the secret),
how settings are validated (a refusal names the field and creates nothing), rotation and revocation."""

import hashlib
import hmac
import json
import re
from datetime import timedelta

import pytest
from django.apps import apps
from django.conf import settings
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.utils import timezone

from allowances import ledger
from allowances import services as allowance_services
from gateway import services as gateway_services
from apikeys import secrets, services
from apikeys.models import ENDPOINTS, ApiKey
from portal.models import AuditLogEntry
from portal import shared_cache
from portal.tenancy import scope, unscoped

KEY_SHAPE = re.compile(r"tap_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}")


@pytest.fixture(autouse=True)
def policy_in_force(request):
    """The fixtures assign the team's policy from the next period; these tests need it to govern now."""
    for name in ("org_a", "org_b"):
        if name in request.fixturenames:
            org = request.getfixturevalue(name)
            with scope(org.organization):
                org.assignment.effective_from = timezone.now() - timedelta(days=1)
                org.assignment.save()


def create(member, **overrides):
    arguments = {"name": "laptop", "endpoints": ["chat"]} | overrides
    with scope(member.organization):
        return services.api_key_create(member=member, actor=member.user, **arguments)


def counts():
    with unscoped():
        return ApiKey.objects.count(), AuditLogEntry.objects.count()


def refused(member, field, **overrides) -> str:
    """Creating with `overrides` is refused on `field`, and nothing is written. Returns the message."""
    before = counts()
    with pytest.raises(ValidationError) as caught:
        create(member, **overrides)
    errors = caught.value.message_dict
    assert field in errors, errors
    assert counts() == before
    return " ".join(errors[field])


def audit(organization, action):
    with unscoped():
        return list(AuditLogEntry.objects.filter(organization=organization, action=action).order_by("id"))


# -- what is stored --------------------------------------------------------------------------------------------


def _text_values():
    """(where, text) for every char/text/JSON value in the database, the way a secret scanner sees it:
    through every model's fields, through raw SQL over every table, and inside decoded sessions."""
    with unscoped():
        for model in apps.get_models(include_auto_created=True):
            if model._meta.proxy or not model._meta.managed:
                continue
            fields = [field for field in model._meta.concrete_fields
                      if isinstance(field, (models.CharField, models.TextField, models.JSONField))]
            if not fields:
                continue
            for row in model._base_manager.values_list(*[field.attname for field in fields]):
                for field, value in zip(fields, row):
                    if value is not None:
                        yield f"{model._meta.db_table}.{field.column}", (
                            value if isinstance(value, str) else json.dumps(value))
        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                columns = [column[0] for column in cursor.description]
                for row in cursor.fetchall():
                    for column, value in zip(columns, row):
                        if isinstance(value, (bytes, memoryview)):
                            value = bytes(value).decode("latin-1")
                        if value is not None and not isinstance(value, (int, float)):
                            yield f"{table}.{column} (raw)", str(value)
        for session in Session.objects.all():
            yield "django_session.session_data (decoded)", json.dumps(session.get_decoded(), default=str)


def leaks(needles):
    hits = set()
    for where, text in _text_values():
        if any(needle in text for needle in needles) or KEY_SHAPE.search(text):
            hits.add(where)
    return hits


def test_scanner_finds_a_planted_secret(org_a):
    """The scan below can fail: a key pasted into any text column is found."""
    _, secret = create(org_a.members["employee"])
    part = secrets.parse(secret).secret
    assert leaks([secret, part]) == set()
    with unscoped():
        org_a.team.__class__.all_objects.filter(pk=org_a.team.pk).update(cost_centre=part)  # varchar(40)
    assert leaks([part]) == {"portal_team.cost_centre", "portal_team.cost_centre (raw)"}


def test_no_column_of_any_table_holds_a_secret(org_a, org_b, client, login):
    employee = org_a.members["admin"]  # an admin may use every scope
    provider_secret = "sk-provider-plaintext-needle-0123456789"
    with scope(org_a.organization):
        gateway_services.provider_connection_create(
            organization=org_a.organization, actor=employee.user, name="Real OpenAI", kind="openai",
            base_url="https://api.openai.example/v1", secret=provider_secret, connect_timeout=5, read_timeout=60)
    key, secret = create(employee, name="everything", endpoints=list(ENDPOINTS), model_ids=["gpt-test"],
                         token_cap=5_000, expires_at=timezone.now() + timedelta(days=30),
                         allowed_cidrs=["127.0.0.0/8", "2001:db8::/32"])
    parts = secrets.parse(secret)
    # Use it (writes last_used_at and caches its identity), rotate it, revoke the successor.
    response = client.get(f"/api/v1/o/{org_a.slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200, response.content
    with scope(org_a.organization):
        successor, new_secret = services.api_key_rotate(key=key, actor=employee.user, grace_hours=2)
        services.api_key_revoke(key=successor, actor=employee.user)
    login(employee)
    assert client.get(f"/o/{org_a.slug}/keys/").status_code == 200  # a session row exists too

    needles = [secret, parts.secret, secret[:-6], new_secret, secrets.parse(new_secret).secret,
               org_a.api_key_secret, secrets.parse(org_a.api_key_secret).secret,
               org_b.api_key_secret, secrets.parse(org_b.api_key_secret).secret, provider_secret, provider_secret[:-4]]
    assert leaks(needles) == set()
    # Not in the cached identity either, whatever the cache backend.
    identity = shared_cache.get(services.cache_key(parts.public_id))
    if identity is not None:
        assert parts.secret not in repr(identity)


def test_only_the_hmac_of_the_secret_is_stored(org_a):
    key, secret = create(org_a.members["employee"])
    parts = secrets.parse(secret)
    with unscoped():
        stored = ApiKey.objects.get(pk=key.pk)
    pepper = (settings.API_KEY_HASH_KEY or settings.SECRET_KEY).encode()
    assert stored.secret_hash == hmac.new(pepper, parts.secret.encode(), hashlib.sha256).hexdigest()
    assert stored.secret_hash != hashlib.sha256(parts.secret.encode()).hexdigest()  # keyed, not a bare hash
    assert stored.public_id == parts.public_id
    assert stored.last_four == secret[-4:] and len(stored.last_four) == 4
    assert str(stored) == f"laptop (tap_{parts.public_id}…{secret[-4:]})"
    assert secrets.secret_matches(parts.secret, stored.secret_hash)
    other = parts.secret[:-1] + ("a" if parts.secret[-1] != "a" else "b")
    assert not secrets.secret_matches(other, stored.secret_hash)


def test_the_hash_depends_on_the_server_key(org_a, settings):
    _, secret = create(org_a.members["employee"])
    parts = secrets.parse(secret)
    settings.API_KEY_HASH_KEY = "one"
    first = secrets.hash_secret(parts.secret)
    settings.API_KEY_HASH_KEY = "two"
    assert secrets.hash_secret(parts.secret) != first


def test_creation_is_audited_without_the_secret(org_a):
    employee = org_a.members["employee"]
    key, secret = create(employee, name="ci runner", endpoints=["chat", "usage_read"], token_cap=1_000,
                         allowed_cidrs=["10.0.0.0/8"])
    [entry] = [e for e in audit(org_a.organization, "api_key.created") if e.object_id == str(key.pk)]
    assert entry.actor == employee.user and entry.actor_email == employee.user.email
    assert entry.object_type == "apikeys.apikey"
    assert entry.data == {"name": "ci runner", "key": f"tap_{key.public_id}…{key.last_four}",
                          "models": "all allowed", "endpoints": ["chat", "usage_read"], "token_cap": 1_000,
                          "allowed_cidrs": ["10.0.0.0/8"], "expires_at": None, "economy_routing": True}
    text = json.dumps(entry.data) + entry.object_repr
    assert secret not in text and secrets.parse(secret).secret not in text and not KEY_SHAPE.search(text)


def test_minting_stores_the_settings_and_who_made_it(org_a):
    employee, admin = org_a.members["employee"], org_a.members["admin"]
    expires = timezone.now() + timedelta(days=7)
    with scope(org_a.organization):
        key, _ = services.api_key_create(member=employee, actor=admin.user, name="  spaced  ",
                                         endpoints=["messages", "chat", "chat"], model_ids=["gpt-test"],
                                         token_cap=" 2500 ", expires_at=expires, allowed_cidrs=[" 10.1.2.3/8 "])
    with unscoped():
        key = ApiKey.objects.get(pk=key.pk)
    assert (key.name, key.endpoints, key.model_ids, key.token_cap) == ("spaced", ["chat", "messages"], ["gpt-test"], 2500)
    assert key.expires_at == expires and key.allowed_cidrs == ["10.0.0.0/8"]
    assert key.member == employee and key.created_by == admin.user and key.organization == org_a.organization
    assert key.revoked_at is None and key.last_used_at is None and key.refusal() is None


# -- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", None])
def test_a_key_needs_a_name(org_a, name):
    assert "Name the key" in refused(org_a.members["employee"], "name", name=name)


@pytest.mark.parametrize("endpoints", [[], None])
def test_a_key_needs_an_endpoint(org_a, endpoints):
    assert "at least one endpoint" in refused(org_a.members["employee"], "endpoints", endpoints=endpoints)


def test_unknown_endpoints_are_named(org_a):
    message = refused(org_a.members["employee"], "endpoints", endpoints=["chat", "admin", "images"])
    assert message == "Unknown endpoints: admin, images."


def test_models_must_be_in_the_organizations_active_catalog(org_a, org_b):
    member = org_a.members["employee"]
    assert refused(member, "model_ids", model_ids=["gpt-test", "gpt-nope"]) == "Not in the catalog: gpt-nope."
    with scope(org_b.organization):
        allowance_services.catalog_model_create(organization=org_b.organization, actor=org_b.members["admin"].user,
                                                model_id="only-in-b", display_name="B only",
                                                connection=org_b.provider_connection)
    assert "only-in-b" in refused(member, "model_ids", model_ids=["only-in-b"])
    with scope(org_a.organization):
        allowance_services.catalog_model_update(catalog_model=org_a.catalog_model, actor=org_a.members["admin"].user,
                                                is_active=False)
    assert "gpt-test" in refused(member, "model_ids", model_ids=["gpt-test"])


@pytest.mark.parametrize("cap", [0, -1, "-5", "abc", "1.5", "1e6", 10_000_000_001, "0", " "])
def test_a_cap_is_a_positive_whole_number(org_a, cap):
    assert refused(org_a.members["employee"], "token_cap", token_cap=cap) == "A cap is a positive whole number of tokens."


def test_a_cap_cannot_exceed_the_owners_allowance_or_what_they_hold_with_approved_overage(org_a):
    member = org_a.members["employee"]
    message = refused(member, "token_cap", token_cap=1_000_001)
    assert "1,000,000" in message and "allowance" in message
    create(member, token_cap=1_000_000)  # exactly the allowance is fine

    with scope(org_a.organization):  # an approved overage request's grant: more than the policy's month
        ledger.post(account=org_a.account, kind="overage_grant", tokens=2_000_000, idempotency_key="overage-request:1")
        org_a.account.refresh_from_db()
    holding = org_a.account.available
    assert holding > 1_000_000
    create(member, token_cap=holding)
    assert f"{holding:,}" in refused(member, "token_cap", token_cap=holding + 1)


def test_the_cap_follows_the_members_own_policy(org_a):
    member, hr = org_a.members["employee"], org_a.members["hr"].user
    with scope(org_a.organization):
        small = allowance_services.policy_create(organization=org_a.organization, actor=hr, name="Small",
                                                 monthly_tokens=10_000)
        allowance_services.policy_assign(organization=org_a.organization, actor=hr, policy=small, member=member,
                                         immediately=True)
    assert "10,000" in refused(member, "token_cap", token_cap=10_001)
    create(member, token_cap=10_000)
    create(org_a.members["approver"], token_cap=1_000_000)  # the team's policy still governs the others


def test_a_member_without_a_policy_cannot_set_any_cap(org_a):
    from tests.factories import MemberFactory

    loner = MemberFactory(organization=org_a.organization, team=None)
    assert "allowance of 0 tokens" in refused(loner, "token_cap", token_cap=1)
    create(loner)  # without a cap the key is fine


@pytest.mark.parametrize("delta", [timedelta(seconds=-1), timedelta(days=-30), timedelta(0)])
def test_expiry_must_be_in_the_future(org_a, delta):
    assert "future" in refused(org_a.members["employee"], "expires_at", expires_at=timezone.now() + delta)


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "not-a-range", "256.1.1.1", "10.0.0.0/8/8", "2001:db8::/129", ""])
def test_bad_ip_ranges_are_refused(org_a, cidr):
    message = refused(org_a.members["employee"], "allowed_cidrs", allowed_cidrs=["192.0.2.0/24", cidr])
    assert "is not an IP range" in message and repr(cidr)[1:-1] in message


def test_at_most_twenty_ranges(org_a):
    ranges = [f"10.0.{i}.0/24" for i in range(21)]
    assert "At most 20" in refused(org_a.members["employee"], "allowed_cidrs", allowed_cidrs=ranges)
    key, _ = create(org_a.members["employee"], allowed_cidrs=ranges[:20])
    assert len(key.allowed_cidrs) == 20


def test_good_ranges_are_normalised(org_a):
    key, _ = create(org_a.members["employee"], allowed_cidrs=[
        "10.1.2.3/8", " 203.0.113.7 ", "2001:DB8:0:0::1/32", "::1", "fe80::/10"])
    assert key.allowed_cidrs == ["10.0.0.0/8", "203.0.113.7/32", "2001:db8::/32", "::1/128", "fe80::/10"]


def test_several_errors_are_reported_together(org_a):
    before = counts()
    with pytest.raises(ValidationError) as caught:
        create(org_a.members["employee"], name="", endpoints=["bogus"], token_cap="abc", allowed_cidrs=["x"])
    assert set(caught.value.message_dict) == {"name", "endpoints", "token_cap", "allowed_cidrs"}
    assert counts() == before


# -- rotation and revocation -----------------------------------------------------------------------------------


def test_rotation_copies_the_settings_and_limits_the_grace(org_a):
    employee = org_a.members["employee"]
    key, secret = create(employee, name="ci", endpoints=["chat", "usage_read"], model_ids=["gpt-test"],
                         token_cap=100, allowed_cidrs=["10.0.0.0/8"])
    before = counts()
    with scope(org_a.organization):
        for grace in (25, -1, 24 * 7):
            with pytest.raises(ValidationError) as caught:
                services.api_key_rotate(key=key, actor=employee.user, grace_hours=grace)
            assert caught.value.message_dict == {"grace_hours": ["The grace period is 0 to 24 hours."]}
        assert counts() == before

        started = timezone.now()
        new_key, new_secret = services.api_key_rotate(key=key, actor=employee.user, grace_hours=24)
        key.refresh_from_db()
    assert new_secret != secret and new_key.public_id != key.public_id
    assert (new_key.name, new_key.endpoints, new_key.model_ids, new_key.token_cap, new_key.allowed_cidrs) == \
        ("ci", ["chat", "usage_read"], ["gpt-test"], 100, ["10.0.0.0/8"])
    assert key.rotated_to == new_key and new_key.works_until is None
    assert started + timedelta(hours=24) <= key.works_until <= timezone.now() + timedelta(hours=24)
    [entry] = audit(org_a.organization, "api_key.rotated")
    assert entry.object_id == str(new_key.pk) and entry.actor == employee.user
    assert entry.data["old"] == f"tap_{key.public_id}…{key.last_four}"
    assert entry.data["new"] == f"tap_{new_key.public_id}…{new_key.last_four}"
    assert new_secret not in json.dumps(entry.data) and secret not in json.dumps(entry.data)
    with scope(org_a.organization), pytest.raises(ValidationError):
        services.api_key_rotate(key=key, actor=employee.user)  # already rotated


def test_a_revoked_or_expired_key_cannot_be_rotated(org_a):
    employee = org_a.members["employee"]
    key, _ = create(employee)
    with scope(org_a.organization):
        services.api_key_revoke(key=key, actor=employee.user)
        with pytest.raises(ValidationError, match="Only a key in use"):
            services.api_key_rotate(key=key, actor=employee.user)
        with pytest.raises(ValidationError, match="already revoked"):
            services.api_key_revoke(key=key, actor=employee.user)
        expired, _ = services.api_key_create(member=employee, actor=employee.user, name="short", endpoints=["chat"],
                                             expires_at=timezone.now() + timedelta(minutes=1))
        ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        with pytest.raises(ValidationError, match="Only a key in use"):
            services.api_key_rotate(key=expired, actor=employee.user)


def test_revocation_is_audited(org_a):
    employee, admin = org_a.members["employee"], org_a.members["admin"]
    key, _ = create(employee)
    with scope(org_a.organization):
        services.api_key_revoke(key=key, actor=admin.user)
        key.refresh_from_db()
    assert key.revoked_by == admin.user and key.revoked_at is not None
    assert key.refusal() == "this API key was revoked"
    [entry] = audit(org_a.organization, "api_key.revoked")
    assert entry.actor == admin.user and entry.object_id == str(key.pk)
    assert entry.data == {"key": f"tap_{key.public_id}…{key.last_four}", "owner": employee.user.email}


def test_without_a_policy_the_cap_is_bounded_by_what_the_owner_holds(org_a):
    """A member living on bonus grants alone may cap a key at what they can spend, not at zero."""
    from allowances import services as allowance_services
    from tests.factories import MemberFactory

    with scope(org_a.organization):
        member = MemberFactory(organization=org_a.organization)  # no team, so no policy
        allowance_services.grant_create(organization=org_a.organization, actor=org_a.members["hr"].user,
                                        tokens=4_000, reason="hackathon", member=member)
    assert "4,000" in refused(member, "token_cap", token_cap=4_001)
    key, _secret = create(member, token_cap=4_000)
    assert key.token_cap == key.spend.token_cap == 4_000
