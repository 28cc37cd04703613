"""The SAML endpoints anyone can post to never fail on the server: a SAMLResponse that is not base64,
not XML, XML with a DTD or entities, or XML that is no SAML response is refused with a 4xx page and
logs no one in; an identity provider whose metadata URL (or OpenID Connect discovery document)
cannot be read makes its login and the portal's metadata page a 4xx saying so, not a 500."""

import base64

import pytest

from identity.models import IdentityProvider
from portal.tenancy import unscoped
from tests.identity.test_saml_login import client, saml_idp, start_login  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db

BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
                  '<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol">&lol2;</samlp:Response>')
RESPONSES = {
    "not xml": base64.b64encode(b"not xml").decode(),
    "not base64": "!!!not base64!!!",
    "empty": "",
    "entities": base64.b64encode(BILLION_LAUGHS.encode()).decode(),
    "external entity": base64.b64encode(b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                        b'<r>&x;</r>').decode(),
    "not a response": base64.b64encode(b"<x/>").decode(),
    "binary": base64.b64encode(bytes(range(256))).decode(),
}


@pytest.mark.parametrize("started", [True, False], ids=["after a login started", "unsolicited"])
@pytest.mark.parametrize("name", RESPONSES)
def test_a_malformed_saml_response_is_refused_without_a_server_error(client, org_a, saml_idp, name, started):
    if started:
        start_login(client, org_a)
    response = client.post(f"/accounts/saml/{org_a.slug}/acs/", {"SAMLResponse": RESPONSES[name], "RelayState": "x"})
    assert response.status_code == 302
    finished = client.get(response["Location"])
    assert 400 <= finished.status_code < 500, finished.content[:300]
    assert "_auth_user_id" not in client.session


@pytest.mark.parametrize("metadata_url", ["https://idp.unreachable.invalid/metadata", "http://127.0.0.1:9/metadata"])
def test_unreadable_metadata_makes_the_login_and_metadata_pages_a_4xx(client, org_a, saml_idp, metadata_url):
    with unscoped():
        IdentityProvider.objects.filter(organization=org_a.organization).update(
            metadata_url=metadata_url, entity_id="https://idp.a.example/saml/metadata", metadata_xml="")
    login = client.post(f"/accounts/saml/{org_a.slug}/login/", {"process": "login"})
    assert login.status_code == 400 and b"metadata" in login.content
    metadata = client.get(f"/accounts/saml/{org_a.slug}/metadata/")
    assert metadata.status_code == 400
    assert "_auth_user_id" not in client.session


def test_an_unreachable_openid_connect_provider_makes_its_login_a_4xx(client, org_a):
    # The fixture's provider is at https://idp.a.example/, a name that does not resolve.
    login = client.post(f"/accounts/oidc/{org_a.slug}-oidc/login/", {"process": "login"})
    assert login.status_code == 400 and b"could not be reached" in login.content
