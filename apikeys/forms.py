import uuid

from django import forms

from apikeys.models import ENDPOINT_ROLES, ENDPOINTS, MAX_ROTATION_GRACE_HOURS
from portal.forms import TokenAmountField


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What will use it, e.g. “laptop: Claude Code”.")
    endpoints = forms.MultipleChoiceField(choices=list(ENDPOINTS.items()), widget=forms.CheckboxSelectMultiple,
                                          initial=["chat", "responses", "messages"])
    model_ids = forms.MultipleChoiceField(choices=[], required=False, widget=forms.CheckboxSelectMultiple,
                                          label="Models", help_text="None ticked: every model your policy allows.")
    token_cap = TokenAmountField(required=False, label="Token cap per period",
                                help_text="Optional sub-budget of your allowance for this key.")
    expires_at = forms.DateTimeField(required=False, label="Expires",
                                     widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    allowed_cidrs = forms.CharField(required=False, label="Allowed IP ranges", widget=forms.Textarea(attrs={"rows": 2}),
                                    help_text="Optional, one per line or comma-separated, e.g. 203.0.113.0/24.")
    economy_routing = forms.BooleanField(
        required=False, initial=True, label="Route to economy models near the limit",
        help_text="Where your policy routes: near the end of your allowance, a premium model's requests are served "
                  "by its cheaper counterpart. Untick to have them refused instead.")
    form_token = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def __init__(self, *args, catalog, member, **kwargs):
        kwargs.setdefault("initial", {}).setdefault("form_token", uuid.uuid4().hex)
        super().__init__(*args, **kwargs)
        self.fields["model_ids"].choices = [(m.model_id, m.display_name) for m in catalog]
        self.fields["endpoints"].choices = [(e, label) for e, label in ENDPOINTS.items()
                                            if e not in ENDPOINT_ROLES or member.has_any_role(ENDPOINT_ROLES[e])]

    def clean_allowed_cidrs(self):
        text = self.cleaned_data["allowed_cidrs"].replace(",", "\n")
        return [line.strip() for line in text.splitlines() if line.strip()]


class RotateForm(forms.Form):
    grace_hours = forms.IntegerField(min_value=0, max_value=MAX_ROTATION_GRACE_HOURS, initial=1,
                                     label="Old secret keeps working for (hours)")
