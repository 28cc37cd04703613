"""TOTP secrets and recovery-code seeds are stored encrypted with MFA_SECRETS_KEY, never in plain text;
the data migration encrypts the ones stored before, once, however often it runs."""

import importlib

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.recovery_codes.internal.auth import RecoveryCodes
from allauth.mfa.totp.internal.auth import generate_totp_secret
from django.apps import apps
from django.contrib.auth import SESSION_KEY
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from gateway import crypto as provider_crypto
from portal.mfa import cipher
from tests.factories import PASSWORD
from tests.support.mfa import current_totp_code

BEFORE = ("portal", "0002_member_id_organization")
ENCRYPTING = ("portal", "0003_encrypt_mfa_secrets")


def raw_rows(user) -> dict[str, str]:
    """The stored authenticator rows of `user`, as the database holds them (type -> data as text)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT type, CAST(data AS TEXT) FROM {Authenticator._meta.db_table} WHERE user_id = %s",
                       [user.pk])
        return dict(cursor.fetchall())


def stored_data(user) -> dict[str, dict]:
    return {a.type: a.data for a in Authenticator.objects.filter(user=user)}


def log_in_with_second_factor(client, user, code: str):
    client.logout()
    response = client.post("/accounts/login/", {"login": user.email, "password": PASSWORD})
    assert response["Location"] == "/accounts/2fa/authenticate/"
    return client.post("/accounts/2fa/authenticate/", {"code": code})


def enable_totp(client, user) -> tuple[str, list[str]]:
    """Turn TOTP on through allauth's pages, as a person does; returns the secret and the recovery codes."""
    assert client.post("/accounts/login/", {"login": user.email, "password": PASSWORD}).status_code == 302
    confirm = client.get("/accounts/2fa/totp/activate/")["Location"]
    assert confirm.startswith("/accounts/reauthenticate/")  # allauth asks for the password again first
    page = client.post(confirm, {"password": PASSWORD}, follow=True)
    assert page.request["PATH_INFO"] == "/accounts/2fa/totp/activate/"
    secret = page.context["form"].secret
    response = client.post("/accounts/2fa/totp/activate/", {"code": current_totp_code(secret)})
    assert (response.status_code, response["Location"]) == (302, "/accounts/2fa/recovery-codes/")
    codes = client.get("/accounts/2fa/recovery-codes/").context["unused_codes"]
    assert len(codes) == 10
    return secret, codes


@pytest.mark.django_db
def test_secrets_enabled_through_allauth_are_not_stored_in_plain_text(client, org_a):
    user = org_a.members["employee"].user
    secret, codes = enable_totp(client, user)

    rows = raw_rows(user)
    assert set(rows) == {"totp", "recovery_codes"}
    data = stored_data(user)
    seed = cipher.decrypt(data["recovery_codes"]["seed"])
    assert cipher.decrypt(data["totp"]["secret"]) == secret
    for plain in (secret, secret.lower(), seed, *codes):
        assert all(plain not in text for text in rows.values()), "a secret is stored in plain text"
    assert cipher.looks_encrypted(data["totp"]["secret"]) and cipher.looks_encrypted(data["recovery_codes"]["seed"])

    # The keys of the two kinds of secret differ (both derived from SECRET_KEY here).
    with pytest.raises(ValueError, match="MFA_SECRETS_KEY"):
        cipher.decrypt(provider_crypto.encrypt(secret))
    with pytest.raises(ValueError, match="PROVIDER_SECRETS_KEY"):
        provider_crypto.decrypt(data["totp"]["secret"])

    # Logging in still works, with the TOTP code and with a recovery code.
    response = log_in_with_second_factor(client, user, current_totp_code(secret))
    assert response.status_code == 302 and client.session[SESSION_KEY] == str(user.pk)
    response = log_in_with_second_factor(client, user, codes[0])
    assert response.status_code == 302 and client.session[SESSION_KEY] == str(user.pk)
    assert codes[0] not in RecoveryCodes(Authenticator.objects.get(user=user, type="recovery_codes")).get_unused_codes()


def migrate(target) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([target])


def migrate_to_the_latest() -> None:
    """Every app's last migration: going back to BEFORE also unapplied the later ones (of any app)."""
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_secrets_stored_in_plain_text_once(client, org_a):
    user = org_a.members["employee"].user
    secret, seed = generate_totp_secret(), RecoveryCodes.generate_seed()
    migrated_codes = ["12345678", "87654321"]
    try:
        migrate(BEFORE)
        # Rows as allauth wrote them before MFA_ADAPTER encrypted anything.
        Authenticator.objects.create(user=user, type="totp", data={"secret": secret})
        Authenticator.objects.create(user=user, type="recovery_codes",
                                     data={"seed": seed, "used_mask": 0, "migrated_codes": migrated_codes})
        assert secret in raw_rows(user)["totp"]
    finally:
        migrate(ENCRYPTING)
        migrate_to_the_latest()

    rows, data = raw_rows(user), stored_data(user)
    for plain in (secret, seed, *migrated_codes):
        assert all(plain not in text for text in rows.values())
    assert cipher.decrypt(data["totp"]["secret"]) == secret
    assert cipher.decrypt(data["recovery_codes"]["seed"]) == seed
    assert [cipher.decrypt(code) for code in data["recovery_codes"]["migrated_codes"]] == migrated_codes
    assert data["recovery_codes"]["used_mask"] == 0

    # Run again, it changes nothing: nothing is encrypted twice.
    importlib.import_module("portal.migrations.0003_encrypt_mfa_secrets").encrypt_secrets(apps, None)
    assert raw_rows(user) == rows

    # The secrets work as allauth reads them.
    response = log_in_with_second_factor(client, user, current_totp_code(secret))
    assert response.status_code == 302 and client.session[SESSION_KEY] == str(user.pk)
    response = log_in_with_second_factor(client, user, migrated_codes[1])
    assert response.status_code == 302 and client.session[SESSION_KEY] == str(user.pk)


@pytest.mark.django_db
def test_the_migration_refuses_a_secret_encrypted_under_another_key(org_a, settings):
    """A token that the key cannot read (MFA_SECRETS_KEY changed) stops the migration rather than
    being encrypted a second time."""
    user = org_a.members["employee"].user
    foreign = provider_crypto.encrypt(generate_totp_secret())
    Authenticator.objects.create(user=user, type="totp", data={"secret": foreign})
    with pytest.raises(ValueError, match="MFA_SECRETS_KEY"):
        importlib.import_module("portal.migrations.0003_encrypt_mfa_secrets").encrypt_secrets(apps, None)
    assert stored_data(user)["totp"]["secret"] == foreign
