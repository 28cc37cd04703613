"""An organization's company identity: its identity provider (OpenID Connect or SAML 2.0), the email
domains it has proven to control, and the tokens its directory provisions members with (SCIM).

The identity provider's client secret is stored encrypted (portal.crypto, SSO_SECRETS_KEY); a SCIM
token only as an HMAC of its secret, like an API key (apikeys.secrets).
"""

from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone

from portal.crypto import SecretCipher
from portal.models import Member, Team
from portal.tenancy import ROLES, TenantModel

cipher = SecretCipher(setting="SSO_SECRETS_KEY", purpose="sso-secrets", what="identity provider's client secret")

ROLE_CHOICES = [(role, "HR" if role == "hr" else role.capitalize()) for role in ROLES]


class IdentityProvider(TenantModel):
    """The organization's single sign-on: one identity provider, and what a login through it may do."""

    class Kind(models.TextChoices):
        OIDC = "oidc", "OpenID Connect"
        SAML = "saml", "SAML 2.0"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    name = models.CharField(max_length=80, help_text="Shown on the login button, e.g. “Acme Okta”.")
    # OpenID Connect: the issuer's discovery document, the portal's client at the issuer.
    discovery_url = models.URLField(max_length=500, blank=True)
    client_id = models.CharField(max_length=255, blank=True)
    client_secret_encrypted = models.TextField(blank=True)
    # SAML 2.0: the identity provider's metadata, by URL (with its entity id) or as XML.
    metadata_url = models.URLField(max_length=500, blank=True)
    entity_id = models.CharField(max_length=500, blank=True)
    metadata_xml = models.TextField(blank=True)
    # What a first login through the provider may do.
    jit_enabled = models.BooleanField("create members on first login", default=True)
    default_role = models.CharField(max_length=16, choices=ROLE_CHOICES, default="employee")
    default_team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    sso_required = models.BooleanField("require single sign-on", default=False)
    # The one owner who may still log in with a password (and TOTP) when single sign-on is required.
    break_glass_member = models.ForeignKey(Member, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    tested_at = models.DateTimeField(null=True, blank=True)
    test_report = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="one_identity_provider_per_org"),
            models.CheckConstraint(name="identity_provider_configured", condition=(
                Q(kind="oidc", discovery_url__gt="", client_id__gt="")
                | Q(kind="saml", metadata_url__gt="", entity_id__gt="") | Q(kind="saml", metadata_xml__gt="")
            )),
            models.CheckConstraint(name="sso_required_has_break_glass",
                                   condition=Q(sso_required=False) | Q(break_glass_member__isnull=False)),
        ]

    def __str__(self):
        return self.name

    @property
    def provider_id(self) -> str:
        """The provider's id at django-allauth: its social accounts' namespace and its URLs."""
        return f"{self.organization.slug}-{self.kind}"

    @property
    def client_secret(self) -> str:
        return cipher.decrypt(self.client_secret_encrypted)


class EmailDomain(TenantModel):
    """An email domain the organization claims; verified by a DNS TXT record, it routes logins of
    its addresses to the organization's identity provider, and only the organization may then link,
    create or provision accounts with its addresses. A domain is verified for one organization only."""

    domain = models.CharField(max_length=253)
    verification_token = models.CharField(max_length=64, unique=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["domain"]
        constraints = [
            models.UniqueConstraint("organization", Lower("domain"), name="email_domain_once_per_org"),
            models.UniqueConstraint(Lower("domain"), condition=Q(verified_at__isnull=False),
                                    name="email_domain_verified_once"),
        ]

    def __str__(self):
        return self.domain

    @property
    def txt_record(self) -> str:
        return f"token-allowance-portal-verification={self.verification_token}"


class ScimToken(TenantModel):
    """The bearer token of the organization's directory (SCIM 2.0). Only an HMAC of its secret is stored."""

    name = models.CharField(max_length=100)
    public_id = models.CharField(max_length=12, unique=True)
    secret_hash = models.CharField(max_length=64)
    last_four = models.CharField(max_length=4)
    # The directory acts with the authority of the admin or owner who created the token.
    created_by = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.display_prefix}…{self.last_four})"

    @property
    def display_prefix(self) -> str:
        return f"tas_{self.public_id}"


class DirectoryEntry(TenantModel):
    """What the directory said about a member or a team that the portal has no column for: its
    externalId, and that it deleted the member (kept deactivated: their ledger stays)."""

    member = models.OneToOneField(Member, null=True, blank=True, on_delete=models.CASCADE, related_name="directory")
    team = models.OneToOneField(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="directory")
    external_id = models.CharField(max_length=255, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(name="directory_entry_member_or_team",
                                   condition=Q(member__isnull=False, team__isnull=True)
                                   | Q(member__isnull=True, team__isnull=False)),
        ]
