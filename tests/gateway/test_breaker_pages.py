"""The breaker's page: admins set its limits (bad values are field errors that change nothing,
empty fields switch a limit off) and every change is audited; the limits reach the gateway's
cached configuration at once."""

import pytest

from gateway.metering import org_config
from gateway.models import BreakerSettings
from portal.models import AuditLogEntry
from portal.tenancy import unscoped

pytestmark = pytest.mark.django_db


def page(org):
    return f"/o/{org.slug}/settings/breaker/"


@pytest.mark.parametrize("field, value, message", [
    ("key_per_minute", "0", "A whole number of tokens from 1"),
    ("key_per_hour", "-5", "A whole number of tokens from 1"),
    ("member_per_minute", "1.5", "A whole number of tokens from 1"),
    ("organization_per_hour", "99999999999", "A whole number of tokens from 1"),
    ("member_normal_multiple", "1", "A whole number from 2 to 1,000"),
    ("member_normal_multiple", "ten", "A whole number from 2 to 1,000"),
])
def test_a_bad_limit_is_a_field_error_and_changes_nothing(as_admin, org_a, field, value, message):
    before = list(BreakerSettings.all_objects.values())
    response = as_admin.post(page(org_a), {field: value, "key_per_minute": "1000"} if field != "key_per_minute"
                             else {field: value})
    assert response.status_code == 400
    assert message in response.context["form"].errors[field][0]
    with unscoped():
        assert list(BreakerSettings.all_objects.values()) == before


def test_limits_are_saved_audited_and_reach_the_gateway_at_once(as_admin, org_a):
    assert org_config(org_a.organization.pk).breaker is None  # cached now, with no limit set
    response = as_admin.post(page(org_a), {"key_per_minute": "50_000", "member_normal_multiple": "10"})
    assert response.status_code == 302
    limits = org_config(org_a.organization.pk).breaker
    assert (limits.key_per_minute, limits.member_normal_multiple, limits.key_per_hour) == (50_000, 10, None)
    with unscoped():
        entry = AuditLogEntry.objects.get(action="breaker.settings_updated")
    assert entry.organization_id == org_a.organization.pk and "key_per_minute" in entry.data
    assert as_admin.post(page(org_a), {}).status_code == 302  # every field empty: the breaker is off
    assert org_config(org_a.organization.pk).breaker is None
    assert "The breaker has not tripped." not in as_admin.get(page(org_a)).content.decode()  # the fixture's trip
