"""SAML 2.0 login against an identity provider the tests run (pysaml2's IdP): the portal's SP
metadata configures the IdP, the IdP's metadata XML configures the organization; a signed response
logs the member in, a response altered after signing (a bad signature) or not signed at all is
refused and logs no one in."""

import pytest

from identity import services as identity_services
from portal.tenancy import scope
from tests.support.saml_idp import ENTITY_ID, SamlIdentityProvider

pytestmark = pytest.mark.django_db


@pytest.fixture
def client():
    """A browser on localhost: python3-saml refuses single-label host names such as "testserver"."""
    from django.test import Client

    return Client(HTTP_HOST="localhost")


@pytest.fixture
def saml_idp(client, org_a):
    owner = org_a.members["owner"]
    with scope(org_a.organization):
        # The SP metadata needs the provider configured first: start with a placeholder IdP.
        placeholder = SamlIdentityProvider("<EntityDescriptor xmlns='urn:oasis:names:tc:SAML:2.0:metadata' "
                                           "entityID='placeholder'/>")
        identity_services.identity_provider_save(organization=org_a.organization, actor=owner.user, kind="saml",
                                                 name="Acme SAML", metadata_xml=placeholder.metadata,
                                                 jit_enabled=True, default_role="employee")
    sp_metadata = client.get(f"/accounts/saml/{org_a.slug}/metadata/").content.decode()
    idp = SamlIdentityProvider(sp_metadata)
    with scope(org_a.organization):
        provider = identity_services.identity_provider_save(
            organization=org_a.organization, actor=owner.user, kind="saml", name="Acme SAML",
            metadata_xml=idp.metadata, jit_enabled=True, default_role="employee")
        checks = identity_services.identity_provider_test(provider=provider, actor=owner.user)
    assert all(check.ok for check in checks), checks
    assert provider.entity_id == ENTITY_ID
    return idp


def start_login(client, org):
    response = client.post(f"/accounts/saml/{org.slug}/login/", {"process": "login"})
    assert response.status_code == 302 and response["Location"].startswith("https://idp.a.example/saml/sso?")
    return response["Location"]


def post_to_acs(client, form, xml=None):
    response = client.post(form["url"].removeprefix("http://localhost"), {
        "SAMLResponse": SamlIdentityProvider.encoded(xml or form["SAMLResponse"]), "RelayState": form["RelayState"]})
    assert response.status_code == 302  # to allauth's finish step
    return client.get(response["Location"])


def test_a_signed_response_logs_the_member_in(client, org_a, saml_idp):
    employee = org_a.members["employee"]
    form = saml_idp.answer(start_login(client, org_a), email=employee.user.email)
    finished = post_to_acs(client, form)
    assert finished.status_code == 302, finished.content[:500]
    assert client.session["_auth_user_id"] == str(employee.user.pk)
    assert client.get("/").headers["Location"] == f"/o/{org_a.slug}/"


@pytest.mark.parametrize("tamper", ["altered after signing", "unsigned"])
def test_a_bad_signature_is_refused(client, org_a, saml_idp, tamper, caplog):
    employee, owner = org_a.members["employee"], org_a.members["owner"]
    if tamper == "unsigned":
        form = saml_idp.answer(start_login(client, org_a), email=owner.user.email, sign=False)
        xml = form["SAMLResponse"]
    else:
        form = saml_idp.answer(start_login(client, org_a), email=employee.user.email)
        # The employee's signed assertion, rewritten to name the owner.
        xml = form["SAMLResponse"].replace(employee.user.email, owner.user.email)
        assert xml != form["SAMLResponse"]
    finished = post_to_acs(client, form, xml)
    assert finished.status_code == 401  # allauth's "third-party login failure" page
    assert "_auth_user_id" not in client.session
    reason = {"altered after signing": "Signature validation failed", "unsigned": "No Signature found"}[tamper]
    assert f"invalid_response: {reason}. SAML Response rejected" in caplog.text
    # The genuine response still works afterwards: the refusal was the signature's.
    form = saml_idp.answer(start_login(client, org_a), email=employee.user.email)
    assert post_to_acs(client, form).status_code == 302
    assert client.session["_auth_user_id"] == str(employee.user.pk)
