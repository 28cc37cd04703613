from django import template
from django.urls import reverse

register = template.Library()


@register.simple_tag(takes_context=True)
def org_url(context, name, **kwargs):
    """reverse() for a page of the active organization: {% org_url 'member_edit' member_id=m.pk %}."""
    return reverse(name, kwargs={"org_slug": context["request"].organization.slug, **kwargs})


@register.filter
def has_role(member, role):
    return member is not None and member.has_any_role([role])


@register.filter
def get_item(mapping, key):
    return mapping.get(key) if mapping else None


# Audit actions whose data are {field: [before, after]} pairs (portal.audit.changes); in the
# others a two-item list is a value (roles, say), not a change.
_CHANGE_ACTIONS = (".updated", ".deactivated")


def _readable(value) -> str:
    if value is None or value == "" or value == []:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_readable(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{key.replace('_', ' ')}: {_readable(item)}" for key, item in value.items())
    return str(value)


@register.filter
def audit_changes(entry) -> list[dict]:
    """An audit entry's data as rows for people: {"field", "before", "after"} or {"field", "value"}."""
    data = entry.data if isinstance(entry.data, dict) else {"data": entry.data}
    pairs = entry.action.endswith(_CHANGE_ACTIONS)
    rows = []
    for field, value in data.items():
        label = field.replace("_", " ")
        if pairs and isinstance(value, list) and len(value) == 2:
            rows.append({"field": label, "before": _readable(value[0]), "after": _readable(value[1])})
        else:
            rows.append({"field": label, "value": _readable(value)})
    return rows
