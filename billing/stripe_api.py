"""Every call the portal makes to Stripe, through one StripeClient (stripe-python 16).

Each function takes and returns plain values (ids, dicts), so the rest of the portal never
handles Stripe objects. Writes send an idempotency key, but nothing relies on it (the test
server ignores them): billing.services records each step and finds what a crashed run made
(`invoice_items_of`, `invoices_of`) before making anything again.
"""

from __future__ import annotations

import functools

import stripe
from django.conf import settings

StripeError = stripe.StripeError
CardError = stripe.CardError
SignatureError = stripe.SignatureVerificationError
# Stripe's own test payment methods, offered when the portal talks to a test server.
TEST_PAYMENT_METHODS = {"pm_card_visa": "Visa, charges succeed", "pm_card_chargeCustomerFail":
                        "Visa, attaches but every charge is declined"}
PLAN_PREFIX = "token-allowance-overage"


def configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def uses_test_server() -> bool:
    """A test server (localstripe) instead of Stripe: no Stripe.js, the test cards are chosen in a form."""
    return bool(settings.STRIPE_API_BASE)


@functools.cache
def _client(key: str, base: str) -> stripe.StripeClient:
    # No network retries: a retry would resend a write that may have been made, and the project
    # does not rely on idempotency keys (billing.services finds what a call made instead).
    return stripe.StripeClient(key, base_addresses={"api": base} if base else None, max_network_retries=0)


def client() -> stripe.StripeClient:
    return _client(settings.STRIPE_SECRET_KEY, settings.STRIPE_API_BASE)


def _v1():
    return client().v1


def _options(idempotency_key: str | None) -> dict:
    return {"idempotency_key": idempotency_key} if idempotency_key else {}


# -- customers and payment methods ---------------------------------------------------------------


def customer_create(*, name: str, email: str, organization_id: int, idempotency_key: str) -> str:
    params = {"name": name, "metadata": {"organization": str(organization_id)}}
    if email:
        params["email"] = email
    return _v1().customers.create(params=params, options=_options(idempotency_key)).id


def customer_update(*, customer_id: str, name: str, email: str) -> None:
    _v1().customers.update(customer_id, params={"name": name, "email": email})


def customer_default_payment_method(*, customer_id: str, payment_method_id: str) -> None:
    _v1().customers.update(customer_id, params={"invoice_settings": {"default_payment_method": payment_method_id}})


def tax_id_replace(*, customer_id: str, old_id: str, type: str, value: str) -> str:
    if old_id:
        _v1().customers.tax_ids.delete(customer_id, old_id)
    if not value:
        return ""
    return _v1().customers.tax_ids.create(customer_id, params={"type": type, "value": value}).id


def setup_intent_create(*, customer_id: str) -> dict:
    intent = _v1().setup_intents.create(params={"customer": customer_id, "payment_method_types": ["card"],
                                                "usage": "off_session"})
    return {"id": intent.id, "client_secret": intent.client_secret}


def setup_intent_confirm(*, setup_intent_id: str, payment_method: str) -> dict:
    """Confirm a SetupIntent on the server with a payment method (the test server's test cards)."""
    return _intent(_v1().setup_intents.confirm(setup_intent_id, params={"payment_method": payment_method}))


def setup_intent_retrieve(*, setup_intent_id: str) -> dict:
    return _intent(_v1().setup_intents.retrieve(setup_intent_id))


def _intent(intent) -> dict:
    return {"id": intent.id, "status": intent.status, "customer": intent.customer,
            "payment_method": intent.payment_method}


def payment_method_attach(*, payment_method_id: str, customer_id: str) -> str:
    """Attach (again: no change) and describe the card, e.g. 'visa ending 4242'."""
    method = _v1().payment_methods.attach(payment_method_id, params={"customer": customer_id})
    card = method.to_dict().get("card") or {}
    return f"{card.get('brand', 'card')} ending {card.get('last4', '????')}"


def subscription_ensure(*, customer_id: str, currency: str, idempotency_key: str) -> str:
    """The customer's subscription that settlement invoices go on: a monthly plan at no charge of
    its own (the invoice items are the overage). One already there is reused."""
    existing = _v1().subscriptions.list(params={"customer": customer_id}).data
    for subscription in existing:
        if subscription.status not in ("canceled", "incomplete_expired"):
            return subscription.id
    plan_id = f"{PLAN_PREFIX}-{currency.lower()}"
    try:
        _v1().plans.retrieve(plan_id)
    except stripe.InvalidRequestError:
        product = _v1().products.create(params={"name": "Token allowance overage", "type": "service"},
                                        options=_options(f"{plan_id}-product"))
        _v1().plans.create(params={"id": plan_id, "amount": 0, "currency": currency.lower(), "interval": "month",
                                   "product": product.id}, options=_options(plan_id))
    return _v1().subscriptions.create(params={"customer": customer_id, "items": [{"plan": plan_id}]},
                                      options=_options(idempotency_key)).id


# -- settlement invoices -------------------------------------------------------------------------


def invoice_items_of(*, customer_id: str) -> dict[str, str]:
    """The customer's pending invoice items that name a settlement line: line id -> item id."""
    items = _v1().invoice_items.list(params={"customer": customer_id, "limit": 100})
    found = {}
    for item in items.auto_paging_iter():
        item = item.to_dict()
        line = (item.get("metadata") or {}).get("settlement_line")
        if line and not item.get("invoice"):
            found[line] = item["id"]
    return found


def invoice_item_create(*, customer_id: str, subscription_id: str, amount_minor: int, currency: str,
                        description: str, line_id: int, idempotency_key: str) -> str:
    return _v1().invoice_items.create(params={
        "customer": customer_id, "subscription": subscription_id, "amount": amount_minor,
        "currency": currency.lower(), "description": description, "metadata": {"settlement_line": str(line_id)},
    }, options=_options(idempotency_key)).id


def invoices_of(*, customer_id: str, reference: str) -> str | None:
    """The customer's invoice whose description ends with `reference`, if there is one."""
    for invoice in _v1().invoices.list(params={"customer": customer_id, "limit": 100}).auto_paging_iter():
        if (invoice.description or "").endswith(reference):
            return invoice.id
    return None


def invoice_create(*, customer_id: str, subscription_id: str, description: str, idempotency_key: str) -> str:
    return _v1().invoices.create(params={
        "customer": customer_id, "subscription": subscription_id, "description": description,
        "pending_invoice_items_behavior": "include",
    }, options=_options(idempotency_key)).id


def invoice_pay(*, invoice_id: str) -> dict:
    """Attempt to pay; a declined card leaves the invoice open (some servers raise a CardError)."""
    try:
        _v1().invoices.pay(invoice_id)
    except stripe.CardError:
        pass
    return invoice_retrieve(invoice_id=invoice_id)


def invoice_retrieve(*, invoice_id: str) -> dict:
    """The invoice as Stripe has it now: status, total, currency, lines, links, payment state."""
    invoice = _v1().invoices.retrieve(invoice_id).to_dict()
    payment_intent = invoice.get("payment_intent")
    if isinstance(payment_intent, dict):
        payment_intent = payment_intent.get("id")
    payment_status = ""
    if payment_intent:
        payment_status = _v1().payment_intents.retrieve(payment_intent).status
    charge = invoice.get("charge")
    receipt = charge.get("receipt_url") if isinstance(charge, dict) else None
    return {
        "id": invoice["id"], "status": invoice.get("status"), "total": invoice.get("total"),
        "currency": (invoice.get("currency") or "").upper(), "customer": invoice.get("customer"),
        "lines": [{"amount": line.get("amount"), "invoice_item": line.get("invoice_item"),
                   "description": line.get("description")} for line in invoice["lines"]["data"]],
        "url": invoice.get("hosted_invoice_url") or receipt or "",
        "payment_intent": payment_intent or "", "payment_status": payment_status,
        # Whether a charge was attempted and failed: Stripe's newer API versions show no payment
        # intent on the invoice, only that it was attempted and is still open.
        "payment_failed": invoice.get("status") == "open" and (
            payment_status in ("requires_payment_method", "canceled")
            or (not payment_intent and bool(invoice.get("attempted")))),
    }


def payment_intent_invoice(*, payment_intent_id: str) -> str | None:
    return _v1().payment_intents.retrieve(payment_intent_id).to_dict().get("invoice")


# -- webhooks ------------------------------------------------------------------------------------


def webhook_event(*, payload: bytes, signature: str) -> dict:
    """The event of a webhook delivery whose signature verifies with STRIPE_WEBHOOK_SECRET;
    SignatureError (or ValueError for a body that is not an event) otherwise."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise SignatureError("No webhook secret is configured.", signature)
    try:
        event = stripe.Webhook.construct_event(payload, signature, settings.STRIPE_WEBHOOK_SECRET).to_dict()
    except (AttributeError, TypeError):  # signed, but JSON that is not an object
        raise ValueError("not a Stripe event") from None
    data = event.get("data")
    if not (isinstance(event.get("id"), str) and event["id"] and isinstance(event.get("type"), str)
            and isinstance(data, dict) and isinstance(data.get("object"), dict)):
        raise ValueError("not a Stripe event")
    return event
