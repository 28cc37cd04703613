from allauth.account.forms import LoginForm as AllauthLoginForm
from django import forms
from django.urls import reverse

from identity.models import ROLE_CHOICES, IdentityProvider


class LoginForm(AllauthLoginForm):
    """allauth's login form; the email field asks, as it is typed, whether the address logs in with
    a company account (htmx). An organization that requires single sign-on refuses a password
    session when it is used there (identity.selectors.organization_session_refusal), not here: a
    person's other organizations may take it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["login"].widget.attrs.update({
            "hx-get": reverse("sso_route"), "hx-trigger": "input changed delay:300ms, change",
            "hx-target": "#company-login", "hx-sync": "this:replace",
        })


class CompanyLoginForm(forms.Form):
    email = forms.EmailField(label="Your work email address")


class IdentityProviderForm(forms.Form):
    kind = forms.ChoiceField(choices=IdentityProvider.Kind.choices, widget=forms.RadioSelect, label="Protocol")
    name = forms.CharField(max_length=80, help_text="Shown on the login button, e.g. “Acme Okta”.")
    discovery_url = forms.CharField(required=False, max_length=500, label="Discovery URL (OpenID Connect)",
                                    help_text="The issuer, or its …/.well-known/openid-configuration address.")
    client_id = forms.CharField(required=False, max_length=255, label="Client id (OpenID Connect)")
    client_secret = forms.CharField(required=False, max_length=2000, label="Client secret (OpenID Connect)",
                                    widget=forms.PasswordInput(render_value=False),
                                    help_text="Stored encrypted; leave empty to keep the one stored.")
    metadata_url = forms.CharField(required=False, max_length=500, label="Metadata URL (SAML)")
    entity_id = forms.CharField(required=False, max_length=500, label="Identity provider entity id (SAML)")
    metadata_xml = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 6}),
                                   label="Metadata XML (SAML)", help_text="Instead of a metadata URL.")
    jit_enabled = forms.BooleanField(required=False, label="Create members at their first login",
                                     help_text="People in a verified domain who are not members yet join with the "
                                               "role and team below; otherwise they must be invited.")
    default_role = forms.ChoiceField(choices=[c for c in ROLE_CHOICES if c[0] not in ("owner", "admin")],
                                     initial="employee")
    default_team = forms.ModelChoiceField(queryset=None, required=False, empty_label="No team")
    sso_required = forms.BooleanField(required=False, label="Require single sign-on",
                                      help_text="Members can no longer log in with a password, except the "
                                                "break-glass owner.")
    break_glass_member = forms.ModelChoiceField(queryset=None, required=False, empty_label="None",
                                                label="Break-glass owner")

    def __init__(self, *args, teams, owners, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["default_team"].queryset = teams
        self.fields["break_glass_member"].queryset = owners
        self.fields["break_glass_member"].label_from_instance = lambda member: member.user.email


class EmailDomainForm(forms.Form):
    domain = forms.CharField(max_length=253, help_text="e.g. example.com")


class ScimTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="The directory that will use it, e.g. “Okta provisioning”.")
