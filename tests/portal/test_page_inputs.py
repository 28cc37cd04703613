"""Page parameters that once answered 500: days at the ends of the calendar on the dashboard and the
audit log, and a key expiry past year 9999 in UTC. Each is a 400 page showing the error; nothing changes."""

import html
from datetime import timedelta

import pytest
from django.utils import timezone

from apikeys.models import ApiKey
from portal.tenancy import unscoped
from tests.allowances.helpers import snapshot

EXTREMES = [{"since": "0001-01-01", "until": "9999-12-31"}, {"since": "0001-01-01"}, {"until": "9999-12-31"},
            {"since": "1999-12-31"}, {"until": "2100-01-01"}]
BOUNDS_MESSAGE = "Choose a day from 2000-01-01 to 2099-12-31."


def shown(response) -> str:
    return html.unescape(response.content.decode())


@pytest.mark.parametrize("query", EXTREMES, ids=repr)
def test_the_dashboard_refuses_days_out_of_bounds(login, org_a, query):
    client = login(org_a.members["employee"])
    client.get(f"/o/{org_a.slug}/")  # the account is open, so the refused request has nothing to open
    before = snapshot()
    response = client.get(f"/o/{org_a.slug}/", query)
    assert response.status_code == 400
    assert BOUNDS_MESSAGE in shown(response)
    partial = client.get(f"/o/{org_a.slug}/", query, headers={"HX-Request": "true", "HX-Target": "history"})
    assert partial.status_code == 400 and BOUNDS_MESSAGE in shown(partial)
    assert snapshot() == before


def test_the_dashboard_takes_the_first_and_last_days(login, org_a):
    client = login(org_a.members["employee"])
    response = client.get(f"/o/{org_a.slug}/", {"since": "2000-01-01", "until": "2099-12-31"})
    assert response.status_code == 200
    assert "welcome" in shown(response)  # the fixture's bonus grant is in the history


@pytest.mark.parametrize("query", EXTREMES, ids=repr)
def test_the_audit_log_refuses_days_out_of_bounds(login, org_a, query):
    client = login(org_a.members["admin"])
    before = snapshot()
    response = client.get(f"/o/{org_a.slug}/audit/", query)
    assert response.status_code == 400
    assert BOUNDS_MESSAGE in shown(response)
    assert snapshot() == before
    assert client.get(f"/o/{org_a.slug}/audit/", {"since": "2000-01-01", "until": "2099-12-31"}).status_code == 200


def test_an_end_before_the_start_is_a_400_too(login, org_a):
    client = login(org_a.members["employee"])
    response = client.get(f"/o/{org_a.slug}/", {"since": "2026-05-02", "until": "2026-05-01"})
    assert response.status_code == 400 and "The end date is before the start date." in shown(response)


@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59", "2099-01-01T00:00"])
def test_a_key_expiry_beyond_ten_years_is_refused(client, org_a, expires_at):
    employee = org_a.members["employee"]
    client.force_login(employee.user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.post("/accounts/reauthenticate/", {"password": org_a.password}).status_code == 302
    with unscoped():
        before = ApiKey.objects.count()
    response = client.post(f"/o/{org_a.slug}/keys/new/", {
        "name": "far future", "endpoints": ["chat"], "form_token": "t-1", "expires_at": expires_at})
    assert response.status_code == 400
    assert "The expiry must be within ten years." in shown(response)
    with unscoped():
        assert ApiKey.objects.count() == before
    soon = (timezone.now() + timedelta(days=365)).strftime("%Y-%m-%dT%H:%M")
    response = client.post(f"/o/{org_a.slug}/keys/new/", {
        "name": "next year", "endpoints": ["chat"], "form_token": "t-2", "expires_at": soon})
    assert response.status_code == 201
