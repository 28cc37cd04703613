"""A member deprovisioned by the directory loses access at once, served as in production (uvicorn,
the gateway and the SCIM API on one server): their key is revoked and fails at the gateway on the
very next request (and stays revoked if they are made active again), their sessions end, their open
holds are released, and the allowance left on their account follows the organization's rule for
leavers; the ledger is kept."""

import json

import httpx
import pytest
from django.test import Client
from scim2_client.engines.httpx2 import SyncSCIMClient
from httpx2 import Client as Httpx2Client
from scim2_models import PatchOp, PatchOperation, User

from allowances.models import Account, LedgerEntry
from portal.models import Organization
from portal.tenancy import unscoped
from tests.factories import PASSWORD
from tests.gateway.conftest import fake_upstream, gateway_url, metered  # noqa: F401  (fixtures)

pytestmark = pytest.mark.transactional

PROMPT = [{"role": "user", "content": "Hi"}]


def chat(metered, secret):
    return httpx.post(f"{metered.url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      content=json.dumps({"model": "fake-gpt", "messages": PROMPT}).encode(), timeout=30)


def scim_client(metered):
    org = metered.org
    http = Httpx2Client(base_url=f"{metered.url.removesuffix('/v1')}/scim/v2/o/{org.slug}",
                        headers={"Authorization": f"Bearer {org.scim_token_secret}"}, timeout=30)
    client = SyncSCIMClient(http)
    client.discover()
    return client


def logged_in(user) -> Client:
    client = Client()
    assert client.post("/accounts/login/", {"login": user.email, "password": PASSWORD}).status_code == 302
    return client


def account_of(member) -> Account:
    with unscoped():
        return Account.objects.get(member=member)


@pytest.mark.parametrize("leaver_allowance", ["keep", "forfeit"])
def test_deactivated_by_scim_the_key_fails_at_the_gateway_on_the_next_request(metered, leaver_allowance):
    org, employee = metered.org, metered.member
    Organization.objects.filter(pk=org.organization.pk).update(leaver_allowance=leaver_allowance)
    browser = logged_in(employee.user)
    assert browser.get(f"/o/{org.slug}/").status_code == 200
    assert chat(metered, metered.key).status_code == 200  # the key works, its identity is cached now
    account = account_of(employee)
    left = account.available + account.held  # what stays once the open holds (the fixture's) are released
    entries_before = LedgerEntry.all_objects.filter(account=account).count()

    scim = scim_client(metered)
    patch = PatchOp[User](operations=[PatchOperation[User](op="replace", path="active", value=False)])
    assert scim.modify(User, str(employee.pk), patch).active is False

    refused = chat(metered, metered.key)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["message"] == "API key refused: this API key was revoked."
    assert len(metered.upstream.requests) == 1  # nothing after the deactivation reached the provider
    assert browser.get(f"/o/{org.slug}/").status_code == 302  # their only organization: the session ended

    with unscoped():
        release = LedgerEntry.all_objects.get(closes_hold_id=org.hold.id)
        assert release.kind == "release"
        account.refresh_from_db()
        assert account.held == 0
        new = LedgerEntry.all_objects.filter(account=account).count() - entries_before
        if leaver_allowance == "forfeit":
            assert account.available == 0
            forfeit = LedgerEntry.all_objects.get(account=account, reference=f"member:{employee.pk}")
            assert (forfeit.kind, forfeit.tokens) == ("adjustment", -left)
            assert new == 2  # the release and the forfeit; nothing earlier was touched
        else:
            assert account.available == left and new == 1
    from django.core.management import call_command

    call_command("verify_ledger")  # every account still equals the sum of its entries

    # Active again (the directory re-hires them), the old key stays revoked: they mint a new one.
    patch = PatchOp[User](operations=[PatchOperation[User](op="replace", path="active", value=True)])
    scim.modify(User, str(employee.pk), patch)
    again = chat(metered, metered.key)
    assert again.status_code == 401
    assert again.json()["error"]["message"] == "API key refused: this API key was revoked."


def test_deleted_by_scim_the_key_is_revoked(metered):
    scim = scim_client(metered)
    assert chat(metered, metered.key).status_code == 200
    scim.delete(User, str(metered.member.pk))
    refused = chat(metered, metered.key)
    assert refused.status_code == 401
    # Even reactivated (provisioned again), a deleted member's old keys stay revoked.
    scim.create(User(user_name=metered.member.user.email))
    assert chat(metered, metered.key).json()["error"]["message"] == "API key refused: this API key was revoked."
