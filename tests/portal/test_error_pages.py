"""403 and 404 are pages of the portal (its frame, a way back), not Django's bare defaults."""

import pytest

pytestmark = pytest.mark.django_db


def test_a_page_the_role_may_not_open_is_a_403_in_the_portal_s_frame(login, org_a):
    response = login(org_a.members["employee"]).get(f"/o/{org_a.slug}/balances/")
    assert response.status_code == 403
    body = response.content.decode()
    assert 'class="topbar"' in body and 'data-testid="error-page"' in body
    assert "Your role in this organization does not allow this page." in body
    assert f'href="/o/{org_a.slug}/">Back to my allowance</a>' in body
    assert 'aria-label="Organization"' in body  # the menu, to go elsewhere


def test_a_missing_object_or_someone_else_s_organization_is_a_404_with_a_way_back(login, org_a, org_b):
    client = login(org_a.members["hr"])
    missing = client.get(f"/o/{org_a.slug}/balances/999999999/")
    assert missing.status_code == 404 and 'data-testid="error-page"' in missing.content.decode()
    assert f'href="/o/{org_a.slug}/">Back to my allowance</a>' in missing.content.decode()
    other = client.get(f"/o/{org_b.slug}/")
    body = other.content.decode()
    assert other.status_code == 404 and 'data-testid="error-page"' in body
    assert 'href="/">Back to the portal</a>' in body and org_b.organization.name not in body
