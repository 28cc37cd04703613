"""One helper that every privileged service calls to write the audit log."""

from __future__ import annotations

from django.db import models

from portal.models import AuditLogEntry


def _jsonable(value):
    if isinstance(value, models.Model):
        return value.pk
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def log_action(*, actor, organization, action: str, obj=None, data: dict | None = None) -> AuditLogEntry:
    """Record that `actor` did `action` to `obj` in `organization`, with the changed values."""
    return AuditLogEntry.all_objects.create(
        organization=organization,
        actor=actor if getattr(actor, "pk", None) else None,
        actor_email=getattr(actor, "email", "") or "",
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        data=_jsonable(data or {}),
    )


def changes(instance, fields, new_values: dict) -> dict:
    """The {field: [old, new]} pairs that actually change, for the audit log."""
    return {
        field: [_jsonable(getattr(instance, field)), _jsonable(new_values[field])]
        for field in fields
        if field in new_values and getattr(instance, field) != new_values[field]
    }
