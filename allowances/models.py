"""Allowances: the model catalog, policies and their assignments, and the token ledger.

Tokens are integers everywhere. The ledger is append-only: `LedgerEntry` rows are inserted and
never updated or deleted, and each carries its effect on the account's three buckets (granted,
held, used). `Account` stores those buckets, updated in the same transaction as the entry, so the
stored balance always equals the sum of the entries (checked by `manage.py verify_ledger`).

A hold is a ledger entry of kind `hold`; it is closed by exactly one later entry (a `usage`
settling it or a `release`) that points at it through the unique `closes_hold` column, so a hold
can never be settled or released twice, whatever retries or races happen.
"""

from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import F, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from allowances.pricing import Pricing
from portal.models import Member, Team
from portal.tenancy import TenantModel

# Anything above this in one grant or policy is a typo, not a budget (10 billion tokens).
MAX_TOKENS = 10_000_000_000
MAX_AUTO_APPROVED_REQUESTS = 1000  # per period, under an auto_approve policy


class CatalogModel(TenantModel):
    """A model the organization offers, with how it counts against allowances and what it costs."""

    model_id = models.CharField(max_length=100, help_text="The id clients send, e.g. gpt-4o-mini.")
    display_name = models.CharField(max_length=120)
    connection = models.ForeignKey("gateway.ProviderConnection", on_delete=models.PROTECT, related_name="models",
                                   help_text="The provider that serves this model.")
    upstream_model = models.CharField(max_length=100, blank=True,
                                      help_text="The provider's name for the model, if not the same id.")
    # What the gateway reserves for a reply when the request does not say max_tokens.
    max_output_tokens = models.PositiveIntegerField(default=4096)
    input_multiplier = models.DecimalField(max_digits=7, decimal_places=3, default=Decimal("1"))
    output_multiplier = models.DecimalField(max_digits=7, decimal_places=3, default=Decimal("1"))
    cached_multiplier = models.DecimalField(max_digits=7, decimal_places=3, default=Decimal("1"))
    # Prices per million tokens in the organization's currency.
    input_price_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    output_price_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    cached_price_per_million = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    is_active = models.BooleanField(default=True)
    # Budget-aware routing: where this model's requests go when the member's policy says the
    # allowance (or the key's cap) is nearly spent. Of the same organization (migration 0011).
    economy_counterpart = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                            related_name="premium_models", db_constraint=False,
                                            help_text="The cheaper model that serves this one's requests near the "
                                                      "limit, when the member's policy routes.")

    class Meta:
        ordering = ["display_name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "model_id"], name="catalog_model_id_unique_per_org"),
            models.CheckConstraint(
                condition=Q(input_multiplier__gt=0, output_multiplier__gt=0, cached_multiplier__gte=0),
                name="catalog_multipliers_positive",
            ),
            models.CheckConstraint(
                condition=Q(input_price_per_million__gte=0, output_price_per_million__gte=0,
                            cached_price_per_million__gte=0),
                name="catalog_prices_not_negative",
            ),
            models.CheckConstraint(condition=Q(max_output_tokens__gt=0), name="catalog_max_output_positive"),
            models.CheckConstraint(condition=Q(economy_counterpart__isnull=True) | ~Q(economy_counterpart=F("id")),
                                   name="catalog_economy_counterpart_not_itself"),
            # What aliases reference (with their organization): see ModelAlias.
            models.UniqueConstraint(fields=["id", "organization"], name="catalog_model_id_organization"),
        ]

    def __str__(self):
        return self.display_name

    @property
    def provider_model(self) -> str:
        return self.upstream_model or self.model_id

    @property
    def pricing(self) -> Pricing:
        return Pricing(multipliers=(self.input_multiplier, self.output_multiplier, self.cached_multiplier),
                       prices=(self.input_price_per_million, self.output_price_per_million,
                               self.cached_price_per_million))


class ModelAlias(TenantModel):
    """A model id that tools send by default, mapped by admins onto a catalog model.

    An alias is an exact id (`claude-sonnet-4-5-20250929`) or a prefix ending in `*`
    (`claude-sonnet-*`, for every dated snapshot to come); allowances.aliases says which wins. On
    PostgreSQL the catalog model is checked by a foreign key over (catalog model, organization)
    (migration 0009): an alias can only name a model of its own organization.
    """

    alias = models.CharField(max_length=100, help_text="e.g. claude-sonnet-4-5-20250929, or claude-sonnet-*.")
    catalog_model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="aliases")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["alias"]
        verbose_name_plural = "model aliases"
        constraints = [
            models.UniqueConstraint(fields=["organization", "alias"], name="model_alias_unique_per_org"),
            models.CheckConstraint(condition=~Q(alias="") & ~Q(alias="*"), name="model_alias_not_empty"),
        ]

    def __str__(self):
        return f"{self.alias} -> {self.catalog_model.model_id}"


class AllowancePolicy(TenantModel):
    class Rollover(models.TextChoices):
        NONE = "none", "Nothing rolls over"
        ALL = "all", "Everything unused rolls over"
        CAPPED_TOKENS = "capped_tokens", "Rolls over up to a number of tokens"
        CAPPED_PERCENT = "capped_percent", "Rolls over up to a percentage of the monthly amount"

    class Overage(models.TextChoices):
        HARD_STOP = "hard_stop", "Hard stop at the allowance"
        REQUEST_APPROVAL = "request_approval", "Member requests more; an approver decides"
        AUTO_APPROVE = "auto_approve", "Requests approved at once up to a limit per period"

    name = models.CharField(max_length=120)
    monthly_tokens = models.BigIntegerField()
    rollover_rule = models.CharField(max_length=20, choices=Rollover.choices, default=Rollover.NONE)
    rollover_cap_tokens = models.BigIntegerField(null=True, blank=True)
    rollover_cap_percent = models.PositiveSmallIntegerField(null=True, blank=True)
    # How many periods rolled-over tokens live before they expire (1 = for the next period only).
    rollover_lifetime_periods = models.PositiveSmallIntegerField(default=1)
    overage_rule = models.CharField(max_length=20, choices=Overage.choices, default=Overage.HARD_STOP)
    # Under auto_approve, overage requests are approved at once while the policy has approved
    # fewer than these tokens and requests in the period; beyond either they go to the approvers.
    auto_approve_tokens = models.BigIntegerField(null=True, blank=True)
    auto_approve_requests = models.PositiveIntegerField(null=True, blank=True)
    # Budget-aware routing: below this percentage of the period's granted tokens left (or of the
    # key's cap), requests for a model with an economy counterpart go to it. None: never routed.
    economy_below_percent = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "allowance policies"
        constraints = [
            models.UniqueConstraint("organization", models.functions.Lower("name"), name="policy_name_unique_per_org"),
            models.CheckConstraint(condition=Q(monthly_tokens__gte=0, monthly_tokens__lte=MAX_TOKENS),
                                   name="policy_monthly_tokens_in_range"),
            models.CheckConstraint(name="policy_rollover_rule_consistent", condition=(
                Q(rollover_rule="none", rollover_cap_tokens__isnull=True, rollover_cap_percent__isnull=True)
                | Q(rollover_rule="all", rollover_cap_tokens__isnull=True, rollover_cap_percent__isnull=True)
                | Q(rollover_rule="capped_tokens", rollover_cap_tokens__gt=0, rollover_cap_percent__isnull=True)
                | Q(rollover_rule="capped_percent", rollover_cap_tokens__isnull=True,
                    rollover_cap_percent__gte=1, rollover_cap_percent__lte=100)
            )),
            models.CheckConstraint(name="policy_rollover_lifetime_positive",
                                   condition=Q(rollover_lifetime_periods__gte=1, rollover_lifetime_periods__lte=24)),
            models.CheckConstraint(name="policy_overage_rule_consistent", condition=(
                Q(overage_rule__in=["hard_stop", "request_approval"], auto_approve_tokens__isnull=True,
                  auto_approve_requests__isnull=True)
                | Q(overage_rule="auto_approve", auto_approve_tokens__gt=0, auto_approve_tokens__lte=MAX_TOKENS,
                    auto_approve_requests__gte=1, auto_approve_requests__lte=MAX_AUTO_APPROVED_REQUESTS)
            )),
            models.CheckConstraint(name="policy_economy_below_percent_in_range", condition=(
                Q(economy_below_percent__isnull=True) | Q(economy_below_percent__gte=1, economy_below_percent__lte=100))),
        ]

    def __str__(self):
        return self.name

    @property
    def allows_overage(self) -> bool:
        return self.overage_rule != self.Overage.HARD_STOP

    def rollover_amount(self, unused: int) -> int:
        """How much of `unused` tokens this policy carries into the next period."""
        unused = max(unused, 0)
        if self.rollover_rule == self.Rollover.ALL:
            return unused
        if self.rollover_rule == self.Rollover.CAPPED_TOKENS:
            return min(unused, self.rollover_cap_tokens)
        if self.rollover_rule == self.Rollover.CAPPED_PERCENT:
            return min(unused, self.monthly_tokens * self.rollover_cap_percent // 100)
        return 0

    # The same rules in SQL, for the set-based period close: `policy` is the alias of a row with
    # this model's columns, all NULL when no policy governs (nothing rolls over).
    # tests/allowances/test_rules_in_sql.py holds each equal to its Python form.

    @classmethod
    def rollover_amount_sql(cls, policy: str, unused: str) -> str:
        unused = f"GREATEST({unused}, 0)"
        return (f"CASE {policy}.rollover_rule WHEN '{cls.Rollover.ALL}' THEN {unused} "
                f"WHEN '{cls.Rollover.CAPPED_TOKENS}' THEN LEAST({unused}, {policy}.rollover_cap_tokens) "
                f"WHEN '{cls.Rollover.CAPPED_PERCENT}' "
                f"THEN LEAST({unused}, {policy}.monthly_tokens * {policy}.rollover_cap_percent / 100) ELSE 0 END")


class PolicyAssignment(TenantModel):
    """A policy assigned to a team or to one member, from the start of a period (or a moment) on.

    A member's own assignment wins over their team's; the latest `effective_from` at or before a
    moment is the one in force then.
    """

    policy = models.ForeignKey(AllowancePolicy, on_delete=models.PROTECT, related_name="assignments")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    member = models.ForeignKey(Member, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    effective_from = models.DateTimeField()
    applied_immediately = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-effective_from", "-id"]
        constraints = [
            models.CheckConstraint(name="assignment_targets_team_or_member",
                                   condition=Q(team__isnull=False, member__isnull=True) | Q(team__isnull=True, member__isnull=False)),
            models.UniqueConstraint(fields=["team", "effective_from"], name="one_team_assignment_per_moment"),
            models.UniqueConstraint(fields=["member", "effective_from"], name="one_member_assignment_per_moment"),
        ]

    def __str__(self):
        return f"{self.policy} -> {self.team or self.member}"


class Account(TenantModel):
    """One member's allowance, or a team's pool: the stored sums of the ledger's buckets, and the
    open period.

    A team pool is what the team's members gave it (allowances.services.transfer_create); its
    members draw on it once their own balance is spent (ledger.hold_statement). It never has an
    overdraft and never holds approved overage, so nothing drawn from it is billable.
    """

    member = models.OneToOneField(Member, null=True, blank=True, on_delete=models.PROTECT, related_name="account")
    # On PostgreSQL checked with its organization by a foreign key over (team, organization)
    # (migration 0013): a pool is an account of a team of its own organization.
    team = models.OneToOneField(Team, null=True, blank=True, on_delete=models.PROTECT, related_name="pool",
                                db_constraint=False)
    period_start = models.DateField(help_text="First day of the open period (a calendar month in the org's zone).")
    granted = models.BigIntegerField(default=0)
    held = models.BigIntegerField(default=0)
    used = models.BigIntegerField(default=0)
    # How far below zero holds may take the available balance. No policy sets one: overage is
    # granted by approved overage requests (overage/), as tokens, not as an overdraft.
    overdraft_limit = models.BigIntegerField(default=0)
    opened_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(held__gte=0), name="account_held_not_negative"),
            models.CheckConstraint(condition=Q(overdraft_limit__gte=0), name="account_overdraft_not_negative"),
            models.CheckConstraint(name="account_of_member_or_team", condition=(
                Q(member__isnull=False, team__isnull=True) | Q(member__isnull=True, team__isnull=False))),
            models.CheckConstraint(condition=Q(team__isnull=True) | Q(overdraft_limit=0), name="pool_no_overdraft"),
            # What ledger entries reference (with their organization): see LedgerEntry.
            models.UniqueConstraint(fields=["id", "organization"], name="account_id_organization"),
        ]

    def __str__(self):
        return f"pool of {self.team.name}" if self.team_id else f"account of {self.member.user.email}"

    @property
    def is_pool(self) -> bool:
        return self.team_id is not None

    @property
    def available(self) -> int:
        return self.granted - self.used - self.held


class KeySpend(TenantModel):
    """What an API key spent in its account's open period: the counter behind a key's own cap.

    A rotated key shares its predecessor's counter, so rotating never resets the cap. The ledger
    moves it in the same statement as the account (under the same row locks), so a capped key can
    no more be overspent by concurrent requests than the account can. Counters from an older
    period count as zero: the first entry of a new period restarts them.
    """

    period_start = models.DateField(null=True, blank=True)
    held = models.BigIntegerField(default=0)
    used = models.BigIntegerField(default=0)
    token_cap = models.BigIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(held__gte=0), name="key_spend_held_not_negative"),
            models.CheckConstraint(condition=Q(token_cap__isnull=True) | Q(token_cap__gt=0),
                                   name="key_spend_cap_positive"),
        ]

    def spent_in(self, period_start) -> int:
        """Tokens used plus held in the given period."""
        return self.used + self.held if self.period_start == period_start else 0

    @staticmethod
    def counted_sql(counter: str, expression: str, period_start: str) -> str:
        """`spent_in`'s rule in SQL, for the ledger's statements: `expression` of the counter row
        `counter` if it counts in `period_start`, else 0 (held equal by tests/allowances/test_rules_in_sql.py)."""
        return f"CASE WHEN {counter}.period_start = {period_start} THEN {expression} ELSE 0 END"


@dataclass(frozen=True)
class CloseLine:
    """One part of a period close as a page shows it."""

    kind: str  # the kind of entry closes wrote for it before the close entry
    tokens: int
    reason: str
    opening: bool = False  # a part of the next period (its grant), not of the period closed

    def get_kind_display(self) -> str:
        return LedgerEntry.Kind(self.kind).label


class LedgerEntry(TenantModel):
    """One append-only movement of tokens on an account."""

    class Kind(models.TextChoices):
        GRANT = "grant", "Monthly grant"
        BONUS = "bonus", "Bonus grant"
        ROLLOVER_IN = "rollover_in", "Rollover in"
        ROLLOVER_OUT = "rollover_out", "Rollover out"
        EXPIRY = "expiry", "Expiry"
        HOLD = "hold", "Hold"
        RELEASE = "release", "Release"
        USAGE = "usage", "Usage"
        OVERAGE_GRANT = "overage_grant", "Overage grant"
        OVERAGE_LAPSE = "overage_lapse", "Overage lapsed"
        ADJUSTMENT = "adjustment", "Adjustment"
        TRANSFER_OUT = "transfer_out", "Given to a teammate or the team pool"
        TRANSFER_IN = "transfer_in", "Received from a teammate"
        CLOSE = "close", "Period close"

    # On PostgreSQL these two are checked by ONE foreign key, (account, organization) -> the
    # account's (id, organization) (migration 0008, portal.composite_keys): an entry can only name
    # an account of its own organization, and a period close inserting millions of entries pays
    # one check per entry, not two. No single-column indexes: the unique (account, idempotency
    # key) and the (organization, created at) indexes lead with them, and every index slows each
    # insert.
    organization = models.ForeignKey("portal.Organization", on_delete=models.CASCADE, related_name="+", db_index=False,
                                     db_constraint=False)
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="entries", db_index=False,
                                db_constraint=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The entry's amount as a person reads it: positive, except adjustments which carry their sign.
    # The deltas say exactly how it moves each bucket; available moves by granted - held - used.
    tokens = models.BigIntegerField()
    granted_delta = models.BigIntegerField(default=0)
    held_delta = models.BigIntegerField(default=0)
    used_delta = models.BigIntegerField(default=0)
    period_start = models.DateField()
    idempotency_key = models.CharField(max_length=200)
    # Unique where set (see Meta): a hold is closed by one entry only. Most entries close nothing,
    # so this and the rarely set columns below are indexed only where they are set.
    closes_hold = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="closed_by",
                                    db_index=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="For holds: when the sweeper releases it.")
    model = models.CharField(max_length=100, blank=True, help_text="Catalog model id, for holds and usage.")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
                              db_index=False)
    # The API key a hold or usage was made with (gateway and usage ingest).
    api_key = models.ForeignKey("apikeys.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                db_index=False)
    reason = models.CharField(max_length=500, blank=True)
    reference = models.CharField(max_length=100, blank=True, help_text="What caused it, e.g. grant:12 or policy:3.")
    created_at = models.DateTimeField(default=timezone.now)
    # A hold on a member's account that the team pool covers in part: the pool's hold, made in the
    # same statement and closed with this one (ledger.hold_statement). Written only by the ledger,
    # which `verify` checks; no foreign key trigger on every ledger insert for a column rarely set.
    pool_hold = models.OneToOneField("self", null=True, blank=True, on_delete=models.PROTECT, related_name="pooled_in",
                                     db_constraint=False, db_index=False)
    # A period close is one entry per account (kind close, in the period it closes) that carries its
    # parts, each zero or more; NULL on every other kind. Entries of the kinds closes wrote before
    # (expiry, overage_lapse, overage_grant, rollover_out in the closed period, rollover_in and grant
    # in the next) stay as they are and are read alongside (see CLOSING_PARTS).
    close_overage_billed = models.BigIntegerField(null=True, blank=True, help_text=(
        "Used beyond the balance in the closed period, booked as billable overage."))
    close_overage_lapsed = models.BigIntegerField(null=True, blank=True, help_text=(
        "Approved overage not used in the closed period (lapsed, not billed)."))
    close_expired = models.BigIntegerField(null=True, blank=True, help_text=(
        "Unused in the closed period beyond what the rollover rule keeps."))
    close_rollover_expired = models.BigIntegerField(null=True, blank=True, help_text=(
        "Rolled-over tokens unused at the end of their life."))
    close_rolled_over = models.BigIntegerField(null=True, blank=True, help_text=(
        "Carried into the next period: the sum of the tranches."))
    close_granted = models.BigIntegerField(null=True, blank=True, help_text=(
        "The next period's monthly grant by the policy in force then."))
    # The rolled-over tranches: tokens usable until (the period starting on) each date.
    close_rollover_until = ArrayField(models.DateField(), null=True, blank=True)
    close_rollover_tokens = ArrayField(models.BigIntegerField(), null=True, blank=True)

    # How each part of a close moves granted, and the period it counts in: the closing parts in the
    # period closed (the entry's own), the opening parts in the next one. granted_delta (and tokens)
    # is the sum of both, checked by the database.
    CLOSING_PARTS = {"close_overage_billed": 1, "close_overage_lapsed": -1, "close_expired": -1,
                     "close_rollover_expired": -1, "close_rolled_over": -1}
    OPENING_PARTS = {"close_rolled_over": 1, "close_granted": 1}
    PARTS = ("close_overage_billed", "close_overage_lapsed", "close_expired", "close_rollover_expired",
             "close_rolled_over", "close_granted")

    @classmethod
    def parts_sql(cls, alias: str, parts: dict) -> str:
        """The sum of `parts` (CLOSING_PARTS or OPENING_PARTS) of a close entry `alias`, in SQL."""
        return " + ".join(f"{sign} * {alias}.{column}" for column, sign in parts.items())
    # Of such a hold: how much of the member's part is their base allowance, charged before the
    # pool; the rest of their part is approved overage (or overdraft), charged after it.
    base_tokens = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.UniqueConstraint(fields=["account", "idempotency_key"], name="ledger_idempotency_key_unique"),
            models.UniqueConstraint(fields=["closes_hold"], condition=Q(closes_hold__isnull=False),
                                    name="ledger_hold_closed_once"),
            # A hold holds tokens, except a member's part of a hold the pool covers whole (zero).
            models.CheckConstraint(name="ledger_hold_shape", condition=~Q(kind="hold") | Q(
                held_delta=F("tokens"), granted_delta=0, used_delta=0, expires_at__isnull=False) & (
                Q(tokens__gt=0) | Q(tokens=0, pool_hold__isnull=False))),
            models.CheckConstraint(name="ledger_pool_hold_on_holds", condition=Q(pool_hold__isnull=True) | Q(kind="hold")),
            models.CheckConstraint(name="ledger_close_parts", condition=(
                Q(kind="close", tokens=F("granted_delta"), held_delta=0, used_delta=0,
                  granted_delta=F("close_overage_billed") - F("close_overage_lapsed") - F("close_expired")
                  - F("close_rollover_expired") + F("close_granted"),
                  close_rollover_until__isnull=False, close_rollover_tokens__isnull=False,
                  close_overage_billed__gte=0, close_overage_lapsed__gte=0, close_expired__gte=0,
                  close_rollover_expired__gte=0, close_rolled_over__gte=0, close_granted__gte=0)
              # Every tranche has its date and a positive amount. That they sum to close_rolled_over
              # (which moves no balance) verify_ledger checks: a function summing them here cost
              # the close 30 microseconds an entry, a third of its time.
              & Q(RawSQL("cardinality(close_rollover_until) = cardinality(close_rollover_tokens) "
                         "AND 0 < ALL(close_rollover_tokens)", [], output_field=models.BooleanField()))
                | (~Q(kind="close") & Q(close_overage_billed__isnull=True, close_overage_lapsed__isnull=True,
                                        close_expired__isnull=True, close_rollover_expired__isnull=True,
                                        close_rolled_over__isnull=True,
                                        close_granted__isnull=True, close_rollover_until__isnull=True,
                                        close_rollover_tokens__isnull=True)))),
            models.CheckConstraint(name="ledger_base_tokens_of_pooled_holds", condition=Q(base_tokens__isnull=True) | Q(
                pool_hold__isnull=False, base_tokens__gte=0, base_tokens__lte=F("tokens"))),
        ]
        indexes = [
            models.Index(fields=["account", "period_start"], name="ledger_account_period"),
            models.Index(fields=["expires_at"], name="ledger_open_hold_expiry", condition=Q(kind="hold")),
            models.Index(fields=["organization", "created_at"], name="ledger_org_created"),
            models.Index(fields=["actor"], condition=Q(actor__isnull=False), name="ledger_actor"),
            models.Index(fields=["api_key"], condition=Q(api_key__isnull=False), name="ledger_api_key"),
            # The few entries billing starts from: a period's overage grants (allowances.consumption).
            models.Index(fields=["organization", "period_start"], condition=Q(kind="overage_grant"),
                         name="ledger_overage_grants"),
            # A member's approved overage of the period, which a hold with the team pool reads.
            models.Index(fields=["account", "period_start"], condition=Q(kind="overage_grant"),
                         name="ledger_account_overage"),
            models.Index(fields=["organization", "period_start"], condition=Q(kind="close", close_overage_billed__gt=0),
                         name="ledger_close_overage_billed"),
        ]

    @property
    def signed_tokens(self) -> int:
        """The entry as the member's history shows it: grants +, expiries, lapses and usage -, a
        hold - and its release + (a settlement's release of its hold is not usage)."""
        if self.granted_delta or self.used_delta:
            return self.granted_delta - self.used_delta
        return -self.held_delta

    @property
    def close_lines(self) -> list[CloseLine]:
        """A close entry's nonzero parts as the member reads them, named as the entries closes
        wrote before it (a rolled-over tranche each)."""
        if self.kind != self.Kind.CLOSE:
            return []
        lines = [
            CloseLine(self.Kind.OVERAGE_GRANT, self.close_overage_billed,
                      "Used beyond the allowance and approved overage this period (billed)"),
            CloseLine(self.Kind.OVERAGE_LAPSE, self.close_overage_lapsed,
                      "Approved overage not used this period (lapsed, not billed)"),
            CloseLine(self.Kind.EXPIRY, self.close_rollover_expired, "Rolled-over tokens reached the end of their life"),
            CloseLine(self.Kind.EXPIRY, self.close_expired, "Unused this period beyond what the policy rolls over"),
            *(CloseLine(self.Kind.ROLLOVER_OUT, tokens, f"Rolls over (usable until the period of {until.isoformat()})")
              for until, tokens in zip(self.close_rollover_until, self.close_rollover_tokens, strict=True)),
            CloseLine(self.Kind.GRANT, self.close_granted, "The next period's monthly allowance", opening=True),
        ]
        return [line for line in lines if line.tokens]

    def __str__(self):
        return f"{self.kind} {self.tokens} on account {self.account_id}"


class Grant(TenantModel):
    """HR's one-off bonus to a member or a team (one ledger entry per member account)."""

    tokens = models.BigIntegerField()
    reason = models.CharField(max_length=500)
    member = models.ForeignKey(Member, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    batch = models.ForeignKey("GrantBatch", null=True, blank=True, on_delete=models.PROTECT, related_name="grants")
    # A form or API retry with the same key finds this grant instead of granting twice.
    idempotency_key = models.CharField(max_length=100)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(tokens__gt=0, tokens__lte=MAX_TOKENS), name="grant_tokens_in_range"),
            models.UniqueConstraint(fields=["organization", "idempotency_key"], name="grant_idempotency_key_unique"),
            models.CheckConstraint(name="grant_targets_team_or_member",
                                   condition=Q(team__isnull=False, member__isnull=True) | Q(team__isnull=True, member__isnull=False)),
        ]

    def __str__(self):
        return f"{self.tokens} tokens to {self.member or self.team}"


class GrantBatch(TenantModel):
    """A CSV of bulk grants: parsed and previewed first, then applied all at once or not at all."""

    class Status(models.TextChoices):
        PREVIEW = "preview", "Previewed"
        APPLIED = "applied", "Applied"
        DISCARDED = "discarded", "Discarded"

    filename = models.CharField(max_length=200, blank=True)
    rows = models.JSONField(default=list, help_text="[{line, email, tokens, reason, member_id}] of the valid rows.")
    errors = models.JSONField(default=list, help_text="[{line, message}] of the rows that cannot be applied.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PREVIEW)
    # For API bulk requests: a retry with the same Idempotency-Key finds this batch.
    idempotency_key = models.CharField(max_length=100, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "grant batches"
        constraints = [models.UniqueConstraint(fields=["organization", "idempotency_key"], condition=~Q(idempotency_key=""),
                                               name="grant_batch_idempotency_key_unique")]

    def __str__(self):
        return f"CSV {self.filename or self.pk} ({self.status})"

    @property
    def total_tokens(self) -> int:
        return sum(row["tokens"] for row in self.rows)


class UsageAlert(TenantModel):
    """A member passed 80% or 100% of their allowance in a period: shown on their dashboard and
    emailed, once per threshold per period (the unique constraint makes reruns harmless)."""

    THRESHOLDS = (80, 100)

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateField()
    threshold = models.PositiveSmallIntegerField()
    used = models.BigIntegerField()
    allowance = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["account", "period_start", "threshold"], name="usage_alert_once_per_period"),
        ]

    def __str__(self):
        return f"{self.threshold}% of the allowance used in the period of {self.period_start}"


class TransferSettings(TenantModel):
    """The organization's rules for members giving allowance to each other (allowances.services
    transfer_create): off until an admin switches them on."""

    organization = models.OneToOneField("portal.Organization", on_delete=models.CASCADE, related_name="+")
    enabled = models.BooleanField(default=False)
    same_team_only = models.BooleanField(default=True)
    # The most one member may give in a period; None: no limit beyond their unused base allowance.
    max_per_period = models.BigIntegerField(null=True, blank=True)
    # Members may give to their team's pool, and draw on it once their own balance is spent.
    team_pools = models.BooleanField(default=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "transfer settings"
        constraints = [models.CheckConstraint(
            condition=Q(max_per_period__isnull=True) | Q(max_per_period__gt=0, max_per_period__lte=MAX_TOKENS),
            name="transfer_settings_max_in_range")]

    def __str__(self):
        return f"transfer rules of {self.organization_id}"


TEAM_POOL = "pool"  # a transfer's receiver that is the giver's team pool (forms and services)


class Transfer(TenantModel):
    """Tokens a member gave another member, or their team's pool, of their unused base allowance:
    a transfer_out entry on the giver's account and a transfer_in on the receiver's (or the
    pool's), posted together (keyed by this row)."""

    giver = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="+")
    receiver = models.ForeignKey(Member, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    pool_team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.PROTECT, related_name="+",
                                  help_text="The team whose pool received the tokens.")
    tokens = models.BigIntegerField()
    period_start = models.DateField()
    note = models.CharField(max_length=300, blank=True)
    # A form or API retry with the same key finds this transfer instead of giving twice.
    idempotency_key = models.CharField(max_length=100)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(tokens__gt=0, tokens__lte=MAX_TOKENS), name="transfer_tokens_in_range"),
            models.CheckConstraint(condition=~Q(giver=F("receiver")), name="transfer_not_to_oneself"),
            models.CheckConstraint(name="transfer_to_member_or_pool", condition=(
                Q(receiver__isnull=False, pool_team__isnull=True) | Q(receiver__isnull=True, pool_team__isnull=False))),
            models.UniqueConstraint(fields=["organization", "idempotency_key"], name="transfer_idempotency_key_unique"),
        ]
        indexes = [models.Index(fields=["organization", "period_start"], name="transfer_org_period")]

    def __str__(self):
        to = f"the pool of team {self.pool_team_id}" if self.pool_team_id else self.receiver_id
        return f"{self.tokens} tokens from {self.giver_id} to {to}"

    @property
    def to_pool(self) -> bool:
        return self.pool_team_id is not None
