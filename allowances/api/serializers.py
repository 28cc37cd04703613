from rest_framework import serializers

from allowances.models import (
    MAX_AUTO_APPROVED_REQUESTS,
    MAX_TOKENS,
    Account,
    AllowancePolicy,
    CatalogModel,
    Grant,
    LedgerEntry,
    PolicyAssignment,
)
from allowances.services import MAX_BULK_ROWS
from portal.api import fields
from portal.api.fields import MAX_ID, TokensField, WholeNumberField, object_id
from portal.api.query import QueryChoiceField, QueryIntegerField


class PolicySerializer(fields.ModelSerializer):
    # Typed and bounded here; the service checks how the rules fit together (a cap needs its rule).
    monthly_tokens = TokensField(min_value=0, max_value=MAX_TOKENS)
    rollover_cap_tokens = TokensField(min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True,
                                           help_text="Only with the capped_tokens rule.")
    rollover_cap_percent = WholeNumberField(min_value=1, max_value=100, required=False, allow_null=True,
                                            help_text="Only with the capped_percent rule.")
    auto_approve_tokens = TokensField(min_value=1, max_value=MAX_TOKENS, required=False, allow_null=True,
                                      help_text="Only with the auto_approve overage rule: overage requests are "
                                                "approved at once up to these tokens per period...")
    auto_approve_requests = WholeNumberField(min_value=1, max_value=MAX_AUTO_APPROVED_REQUESTS, required=False,
                                             allow_null=True, help_text="...and up to this many requests per "
                                                                        "period (only with auto_approve).")
    rollover_lifetime_periods = WholeNumberField(min_value=1, max_value=24, required=False,
                                                 help_text="More than 1 only with a rule that rolls tokens over.")
    economy_below_percent = WholeNumberField(min_value=1, max_value=100, required=False, allow_null=True, help_text=(
        "Below this percentage of the period's granted tokens (or of a key's cap) left, requests for a model with "
        "an economy counterpart are served by it. Null: never routed."))

    class Meta:
        model = AllowancePolicy
        fields = ["id", "name", "monthly_tokens", "rollover_rule", "rollover_cap_tokens", "rollover_cap_percent",
                  "rollover_lifetime_periods", "overage_rule", "auto_approve_tokens", "auto_approve_requests",
                  "economy_below_percent", "created_at"]
        read_only_fields = ["id", "created_at"]
        validators = []
        extra_kwargs = {"name": {"validators": []}}


class PolicyUpdateSerializer(PolicySerializer):
    applies = serializers.ChoiceField(choices=["next", "now"], default="next", write_only=True,
                                      help_text="next: from the next period; now: pro rata for the rest of this one.")

    class Meta(PolicySerializer.Meta):
        fields = PolicySerializer.Meta.fields + ["applies"]


class AssignmentSerializer(fields.ModelSerializer):
    policy = object_id(source="policy_id")
    team = object_id(source="team_id", required=False, allow_null=True, help_text="A team or a member, not both.")
    member = object_id(source="member_id", required=False, allow_null=True)
    applies = serializers.ChoiceField(choices=["next", "now"], default="next", write_only=True)

    class Meta:
        model = PolicyAssignment
        fields = ["id", "policy", "team", "member", "effective_from", "applied_immediately", "applies", "created_at"]
        read_only_fields = ["id", "effective_from", "applied_immediately", "created_at"]


class GrantSerializer(fields.ModelSerializer):
    tokens = TokensField(min_value=1, max_value=MAX_TOKENS)
    team = object_id(source="team_id", required=False, allow_null=True, help_text="A team or a member, not both.")
    member = object_id(source="member_id", required=False, allow_null=True)

    class Meta:
        model = Grant
        fields = ["id", "tokens", "reason", "team", "member", "created_at", "revoked_at"]
        read_only_fields = ["id", "created_at", "revoked_at"]


class CsvTokensField(TokensField):
    """Tokens of a bulk row, stated as TokensField's but checked by the service with the rest of the
    row, so that a refusal names the row like the CSV upload's."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.validators = []  # the bounds too: the service names the row

    def to_internal_value(self, data):
        return data


class BulkGrantRowSerializer(serializers.Serializer):
    """A row of the CSV upload, checked by the same service (a 400 names each bad row)."""

    email = fields.CharField(max_length=254)
    tokens = CsvTokensField(min_value=1, max_value=MAX_TOKENS)
    reason = fields.CharField(allow_blank=True, max_length=500)


class BulkGrantSerializer(serializers.Serializer):
    grants = serializers.ListField(child=BulkGrantRowSerializer(), min_length=1, max_length=MAX_BULK_ROWS)


class BalanceSerializer(fields.ModelSerializer):
    member = serializers.IntegerField(source="member_id")
    email = fields.EmailField(source="member.user.email")
    available = serializers.IntegerField()

    class Meta:
        model = Account
        fields = ["member", "email", "period_start", "granted", "held", "used", "available", "overdraft_limit"]


class LedgerEntrySerializer(fields.ModelSerializer):
    member = serializers.IntegerField(source="account.member_id", allow_null=True,
                                      help_text="The member whose account it is; null on a team pool's entry.")
    team = serializers.IntegerField(source="account.team_id", allow_null=True,
                                    help_text="The team whose pool it is; null on a member's entry.")

    class Meta:
        model = LedgerEntry
        fields = ["id", "member", "team", "kind", "tokens", "granted_delta", "held_delta", "used_delta", "period_start",
                  "model", "reason", "reference", "created_at", *LedgerEntry.PARTS, "close_rollover_until",
                  "close_rollover_tokens"]


class LedgerEntryFilterSerializer(serializers.Serializer):
    """The ledger's query parameters."""

    member = QueryIntegerField(required=False, min_value=1, max_value=MAX_ID,
                               help_text="Only this member's entries (HR; a member always sees only their own).")
    kind = QueryChoiceField(required=False, choices=LedgerEntry.Kind.choices)


class CatalogModelSerializer(fields.ModelSerializer):
    class Meta:
        model = CatalogModel
        fields = ["id", "model_id", "display_name", "connection", "upstream_model", "max_output_tokens",
                  "input_multiplier", "output_multiplier",
                  "cached_multiplier", "input_price_per_million", "output_price_per_million",
                  "cached_price_per_million", "is_active", "economy_counterpart"]
        read_only_fields = ["id"]
        validators = []
        extra_kwargs = {"model_id": {"validators": []}, "max_output_tokens": {"min_value": 1, "max_value": 1_000_000}}
