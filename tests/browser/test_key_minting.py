"""API keys end to end in a real browser: a member mints a key, sees its secret once, uses it, revokes it.

alice logs in through the form, creates a key scoped to chat + reading her own usage and one model,
and gets the secret exactly once (with ready-to-paste SDK and curl snippets and a working Copy
button). Afterwards the secret is nowhere: not in any later page, not in any text column of the
database (nor in a decoded session), not in the logs. The secret authenticates against the REST API
for alice's own balance only, and once revoked from the page it is refused from the very next call.
"""

import json
import logging
import os
import re

import httpx
import pytest
from django.apps import apps
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import connection, models
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from apikeys import secrets
from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, ApiKey
from portal.demo import DEMO_PASSWORD
from portal.models import Member
from portal.tenancy import unscoped

ALICE = "alice@acme.example"
KEY_NAME = "laptop: Claude Code"
MODEL_ID, MODEL_LABEL = "claude-haiku", "Claude Haiku"
BALANCES = "/api/v1/o/acme/balances/"
SCREENSHOT = "/tmp/key-created.png"
KEY_SHAPE = re.compile(r"tap_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}")  # public id _ secret + checksum


def _field(page, label):
    return page.get_by_label(f"{label}:", exact=True)


def _stored_text_containing(needles):
    """Every (table, column) holding one of `needles` anywhere in a char/text/JSON value, case-insensitively.

    Three passes: the ORM over every model's char/text/JSON fields (values loaded and searched as
    text), every column of every table in raw SQL (tables or columns no model covers),
    and the decoded session data (stored base64-signed, so the raw passes could not see inside it).
    """
    needles = [needle.lower() for needle in needles]
    hits = set()

    def check(where, value):
        if value is None:
            return
        if isinstance(value, (bytes, memoryview)):
            text = bytes(value).decode("latin-1")
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
        if any(needle in text.lower() for needle in needles):
            hits.add(where)

    with unscoped():
        for model in apps.get_models(include_auto_created=True):
            fields = [f for f in model._meta.concrete_fields
                      if isinstance(f, (models.CharField, models.TextField, models.JSONField))]
            if not fields:
                continue
            for row in model._base_manager.values_list(*[f.attname for f in fields]):
                for field, value in zip(fields, row):
                    check((model._meta.db_table, field.column), value)

        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                columns = [column[0] for column in cursor.description]
                for row in cursor.fetchall():
                    for column, value in zip(columns, row):
                        if not isinstance(value, (int, float)):
                            check((table, column), value if isinstance(value, (bytes, memoryview)) else str(value))

        for session in Session.objects.all():
            check(("django_session", "session_data (decoded)"), session.get_decoded())
    return hits


def _balances(portal_server, secret=None):
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    return httpx.get(f"{portal_server.url}{BALANCES}", headers=headers, timeout=10)


def test_member_mints_a_key_sees_it_once_uses_it_and_revokes_it(portal_server, context, page, log_in, caplog):
    call_command("seed_demo", stdout=open(os.devnull, "w"))
    caplog.set_level(logging.DEBUG)
    page.set_default_timeout(10_000)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=portal_server.url)
    with unscoped():
        alice = Member.objects.select_related("user").get(organization__slug="acme", user__email=ALICE)
        keys_before = set(ApiKey.objects.filter(member=alice).values_list("pk", flat=True))

    # -- 1. alice logs in through the form and opens "API keys" from the navigation.
    log_in(ALICE, DEMO_PASSWORD)
    expect(page).to_have_url(re.compile(r"/o/acme/$"))
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="API keys").click()
    expect(page).to_have_url(re.compile(r"/o/acme/keys/$"))
    expect(page.get_by_role("heading", name="My API keys")).to_be_visible()
    expect(page.locator("[data-testid=key-row]", has_text=KEY_NAME)).to_have_count(0)

    # -- 2. She names the key, scopes it to chat + reading her usage, and one model.
    def fill_the_form():
        _field(page, "Name").fill(KEY_NAME)
        endpoint = {name: page.get_by_role("checkbox", name=label, exact=True) for name, label in ENDPOINTS.items()
                    if name not in ENDPOINT_ROLES}
        # Reporting usage for the organization is for admins: an employee is not even offered it.
        expect(page.get_by_role("checkbox", name=ENDPOINTS["usage_write"], exact=True)).to_have_count(0)
        endpoint["chat"].check()
        endpoint["usage_read"].check()
        endpoint["messages"].uncheck()  # ticked by default
        endpoint["responses"].uncheck()  # ticked by default
        for name, box in endpoint.items():
            (expect(box).to_be_checked if name in ("chat", "usage_read") else expect(box).not_to_be_checked)()
        page.get_by_role("checkbox", name=MODEL_LABEL, exact=True).check()

    fill_the_form()
    page.get_by_role("button", name="Create key").click()
    # Minting needs a fresh password check: with this allauth a plain login does not count as one
    # (only records flagged "reauthenticated" do). The prompt comes back to the keys page; the POST
    # is not replayed, so nothing is minted until she submits again.
    expect(page).to_have_url(re.compile(r"/accounts/reauthenticate/\?next=%2Fo%2Facme%2Fkeys%2F$"))
    expect(page.get_by_text("Confirm your password, then submit again.")).to_be_visible()
    with unscoped():
        assert set(ApiKey.objects.filter(member=alice).values_list("pk", flat=True)) == keys_before  # not yet
    page.locator("input[name=password]").fill(DEMO_PASSWORD)
    page.locator("button[type=submit]").click()
    expect(page).to_have_url(re.compile(r"/o/acme/keys/$"))
    with unscoped():
        assert set(ApiKey.objects.filter(member=alice).values_list("pk", flat=True)) == keys_before  # still not
    fill_the_form()
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Create key").click()
    response = navigation.value

    # -- 3. The response shows the secret once, never cacheable, with snippets carrying it.
    assert response.status == 201, response.status
    assert "no-store" in response.headers.get("cache-control", ""), response.headers
    expect(page.get_by_role("heading", name=f"Your new API key “{KEY_NAME}”")).to_be_visible()
    secret_box = page.locator("[data-testid=secret]")
    expect(secret_box).to_have_count(1)
    secret = secret_box.inner_text()
    assert secret.startswith("tap_") and KEY_SHAPE.fullmatch(secret), secret
    parts = secrets.parse(secret)  # well-formed, checksum included
    assert len(parts.secret) == secrets.SECRET_LENGTH

    base = portal_server.url  # no PORTAL_BASE_URL: the address the page was served on
    snippets = {heading: page.locator("h2", has_text=heading).locator("xpath=following-sibling::pre[1]").inner_text()
                for heading in ("OpenAI SDK (Python)", "Anthropic SDK (Python)", "curl")}
    assert f'OpenAI(base_url="{base}/v1", api_key="{secret}")' in snippets["OpenAI SDK (Python)"]
    assert f'Anthropic(base_url="{base}", api_key="{secret}")' in snippets["Anthropic SDK (Python)"]
    assert snippets["curl"].startswith(f"curl {base}/v1/chat/completions")
    assert f'-H "Authorization: Bearer {secret}"' in snippets["curl"]
    for heading, snippet in snippets.items():
        assert snippet.count(secret) == 1, heading
        assert f'"{MODEL_ID}"' in snippet, heading  # the snippets use the model the key was scoped to
    # The display box, the three snippets and the agents' five places for it, and nowhere else (no
    # hidden input, no attribute).
    assert page.content().count(secret) == 9

    page.screenshot(path=SCREENSHOT, full_page=True)

    # The Copy button puts exactly the secret on the clipboard.
    page.evaluate("navigator.clipboard.writeText('something else')")
    page.get_by_role("button", name="Copy").first.click()
    page.wait_for_function("async secret => (await navigator.clipboard.readText()) === secret", arg=secret)
    # The agents' set-ups copy whole, with the portal's address and the secret.
    setups = page.locator("[data-testid=agent-setups]")
    setups.locator("button[data-copy=setup-claude-code]").click()
    claude_code = f'export ANTHROPIC_BASE_URL="{base}"\nexport ANTHROPIC_API_KEY="{secret}"\nclaude'
    page.wait_for_function("async text => (await navigator.clipboard.readText()) === text", arg=claude_code)
    setups.locator("button[data-copy=setup-codex]").click()
    page.wait_for_function("async base => (await navigator.clipboard.readText()).includes(`base_url = \"${base}/v1\"`)",
                           arg=base)

    # The key was stored with the chosen scopes and only a hash of the secret.
    with unscoped():
        key = ApiKey.objects.get(member=alice, pk__in=ApiKey.objects.exclude(pk__in=keys_before).values("pk"))
    assert (key.name, key.public_id, key.last_four) == (KEY_NAME, parts.public_id, secret[-4:])
    assert key.endpoints == ["chat", "usage_read"] and key.model_ids == [MODEL_ID]
    assert key.secret_hash == secrets.hash_secret(parts.secret) and parts.secret not in key.secret_hash
    assert key.revoked_at is None

    # -- 4. Back on the key list (and after a reload) the secret is gone; the row shows the masked key.
    page.get_by_role("link", name="Back to my keys").click()
    expect(page).to_have_url(re.compile(r"/o/acme/keys/$"))
    # History cannot bring the secret back either: the answer was no-store, so there is no copy to show.
    with pytest.raises(PlaywrightError, match="ERR_CACHE_MISS"):
        page.go_back()
    page.wait_for_url(re.compile(r"^chrome-error://"))  # Chromium's "Confirm Form Resubmission" page
    expect(page.get_by_text(secret)).to_have_count(0)
    page.goto(f"{portal_server.url}/o/acme/keys/")
    for _ in range(2):
        row = page.locator("[data-testid=key-row]", has_text=KEY_NAME)
        expect(row).to_have_count(1)
        expect(row.locator("code")).to_have_text(f"tap_{parts.public_id}…{secret[-4:]}")
        html = page.content()
        assert secret not in html and parts.secret not in html
        assert parts.secret[:8] not in html  # not even a fragment of the secret part
        page.reload()

    # -- 5. The database holds the public id (the scanner can find things) but never the secret.
    public_id_at = _stored_text_containing([parts.public_id])
    assert ("apikeys_apikey", "public_id") in public_id_at, public_id_at
    assert _stored_text_containing([secret, parts.secret]) == set()

    # -- 6. The secret authenticates as alice, for her own balance only.
    assert _balances(portal_server).status_code == 401  # the control: no key, no access
    answer = _balances(portal_server, secret)
    assert answer.status_code == 200, answer.text
    rows = answer.json()["results"]
    assert [(row["member"], row["email"]) for row in rows] == [(alice.pk, ALICE)]
    with unscoped():
        assert ApiKey.objects.get(pk=key.pk).last_used_at is not None
    # A wrong secret with the same public id is refused (the hash is checked, not just the id).
    forged_body = f"tap_{parts.public_id}_{'A' * secrets.SECRET_LENGTH}"
    assert _balances(portal_server, forged_body + secrets._checksum(forged_body)).status_code == 401

    # -- 6b. The key works with the OpenAI SDK through the gateway (chat is in its scopes; the demo's
    # sandbox serves every model); the list shows what it spent this period, her usage page the request.
    import openai

    reply = openai.OpenAI(base_url=f"{portal_server.url}/v1", api_key=secret, max_retries=0).chat.completions.create(
        model=MODEL_ID, max_tokens=20, messages=[{"role": "user", "content": "Hello from the browser test"}])
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    with unscoped():
        spent = ApiKey.objects.select_related("spend").get(pk=key.pk).spend.used
    assert spent > 0
    page.goto(f"{portal_server.url}/o/acme/keys/")
    spend_cell = page.locator("[data-testid=key-row]", has_text=KEY_NAME).locator("[data-testid=key-spend] .tokens")
    expect(spend_cell).to_have_attribute("title", f"{spent:,} tokens")
    page.get_by_role("navigation", name="Organization").get_by_role("link", name="Usage").click()
    expect(page.locator("tbody tr").first).to_contain_text(MODEL_ID)
    expect(page.locator("tbody tr").first).to_contain_text(KEY_NAME)
    page.goto(f"{portal_server.url}/o/acme/keys/")

    # -- 7. alice revokes the key from the page; the very next API call is refused.
    revoke = page.locator("[data-testid=key-row]", has_text=KEY_NAME).get_by_role("button", name="Revoke")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    revoke.click()  # a confirmation first: dismissed, nothing happens
    assert asked and f"Revoke the key “{KEY_NAME}”?" in asked[0]
    expect(revoke).to_have_count(1)
    page.once("dialog", lambda dialog: dialog.accept())
    revoke.click()
    expect(page.locator(".messages .success")).to_contain_text(f"Key {KEY_NAME} revoked")
    row = page.locator("[data-testid=key-row]", has_text=KEY_NAME)
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    refused = _balances(portal_server, secret)
    assert refused.status_code == 401, refused.text
    assert refused.json() == {"detail": "API key refused: this API key was revoked."}
    assert refused.headers["www-authenticate"] == "Bearer"
    with unscoped():
        assert ApiKey.objects.get(pk=key.pk).revoked_by_id == alice.user_id

    # -- 8. Nothing on the way logged the secret, and the database still does not hold it.
    assert parts.secret not in caplog.text
    assert _stored_text_containing([secret, parts.secret]) == set()
