"""The key pages: a member's own keys, minting behind a fresh re-authentication, the secret shown exactly once
(never cached, never on a later page), refused forms that name the field, who may revoke or rotate which key,
and the audit log of every create, rotate and revoke."""

import html
import re
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from apikeys import secrets
from apikeys.models import ApiKey
from apikeys.services import api_key_create
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped

KEY_SHAPE = re.compile(r"tap_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}")
AUTH_RECORDS, AUTH_RECORDS_USER = "account_authentication_methods", "account_authentication_methods_user"


@pytest.fixture(autouse=True)
def policy_in_force(request):
    """The fixtures assign the team's policy from the next period; these tests need it to govern now."""
    for name in ("org_a", "org_b"):
        if name in request.fixturenames:
            org = request.getfixturevalue(name)
            with scope(org.organization):
                org.assignment.effective_from = timezone.now() - timedelta(days=1)
                org.assignment.save()


def page(org, rest=""):
    return f"/o/{org.slug}/keys/{rest}"


def reauthenticate(client, org):
    """Confirm the password on allauth's re-authentication form (a fresh, explicit re-authentication)."""
    response = client.post("/accounts/reauthenticate/", {"password": org.password})
    assert response.status_code == 302, response.content[:500]
    return client


@pytest.fixture
def as_member(login, org_a):
    """Log in as a member of org_a, freshly re-authenticated: as_member("employee")."""

    def _as(role, org=org_a):
        return reauthenticate(login(org.members[role]), org)

    return _as


def keys_of(member):
    with unscoped():
        return list(ApiKey.objects.filter(member=member).order_by("pk"))


def audit(org, action):
    with unscoped():
        return list(AuditLogEntry.objects.filter(organization=org.organization, action=action).order_by("pk"))


def text(response) -> str:
    return html.unescape(response.content.decode())


def mint(member, **overrides):
    with scope(member.organization):
        return api_key_create(member=member, actor=member.user, **({"name": "tool", "endpoints": ["chat"]} | overrides))


def secret_on(response) -> str:
    [secret] = re.findall(r'<code id="secret" data-testid="secret">([^<]*)</code>', response.content.decode())
    return secret


def form(**changes) -> dict:
    """A valid key form, with the one-time token the page puts in it."""
    return {"name": "laptop: Claude Code", "endpoints": ["chat", "usage_read"], "form_token": uuid.uuid4().hex} | changes


VALID_NAME = "laptop: Claude Code"


# -- listing -------------------------------------------------------------------------------------------------------


def test_member_lists_only_their_own_keys(login, org_a, org_b):
    employee, hr = org_a.members["employee"], org_a.members["hr"]
    hr_key, _ = mint(hr, name="hr laptop")
    response = login(employee).get(page(org_a))
    assert response.status_code == 200
    assert [key.pk for key in response.context["keys"]] == [org_a.api_key.pk]
    body = text(response)
    assert f"tap_{org_a.api_key.public_id}…{org_a.api_key.last_four}" in body and "fixture key" in body
    assert hr_key.public_id not in body and "hr laptop" not in body
    assert org_b.api_key.public_id not in body
    assert body.count('data-testid="key-row"') == 1


def test_key_list_is_per_organization(login, org_a):
    response = login(org_a.members["employee"]).get("/o/org-b/keys/")
    assert response.status_code == 404


# -- re-authentication before minting ------------------------------------------------------------------------------


KEYS_AFTER_PASSWORD = "/accounts/reauthenticate/?next=%2Fo%2Forg-a%2Fkeys%2F"


def test_creating_without_an_authentication_record_asks_for_the_password(login, org_a):
    employee = org_a.members["employee"]
    client = login(employee)  # force_login: the session has no allauth authentication record
    assert AUTH_RECORDS not in client.session
    response = client.post(page(org_a, "new/"), form())
    assert response.status_code == 302
    assert response["Location"] == KEYS_AFTER_PASSWORD
    assert keys_of(employee) == [org_a.api_key]


@pytest.mark.parametrize("seconds_ago, allowed", [(3600, False), (301, False), (10, True)])
def test_creating_needs_a_recent_reauthentication(login, org_a, seconds_ago, allowed):
    employee = org_a.members["employee"]
    client = login(employee)
    session = client.session
    session[AUTH_RECORDS] = [{"method": "password", "at": time.time() - seconds_ago, "reauthenticated": True}]
    session[AUTH_RECORDS_USER] = str(employee.user.pk)
    session.save()
    response = client.post(page(org_a, "new/"), form())
    if allowed:
        assert response.status_code == 201
        assert len(keys_of(employee)) == 2
    else:
        assert response.status_code == 302 and response["Location"] == KEYS_AFTER_PASSWORD
        assert keys_of(employee) == [org_a.api_key]


def test_after_logging_in_through_the_form_and_confirming_the_password_creation_works(client, org_a):
    """allauth (65.x) does not count a login as a re-authentication (only records flagged
    "reauthenticated" do), so a member who just logged in is asked for the password once more; the
    prompt comes back to the keys page and the same form, submitted again, mints the key."""
    employee = org_a.members["employee"]
    response = client.post("/accounts/login/", {"login": employee.user.email, "password": org_a.password})
    assert response.status_code == 302 and "_auth_user_id" in client.session
    assert client.session[AUTH_RECORDS][-1]["method"] == "password"

    submitted = form()
    response = client.post(page(org_a, "new/"), submitted)
    assert response.status_code == 302 and response["Location"] == KEYS_AFTER_PASSWORD
    prompt = client.get(KEYS_AFTER_PASSWORD)
    assert prompt.status_code == 200 and "Confirm your password, then submit again." in text(prompt)
    assert keys_of(employee) == [org_a.api_key]

    response = client.post(KEYS_AFTER_PASSWORD, {"password": "wrong password"})
    assert response.status_code == 200 and keys_of(employee) == [org_a.api_key]
    response = client.post(KEYS_AFTER_PASSWORD, {"password": org_a.password}, follow=True)
    assert response.redirect_chain == [(page(org_a), 302)] and response.status_code == 200
    assert keys_of(employee) == [org_a.api_key]  # nothing replayed behind the member's back
    # ... but what the member typed is there again, to submit once more (once: a reload is empty).
    kept = response.context["form"]
    assert kept["name"].value() == VALID_NAME and kept["endpoints"].value() == ["chat", "usage_read"]
    assert kept["form_token"].value() == submitted["form_token"]
    assert client.get(page(org_a)).context["form"]["name"].value() is None

    response = client.post(page(org_a, "new/"), submitted)
    assert response.status_code == 201, response.content[:500]
    secret = secret_on(response)
    [_, key] = keys_of(employee)
    assert key.name == VALID_NAME and key.endpoints == ["chat", "usage_read"]
    assert secrets.parse(secret).public_id == key.public_id
    assert "no-store" in response["Cache-Control"]

    # Recently re-authenticated now: a second key needs no prompt, and the first one works.
    assert client.post(page(org_a, "new/"), form(name="second")).status_code == 201
    assert client.get(f"/api/v1/o/{org_a.slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200


def test_a_stale_login_is_asked_again_even_right_after_a_reauthentication_expires(client, org_a, settings):
    settings.ACCOUNT_REAUTHENTICATION_TIMEOUT = 1
    employee = org_a.members["employee"]
    client.post("/accounts/login/", {"login": employee.user.email, "password": org_a.password})
    reauthenticate(client, org_a)
    session = client.session
    for record in session[AUTH_RECORDS]:
        record["at"] -= 5
    session.save()
    response = client.post(page(org_a, "new/"), form())
    assert response.status_code == 302 and response["Location"] == KEYS_AFTER_PASSWORD
    assert keys_of(employee) == [org_a.api_key]


def test_rotating_needs_a_recent_reauthentication_too(login, org_a):
    employee = org_a.members["employee"]
    client = login(employee)
    url = page(org_a, f"{org_a.api_key.pk}/rotate/")
    response = client.post(url, {"grace_hours": "1"})
    assert response.status_code == 302 and response["Location"] == KEYS_AFTER_PASSWORD
    assert len(keys_of(employee)) == 1
    response = client.post(response["Location"], {"password": org_a.password})
    assert response.status_code == 302 and response["Location"] == page(org_a)
    assert len(keys_of(employee)) == 1 and keys_of(employee)[0].rotated_to_id is None
    response = client.post(url, {"grace_hours": "1"})
    assert response.status_code == 201, response.content[:500]
    assert len(keys_of(employee)) == 2
    assert secrets.parse(secret_on(response)).public_id == keys_of(employee)[1].public_id


def test_someone_elses_key_answers_404_before_any_password_prompt(login, org_a):
    client = login(org_a.members["employee"])  # not re-authenticated
    hr_key, _ = mint(org_a.members["hr"])
    assert client.post(page(org_a, f"{hr_key.pk}/rotate/"), {"grace_hours": "1"}).status_code == 404
    assert client.post(page(org_a, f"{org_a.api_key.pk + 10_000}/rotate/"), {"grace_hours": "1"}).status_code == 404


# -- the secret, shown once ----------------------------------------------------------------------------------------


def test_the_created_page_shows_the_secret_and_three_snippets_uncached(as_member, org_a, settings):
    settings.PORTAL_BASE_URL = "https://tokens.example.com"
    client = as_member("employee")
    response = client.post(page(org_a, "new/"), form(model_ids=["gpt-test"]))
    assert response.status_code == 201
    cache_control = {part.strip() for part in response["Cache-Control"].split(",")}
    assert {"no-store", "no-cache", "private"} <= cache_control
    secret = secret_on(response)
    assert KEY_SHAPE.fullmatch(secret)
    body = text(response)
    assert "this is the only time it is shown" in body
    assert f'OpenAI(base_url="https://tokens.example.com/v1", api_key="{secret}")' in body
    assert 'model="gpt-test"' in body
    assert f'Anthropic(base_url="https://tokens.example.com", api_key="{secret}")' in body
    assert "curl https://tokens.example.com/v1/chat/completions" in body
    assert f'-H "Authorization: Bearer {secret}"' in body
    # The secret itself, three snippets, and the agents' set-ups (Claude Code, Codex CLI, aider, two in the .env).
    assert body.count(secret) == 9
    setups = setups_on(response)
    assert setups["setup-claude-code"] == (f'export ANTHROPIC_BASE_URL="https://tokens.example.com"\n'
                                           f'export ANTHROPIC_API_KEY="{secret}"\nclaude')
    assert 'base_url = "https://tokens.example.com/v1"' in setups["setup-codex"]
    assert 'wire_api = "responses"' in setups["setup-codex"] and 'env_key = "PORTAL_API_KEY"' in setups["setup-codex"]
    assert setups["setup-codex-key"] == f'export PORTAL_API_KEY="{secret}"'
    assert setups["setup-aider"] == (f"aider --openai-api-base https://tokens.example.com/v1 --openai-api-key {secret} "
                                     "--model openai/gpt-test")
    assert setups["setup-dotenv"].splitlines() == [
        "OPENAI_BASE_URL=https://tokens.example.com/v1", f"OPENAI_API_KEY={secret}",
        "ANTHROPIC_BASE_URL=https://tokens.example.com", f"ANTHROPIC_API_KEY={secret}"]
    [key] = [key for key in keys_of(org_a.members["employee"]) if key.name == VALID_NAME]
    assert key.secret_hash == secrets.hash_secret(secrets.parse(secret).secret)

    # Never again: not on the list, not in the admin list, not after using or rotating it.
    api_response = client.get(f"/api/v1/o/{org_a.slug}/balances/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api_response.status_code == 200
    listing = client.get(page(org_a))
    assert listing.status_code == 200
    assert f"tap_{key.public_id}…{key.last_four}" in text(listing)
    assert secret not in text(listing) and secrets.parse(secret).secret not in text(listing)
    assert not KEY_SHAPE.search(text(listing))
    admin = as_member("admin")
    all_keys = admin.get(page(org_a, "all/"))
    assert all_keys.status_code == 200 and f"tap_{key.public_id}" in text(all_keys)
    assert not KEY_SHAPE.search(text(all_keys))


def setups_on(response) -> dict[str, str]:
    """The agent set-ups on a page, by the id of their block, as a copy button copies them."""
    import html
    import re

    found = re.findall(r'<pre class="snippet" id="(setup-[a-z-]+)">(.*?)</pre>', text(response), re.S)
    assert all(f'data-copy="{name}"' in text(response) for name, _ in found)
    return {name: html.unescape(body) for name, body in found}


def test_the_keys_page_offers_the_set_ups_with_the_portals_address_and_no_secret(as_member, org_a, settings):
    settings.PORTAL_BASE_URL = "https://tokens.example.com"
    response = as_member("employee").get(page(org_a))
    setups = setups_on(response)
    assert set(setups) == {"setup-claude-code", "setup-codex", "setup-codex-key", "setup-aider", "setup-dotenv"}
    assert 'export ANTHROPIC_API_KEY="tap_…"' in setups["setup-claude-code"]
    assert "https://tokens.example.com" in setups["setup-claude-code"]
    assert not KEY_SHAPE.search(text(response))


def test_the_rotated_page_shows_the_new_secret_once(as_member, org_a):
    client = as_member("employee")
    response = client.post(page(org_a, f"{org_a.api_key.pk}/rotate/"), {"grace_hours": "3"})
    assert response.status_code == 201 and "no-store" in response["Cache-Control"]
    new_secret = secret_on(response)
    assert new_secret != org_a.api_key_secret
    listing = text(client.get(page(org_a)))
    assert new_secret not in listing and org_a.api_key_secret not in listing
    assert "rotated; works until" in listing
    # The rotated key offers no second rotation; the new one does.
    assert f"keys/{org_a.api_key.pk}/rotate/" not in listing
    assert f"keys/{keys_of(org_a.members['employee'])[1].pk}/rotate/" in listing


@pytest.mark.parametrize("grace", ["25", "-1", "abc", ""])
def test_a_bad_grace_period_is_refused_on_the_page(as_member, org_a, grace):
    client = as_member("employee")
    before = audit(org_a, "api_key.rotated")
    response = client.post(page(org_a, f"{org_a.api_key.pk}/rotate/"), {"grace_hours": grace}, follow=True)
    assert response.redirect_chain == [(page(org_a), 302)]
    assert "The grace period is a whole number of hours from 0 to 24." in text(response)
    assert keys_of(org_a.members["employee"]) == [org_a.api_key]
    assert audit(org_a, "api_key.rotated") == before


# -- refused forms ---------------------------------------------------------------------------------------------


PAST = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")

REFUSED_FORMS = {
    "blank name": ({"name": "  "}, "name"),
    "no endpoints": ({"endpoints": []}, "endpoints"),
    "unknown endpoint": ({"endpoints": ["chat", "admin"]}, "endpoints"),
    "model not in catalog": ({"model_ids": ["gpt-nope"]}, "model_ids"),
    "cap zero": ({"token_cap": "0"}, "token_cap"),
    "cap negative": ({"token_cap": "-10"}, "token_cap"),
    "cap not a number": ({"token_cap": "abc"}, "token_cap"),
    "cap over the allowance": ({"token_cap": "1000001"}, "token_cap"),
    "expiry in the past": ({"expires_at": PAST}, "expires_at"),
    "bad CIDR": ({"allowed_cidrs": "10.0.0.0/8\n10.0.0.0/33"}, "allowed_cidrs"),
    "not an address": ({"allowed_cidrs": "office"}, "allowed_cidrs"),
}


@pytest.mark.parametrize("case", list(REFUSED_FORMS))
def test_a_refused_form_names_the_field_and_creates_nothing(as_member, org_a, case):
    change, field = REFUSED_FORMS[case]
    client = as_member("employee")
    audit_before = AuditLogEntry.all_objects.count()
    response = client.post(page(org_a, "new/"), form(**change))
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert list(errors) == [field], errors
    assert keys_of(org_a.members["employee"]) == [org_a.api_key]
    assert AuditLogEntry.all_objects.count() == audit_before
    assert not KEY_SHAPE.search(text(response))
    assert "no-store" in response["Cache-Control"]


def test_the_cap_error_names_the_allowance(as_member, org_a):
    response = as_member("employee").post(page(org_a, "new/"), form(token_cap="2.000.000"))  # a decimal point?
    assert response.context["form"].errors["token_cap"] == ["A cap is a positive whole number of tokens."]
    for typed in ("2000000", "2,000,000"):  # thousands separators are taken as people type them
        response = as_member("employee").post(page(org_a, "new/"), form(token_cap=typed))
        assert response.context["form"].errors["token_cap"] == [
            "A key's cap cannot exceed your own allowance of 1,000,000 tokens per period."]


def test_a_full_form_is_stored_normalised(as_member, org_a):
    future = (timezone.now() + timedelta(days=10)).replace(second=0, microsecond=0)
    response = as_member("employee").post(page(org_a, "new/"), {
        "name": " ci ", "endpoints": ["messages", "chat"], "form_token": "full-form", "model_ids": ["gpt-test"], "token_cap": " 1000000 ",
        "expires_at": future.strftime("%Y-%m-%dT%H:%M"),
        "allowed_cidrs": "10.1.2.3/8, 203.0.113.7\n2001:DB8:0:0::1/32",
    })
    assert response.status_code == 201, response.context["form"].errors if response.context else response
    [_, key] = keys_of(org_a.members["employee"])
    assert (key.name, key.endpoints, key.model_ids, key.token_cap) == ("ci", ["chat", "messages"], ["gpt-test"], 1_000_000)
    assert key.allowed_cidrs == ["10.0.0.0/8", "203.0.113.7/32", "2001:db8::/32"]
    assert key.expires_at == future


# -- who may revoke or rotate what ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["employee", "hr", "approver"])
def test_a_member_cannot_revoke_or_rotate_another_members_key(as_member, org_a, role):
    other = org_a.members["employee"] if role != "employee" else org_a.members["approver"]
    key, _ = mint(other)
    keys_before = keys_of(other)
    client = as_member(role)
    assert client.post(page(org_a, f"{key.pk}/revoke/")).status_code == 404
    assert client.post(page(org_a, f"{key.pk}/rotate/"), {"grace_hours": "1"}).status_code == 404
    [stored] = [k for k in keys_of(other) if k.pk == key.pk]
    assert stored.revoked_at is None and stored.rotated_to_id is None and keys_of(other) == keys_before
    assert client.get(page(org_a, "all/")).status_code == 403


def test_a_key_of_another_organization_answers_404_even_for_its_admin(as_member, org_a, org_b):
    client = as_member("admin")
    assert client.post(page(org_a, f"{org_b.api_key.pk}/revoke/")).status_code == 404
    assert client.post(page(org_a, f"{org_b.api_key.pk}/rotate/"), {"grace_hours": "1"}).status_code == 404
    assert keys_of(org_b.members["employee"])[0].revoked_at is None


def test_an_admin_revokes_any_key_from_the_all_keys_page(as_member, org_a, client):
    employee, admin = org_a.members["employee"], org_a.members["admin"]
    admin_client = as_member("admin")
    listing = admin_client.get(page(org_a, "all/"))
    assert listing.status_code == 200
    assert employee.user.email in text(listing)
    assert f'action="/o/org-a/keys/{org_a.api_key.pk}/revoke/"' in listing.content.decode()

    response = admin_client.post(page(org_a, f"{org_a.api_key.pk}/revoke/"), {"next": "all"})
    assert response.status_code == 302 and response["Location"] == page(org_a, "all/")
    [key] = keys_of(employee)
    assert key.revoked_at is not None and key.revoked_by == admin.user
    [entry] = audit(org_a, "api_key.revoked")
    assert entry.actor == admin.user and entry.data["owner"] == employee.user.email
    # ... but cannot rotate it: rotation is the owner's.
    assert admin_client.post(page(org_a, f"{org_a.api_key.pk}/rotate/"), {"grace_hours": "1"}).status_code == 404
    # Revoking twice says so and writes nothing.
    response = admin_client.post(page(org_a, f"{org_a.api_key.pk}/revoke/"), {"next": "all"}, follow=True)
    assert "This key is already revoked." in text(response)
    assert len(audit(org_a, "api_key.revoked")) == 1


def test_revoke_and_rotate_need_post(as_member, org_a):
    client = as_member("employee")
    assert client.get(page(org_a, f"{org_a.api_key.pk}/revoke/")).status_code == 405
    assert client.get(page(org_a, f"{org_a.api_key.pk}/rotate/")).status_code == 405
    assert client.get(page(org_a, "new/")).status_code == 405
    assert keys_of(org_a.members["employee"])[0].revoked_at is None


# -- the audit log ---------------------------------------------------------------------------------------------------


def test_create_rotate_and_revoke_on_the_pages_are_audited_without_secrets(as_member, org_a):
    employee = org_a.members["employee"]
    client = as_member("employee")
    before = {action: len(audit(org_a, action)) for action in ("api_key.created", "api_key.rotated", "api_key.revoked")}

    created = client.post(page(org_a, "new/"), form())
    secret = secret_on(created)
    [_, key] = keys_of(employee)
    rotated = client.post(page(org_a, f"{key.pk}/rotate/"), {"grace_hours": "0"})
    assert rotated.status_code == 201
    new_secret = secret_on(rotated)
    new_key = keys_of(employee)[-1]
    assert client.post(page(org_a, f"{new_key.pk}/revoke/")).status_code == 302

    after = {action: audit(org_a, action) for action in before}
    assert {action: len(entries) for action, entries in after.items()} == {
        action: count + 1 for action, count in before.items()}
    created_entry, rotated_entry, revoked_entry = (after[action][-1] for action in before)
    assert created_entry.object_id == str(key.pk) and created_entry.data["name"] == VALID_NAME
    assert rotated_entry.object_id == str(new_key.pk)
    assert rotated_entry.data["old"] == f"tap_{key.public_id}…{key.last_four}"
    assert revoked_entry.object_id == str(new_key.pk)
    for entry in (created_entry, rotated_entry, revoked_entry):
        assert entry.actor == employee.user
        logged = str(entry.data) + entry.object_repr
        assert secret not in logged and new_secret not in logged and not KEY_SHAPE.search(logged)

    # The audit log page shows them to an admin, still without secrets.
    log = as_member("admin").get(f"/o/{org_a.slug}/audit/")
    assert log.status_code == 200
    assert "api_key.created" in text(log) and "api_key.rotated" in text(log) and "api_key.revoked" in text(log)
    assert not KEY_SHAPE.search(text(log))
