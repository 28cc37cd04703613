"""A SAML 2.0 identity provider run by the tests: pysaml2's IdP server, with a key and certificate
made for the test, answering the portal's authentication requests with signed responses."""

import base64
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from saml2 import BINDING_HTTP_REDIRECT, saml
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAME_FORMAT_URI, NAMEID_FORMAT_EMAILADDRESS
from saml2.server import Server
from saml2.xmldsig import DIGEST_SHA256, SIG_RSA_SHA256

ENTITY_ID = "https://idp.a.example/saml/metadata"
SSO_URL = "https://idp.a.example/saml/sso"


def _key_and_certificate(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test identity provider")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=30)).sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "idp.key", folder / "idp.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class SamlIdentityProvider:
    def __init__(self, sp_metadata: str):
        self.folder = Path(tempfile.mkdtemp(prefix="saml-idp-"))
        key_path, cert_path = _key_and_certificate(self.folder)
        (self.folder / "sp.xml").write_text(sp_metadata)
        config = IdPConfig()
        config.load({
            "entityid": ENTITY_ID,
            "service": {"idp": {
                "endpoints": {"single_sign_on_service": [(SSO_URL, BINDING_HTTP_REDIRECT)]},
                "name_id_format": [NAMEID_FORMAT_EMAILADDRESS],
                "policy": {"default": {"lifetime": {"minutes": 15}, "name_form": NAME_FORMAT_URI}},
            }},
            "key_file": str(key_path), "cert_file": str(cert_path),
            "metadata": {"local": [str(self.folder / "sp.xml")]},
        })
        self.config = config
        self.server = Server(config=config)

    @property
    def metadata(self) -> str:
        return create_metadata_string(None, config=self.config).decode()

    def answer(self, redirect_url: str, *, email: str, sign: bool = True) -> dict:
        """The form an IdP posts back to the portal's assertion consumer service, for the
        authentication request in `redirect_url` (HTTP-Redirect binding), as `email`."""
        query = parse_qs(urlsplit(redirect_url).query)
        request = self.server.parse_authn_request(query["SAMLRequest"][0], BINDING_HTTP_REDIRECT).message
        response = self.server.create_authn_response(
            identity={"mail": [email], "givenName": ["Sam"], "sn": ["Lee"]}, userid=email,
            name_id=saml.NameID(format=NAMEID_FORMAT_EMAILADDRESS, text=email), in_response_to=request.id,
            destination=request.assertion_consumer_service_url, sp_entity_id=request.issuer.text,
            sign_response=sign, sign_assertion=sign, sign_alg=SIG_RSA_SHA256, digest_alg=DIGEST_SHA256,
            authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"})
        return {"url": request.assertion_consumer_service_url, "SAMLResponse": str(response),
                "RelayState": query.get("RelayState", [""])[0]}

    @staticmethod
    def encoded(xml: str) -> str:
        return base64.b64encode(xml.encode()).decode()
