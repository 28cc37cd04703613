from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from apikeys.models import ApiKey
from portal.models import Member, Organization


def keys_of(*, member: Member) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(member=member).select_related("rotated_to")


def keys_of_organization(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("member__user", "rotated_to")


def key_get(*, organization: Organization, api_key_id: int, member: Member | None = None) -> ApiKey:
    """A key of the organization; with `member`, only that member's own (others' answer 404)."""
    keys = ApiKey.objects.filter(organization=organization).select_related("member__user")
    if member is not None:
        keys = keys.filter(member=member)
    return get_object_or_404(keys, pk=api_key_id)
