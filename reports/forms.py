from datetime import date, timedelta

from django import forms

from allowances.models import CatalogModel
from reports.models import ReportSettings

NO_TEAM = "(none)"  # the team filter's value for members without a team


class PeriodField(forms.Field):
    """A period as YYYY-MM (the first day of the calendar month)."""

    widget = forms.TextInput(attrs={"maxlength": 7, "placeholder": "YYYY-MM"})

    def to_python(self, value):
        text = str(value or "").strip()
        if not text:
            return None
        try:
            year, month = text.split("-")
            if not (len(year) == 4 and len(month) == 2 and year.isascii() and year.isdigit() and month.isascii()
                    and month.isdigit() and int(year) >= 1900):
                raise ValueError
            return date(int(year), int(month), 1)
        except ValueError:
            raise forms.ValidationError("Enter a month as YYYY-MM, e.g. 2026-11.") from None


class PeriodForm(forms.Form):
    period = PeriodField(help_text="YYYY-MM")


class InsightsFilterForm(forms.Form):
    DAYS = [(7, "7 days"), (30, "30 days"), (90, "90 days")]
    days = forms.TypedChoiceField(choices=DAYS, coerce=int, required=False, empty_value=30)
    team = forms.CharField(max_length=100, required=False)
    member = forms.TypedChoiceField(required=False, coerce=int, empty_value=None, choices=[])

    def __init__(self, *args, members=(), teams=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["member"].choices = [("", "Everyone (aggregate)")] + [(m.pk, m.user.email) for m in members]
        self.fields["team"].widget = forms.Select(choices=[("", "All teams")] + [(t or NO_TEAM, t or "(no team)") for t in teams])

    def window(self, today: date) -> tuple[date, date]:
        days = self.cleaned_data.get("days") or 30
        return today - timedelta(days=days - 1), today


class ReportSettingsForm(forms.ModelForm):
    # Tenant querysets are made per request (a model form would query the catalog at import).
    economy_model = forms.ModelChoiceField(queryset=CatalogModel.all_objects.none(), required=False,
                                           help_text="This model and every model no dearer are the economy tier.")
    valuation_model = forms.ModelChoiceField(queryset=CatalogModel.all_objects.none(), required=False,
                                             help_text="Statements value a token at what it buys of this model as "
                                                       "input (default: the first priced model).")

    class Meta:
        model = ReportSettings
        fields = ["per_member_views", "small_prompt_tokens", "small_reply_tokens",
                  "reconciliation_tolerance_percent", "reconciliation_tolerance_tokens"]
        labels = {"per_member_views": "HR and admins may view one member's insights",
                  "small_prompt_tokens": "Small request: prompt at most (tokens)",
                  "small_reply_tokens": "Small request: reply at most (tokens)",
                  "reconciliation_tolerance_percent": "Reconciliation tolerance (%)",
                  "reconciliation_tolerance_tokens": "Reconciliation tolerance (tokens)"}

    def __init__(self, *args, organization, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance is not None:
            self.initial.setdefault("economy_model", self.instance.economy_model_id)
            self.initial.setdefault("valuation_model", self.instance.valuation_model_id)
        catalog = CatalogModel.objects.filter(organization=organization).order_by("display_name")
        self.fields["economy_model"].queryset = catalog
        self.fields["valuation_model"].queryset = catalog
