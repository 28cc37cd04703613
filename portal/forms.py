import re
import zoneinfo
from datetime import date

from django import forms
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator

from portal import services
from portal.models import CURRENCY_CHOICES, Organization
from portal.tenancy import ROLES

TIME_ZONE_CHOICES = [(name, name) for name in sorted(zoneinfo.available_timezones())]
ROLE_CHOICES = [(role, role.upper() if role == "hr" else role.capitalize()) for role in ROLES]


def apply_service_error(form: forms.Form, error: ValidationError) -> None:
    """Show a service's ValidationError on the form, on the field it names where the form has one."""
    if hasattr(error, "error_dict"):
        for field, messages in error.message_dict.items():
            form.add_error(field if field in form.fields else None, messages)
    else:
        form.add_error(None, error.messages)


class TokenAmountField(forms.CharField):
    """A number of tokens as people type it: `1000000`, `1,000,000`, `1 000 000` or `1_000_000`;
    shown with thousands separators. It only takes the separators out: the service that receives
    the digits says what is wrong with a number (one rule for forms, API and CSV)."""

    GROUPED = re.compile(r"-?\d{1,3}(?:([,\u00a0\u202f _])\d{3})(?:\1\d{3})*")

    def __init__(self, **kwargs):
        kwargs.setdefault("widget", forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "off"}))
        super().__init__(**kwargs)

    def to_python(self, value):
        value = super().to_python(value)
        if self.GROUPED.fullmatch(value):
            return re.sub(r"[^\d-]", "", value)
        return value

    def prepare_value(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return value


class SignupOrganizationForm(forms.Form):
    """Extra sign-up fields: every sign-up creates an organization owned by the new user."""

    organization_name = forms.CharField(max_length=120, label="Organization name")
    time_zone = forms.ChoiceField(choices=TIME_ZONE_CHOICES, initial="UTC",
                                  help_text="Periods close at midnight of the first of each month in this zone.")
    currency = forms.ChoiceField(choices=CURRENCY_CHOICES, initial="USD")

    def clean_organization_name(self):
        name = self.cleaned_data["organization_name"].strip()
        if not name:
            raise ValidationError("Give the organization a name.")
        return name

    def signup(self, request, user):
        services.organization_create(name=self.cleaned_data["organization_name"], owner=user,
                                     time_zone=self.cleaned_data["time_zone"], currency=self.cleaned_data["currency"])


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=120)
    time_zone = forms.ChoiceField(choices=TIME_ZONE_CHOICES)
    currency = forms.ChoiceField(choices=CURRENCY_CHOICES)
    leaver_allowance = forms.ChoiceField(choices=Organization.LeaverAllowance.choices, required=False,
                                         label="Allowance left when a member is deactivated")


class OrganizationCreateForm(forms.Form):
    name = forms.CharField(max_length=120, label="Organization name")
    time_zone = forms.ChoiceField(choices=TIME_ZONE_CHOICES, initial="UTC")
    currency = forms.ChoiceField(choices=CURRENCY_CHOICES, initial="USD")


class TeamForm(forms.Form):
    name = forms.CharField(max_length=120)
    cost_centre = forms.CharField(max_length=40, required=False)


class _TeamChoiceMixin:
    def _set_teams(self, teams):
        self.fields["team"].queryset = teams


class MemberForm(_TeamChoiceMixin, forms.Form):
    team = forms.ModelChoiceField(queryset=None, required=False, empty_label="No team")
    roles = forms.MultipleChoiceField(choices=ROLE_CHOICES, widget=forms.CheckboxSelectMultiple, required=False)
    is_active = forms.BooleanField(required=False, label="Active",
                                   help_text="Deactivated members cannot log in to this organization.")

    def __init__(self, *args, teams, can_edit_roles: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_teams(teams)
        if not can_edit_roles:
            del self.fields["roles"]


class InvitationForm(_TeamChoiceMixin, forms.Form):
    email = forms.EmailField()
    roles = forms.MultipleChoiceField(choices=ROLE_CHOICES, widget=forms.CheckboxSelectMultiple, initial=["employee"])
    team = forms.ModelChoiceField(queryset=None, required=False, empty_label="No team")

    def __init__(self, *args, teams, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_teams(teams)


class InvitationSignupForm(forms.Form):
    first_name = forms.CharField(max_length=150, required=False)
    last_name = forms.CharField(max_length=150, required=False)
    password1 = forms.CharField(label="Password", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))
    password2 = forms.CharField(label="Password (again)", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))

    def __init__(self, *args, email: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.email = email

    def clean(self):
        cleaned = super().clean()
        password1, password2 = cleaned.get("password1"), cleaned.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", "The two passwords differ.")
        elif password1:
            try:
                validate_password(password1)
            except ValidationError as error:
                self.add_error("password1", error)
        return cleaned


# The days a filter may name: the portal's records lie well within them, and a day near year 1 or
# 9999 cannot be turned into a time in every zone (it answered 500).
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2099, 12, 31)
_DAY_BOUNDS = [MinValueValidator(FIRST_DAY, f"Choose a day from {FIRST_DAY} to {LAST_DAY}."),
               MaxValueValidator(LAST_DAY, f"Choose a day from {FIRST_DAY} to {LAST_DAY}.")]


class DateRangeFilterForm(forms.Form):
    """A filter with an optional since/until day range (both days included)."""

    since = forms.DateField(required=False, validators=_DAY_BOUNDS, widget=forms.DateInput(
        attrs={"type": "date", "min": FIRST_DAY.isoformat(), "max": LAST_DAY.isoformat()}))
    until = forms.DateField(required=False, validators=_DAY_BOUNDS, widget=forms.DateInput(
        attrs={"type": "date", "min": FIRST_DAY.isoformat(), "max": LAST_DAY.isoformat()}))

    @property
    def status(self) -> int:
        """The page's status: 400 when the filter was given and is not valid (its errors are shown)."""
        return 400 if self.is_bound and not self.is_valid() else 200

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("since") and cleaned.get("until") and cleaned["since"] > cleaned["until"]:
            self.add_error("until", "The end date is before the start date.")
        return cleaned


class AuditFilterForm(DateRangeFilterForm):
    action = forms.CharField(required=False, widget=forms.TextInput(attrs={"list": "actions"}))
    actor = forms.CharField(required=False, label="Actor email")
    object_type = forms.CharField(required=False)
    field_order = ["action", "actor", "object_type", "since", "until"]
