"""Finding the usage records a gateway request left."""

from gateway.models import UsageRecord
from portal.tenancy import unscoped


def last_record_id():
    with unscoped():
        return UsageRecord.all_objects.order_by("-id").values_list("id", flat=True).first() or 0


def records_after(record_id):
    with unscoped():
        return list(UsageRecord.all_objects.filter(id__gt=record_id).order_by("id"))


def the_record_after(record_id):
    found = records_after(record_id)
    assert len(found) == 1, found
    return found[0]
