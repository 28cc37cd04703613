from rest_framework import serializers

from allowances.models import Account, AllowancePolicy, CatalogModel, Grant, LedgerEntry, PolicyAssignment
from portal.api.query import MAX_ID, QueryIntegerField


class PolicySerializer(serializers.ModelSerializer):
    # Loose types on purpose: the service validates the rules together and names the field at fault.
    monthly_tokens = serializers.JSONField()
    rollover_cap_tokens = serializers.JSONField(required=False, allow_null=True)
    rollover_cap_percent = serializers.JSONField(required=False, allow_null=True)
    auto_approve_tokens = serializers.JSONField(required=False, allow_null=True)
    rollover_lifetime_periods = serializers.JSONField(required=False)

    class Meta:
        model = AllowancePolicy
        fields = ["id", "name", "monthly_tokens", "rollover_rule", "rollover_cap_tokens", "rollover_cap_percent",
                  "rollover_lifetime_periods", "overage_rule", "auto_approve_tokens", "created_at"]
        read_only_fields = ["id", "created_at"]
        validators = []
        extra_kwargs = {"name": {"validators": []}}


class PolicyUpdateSerializer(PolicySerializer):
    applies = serializers.ChoiceField(choices=["next", "now"], default="next", write_only=True,
                                      help_text="next: from the next period; now: pro rata for the rest of this one.")

    class Meta(PolicySerializer.Meta):
        fields = PolicySerializer.Meta.fields + ["applies"]


class AssignmentSerializer(serializers.ModelSerializer):
    policy = serializers.IntegerField(source="policy_id")
    team = serializers.IntegerField(source="team_id", required=False, allow_null=True)
    member = serializers.IntegerField(source="member_id", required=False, allow_null=True)
    applies = serializers.ChoiceField(choices=["next", "now"], default="next", write_only=True)

    class Meta:
        model = PolicyAssignment
        fields = ["id", "policy", "team", "member", "effective_from", "applied_immediately", "applies", "created_at"]
        read_only_fields = ["id", "effective_from", "applied_immediately", "created_at"]


class GrantSerializer(serializers.ModelSerializer):
    tokens = serializers.JSONField()
    team = serializers.IntegerField(source="team_id", required=False, allow_null=True)
    member = serializers.IntegerField(source="member_id", required=False, allow_null=True)

    class Meta:
        model = Grant
        fields = ["id", "tokens", "reason", "team", "member", "created_at", "revoked_at"]
        read_only_fields = ["id", "created_at", "revoked_at"]


class BulkGrantRowSerializer(serializers.Serializer):
    email = serializers.CharField()
    tokens = serializers.JSONField()
    reason = serializers.CharField(allow_blank=True)


class BulkGrantSerializer(serializers.Serializer):
    grants = BulkGrantRowSerializer(many=True, allow_empty=False, max_length=5000)


class BalanceSerializer(serializers.ModelSerializer):
    member = serializers.IntegerField(source="member_id")
    email = serializers.EmailField(source="member.user.email")
    available = serializers.IntegerField()

    class Meta:
        model = Account
        fields = ["member", "email", "period_start", "granted", "held", "used", "available", "overdraft_limit"]


class LedgerEntrySerializer(serializers.ModelSerializer):
    member = serializers.IntegerField(source="account.member_id")

    class Meta:
        model = LedgerEntry
        fields = ["id", "member", "kind", "tokens", "granted_delta", "held_delta", "used_delta", "period_start",
                  "model", "reason", "reference", "created_at"]


class LedgerEntryFilterSerializer(serializers.Serializer):
    """The ledger's query parameters."""

    member = QueryIntegerField(required=False, min_value=1, max_value=MAX_ID,
                               help_text="Only this member's entries (HR; a member always sees only their own).")
    kind = serializers.ChoiceField(required=False, choices=LedgerEntry.Kind.choices)


class CatalogModelSerializer(serializers.ModelSerializer):
    class Meta:
        model = CatalogModel
        fields = ["id", "model_id", "display_name", "connection", "upstream_model", "max_output_tokens",
                  "input_multiplier", "output_multiplier",
                  "cached_multiplier", "input_price_per_million", "output_price_per_million",
                  "cached_price_per_million", "is_active"]
        read_only_fields = ["id"]
        validators = []
        extra_kwargs = {"model_id": {"validators": []}}
