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
