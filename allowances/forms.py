import uuid

from django import forms

from allowances.models import TEAM_POOL, AllowancePolicy, CatalogModel, LedgerEntry
from portal.forms import DateRangeFilterForm, TokenAmountField

APPLY_CHOICES = [
    ("next", "From the next period (nothing changes this month)"),
    ("now", "Immediately: top the rest of this period up or down pro rata"),
]


class PolicyForm(forms.Form):
    name = forms.CharField(max_length=120)
    monthly_tokens = TokenAmountField(help_text="Whole tokens per calendar month, e.g. 5,000,000.")
    rollover_rule = forms.ChoiceField(choices=AllowancePolicy.Rollover.choices)
    rollover_cap_tokens = TokenAmountField(required=False, label="Rollover cap (tokens)")
    rollover_cap_percent = forms.CharField(required=False, label="Rollover cap (% of the monthly amount)")
    rollover_lifetime_periods = forms.IntegerField(initial=1, label="Rolled-over tokens live for (periods)")
    overage_rule = forms.ChoiceField(choices=AllowancePolicy.Overage.choices)
    auto_approve_tokens = TokenAmountField(required=False, label="Auto-approved overage per period (tokens)")
    auto_approve_requests = forms.CharField(required=False, label="Auto-approved requests per period")
    economy_below_percent = forms.CharField(
        required=False, label="Route to economy models below (% left)", help_text=(
            "When less than this share of the period's granted tokens (or of a key's cap) is left, requests for a "
            "model with an economy counterpart are served by it instead of being refused. Empty: never."))


    # Fields that only one rule uses: shown while that rule is chosen (static/js/portal.js; all of
    # them without JavaScript).
    SHOWN_WHEN = {
        "rollover_cap_tokens": "rollover_rule=capped_tokens",
        "rollover_cap_percent": "rollover_rule=capped_percent",
        "rollover_lifetime_periods": "rollover_rule=all,capped_tokens,capped_percent",
        "auto_approve_tokens": "overage_rule=auto_approve",
        "auto_approve_requests": "overage_rule=auto_approve",
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, rule in self.SHOWN_WHEN.items():
            self.fields[name].widget.attrs["data-shown-when"] = rule


class PolicyEditForm(PolicyForm):
    applies = forms.ChoiceField(choices=APPLY_CHOICES, initial="next", widget=forms.RadioSelect,
                                label="The change applies")


class TeamOrMemberForm(forms.Form):
    """A form aimed at one team or one member of the organization, not both."""

    team = forms.ModelChoiceField(queryset=None, required=False, empty_label="—")
    member = forms.ModelChoiceField(queryset=None, required=False, empty_label="—")
    target_error = "Choose a team or a member (one of them)."

    def __init__(self, *args, teams, members, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams
        self.fields["member"].queryset = members
        self.fields["member"].label_from_instance = lambda m: m.user.email

    def clean(self):
        cleaned = super().clean()
        if bool(cleaned.get("team")) == bool(cleaned.get("member")):
            raise forms.ValidationError(self.target_error)
        return cleaned


class AssignmentForm(TeamOrMemberForm):
    policy = forms.ModelChoiceField(queryset=None)
    applies = forms.ChoiceField(choices=APPLY_CHOICES, initial="next", widget=forms.RadioSelect)
    field_order = ["policy", "team", "member", "applies"]

    def __init__(self, *args, policies, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["policy"].queryset = policies
        self.fields["member"].help_text = "A member's own policy wins over their team's."


class GrantForm(TeamOrMemberForm):
    tokens = TokenAmountField(help_text="Whole tokens, e.g. 250,000.")
    reason = forms.CharField(max_length=500)
    # Generated when the form is shown, so a double submit grants once.
    idempotency_key = forms.CharField(widget=forms.HiddenInput, max_length=100)
    field_order = ["tokens", "reason", "team", "member", "idempotency_key"]
    target_error = "Grant to a team or to a member (one of them)."

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("initial", {}).setdefault("idempotency_key", uuid.uuid4().hex)
        super().__init__(*args, **kwargs)


class GrantImportForm(forms.Form):
    file = forms.FileField(help_text="CSV with the columns email, tokens, reason (UTF-8).")


class CatalogModelForm(forms.Form):
    model_id = forms.CharField(max_length=100)
    display_name = forms.CharField(max_length=120, required=False)
    connection = forms.ModelChoiceField(queryset=None, label="Provider connection")
    upstream_model = forms.CharField(max_length=100, required=False, label="Provider's model name",
                                     help_text="Leave empty when the provider uses the same id.")
    max_output_tokens = forms.IntegerField(initial=4096, label="Maximum output per reply (tokens)", help_text=(
        "The most the model writes in one reply (its provider's documented limit, or less). Requests that ask "
        "for more are sent with this cap, and it is what is held for a request that names none."))
    input_multiplier = forms.CharField(initial="1")
    output_multiplier = forms.CharField(initial="1")
    cached_multiplier = forms.CharField(initial="1")
    input_price_per_million = forms.CharField(initial="0", label="Input price per million tokens")
    output_price_per_million = forms.CharField(initial="0", label="Output price per million tokens")
    cached_price_per_million = forms.CharField(initial="0", label="Cached price per million tokens")
    is_active = forms.BooleanField(required=False, initial=True)
    economy_counterpart = forms.ModelChoiceField(
        queryset=None, required=False, label="Economy counterpart", help_text=(
            "The cheaper model that serves this model's requests when a member's policy routes near the limit."))

    def __init__(self, *args, connections, catalog, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["connection"].queryset = connections
        self.fields["economy_counterpart"].queryset = catalog


class ModelAliasForm(forms.Form):
    alias = forms.CharField(max_length=100, help_text="A model id tools send, e.g. claude-sonnet-4-5-20250929, or a "
                            "prefix ending in * for every id that starts with it, e.g. claude-sonnet-*.")
    catalog_model = forms.ModelChoiceField(queryset=None, label="Catalog model", to_field_name="pk")

    def __init__(self, *args, catalog, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["catalog_model"].queryset = catalog


class HistoryFilterForm(DateRangeFilterForm):
    kind = forms.ChoiceField(choices=[("", "All kinds"), *LedgerEntry.Kind.choices], required=False)
    field_order = ["kind", "since", "until"]


class TransferForm(forms.Form):
    receiver = forms.ChoiceField(label="Give to")
    tokens = TokenAmountField(label="Tokens", help_text="Whole tokens of your unused base allowance.")
    note = forms.CharField(max_length=300, required=False)
    idempotency_key = forms.CharField(widget=forms.HiddenInput, max_length=100)

    def __init__(self, *args, receivers, pool_team=None, **kwargs):
        """`receivers`: the members one may give to; `pool_team`: the team whose pool one may give to."""
        kwargs.setdefault("initial", {}).setdefault("idempotency_key", uuid.uuid4().hex)
        super().__init__(*args, **kwargs)
        pool = [(TEAM_POOL, f"The {pool_team.name} team pool")] if pool_team is not None else []
        self.fields["receiver"].choices = [("", "---------"), *pool,
                                           *((str(member.pk), member.user.email) for member in receivers)]


class TransferSettingsForm(forms.Form):
    enabled = forms.BooleanField(required=False, label="Members may give allowance to each other")
    team_pools = forms.BooleanField(
        required=False, label="Team pools: members may give to their team's pool, and draw on it once their own "
                              "balance is spent", help_text="What a pool has left expires at the end of the month.")
    same_team_only = forms.BooleanField(required=False, initial=True, label="Only to members of their own team")
    max_per_period = TokenAmountField(required=False, label="Most one member may give per period (tokens)",
                                     help_text="Empty: up to their whole unused base allowance.")
