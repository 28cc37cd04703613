"""The gateway: the providers an organization forwards to, and the record every request leaves."""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Member
from portal.tenancy import TenantModel


class ProviderConnection(TenantModel):
    """Where an organization's catalog models are served: a provider's API and the secret for it.

    The secret is stored encrypted (see gateway.crypto); only its last four characters are kept in
    the clear, to recognise it.
    """

    class Kind(models.TextChoices):
        SANDBOX = "sandbox", "Sandbox (built in, no network, deterministic replies)"
        OPENAI = "openai", "OpenAI"
        ANTHROPIC = "anthropic", "Anthropic"
        OPENAI_COMPATIBLE = "openai_compatible", "OpenAI-compatible server (vLLM, Ollama, ...)"

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    base_url = models.URLField(blank=True, help_text="e.g. https://api.openai.com/v1 (not for the sandbox).")
    secret_ciphertext = models.TextField(blank=True)
    secret_last_four = models.CharField(max_length=4, blank=True)
    connect_timeout = models.PositiveIntegerField(default=5, help_text="Seconds to connect.")
    read_timeout = models.PositiveIntegerField(default=120, help_text="Seconds to wait for the next bytes.")
    # OpenAI's own API has the Responses API; an OpenAI-compatible server may or may not. Without
    # it the gateway translates /v1/responses into the server's chat completions and back.
    responses_api = models.BooleanField(default=False, db_default=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="provider_connection_name_unique"),
            models.CheckConstraint(condition=Q(kind="sandbox") | ~Q(base_url=""), name="provider_needs_base_url"),
            models.CheckConstraint(condition=Q(connect_timeout__gt=0, read_timeout__gt=0),
                                   name="provider_timeouts_positive"),
        ]

    def __str__(self):
        return f"{self.name} (sandbox)" if self.is_sandbox else self.name

    @property
    def is_sandbox(self) -> bool:
        return self.kind == self.Kind.SANDBOX

    @property
    def has_responses_api(self) -> bool:
        return self.kind == self.Kind.OPENAI or (self.kind == self.Kind.OPENAI_COMPATIBLE and self.responses_api)

    @property
    def family(self) -> str:
        """Which API the provider speaks: "anthropic", "openai", or "any" (the sandbox speaks both)."""
        return {"sandbox": "any", "anthropic": "anthropic"}.get(self.kind, "openai")


class UsageRecord(TenantModel):
    """What one request through the gateway (or one ingested event) consumed. Dashboards and
    billing read these; the ledger is the balance, this is the detail."""

    class Status(models.TextChoices):
        OK = "ok", "Completed"
        REFUSED = "refused", "Refused (allowance or key cap)"
        UPSTREAM_ERROR = "upstream_error", "Provider error"
        TIMEOUT = "timeout", "Provider timed out"
        CLIENT_DISCONNECT = "client_disconnect", "Client disconnected"
        NO_USAGE_REPORTED = "no_usage", "Provider reported no usage (estimated)"

    class Source(models.TextChoices):
        GATEWAY = "gateway", "Gateway"
        INGEST = "ingest", "Usage ingest API"

    # No single-column indexes for these three: the indexes below lead with them, and every index
    # slows each insert (a usage batch writes 1,000 rows). On PostgreSQL the organization and the
    # member are checked by ONE foreign key, (member, organization) -> the member's (id,
    # organization) (migration 0004, portal.composite_keys): a record can only name a member of
    # its own organization, at one check per row instead of two.
    organization = models.ForeignKey("portal.Organization", on_delete=models.CASCADE, related_name="+", db_index=False,
                                     db_constraint=False)
    member = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="+", db_index=False,
                               db_constraint=False)
    api_key = models.ForeignKey("apikeys.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                db_index=False)
    model = models.CharField(max_length=100)  # the catalog model charged
    # The id the client sent, when it was an alias of `model` (raw inserts, the ingest, leave it out).
    requested_model = models.CharField(max_length=100, blank=True, default="", db_default="")
    # The catalog model asked for, when budget-aware routing sent the request to `model`, its
    # economy counterpart, instead ("" when not routed).
    routed_from = models.CharField(max_length=100, blank=True, default="", db_default="")
    endpoint = models.CharField(max_length=20)
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.GATEWAY)
    status = models.CharField(max_length=20, choices=Status.choices)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    # Tokens counted against the allowance (after the model's multipliers).
    charged_tokens = models.BigIntegerField(default=0)
    # Counted tokens beyond what the request's hold covered: a fault (the bound of its worst case
    # was wrong), alarmed to admins and never debited past the allowance's limit.
    uncharged_tokens = models.BigIntegerField(default=0, db_default=0)  # raw inserts (ingest) leave it out
    # Chargeback at the catalog's prices, in the organization's currency.
    cost = models.DecimalField(max_digits=18, decimal_places=6, default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    request_id = models.CharField(max_length=64, blank=True)
    # A Responses API reply's id: what a later request's previous_response_id names.
    response_id = models.CharField(max_length=100, blank=True, default="", db_default="")
    idempotency_key = models.CharField(max_length=200, blank=True)
    detail = models.CharField(max_length=300, blank=True)
    occurred_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-occurred_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "idempotency_key"], condition=~Q(idempotency_key=""),
                                    name="usage_record_idempotency_key_unique"),
            models.CheckConstraint(condition=Q(input_tokens__gte=0, output_tokens__gte=0, cached_tokens__gte=0,
                                               charged_tokens__gte=0, uncharged_tokens__gte=0),
                                   name="usage_record_tokens_not_negative"),
        ]
        indexes = [
            models.Index(fields=["organization", "occurred_at"], name="usage_org_time"),
            models.Index(fields=["member", "occurred_at"], name="usage_member_time"),
            # Only where set: usage named by a member has no key.
            models.Index(fields=["api_key", "occurred_at"], name="usage_key_time", condition=Q(api_key__isnull=False)),
            models.Index(fields=["organization", "response_id"], name="usage_response_id",
                         condition=~Q(response_id="")),
        ]

    def __str__(self):
        return f"{self.model} {self.status} {self.charged_tokens}"


class RollupSums(TenantModel):
    """What a roll-up row sums of the usage records of one day (in the organization's time zone)."""

    day = models.DateField()
    model = models.CharField(max_length=100)
    requests = models.PositiveIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    charged_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=18, decimal_places=6, default=0)
    # How the requests ended (gateway.rollups.OUTCOMES says which statuses count where), so the
    # insights never scan the records.
    ok_requests = models.PositiveIntegerField(default=0, db_default=0)
    ok_cost = models.DecimalField(max_digits=18, decimal_places=6, default=0, db_default=0)
    refused_requests = models.PositiveIntegerField(default=0, db_default=0)
    error_requests = models.PositiveIntegerField(default=0, db_default=0)
    no_usage_requests = models.PositiveIntegerField(default=0, db_default=0)
    # Requests sent again soon after one of the same member and model failed (gateway.rollups.RETRY_WINDOW).
    retried_requests = models.PositiveIntegerField(default=0, db_default=0)
    # Successful requests small enough for the economy model (the organization's thresholds, see
    # reports.models.ReportSettings, when the day was rolled up) and the tokens and cost of them.
    small_requests = models.PositiveIntegerField(default=0, db_default=0)
    small_input_tokens = models.BigIntegerField(default=0, db_default=0)
    small_output_tokens = models.BigIntegerField(default=0, db_default=0)
    small_cached_tokens = models.BigIntegerField(default=0, db_default=0)
    small_cost = models.DecimalField(max_digits=18, decimal_places=6, default=0, db_default=0)

    class Meta:
        abstract = True

    def __str__(self):
        return f"{self.day} {self.model} {self.charged_tokens}"


SUMMED = ("requests", "input_tokens", "output_tokens", "cached_tokens", "charged_tokens", "cost", "ok_requests",
          "ok_cost", "refused_requests", "error_requests", "no_usage_requests", "retried_requests", "small_requests",
          "small_input_tokens", "small_output_tokens", "small_cached_tokens", "small_cost")


class UsageRollup(RollupSums):
    """One member's usage of one model on one day, summed from the usage records by the hourly
    job; reports read these instead of every request."""

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="+")
    team_name = models.CharField(max_length=100, blank=True, help_text="The member's team when it was rolled up.")

    class Meta:
        ordering = ["-day", "model"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "day", "member", "model"], name="usage_rollup_unique"),
        ]
        indexes = [models.Index(fields=["organization", "day"], name="usage_rollup_org_day"),
                   # A member's own insights.
                   models.Index(fields=["member", "day"], name="usage_rollup_member_day")]


class UsageTeamRollup(RollupSums):
    """A team's usage of one model on one day (team "": members without one), summed from the
    members' roll-ups: what the organization's and teams' insights read (a few rows a day)."""

    team_name = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["-day", "model"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "day", "team_name", "model"],
                                    name="usage_team_rollup_unique"),
        ]


class BreakerSettings(TenantModel):
    """An organization's spend-velocity breaker: limits on the rolling rate of charged (weighted)
    tokens per minute and per hour, for each key, each member and the whole organization, and a
    member's hourly limit relative to their own normal. None: that limit is off."""

    LIMITS = ("key_per_minute", "key_per_hour", "member_per_minute", "member_per_hour", "organization_per_minute",
              "organization_per_hour")

    organization = models.OneToOneField("portal.Organization", on_delete=models.CASCADE, related_name="+")
    key_per_minute = models.BigIntegerField(null=True, blank=True)
    key_per_hour = models.BigIntegerField(null=True, blank=True)
    member_per_minute = models.BigIntegerField(null=True, blank=True)
    member_per_hour = models.BigIntegerField(null=True, blank=True)
    organization_per_minute = models.BigIntegerField(null=True, blank=True)
    organization_per_hour = models.BigIntegerField(null=True, blank=True)
    # A member's hour over this many times their normal hour (SpendNormal) trips too.
    member_normal_multiple = models.PositiveSmallIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "breaker settings"
        constraints = [
            models.CheckConstraint(name="breaker_limits_positive", condition=(
                (Q(key_per_minute__isnull=True) | Q(key_per_minute__gt=0))
                & (Q(key_per_hour__isnull=True) | Q(key_per_hour__gt=0))
                & (Q(member_per_minute__isnull=True) | Q(member_per_minute__gt=0))
                & (Q(member_per_hour__isnull=True) | Q(member_per_hour__gt=0))
                & (Q(organization_per_minute__isnull=True) | Q(organization_per_minute__gt=0))
                & (Q(organization_per_hour__isnull=True) | Q(organization_per_hour__gt=0))
                & (Q(member_normal_multiple__isnull=True) | Q(member_normal_multiple__gte=2)))),
        ]

    def __str__(self):
        return f"breaker of {self.organization_id}"


class BreakerTrip(TenantModel):
    """A breaker that tripped: which one, on what rate, and the keys it paused until someone resumed."""

    class Scope(models.TextChoices):
        KEY = "key", "API key"
        MEMBER = "member", "Member"
        ORGANIZATION = "organization", "Organization"

    scope = models.CharField(max_length=12, choices=Scope.choices)
    api_key = models.ForeignKey("apikeys.ApiKey", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    member = models.ForeignKey(Member, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    window = models.CharField(max_length=6)  # "minute" or "hour"
    rate = models.BigIntegerField()  # charged tokens in the rolling window when it tripped
    limit = models.BigIntegerField()
    limit_kind = models.CharField(max_length=10, default="absolute")  # or "relative": times the member's normal
    tripped_at = models.DateTimeField(default=timezone.now)
    resumed_at = models.DateTimeField(null=True, blank=True)
    resumed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")

    class Meta:
        ordering = ["-tripped_at", "-id"]
        indexes = [models.Index(fields=["organization", "tripped_at"], name="breaker_trip_org_time")]

    def __str__(self):
        return f"{self.get_scope_display()} breaker tripped at {self.tripped_at:%Y-%m-%d %H:%M}"

    @property
    def description(self) -> str:
        """What tripped, for the 429, the emails and the pages."""
        subject = {"key": "this API key", "member": "the member's keys together",
                   "organization": "the organization's keys together"}[self.scope]
        limit = f"{self.limit:,} tokens" + (" (the member's normal hour times the organization's multiple)"
                                            if self.limit_kind == "relative" else "")
        return f"{subject} spent {self.rate:,} tokens in the last {self.window}, over the limit of {limit}"


class SpendNormal(TenantModel):
    """A member's normal hour: the 95th percentile of their charged tokens per hour, over the hours
    of the last 7 days with any usage (refreshed hourly), for the breaker's relative limit."""

    member = models.OneToOneField(Member, on_delete=models.CASCADE, related_name="+")
    p95_hour_tokens = models.BigIntegerField()
    active_hours = models.PositiveIntegerField()
    computed_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"normal hour of member {self.member_id}: {self.p95_hour_tokens}"
