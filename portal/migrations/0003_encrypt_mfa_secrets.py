"""Encrypt the TOTP secrets and recovery-code seeds stored in plain text before MFA_ADAPTER
encrypted them. Safe to run again: a value already encrypted is left as it is."""

from django.db import migrations

from portal.mfa import cipher


def _encrypted(value: str) -> str:
    if cipher.looks_encrypted(value):
        cipher.decrypt(value)  # refuses a value encrypted under another key rather than encrypt it twice
        return value
    return cipher.encrypt(value)


def _decrypted(value: str) -> str:
    return cipher.decrypt(value) if cipher.looks_encrypted(value) else value


def _convert(data: dict, convert) -> dict:
    """The authenticator's data with each secret converted: the TOTP secret, the recovery-code
    seed, and codes migrated from django-allauth-2fa."""
    data = dict(data)
    for name in ("secret", "seed"):
        if isinstance(data.get(name), str):
            data[name] = convert(data[name])
    if isinstance(data.get("migrated_codes"), list):
        data["migrated_codes"] = [convert(code) for code in data["migrated_codes"]]
    return data


def _rewrite(apps, convert) -> None:
    Authenticator = apps.get_model("mfa", "Authenticator")
    for authenticator in Authenticator.objects.filter(type__in=["totp", "recovery_codes"]).iterator():
        data = _convert(authenticator.data, convert)
        if data != authenticator.data:
            authenticator.data = data
            authenticator.save(update_fields=["data"])


def encrypt_secrets(apps, schema_editor):
    _rewrite(apps, _encrypted)


def decrypt_secrets(apps, schema_editor):
    _rewrite(apps, _decrypted)


class Migration(migrations.Migration):

    dependencies = [
        ("portal", "0002_member_id_organization"),
        ("mfa", "0003_authenticator_type_uniq"),
    ]

    operations = [migrations.RunPython(encrypt_secrets, decrypt_secrets)]
