from django import forms

from gateway.models import ProviderConnection


class ProviderConnectionForm(forms.Form):
    name = forms.CharField(max_length=100)
    kind = forms.ChoiceField(choices=ProviderConnection.Kind.choices)
    base_url = forms.CharField(max_length=200, required=False, label="Base URL",
                               help_text="e.g. https://api.openai.com/v1, https://api.anthropic.com/v1 or "
                                         "http://vllm.internal:8000/v1. Not for the sandbox.")
    secret = forms.CharField(required=False, label="API key of the provider", widget=forms.PasswordInput,
                             help_text="Stored encrypted; never shown again.")
    connect_timeout = forms.IntegerField(initial=5, label="Connect time-out (seconds)")
    read_timeout = forms.IntegerField(initial=120, label="Read time-out (seconds)",
                                      help_text="How long to wait for the next bytes of an answer.")
    responses_api = forms.BooleanField(required=False, label="Has the Responses API (/responses)", help_text=(
        "For an OpenAI-compatible server only (OpenAI's own API has it). Without it, the gateway translates "
        "/v1/responses (Codex CLI, the SDKs' responses.create) into the server's chat completions."))
    is_active = forms.BooleanField(required=False, initial=True, label="Active")


class ProviderConnectionEditForm(ProviderConnectionForm):
    secret = forms.CharField(required=False, label="New API key of the provider", widget=forms.PasswordInput,
                             help_text="Leave empty to keep the stored one.")
    clear_secret = forms.BooleanField(required=False, label="Remove the stored key")


class BreakerSettingsForm(forms.Form):
    key_per_minute = forms.CharField(required=False, label="One key, tokens per minute")
    key_per_hour = forms.CharField(required=False, label="One key, tokens per hour")
    member_per_minute = forms.CharField(required=False, label="One member's keys together, tokens per minute")
    member_per_hour = forms.CharField(required=False, label="One member's keys together, tokens per hour")
    organization_per_minute = forms.CharField(required=False, label="The whole organization, tokens per minute")
    organization_per_hour = forms.CharField(required=False, label="The whole organization, tokens per hour")
    member_normal_multiple = forms.CharField(
        required=False, label="A member's hour over their normal hour times",
        help_text="Their normal hour is the 95th percentile of their hours with usage over the last 7 days "
                  "(known once they have 5 such hours), e.g. 10.")
