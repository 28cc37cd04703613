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
    speaks nothing else); the others are left as they were. The keys are read and written through
    the models as they were at each migration (later ones add columns), and the database is
    migrated back to the latest whatever happens."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = ("apikeys", "0004_apikey_expiry_reminded_at"), ("apikeys", "0005_chat_keys_may_call_responses")
    executor = MigrationExecutor(connection)
    try:
        executor.migrate([before])
        old_keys = executor.loader.project_state([before]).apps.get_model("apikeys", "ApiKey")
        chat_key = old_keys.objects.get(pk=org_a.api_key.pk)
        assert "responses" not in chat_key.endpoints and "chat" in chat_key.endpoints  # as minted back then
        other = old_keys.objects.create(organization_id=org_a.organization.pk, member_id=org_a.members["employee"].pk,
                                        name="messages only", public_id="msgonly00001", secret_hash="x" * 64,
                                        last_four="abcd", endpoints=["messages", "usage_read"],
                                        spend_id=chat_key.spend_id)
        executor = MigrationExecutor(connection)
        executor.migrate([after])
        new_keys = executor.loader.project_state([after]).apps.get_model("apikeys", "ApiKey")
        assert new_keys.objects.get(pk=chat_key.pk).endpoints == sorted({*chat_key.endpoints, "responses"})
        assert new_keys.objects.get(pk=other.pk).endpoints == ["messages", "usage_read"]
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
