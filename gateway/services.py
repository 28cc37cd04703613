"""Writes for the gateway's admin side: provider connections. Every write is audited; secrets never are."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction

from gateway import crypto
from gateway.models import ProviderConnection
from portal.audit import changes, log_action
from portal.models import Organization

CONNECTION_FIELDS = ["name", "kind", "base_url", "connect_timeout", "read_timeout", "is_active"]


def _clean_connection(organization: Organization, data: dict, *, exclude_pk=None) -> dict:
    errors = {}
    name = str(data.get("name") or "").strip()
    if not name:
        errors["name"] = "Name the connection."
    elif ProviderConnection.objects.filter(organization=organization, name=name).exclude(pk=exclude_pk).exists():
        errors["name"] = f"There is already a connection named {name}."
    kind = data.get("kind")
    if kind not in ProviderConnection.Kind.values:
        errors["kind"] = "Choose a kind of provider."
    base_url = str(data.get("base_url") or "").strip().rstrip("/")
    if kind == ProviderConnection.Kind.SANDBOX:
        base_url = ""
    elif not base_url:
        errors["base_url"] = "Enter the provider's API address, e.g. https://api.openai.com/v1."
    else:
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError:
            errors["base_url"] = "Enter an http(s) address."
    cleaned = {"name": name, "kind": kind, "base_url": base_url, "is_active": bool(data.get("is_active", True))}
    for field, ceiling in (("connect_timeout", 60), ("read_timeout", 3600)):
        try:
            value = int(str(data.get(field)).strip())
            if not 0 < value <= ceiling:
                raise ValueError
        except (TypeError, ValueError):
            errors[field] = f"Whole seconds from 1 to {ceiling}."
            continue
        cleaned[field] = value
    if errors:
        raise ValidationError(errors)
    return cleaned


def _set_secret(connection: ProviderConnection, secret: str | None) -> bool:
    """Store a new secret (None keeps the current one, "" clears it). True when it changed."""
    if secret is None:
        return False
    secret = secret.strip()
    connection.secret_ciphertext = crypto.encrypt(secret)
    connection.secret_last_four = secret[-4:] if len(secret) >= 12 else ""
    return True


@transaction.atomic
def provider_connection_create(*, organization: Organization, actor, secret: str = "", **data) -> ProviderConnection:
    connection = ProviderConnection(organization=organization, **_clean_connection(organization, data))
    _set_secret(connection, secret)
    connection.save()
    log_action(actor=actor, organization=organization, action="provider_connection.created", obj=connection,
               data={field: getattr(connection, field) for field in CONNECTION_FIELDS}
               | {"secret": "set" if secret else "none"})
    return connection


@transaction.atomic
def provider_connection_update(*, connection: ProviderConnection, actor, secret: str | None = None,
                               **data) -> ProviderConnection:
    merged = {field: getattr(connection, field) for field in CONNECTION_FIELDS} | data
    cleaned = _clean_connection(connection.organization, merged, exclude_pk=connection.pk)
    diff = changes(connection, cleaned.keys(), cleaned)
    for field, value in cleaned.items():
        setattr(connection, field, value)
    if _set_secret(connection, secret):
        diff["secret"] = "replaced" if secret else "cleared"
    connection.save()
    if diff:
        log_action(actor=actor, organization=connection.organization, action="provider_connection.updated",
                   obj=connection, data=diff)
    return connection
