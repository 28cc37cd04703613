from django.db.models import BigIntegerField, Case, F, Q, QuerySet, Value, When
from django.shortcuts import get_object_or_404

from apikeys.models import ApiKey
from portal.models import Member, Organization


def _with_spend(keys: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
    """`spent_this_period`: tokens used and held with the key (and the keys it was rotated from) in
    its owner's open period."""
    in_open_period = Q(spend__period_start=F("member__account__period_start"))
    return keys.annotate(spent_this_period=Case(When(in_open_period, then=F("spend__used") + F("spend__held")),
                                                default=Value(0), output_field=BigIntegerField()))


def keys_of(*, member: Member) -> QuerySet[ApiKey]:
    return _with_spend(ApiKey.objects.filter(member=member).select_related("rotated_to", "paused_by"))


def keys_of_organization(*, organization: Organization) -> QuerySet[ApiKey]:
    return _with_spend(ApiKey.objects.filter(organization=organization).select_related("member__user", "rotated_to", "paused_by"))


def key_get(*, organization: Organization, api_key_id: int, member: Member | None = None) -> ApiKey:
    """A key of the organization; with `member`, only that member's own (others' answer 404)."""
    keys = ApiKey.objects.filter(organization=organization).select_related("member__user")
    if member is not None:
        keys = keys.filter(member=member)
    return get_object_or_404(keys, pk=api_key_id)
