"""Reloading the page that showed a new secret re-posts its form: that must not mint a second key."""

import re

from apikeys.models import ApiKey
from portal.tenancy import unscoped


def test_a_resubmitted_key_form_mints_once(client, org_a):
    employee = org_a.members["employee"]
    client.post("/accounts/login/", {"login": employee.user.email, "password": org_a.password})
    client.post("/accounts/reauthenticate/", {"password": org_a.password})
    form = {"name": "laptop", "endpoints": ["chat"], "form_token": "one-form"}
    first = client.post(f"/o/{org_a.slug}/keys/new/", form)
    assert first.status_code == 201
    secret = re.search(r'data-testid="secret">([^<]+)<', first.content.decode()).group(1)
    again = client.post(f"/o/{org_a.slug}/keys/new/", form)
    assert again.status_code == 400
    assert "already created the key" in again.content.decode()
    assert secret not in again.content.decode()  # the secret is never shown a second time
    with unscoped():
        assert ApiKey.objects.filter(member=employee, name="laptop").count() == 1
