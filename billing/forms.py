from django import forms

from billing import services, stripe_api


class BillingAccountForm(forms.Form):
    """The billing details; the service checks them (the same rules as anywhere else)."""

    billing_email = forms.CharField(required=False, label="Billing email",
                                    help_text="Where Stripe sends invoices and receipts (default: yours).")
    tax_id_type = forms.ChoiceField(required=False, choices=list(services.TAX_ID_TYPES.items()), label="Tax id type")
    tax_id = forms.CharField(required=False, label="Tax id", help_text="e.g. DE123456789")


class PaymentMethodForm(forms.Form):
    """A card: a SetupIntent confirmed by Stripe's card element, or on a test server one of
    Stripe's test payment methods."""

    setup_intent = forms.CharField(required=False, widget=forms.HiddenInput, max_length=100)
    test_payment_method = forms.ChoiceField(required=False, label="Test card",
                                            choices=list(stripe_api.TEST_PAYMENT_METHODS.items()))
