"""Overage requests: a member asks for more tokens than the allowance, an approver (or the
policy, at once) decides, and an approval is a billable overage grant in the ledger.

A request moves once from pending to an end state (approved in full or in part, rejected,
cancelled, lapsed): every move is one conditional UPDATE of a pending row, made while the
requester's account row is locked, and an approval's grant is the ledger entry keyed by the
request, so a double click, a retried call or two approvers at once decide it once and grant it
once. The database holds the shape of each state and one pending request per member.
"""

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from allowances.models import MAX_TOKENS
from portal.models import Member, Team
from portal.tenancy import TenantModel


class OverageRequest(TenantModel):
    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved in full"
        PARTIALLY_APPROVED = "partially_approved", "Approved in part"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"
        LAPSED = "lapsed", "Lapsed"

    APPROVED_STATES = (State.APPROVED, State.PARTIALLY_APPROVED)

    member = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="overage_requests")
    period_start = models.DateField(help_text="The period the tokens are asked for (the requester's open period).")
    tokens = models.BigIntegerField()
    reason = models.CharField(max_length=1000)
    model = models.CharField(max_length=100, blank=True, help_text="The catalog model the tokens are for, if one.")
    project = models.CharField(max_length=200, blank=True)
    state = models.CharField(max_length=20, choices=State.choices, default=State.PENDING)
    approved_tokens = models.BigIntegerField(null=True, blank=True)
    # Who moved it out of pending: an approver, the requester (cancelled), nobody (the policy
    # approved it at once, or the period close lapsed it).
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_note = models.CharField(max_length=1000, blank=True)
    auto_approved = models.BooleanField(default=False)
    # A create retried with the same key (a form resubmitted, an API call repeated) finds this request.
    idempotency_key = models.CharField(max_length=100, blank=True)
    # When the requester dismissed the in-portal notice of the decision.
    notice_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(tokens__gt=0, tokens__lte=MAX_TOKENS), name="overage_tokens_in_range"),
            models.UniqueConstraint(fields=["member"], condition=Q(state="pending"),
                                    name="overage_one_pending_per_member"),
            models.UniqueConstraint(fields=["member", "idempotency_key"], condition=~Q(idempotency_key=""),
                                    name="overage_idempotency_key_unique"),
            models.CheckConstraint(name="overage_state_shape", condition=(
                Q(state="pending", approved_tokens__isnull=True, decided_at__isnull=True, decided_by__isnull=True,
                  auto_approved=False)
                | Q(state="approved", approved_tokens=F("tokens"), decided_at__isnull=False)
                | Q(state="partially_approved", approved_tokens__gt=0, approved_tokens__lt=F("tokens"),
                    decided_at__isnull=False, auto_approved=False)
                | Q(state__in=["rejected", "cancelled", "lapsed"], approved_tokens__isnull=True,
                    decided_at__isnull=False, auto_approved=False)
            )),
        ]
        indexes = [
            models.Index(fields=["organization", "state", "created_at"], name="overage_queue"),
            models.Index(fields=["organization", "period_start", "state"], name="overage_period_state"),
        ]

    def __str__(self):
        return f"overage request #{self.pk} for {self.tokens:,} tokens ({self.state})"

    @property
    def is_pending(self) -> bool:
        return self.state == self.State.PENDING

    @property
    def is_approved(self) -> bool:
        return self.state in self.APPROVED_STATES

    @property
    def ledger_key(self) -> str:
        """The idempotency key and reference of the approval's overage grant: one grant per request."""
        return f"overage-request:{self.pk}"


class ApproverTeam(TenantModel):
    """A team an approver approves for, set by admins. An approver with none approves for everyone."""

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="approves_for")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["member", "team"], name="approver_team_once")]

    def __str__(self):
        return f"member {self.member_id} approves for team {self.team_id}"


class OverageSettings(TenantModel):
    """The organization's rules for overage. Its row is also what approvals lock, one at a time
    per organization, while they check the cap."""

    cap_tokens = models.BigIntegerField(null=True, blank=True,
                                        help_text="Approved overage tokens per period for the whole organization.")

    class Meta:
        verbose_name_plural = "overage settings"
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="overage_settings_once_per_org"),
            models.CheckConstraint(condition=Q(cap_tokens__isnull=True) | Q(cap_tokens__gte=0, cap_tokens__lte=MAX_TOKENS),
                                   name="overage_cap_in_range"),
        ]

    def __str__(self):
        return f"overage settings of organization {self.organization_id}"


class ApproverDigest(TenantModel):
    """The day's digest of pending requests sent to one approver: once a day, whatever reruns."""

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    pending = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["member", "day"], name="approver_digest_once_a_day")]
