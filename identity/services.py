"""Writes for company identity: the organization's identity provider and its test, email domains and
their DNS verification, SCIM tokens, and the membership a single sign-on login joins.

Keyword-only, one transaction each, every privileged action in the audit log; errors are
`ValidationError`s keyed by field.
"""

from __future__ import annotations

import base64
import secrets as random
from dataclasses import dataclass

import dns.exception
import dns.nameserver
import dns.resolver
import httpx
from cryptography import x509
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.utils import timezone
from onelogin.saml2.errors import OneLogin_Saml2_Error
from onelogin.saml2.idp_metadata_parser import OneLogin_Saml2_IdPMetadataParser

from apikeys.secrets import SecretFormat, hash_secret
from gateway.destinations import url_refusal
from identity.models import EmailDomain, IdentityProvider, ScimToken, cipher
from identity.selectors import email_is_organizations, email_link_refusal
from portal.audit import changes, log_action
from portal.models import Member, Organization, User
from portal.tenancy import ROLES, scope

SCIM_TOKEN = SecretFormat(prefix="tas_", what="SCIM token")
FETCH_TIMEOUT = 10  # seconds, for discovery documents, key sets and metadata
MAX_METADATA_BYTES = 1024 * 1024

PROVIDER_FIELDS = ["kind", "name", "discovery_url", "client_id", "metadata_url", "entity_id", "metadata_xml",
                   "jit_enabled", "default_role", "default_team", "sso_required", "break_glass_member"]
# A change to one of these is a new connection: it has to be tested again.
CONNECTION_FIELDS = {"kind", "discovery_url", "client_id", "metadata_url", "entity_id", "metadata_xml"}


# -- the identity provider ------------------------------------------------------------------------


def saml_idp_settings(provider: IdentityProvider) -> dict:
    """django-allauth's `idp` settings of a SAML provider: its metadata URL, or what its metadata
    XML says (parsed by python3-saml). ValueError when the XML is not an identity provider's metadata."""
    if provider.metadata_url:
        return {"entity_id": provider.entity_id, "metadata_url": provider.metadata_url,
                "metadata_request_timeout": FETCH_TIMEOUT}
    idp = _parse_saml_metadata(provider.metadata_xml, entity_id=provider.entity_id or None)
    return {"entity_id": idp["entityId"], "sso_url": idp["singleSignOnService"]["url"], "x509cert": idp["x509cert"]}


def _parse_saml_metadata(xml: str, *, entity_id: str | None) -> dict:
    try:
        data = OneLogin_Saml2_IdPMetadataParser.parse(xml, entity_id=entity_id)
    except (OneLogin_Saml2_Error, ValueError, SyntaxError) as error:  # lxml's XMLSyntaxError is a SyntaxError
        raise ValueError(f"the metadata is not XML that can be read: {error}") from None
    idp = data.get("idp") or {}
    if "entityId" not in idp:
        raise ValueError("the metadata has no identity provider (IDPSSODescriptor) in it")
    if "singleSignOnService" not in idp:
        raise ValueError("the metadata names no single sign-on service with the HTTP-Redirect binding")
    if "x509cert" not in idp:
        multi = (idp.get("x509certMulti") or {}).get("signing") or []
        if not multi:
            raise ValueError("the metadata has no signing certificate")
        idp["x509cert"] = multi[0]
    return idp


def _clean_url(value: str, field: str, errors: dict) -> str:
    value = (value or "").strip()
    if not value:
        return ""
    try:
        URLValidator(schemes=["http", "https"])(value)
    except ValidationError:
        errors[field] = "Enter an http or https address."
        return value
    refused = url_refusal(value)
    if refused:
        errors[field] = f"This address cannot be used: {refused}."
    return value


def _clean_provider(*, organization: Organization, actor: User, data: dict, client_secret: str | None,
                    existing: IdentityProvider | None) -> dict:
    errors: dict[str, str] = {}
    kind = data.get("kind")
    if kind not in IdentityProvider.Kind.values:
        errors["kind"] = "Choose OpenID Connect or SAML 2.0."
    name = str(data.get("name") or "").strip()[:80]
    if not name:
        errors["name"] = "Name the provider as your people know it, e.g. “Acme Okta”."
    cleaned = {"kind": kind, "name": name, "discovery_url": "", "client_id": "", "metadata_url": "", "entity_id": "",
               "metadata_xml": ""}
    if kind == IdentityProvider.Kind.OIDC:
        cleaned["discovery_url"] = _clean_url(data.get("discovery_url"), "discovery_url", errors)
        cleaned["client_id"] = str(data.get("client_id") or "").strip()
        if not cleaned["discovery_url"] and "discovery_url" not in errors:
            errors["discovery_url"] = "Give the issuer's discovery URL (…/.well-known/openid-configuration)."
        if not cleaned["client_id"]:
            errors["client_id"] = "Give the client id the identity provider issued for the portal."
        if not client_secret and not (existing and existing.client_secret_encrypted and existing.kind == kind):
            errors["client_secret"] = "Give the client secret the identity provider issued for the portal."
    elif kind == IdentityProvider.Kind.SAML:
        cleaned["metadata_url"] = _clean_url(data.get("metadata_url"), "metadata_url", errors)
        cleaned["entity_id"] = str(data.get("entity_id") or "").strip()
        cleaned["metadata_xml"] = str(data.get("metadata_xml") or "").strip()
        if "'" in cleaned["entity_id"] or '"' in cleaned["entity_id"]:
            errors["entity_id"] = "An entity id has no quotes."
        if bool(cleaned["metadata_url"]) == bool(cleaned["metadata_xml"]) and "metadata_url" not in errors:
            errors["metadata_url"] = "Give the metadata either by URL or as XML (one of them)."
        elif cleaned["metadata_url"] and not cleaned["entity_id"]:
            errors["entity_id"] = "With a metadata URL, give the identity provider's entity id too."
        elif cleaned["metadata_xml"] and "entity_id" not in errors:
            if len(cleaned["metadata_xml"].encode()) > MAX_METADATA_BYTES:
                errors["metadata_xml"] = "The metadata is larger than 1 MB."
            else:
                try:
                    idp = _parse_saml_metadata(cleaned["metadata_xml"], entity_id=cleaned["entity_id"] or None)
                except ValueError as error:
                    errors["metadata_xml"] = f"This is not usable: {error}."
                else:
                    cleaned["entity_id"] = idp["entityId"]

    cleaned["jit_enabled"] = bool(data.get("jit_enabled"))
    cleaned["default_role"] = data.get("default_role") or "employee"
    if cleaned["default_role"] not in ROLES:
        errors["default_role"] = "Choose a role."
    elif cleaned["default_role"] in {"owner", "admin"}:
        errors["default_role"] = "People who join by single sign-on cannot be made owners or admins automatically."
    team = data.get("default_team")
    if team is not None and team.organization_id != organization.pk:
        errors["default_team"] = "Choose a team of this organization."
    cleaned["default_team"] = team
    cleaned["sso_required"] = bool(data.get("sso_required"))
    break_glass = data.get("break_glass_member")
    if break_glass is not None and (break_glass.organization_id != organization.pk or not break_glass.is_owner
                                    or not break_glass.is_active):
        errors["break_glass_member"] = "The break-glass account must be an active owner of this organization."
    cleaned["break_glass_member"] = break_glass
    # Whoever chooses the identity provider decides who logs in: an owner's decision, like roles.
    if connection_changed(existing, cleaned) and not _is_owner(organization=organization, actor=actor):
        errors[NON_FIELD_ERRORS] = ("Only an owner can choose the identity provider (its discovery URL, client id "
                                    "or SAML metadata).")
    if cleaned["sso_required"]:
        if break_glass is None and "break_glass_member" not in errors:
            errors["break_glass_member"] = ("Choose a break-glass owner before requiring single sign-on: they can "
                                            "still log in with a password and two-factor authentication.")
        if connection_changed(existing, cleaned) or client_secret or existing.tested_at is None:
            errors["sso_required"] = ("Test the connection first: single sign-on can only be required once a "
                                      "test of this configuration passed.")
    if errors:
        raise ValidationError(errors)
    return cleaned


def connection_changed(existing: IdentityProvider | None, cleaned: dict) -> bool:
    return existing is None or any(cleaned[field] != getattr(existing, field) for field in CONNECTION_FIELDS)


def _is_owner(*, organization: Organization, actor: User) -> bool:
    return Member.all_objects.filter(organization=organization, user=actor, is_owner=True, is_active=True).exists()


def _social_accounts_unlink(organization: Organization) -> int:
    """Forget which accounts the organization's identity provider logged in as (django-allauth's
    social accounts, keyed by the provider's subject or NameID): a new provider's subjects are
    its own, and a reused one must not log in as whoever the old provider named. Returns how many."""
    from allauth.socialaccount.models import SocialAccount

    provider_ids = [f"{organization.slug}-{kind}" for kind in IdentityProvider.Kind.values]
    accounts = SocialAccount.objects.filter(provider__in=provider_ids)
    count = accounts.count()
    accounts.delete()
    return count


@transaction.atomic
def identity_provider_save(*, organization: Organization, actor: User, client_secret: str | None = None,
                           **data) -> IdentityProvider:
    """Configure the organization's identity provider (create or change it). A changed connection
    must be tested again, and forgets the accounts the old one linked; only an owner may change it."""
    existing = IdentityProvider.objects.select_for_update().filter(organization=organization).first()
    cleaned = _clean_provider(organization=organization, actor=actor, data=data, client_secret=client_secret,
                              existing=existing)
    new_connection = connection_changed(existing, cleaned)
    was_required = existing is not None and existing.sso_required
    provider = existing or IdentityProvider(organization=organization)
    diff = changes(provider, PROVIDER_FIELDS, cleaned) if existing else {
        field: [None, getattr(value, "pk", value)] for field, value in cleaned.items() if field != "metadata_xml"}
    if "metadata_xml" in diff:
        diff["metadata_xml"] = "changed"
    for field, value in cleaned.items():
        setattr(provider, field, value)
    if cleaned["kind"] != IdentityProvider.Kind.OIDC:
        provider.client_secret_encrypted = ""
    elif client_secret:
        provider.client_secret_encrypted = cipher.encrypt(client_secret)
        diff["client_secret"] = "changed"
    if new_connection or client_secret:
        provider.tested_at, provider.test_report = None, []
    provider.save()
    if new_connection:
        diff["social_accounts_unlinked"] = _social_accounts_unlink(organization)
    if diff:
        log_action(actor=actor, organization=organization, obj=provider, data=diff,
                   action="identity_provider.created" if existing is None else "identity_provider.updated")
    if provider.sso_required and not was_required:
        # From the next request, the organization refuses sessions not signed in through the provider
        # (selectors.organization_session_refusal); they stay for the members' other organizations.
        log_action(actor=actor, organization=organization, action="identity_provider.sso_required", obj=provider,
                   data={"break_glass": provider.break_glass_member.user.email})
    return provider


@transaction.atomic
def identity_provider_delete(*, provider: IdentityProvider, actor: User) -> None:
    if not _is_owner(organization=provider.organization, actor=actor):
        raise ValidationError("Only an owner can remove the identity provider.")
    log_action(actor=actor, organization=provider.organization, action="identity_provider.deleted", obj=provider,
               data={"name": provider.name, "kind": provider.kind,
                     "social_accounts_unlinked": _social_accounts_unlink(provider.organization)})
    provider.delete()


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def _fetch(url: str) -> httpx.Response:
    refused = url_refusal(url)
    if refused:
        raise ValueError(f"{url} cannot be used: {refused}")
    try:
        response = httpx.get(url, timeout=FETCH_TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as error:
        raise ValueError(f"{url} could not be reached: {error.__class__.__name__}") from None
    if response.status_code != 200:
        raise ValueError(f"{url} answered HTTP {response.status_code}")
    if len(response.content) > MAX_METADATA_BYTES:
        raise ValueError(f"{url} answered more than 1 MB")
    return response


def _oidc_checks(provider: IdentityProvider) -> list[Check]:
    url = provider.discovery_url
    if "/.well-known/" not in url:
        url = url.rstrip("/") + "/.well-known/openid-configuration"
    try:
        document = _fetch(url).json()
        if not isinstance(document, dict):
            raise ValueError("the discovery document is not a JSON object")
    except ValueError as error:
        return [Check("discovery document", False, str(error))]
    missing = [name for name in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
               if not isinstance(document.get(name), str)]
    checks = [Check("discovery document", not missing,
                    f"missing {', '.join(missing)}" if missing else f"issuer {document['issuer']}")]
    if missing:
        return checks
    try:
        keys = _fetch(document["jwks_uri"]).json()
        count = len(keys.get("keys") or []) if isinstance(keys, dict) else 0
        checks.append(Check("signing keys", count > 0, f"{count} key(s) published" if count else "no keys published"))
    except ValueError as error:
        checks.append(Check("signing keys", False, str(error)))
    checks.append(Check("client secret", bool(provider.client_secret), "stored encrypted"))
    return checks


def _saml_checks(provider: IdentityProvider) -> list[Check]:
    try:
        xml = _fetch(provider.metadata_url).text if provider.metadata_url else provider.metadata_xml
        idp = _parse_saml_metadata(xml, entity_id=provider.entity_id or None)
    except ValueError as error:
        return [Check("metadata", False, str(error))]
    checks = [Check("metadata", True, f"entity {idp['entityId']}, single sign-on at {idp['singleSignOnService']['url']}")]
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(idp["x509cert"]))
    except ValueError as error:
        return [*checks, Check("signing certificate", False, f"not a certificate: {error}")]
    expires = certificate.not_valid_after_utc
    checks.append(Check("signing certificate", expires > timezone.now(), f"valid until {expires:%Y-%m-%d}"))
    return checks


@transaction.atomic
def identity_provider_test(*, provider: IdentityProvider, actor: User) -> list[Check]:
    """Test the connection: fetch and read what the portal will rely on at login (the discovery
    document and signing keys, or the SAML metadata and certificate). Passed, it allows requiring
    single sign-on until the connection changes."""
    checks = _oidc_checks(provider) if provider.kind == IdentityProvider.Kind.OIDC else _saml_checks(provider)
    passed = all(check.ok for check in checks)
    provider.tested_at = timezone.now() if passed else None
    provider.test_report = [check.__dict__ for check in checks]
    provider.save(update_fields=["tested_at", "test_report"])
    log_action(actor=actor, organization=provider.organization, action="identity_provider.tested", obj=provider,
               data={"passed": passed, "checks": provider.test_report})
    return checks


# -- email domains -------------------------------------------------------------------------------


def _clean_domain(domain: str) -> str:
    domain = (domain or "").strip().lower().rstrip(".")
    if domain.startswith("@"):
        domain = domain[1:]
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_domain = ""
    labels = ascii_domain.split(".")
    if (len(labels) < 2 or len(ascii_domain) > 253
            or not all(label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
                       and not label.startswith("-") and not label.endswith("-") for label in labels)):
        raise ValidationError({"domain": "Enter a domain name such as example.com."})
    return ascii_domain


@transaction.atomic
def email_domain_add(*, organization: Organization, actor: User, domain: str) -> EmailDomain:
    domain = _clean_domain(domain)
    if EmailDomain.objects.filter(organization=organization, domain__iexact=domain).exists():
        raise ValidationError({"domain": f"{domain} is already on the list."})
    email_domain = EmailDomain.objects.create(organization=organization, domain=domain,
                                              verification_token=random.token_urlsafe(24))
    log_action(actor=actor, organization=organization, action="email_domain.added", obj=email_domain,
               data={"domain": domain})
    return email_domain


def txt_records(name: str) -> list[str]:
    """The TXT records of a name, from IDENTITY_DNS_NAMESERVERS (host or host:port) or the system's."""
    resolver = dns.resolver.Resolver(configure=not settings.IDENTITY_DNS_NAMESERVERS)
    if settings.IDENTITY_DNS_NAMESERVERS:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, int(port or 53))
            for host, _colon, port in (entry.partition(":") for entry in settings.IDENTITY_DNS_NAMESERVERS)]
    resolver.lifetime = 5
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.exception.DNSException, ValueError):
        return []
    return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]


@transaction.atomic
def email_domain_verify(*, email_domain: EmailDomain, actor: User) -> EmailDomain:
    """Verify the domain by its TXT record. Only one organization can hold a domain verified."""
    email_domain = EmailDomain.objects.select_for_update().get(pk=email_domain.pk)
    if email_domain.verified_at is not None:
        return email_domain
    if email_domain.txt_record not in txt_records(email_domain.domain):
        raise ValidationError(f"No TXT record “{email_domain.txt_record}” was found at {email_domain.domain} "
                              "(DNS changes can take a while to show).")
    email_domain.verified_at = timezone.now()
    try:
        with transaction.atomic():
            email_domain.save(update_fields=["verified_at"])
    except IntegrityError:
        raise ValidationError(f"{email_domain.domain} is verified by another organization.") from None
    log_action(actor=actor, organization=email_domain.organization, action="email_domain.verified", obj=email_domain,
               data={"domain": email_domain.domain})
    return email_domain


@transaction.atomic
def email_domain_remove(*, email_domain: EmailDomain, actor: User) -> None:
    log_action(actor=actor, organization=email_domain.organization, action="email_domain.removed", obj=email_domain,
               data={"domain": email_domain.domain, "was_verified": email_domain.verified_at is not None})
    email_domain.delete()


# -- SCIM tokens ---------------------------------------------------------------------------------


@transaction.atomic
def scim_token_create(*, organization: Organization, actor_member: Member, name: str) -> tuple[ScimToken, str]:
    """A token for the organization's directory. Returns it and its secret, which is never shown again."""
    name = (name or "").strip()[:100]
    if not name:
        raise ValidationError({"name": "Name the token after the directory that will use it."})
    secret, parts = SCIM_TOKEN.new()
    token = ScimToken.objects.create(organization=organization, name=name, public_id=parts.public_id,
                                     secret_hash=hash_secret(parts.secret), last_four=secret[-4:],
                                     created_by=actor_member)
    log_action(actor=actor_member.user, organization=organization, action="scim_token.created", obj=token,
               data={"name": name, "token": f"{token.display_prefix}…{token.last_four}"})
    return token, secret


@transaction.atomic
def scim_token_revoke(*, token: ScimToken, actor: User) -> ScimToken:
    token = ScimToken.objects.select_for_update().get(pk=token.pk)
    if token.revoked_at is not None:
        raise ValidationError("This token is already revoked.")
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    log_action(actor=actor, organization=token.organization, action="scim_token.revoked", obj=token,
               data={"token": f"{token.display_prefix}…{token.last_four}"})
    return token


# -- single sign-on logins -----------------------------------------------------------------------


class SsoRefused(Exception):
    """A login through an identity provider that must not go on; the message says why, to the person."""


def sso_login_check(*, provider: IdentityProvider, email: str, user: User | None, by_email: bool = False) -> None:
    """Whether a login through `provider` as `email` (the account `user`, if one exists) may go on;
    SsoRefused saying why. The provider vouches only for its organization's verified domains;
    `by_email`: `user` is found by that address and would be linked to the provider now, which only
    an ordinary account of the organization may be (selectors.email_link_refusal)."""
    organization = provider.organization
    if not email:
        raise SsoRefused(f"{provider.name} did not say which email address you have.")
    if not email_is_organizations(organization=organization, email=email):
        raise SsoRefused(f"{provider.name} signed you in as {email}, which is not in an email domain "
                         f"{organization.name} has verified.")
    if user is not None and not user.is_active:
        raise SsoRefused("This account is disabled.")
    if by_email and user is not None and (refusal := email_link_refusal(user=user, organization=organization)):
        raise SsoRefused(f"{refusal} It is not linked to {provider.name} by its email address: log in with your "
                         "password, then link your company account from your logged-in session.")
    with scope(organization):
        member = Member.objects.filter(organization=organization, user=user).first() if user is not None else None
    if member is not None and not member.is_active:
        raise SsoRefused(f"Your membership of {organization.name} is deactivated; ask an administrator.")
    if member is None and not provider.jit_enabled:
        raise SsoRefused(f"{organization.name} does not add people at their first login: ask an administrator "
                         "to invite you.")


def sso_refusal_record(*, provider: IdentityProvider, email: str, user: User | None, reason: str) -> None:
    log_action(actor=None, organization=provider.organization, action="sso.refused", obj=provider,
               data={"email": email, "account": user.email if user is not None else None, "reason": reason})


def sso_account_link_record(*, provider: IdentityProvider, user: User, uid: str) -> None:
    log_action(actor=user, organization=provider.organization, action="sso.account_linked", obj=provider,
               data={"email": user.email, "subject": uid})


@transaction.atomic
def sso_member_join(*, provider: IdentityProvider, user: User) -> Member:
    """The member a single sign-on login acts as: the user's membership, or (just-in-time creation)
    a new one with the provider's default role and team."""
    organization = provider.organization
    with scope(organization):
        member = Member.objects.filter(organization=organization, user=user).first()
        if member is not None:
            return member
        member = Member(organization=organization, user=user, team=provider.default_team)
        member.set_roles([provider.default_role])
        try:
            with transaction.atomic():
                member.save()
        except IntegrityError:  # joined concurrently by another login of the same person
            return Member.objects.get(organization=organization, user=user)
        log_action(actor=user, organization=organization, action="member.joined_by_sso", obj=member,
                   data={"provider": provider.name, "roles": member.roles, "team": member.team})
    return member
