"""Billing: the organization as a Stripe customer, and the settlement of each period's consumed
billable overage, with a line per team (cost centre).

A settlement and its lines are written before any Stripe call and completed after each one
(billing.services), so whatever is retried, crashed or raced, each line is one invoice item and
each settlement one invoice. The database holds that: one settlement per (organization, period),
one line per (settlement, team), each Stripe id stored once.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.tenancy import TenantModel


class BillingAccount(TenantModel):
    """The organization's Stripe customer (and the subscription its settlement invoices go on)."""

    billing_email = models.EmailField(blank=True)
    tax_id_type = models.CharField(max_length=20, blank=True, help_text="Stripe's tax id type, e.g. eu_vat.")
    tax_id = models.CharField(max_length=40, blank=True)
    stripe_customer_id = models.CharField(max_length=100, blank=True)
    stripe_subscription_id = models.CharField(max_length=100, blank=True)
    stripe_tax_id_id = models.CharField(max_length=100, blank=True)
    stripe_payment_method_id = models.CharField(max_length=100, blank=True)
    card_description = models.CharField(max_length=60, blank=True, help_text="e.g. visa ending 4242")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="billing_account_one_per_org"),
            # Webhooks find the organization by its Stripe customer.
            models.UniqueConstraint(fields=["stripe_customer_id"], condition=~Q(stripe_customer_id=""),
                                    name="billing_account_customer_unique"),
        ]

    def __str__(self):
        return f"Billing of organization {self.organization_id}"

    @property
    def is_set_up(self) -> bool:
        return bool(self.stripe_customer_id and self.stripe_subscription_id)

    @property
    def has_payment_method(self) -> bool:
        return bool(self.stripe_payment_method_id)


class Settlement(TenantModel):
    """One organization's consumed billable overage of one period, charged through Stripe."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PAID = "paid", "Paid"
        PAST_DUE = "past_due", "Past due"
        FAILED = "failed", "Failed"
        VOID = "void", "Void"

    period_start = models.DateField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    currency = models.CharField(max_length=3)
    amount_minor = models.BigIntegerField(help_text="The total, in the currency's minor units.")
    tokens = models.BigIntegerField()
    stripe_invoice_id = models.CharField(max_length=100, blank=True)
    stripe_invoice_url = models.URLField(max_length=500, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    past_due_since = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "period_start"], name="settlement_one_per_period"),
            models.UniqueConstraint(fields=["stripe_invoice_id"], condition=~Q(stripe_invoice_id=""),
                                    name="settlement_invoice_unique"),
            models.CheckConstraint(condition=Q(amount_minor__gte=0, tokens__gte=0), name="settlement_not_negative"),
            models.CheckConstraint(condition=Q(status__in=["pending", "paid", "past_due", "failed", "void"]),
                                   name="settlement_status_known"),
            models.CheckConstraint(condition=~Q(status="past_due") | Q(past_due_since__isnull=False),
                                   name="settlement_past_due_since"),
        ]

    def __str__(self):
        return f"Settlement {self.period_start:%Y-%m}"

    @property
    def reference(self) -> str:
        """What names this settlement at Stripe (the invoice's description ends with it)."""
        return f"settlement {self.organization_id}-{self.period_start:%Y-%m}"


class SettlementLine(TenantModel):
    """One team's (cost centre's) part of a settlement: one invoice item at Stripe."""

    settlement = models.ForeignKey(Settlement, on_delete=models.CASCADE, related_name="lines")
    team = models.ForeignKey("portal.Team", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    team_name = models.CharField(max_length=120)
    cost_centre = models.CharField(max_length=40, blank=True)
    tokens = models.BigIntegerField()
    amount_minor = models.BigIntegerField()
    # [{"model": id, "tokens": n, "amount_minor": m}], summing to the line: the chargeback rows.
    by_model = models.JSONField(default=list)
    stripe_invoice_item_id = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["team_name", "id"]
        constraints = [
            models.UniqueConstraint(fields=["settlement", "team"], nulls_distinct=False,
                                    name="settlement_line_one_per_team"),
            models.UniqueConstraint(fields=["stripe_invoice_item_id"], condition=~Q(stripe_invoice_item_id=""),
                                    name="settlement_line_invoice_item_unique"),
            models.CheckConstraint(condition=Q(amount_minor__gte=0, tokens__gte=0), name="settlement_line_not_negative"),
        ]

    def __str__(self):
        return f"{self.team_name or 'No team'}: {self.amount_minor}"


class StripeEvent(models.Model):
    """A Stripe webhook event, stored once by its id before it is processed (in a task).

    Not a tenant row: an event arrives before anyone knows its organization; processing finds it
    through the Stripe customer or invoice it names (BillingAccount, Settlement)."""

    stripe_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    organization = models.ForeignKey("portal.Organization", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    outcome = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self):
        return f"{self.type} {self.stripe_id}"
