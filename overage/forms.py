import uuid

from django import forms

from overage import services
from portal.forms import TokenAmountField


class OverageRequestForm(forms.Form):
    """What the member asks for; the service checks it (the same rules as the API)."""

    tokens = TokenAmountField(required=False, help_text="How many tokens more you need this month, e.g. 500,000.")
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}),
                             help_text="What the tokens are for: the approver decides on it.")
    model = forms.ChoiceField(required=False, label="Model (optional)")
    project = forms.CharField(required=False, label="Project (optional)", max_length=services.PROJECT_LENGTH)
    # A resubmitted form (a double click, a reload) finds the request it made instead of a second one.
    form_token = forms.CharField(widget=forms.HiddenInput, required=False, max_length=services.KEY_LENGTH)

    def __init__(self, *args, catalog, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [("", "Any model")] + [(m.model_id, m.display_name) for m in catalog]
        if not self.is_bound:
            self.initial.setdefault("form_token", uuid.uuid4().hex)


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    tokens = TokenAmountField(required=False, label="Approve only (tokens)",
                             help_text="Leave empty to approve what was asked for; fewer tokens approve it in part.")
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}), label="Note (optional)",
                           help_text="The requester sees it.")


class BatchApproveForm(forms.Form):
    overage_requests = forms.ModelMultipleChoiceField(queryset=None, label="Requests")
    note = forms.CharField(required=False, max_length=services.NOTE_LENGTH, label="Note (optional)")

    def __init__(self, *args, queue, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["overage_requests"].queryset = queue
        self.fields["overage_requests"].error_messages["required"] = "Select the requests to approve."


class CapForm(forms.Form):
    cap_tokens = TokenAmountField(required=False, label="Approved overage per month, for the whole organization (tokens)",
                                 help_text="Empty: no cap. 0: nothing can be approved.")


class ApproverTeamsForm(forms.Form):
    approver = forms.ModelChoiceField(queryset=None, widget=forms.HiddenInput)
    teams = forms.ModelMultipleChoiceField(queryset=None, required=False, widget=forms.CheckboxSelectMultiple,
                                           help_text="None ticked: this approver decides for every team.")

    def __init__(self, *args, approvers, teams, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["approver"].queryset = approvers
        self.fields["teams"].queryset = teams
