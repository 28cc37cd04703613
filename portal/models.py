import hashlib
import zoneinfo

from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from portal.tenancy import ROLES, TenantModel, effective_roles

# ISO 4217 code -> number of minor-unit digits; money is kept in Decimal and minor units.
CURRENCIES = {
    "USD": 2,
    "EUR": 2,
    "GBP": 2,
    "CHF": 2,
    "CAD": 2,
    "AUD": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "INR": 2,
    "BRL": 2,
    "JPY": 0,
    "KRW": 0,
}
CURRENCY_CHOICES = [(code, code) for code in CURRENCIES]


def validate_time_zone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError("%(value)s is not a known time zone (use a name like Europe/Berlin).", params={"value": value})


class UserManager(BaseUserManager):
    use_in_migrations = True

    def _create_user(self, email, password, **extra):
        if not email:
            raise ValueError("an email address is required")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email, password=None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email, password=None, **extra):
        extra.update(is_staff=True, is_superuser=True)
        return self._create_user(email, password, **extra)


class User(AbstractUser):
    """A person who logs in with their email address. Not tenant-owned: one user, many orgs."""

    username = None
    email = models.EmailField("email address", unique=True)

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    class Meta:
        constraints = [models.UniqueConstraint(Lower("email"), name="user_email_ci_unique")]

    def __str__(self):
        return self.email

    @property
    def display_name(self) -> str:
        return self.get_full_name() or self.email


class Organization(models.Model):
    """The tenant: one company."""

    class LeaverAllowance(models.TextChoices):
        KEEP = "keep", "Stays on their account, for HR to transfer"
        FORFEIT = "forfeit", "Is forfeited"

    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=60, unique=True)
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    currency = models.CharField(max_length=3, choices=CURRENCY_CHOICES, default="USD")
    created_at = models.DateTimeField(default=timezone.now)
    # What happens to the allowance left on a member's account when they are deactivated.
    leaver_allowance = models.CharField("allowance of a deactivated member", max_length=8,
                                        choices=LeaverAllowance.choices, default=LeaverAllowance.KEEP)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Team(TenantModel):
    """A cost centre inside an organization."""

    name = models.CharField(max_length=120)
    cost_centre = models.CharField(max_length=40, blank=True, help_text="Code used in chargeback reports.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint("organization", Lower("name"), name="team_name_unique_per_org"),
            # What a team pool's account references (with its organization): see allowances.Account.
            models.UniqueConstraint(fields=["id", "organization"], name="team_id_organization"),
        ]

    def __str__(self):
        return self.name


class RoleFlags(models.Model):
    is_owner = models.BooleanField("owner", default=False)
    is_admin = models.BooleanField("admin", default=False)
    is_hr = models.BooleanField("HR", default=False)
    is_approver = models.BooleanField("approver", default=False)
    is_employee = models.BooleanField("employee", default=False)

    class Meta:
        abstract = True

    @property
    def roles(self) -> list[str]:
        return [role for role in ROLES if getattr(self, f"is_{role}")]

    def set_roles(self, roles) -> None:
        for role in ROLES:
            setattr(self, f"is_{role}", role in roles)

    @staticmethod
    def at_least_one_role(name: str) -> models.CheckConstraint:
        return models.CheckConstraint(
            condition=models.Q(is_owner=True)
            | models.Q(is_admin=True)
            | models.Q(is_hr=True)
            | models.Q(is_approver=True)
            | models.Q(is_employee=True),
            name=name,
        )


class Member(TenantModel, RoleFlags):
    """A user in an organization, with one or more roles and optionally a team."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="members")
    is_active = models.BooleanField(default=True)
    joined_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["user__email"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="member_unique_per_org"),
            RoleFlags.at_least_one_role("member_has_a_role"),
            # What usage records reference (with their organization): see gateway.UsageRecord.
            models.UniqueConstraint(fields=["id", "organization"], name="member_id_organization"),
        ]

    def __str__(self):
        return f"{self.user.email} @ {self.organization_id}"

    @property
    def effective_roles(self) -> frozenset[str]:
        return effective_roles(self.roles)

    def has_any_role(self, roles) -> bool:
        return bool(self.effective_roles & set(roles))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Invitation(TenantModel, RoleFlags):
    """An email invitation to join an organization with given roles and team.

    Only a hash of the token is stored; the token itself travels in the email.
    """

    email = models.EmailField()
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(User, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            RoleFlags.at_least_one_role("invitation_has_a_role"),
            models.UniqueConstraint(
                "organization",
                Lower("email"),
                condition=models.Q(accepted_at__isnull=True, revoked_at__isnull=True),
                name="one_open_invitation_per_email",
            ),
        ]

    def __str__(self):
        return f"invitation for {self.email}"

    @property
    def status(self) -> str:
        if self.accepted_at:
            return "accepted"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "open"


class AuditLogEntry(TenantModel):
    """Who did what to which object in which organization, when, with the changed values.

    Append-only: entries are written by `portal.audit.log_action` and never updated.
    """

    actor = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Kept as text so the entry still names the actor after the user is deleted.
    actor_email = models.CharField(max_length=254, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "audit log entries"
        indexes = [models.Index(fields=["organization", "-created_at"], name="audit_org_created")]

    def __str__(self):
        return f"{self.action} {self.object_repr}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("audit log entries are append-only")
        super().save(*args, **kwargs)
