"""Keys that may call chat completions may call the Responses API too.

The Responses API (/v1/responses) came after these keys were minted. It does what chat
completions do (text, tools, structured output: one request, one reply, metered the same way),
and it is the only API some tools speak (Codex CLI), so a key minted for "chat" means it. Legacy
completions and moderations are not added: a key gets those only when asked for.

The gateway caches key identities for up to five minutes (apikeys.services.IDENTITY_TTL); a key's
new scope applies once its cached identity expires or the key next changes.
"""

from django.db import migrations


def add_responses(apps, schema_editor):
    ApiKey = apps.get_model("apikeys", "ApiKey")
    for key in ApiKey.objects.filter(endpoints__contains=["chat"]).exclude(endpoints__contains=["responses"]):
        key.endpoints = sorted({*key.endpoints, "responses"})
        key.save(update_fields=["endpoints"])


def remove_responses(apps, schema_editor):
    ApiKey = apps.get_model("apikeys", "ApiKey")
    for key in ApiKey.objects.filter(endpoints__contains=["chat", "responses"]):
        key.endpoints = [e for e in key.endpoints if e != "responses"]
        key.save(update_fields=["endpoints"])


class Migration(migrations.Migration):

    dependencies = [
        ("apikeys", "0004_apikey_expiry_reminded_at"),
    ]

    operations = [migrations.RunPython(add_responses, remove_responses)]
