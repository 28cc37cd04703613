from django.urls import path

from billing import views

# Included under /o/<org_slug>/.
urlpatterns = [
    path("billing/", views.billing, name="billing"),
    path("billing/payment-method/", views.billing_payment_method, name="billing_payment_method"),
    path("billing/settlements/<int:settlement_id>/retry/", views.billing_settlement_retry,
         name="billing_settlement_retry"),
    path("billing/settlements/<int:settlement_id>/chargeback.csv", views.billing_chargeback,
         name="billing_chargeback"),
]
# Not under an organization: Stripe calls it, authenticated by the event's signature.
webhook_patterns = [
    path("billing/stripe/webhook/", views.stripe_webhook, name="stripe_webhook"),
]
