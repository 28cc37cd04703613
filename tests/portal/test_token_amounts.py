"""Token amounts are typed as people write them (1,000,000) wherever a form takes one, and shown
with thousands separators; one field class (portal.forms.TokenAmountField) does it for all."""

import pytest
from django import forms as django_forms
from django.urls import reverse

from allowances import forms as allowance_forms
from allowances.models import Grant
from apikeys import forms as key_forms
from overage import forms as overage_forms
from portal.forms import TokenAmountField
from portal.tenancy import unscoped

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("typed", "digits"), [
    ("1,000,000", "1000000"), ("1 000 000", "1000000"), ("1_000_000", "1000000"), ("1\u202f000", "1000"),
    ("250000", "250000"), ("-1,000", "-1000"),
    # Not thousands groups: passed on as typed, for the service to refuse with its own message.
    ("1,00", "1,00"), ("1,000 000", "1,000 000"), ("1.000", "1.000"), ("abc", "abc"), ("12,3456", "12,3456"),
])
def test_the_field_takes_out_thousands_separators_only(typed, digits):
    assert TokenAmountField(required=False).clean(typed) == digits


def test_every_form_that_takes_tokens_uses_the_one_field():
    forms = [allowance_forms.PolicyForm, allowance_forms.GrantForm, key_forms.ApiKeyForm,
             overage_forms.OverageRequestForm, overage_forms.DecisionForm, overage_forms.CapForm]
    for form in forms:
        for name, field in form.base_fields.items():
            if "token" in name and name not in ("form_token",) or "tokens" in str(field.label or "").lower():
                if isinstance(field, django_forms.IntegerField):
                    continue  # counts of things (periods, seconds), not token amounts
                assert isinstance(field, TokenAmountField), (form.__name__, name)


def test_a_grant_typed_with_separators_grants_that_many(login, org_a):
    response = login(org_a.members["hr"]).post(reverse("grant_list", kwargs={"org_slug": org_a.slug}), {
        "tokens": "1,250,000", "reason": "launch", "member": org_a.members["employee"].pk, "team": "",
        "idempotency_key": "sep-1"})
    assert response.status_code == 302
    with unscoped():
        assert Grant.all_objects.get(reason="launch").tokens == 1_250_000


def test_the_policy_edit_form_shows_amounts_with_separators(login, org_a):
    page = login(org_a.members["hr"]).get(reverse("policy_edit", kwargs={
        "org_slug": org_a.slug, "allowance_policy_id": org_a.policy.pk})).content.decode()
    assert f'value="{org_a.policy.monthly_tokens:,}"' in page and 'inputmode="numeric"' in page
