from io import StringIO

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_every_model_change_has_its_migration():
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out)
    except SystemExit:
        pytest.fail(f"models changed without a migration:\n{out.getvalue()}")


@pytest.mark.transactional
def test_keys_that_may_call_chat_completions_may_call_the_responses_api_after_apikeys_0005(org_a):
    """Keys minted before the Responses API existed: those with the chat scope get it (Codex CLI
    speaks nothing else); the others are left as they were."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    from apikeys.models import ApiKey
    from portal.tenancy import unscoped

    before, after = ("apikeys", "0004_apikey_expiry_reminded_at"), ("apikeys", "0005_chat_keys_may_call_responses")
    MigrationExecutor(connection).migrate([before])
    with unscoped():
        chat_key = ApiKey.all_objects.get(pk=org_a.api_key.pk)
        assert "responses" not in chat_key.endpoints and "chat" in chat_key.endpoints  # as minted back then
        other = ApiKey.all_objects.create(organization=org_a.organization, member=org_a.members["employee"],
                                          name="messages only", public_id="msgonly00001", secret_hash="x" * 64,
                                          last_four="abcd", endpoints=["messages", "usage_read"],
                                          spend=chat_key.spend)
    MigrationExecutor(connection).migrate([after])
    with unscoped():
        assert ApiKey.all_objects.get(pk=chat_key.pk).endpoints == sorted({*chat_key.endpoints, "responses"})
        assert ApiKey.all_objects.get(pk=other.pk).endpoints == ["messages", "usage_read"]
