from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Member
from portal.tenancy import TenantModel

# What a key may call. Gateway endpoints and reading one's own usage through the REST API.
ENDPOINTS = {
    "chat": "Chat completions (/v1/chat/completions)",
    "responses": "Responses (/v1/responses; what Codex CLI speaks)",
    "completions": "Legacy completions (/v1/completions)",
    "embeddings": "Embeddings (/v1/embeddings)",
    "moderations": "Moderations (/v1/moderations)",
    "messages": "Messages and token counting (/v1/messages, what Claude Code speaks)",
    "usage_read": "Read own balance and usage (REST API)",
    "overage_requests": "Ask for more tokens and follow your overage requests (REST API)",
    "usage_write": "Report usage and hold tokens from your own gateway (REST API; admins only)",
}
# Scopes only members with these roles may put on a key.
ENDPOINT_ROLES = {"usage_write": ("admin",)}
MAX_ROTATION_GRACE_HOURS = 24


class ApiKey(TenantModel):
    """A member's scoped API key. Only a keyed hash of its secret is stored."""

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    public_id = models.CharField(max_length=12, unique=True)
    secret_hash = models.CharField(max_length=64)
    last_four = models.CharField(max_length=4)
    # Catalog model ids this key may use; empty means every model the member's policy allows.
    model_ids = models.JSONField(default=list, blank=True)
    endpoints = models.JSONField(default=list)
    token_cap = models.BigIntegerField(null=True, blank=True, help_text="A sub-budget per period for this key.")
    # The counter the cap is checked against; shared with the keys this one was rotated from.
    spend = models.ForeignKey("allowances.KeySpend", on_delete=models.PROTECT, related_name="keys")
    allowed_cidrs = models.JSONField(default=list, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    # Set while a spend-velocity breaker has the key paused (gateway.BreakerTrip); refused with a 429.
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_by = models.ForeignKey("gateway.BreakerTrip", null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="paused_keys")
    # Not paused when the organization-wide breaker trips (a production service's key, say).
    breaker_exempt = models.BooleanField(default=False, db_default=False)
    # Off: near the limit its requests are refused, never routed to an economy model.
    economy_routing = models.BooleanField(default=True, db_default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Set when the key was rotated: it keeps working until then, its successor from the start.
    rotated_to = models.OneToOneField("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="rotated_from")
    works_until = models.DateTimeField(null=True, blank=True)
    expiry_reminded_at = models.DateTimeField(null=True, blank=True)
    # The one-time token of the form that minted it: a resubmitted form cannot mint a second key.
    form_token = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(token_cap__isnull=True) | Q(token_cap__gt=0), name="api_key_cap_positive"),
            models.UniqueConstraint(fields=["member", "form_token"], condition=~Q(form_token=""),
                                    name="api_key_form_token_unique"),
        ]

    def __str__(self):
        return f"{self.name} ({self.display_prefix}…{self.last_four})"

    @property
    def display_prefix(self) -> str:
        return f"tap_{self.public_id}"

    def refusal(self, *, now=None) -> str | None:
        """Why this key cannot be used now, or None."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return "this API key was revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "this API key has expired"
        if self.works_until is not None and self.works_until <= now:
            return "this API key was rotated and its grace period is over"
        return None
