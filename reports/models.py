"""Reports: the organization's report settings, bulk statement exports and their progress, and the
daily reconciliation of each provider connection's own usage report with what the portal recorded."""

from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.tenancy import TenantModel

MAX_THRESHOLD_TOKENS = 1_000_000


class ReportSettings(TenantModel):
    """One per organization (absent: the defaults). Who may see what, and the thresholds the
    insights and the reconciliation use."""

    organization = models.OneToOneField("portal.Organization", on_delete=models.CASCADE, related_name="+")
    # Individual figures are shown only to the member unless this is on (HR and admins then see
    # one member at a time; never a ranking). Changing it is audited.
    per_member_views = models.BooleanField(default=False)
    # A successful request to a premium model at most this large (prompt, reply) could have gone to
    # the economy model. Applies to the days rolled up after a change (the last 31 are redone).
    small_prompt_tokens = models.PositiveIntegerField(
        default=2000, validators=[MinValueValidator(1), MaxValueValidator(MAX_THRESHOLD_TOKENS)])
    small_reply_tokens = models.PositiveIntegerField(
        default=500, validators=[MinValueValidator(1), MaxValueValidator(MAX_THRESHOLD_TOKENS)])
    # The economy tier: this model and every catalog model no dearer than it; the rest is premium.
    economy_model = models.ForeignKey("allowances.CatalogModel", null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="+")
    # A benefit statement values allowance tokens at what they buy of this model as input (its
    # input price over its input multiplier). None: the first active catalog model with a price.
    valuation_model = models.ForeignKey("allowances.CatalogModel", null=True, blank=True, on_delete=models.SET_NULL,
                                        related_name="+")
    # A day and model whose provider figure and the portal's differ by more than this share (and by
    # more than the tokens below) raises an alert.
    reconciliation_tolerance_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=Decimal("1.00"),
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("100"))])
    reconciliation_tolerance_tokens = models.PositiveIntegerField(default=1000,
                                                                  validators=[MaxValueValidator(MAX_THRESHOLD_TOKENS)])
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "report settings"
        constraints = [
            models.CheckConstraint(condition=Q(small_prompt_tokens__gte=1, small_reply_tokens__gte=1,
                                               small_prompt_tokens__lte=MAX_THRESHOLD_TOKENS,
                                               small_reply_tokens__lte=MAX_THRESHOLD_TOKENS),
                                   name="report_settings_thresholds_in_range"),
            models.CheckConstraint(condition=Q(reconciliation_tolerance_percent__gte=0,
                                               reconciliation_tolerance_percent__lte=100),
                                   name="report_settings_tolerance_in_range"),
        ]

    def __str__(self):
        return "report settings"


class StatementExport(TenantModel):
    """HR's export of one period's benefit statements: a CSV of all members and a ZIP of their
    PDFs, made by a Celery task that stores its progress here for the page to poll."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    period_start = models.DateField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    total = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    csv_data = models.BinaryField(null=True, blank=True, editable=False)
    zip_data = models.BinaryField(null=True, blank=True, editable=False)
    error = models.CharField(max_length=300, blank=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.CheckConstraint(condition=Q(done__lte=models.F("total")), name="statement_export_progress")]

    def __str__(self):
        return f"statements of {self.period_start:%Y-%m} ({self.state})"

    @property
    def percent(self) -> int:
        return 100 if self.state == self.State.DONE else (self.done * 100 // self.total if self.total else 0)

    @property
    def finished(self) -> bool:
        return self.state in (self.State.DONE, self.State.FAILED)


class ReconciliationLine(TenantModel):
    """One provider connection's usage of one model on one day (UTC, as providers report): what
    the provider's usage report says and what the portal recorded. Rewritten by every run."""

    connection = models.ForeignKey("gateway.ProviderConnection", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    model = models.CharField(max_length=100, help_text="The provider's model name.")
    provider_requests = models.BigIntegerField(null=True, blank=True, help_text="None: not in the provider's report.")
    provider_input_tokens = models.BigIntegerField(null=True, blank=True)
    provider_output_tokens = models.BigIntegerField(null=True, blank=True)
    provider_cached_tokens = models.BigIntegerField(null=True, blank=True)
    portal_requests = models.BigIntegerField(default=0)
    portal_input_tokens = models.BigIntegerField(default=0)
    portal_output_tokens = models.BigIntegerField(default=0)
    portal_cached_tokens = models.BigIntegerField(default=0)
    portal_cost = models.DecimalField(max_digits=18, decimal_places=6, default=0)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-day", "model"]
        constraints = [models.UniqueConstraint(fields=["connection", "day", "model"], name="reconciliation_line_unique")]

    def __str__(self):
        return f"{self.day} {self.model}"

    @property
    def provider_tokens(self) -> int | None:
        if self.provider_requests is None:
            return None
        return self.provider_input_tokens + self.provider_output_tokens + self.provider_cached_tokens

    @property
    def portal_tokens(self) -> int:
        return self.portal_input_tokens + self.portal_output_tokens + self.portal_cached_tokens


class ReconciliationAlert(TenantModel):
    """A difference found on a day and model of a connection; one per kind, whatever reruns."""

    class Kind(models.TextChoices):
        MISSING_AT_PROVIDER = "missing_at_provider", "The provider reports no usage the portal recorded"
        MISSING_IN_PORTAL = "missing_in_portal", "The provider reports usage the portal did not record"
        DIFFERS = "differs", "The provider's figure differs from the portal's"
        UNPRICED = "unpriced", "Usage of a model without a catalog price"
        ZERO_COST = "zero_cost", "Usage recorded at zero tokens or zero cost"

    connection = models.ForeignKey("gateway.ProviderConnection", on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    model = models.CharField(max_length=100)
    kind = models.CharField(max_length=24, choices=Kind.choices)
    detail = models.CharField(max_length=300)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-day", "model", "kind"]
        constraints = [models.UniqueConstraint(fields=["connection", "day", "model", "kind"],
                                               name="reconciliation_alert_once")]

    def __str__(self):
        return f"{self.day} {self.model}: {self.get_kind_display()}"
