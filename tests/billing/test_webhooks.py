"""Stripe's webhooks on the live portal (uvicorn): localstripe delivers signed events to it; a
missing or bad signature is refused with 400 and nothing stored; a repeated event is processed
once; a failure and a success delivered out of order end paid (each re-fetches the invoice)."""

import hashlib
import hmac
import json
import time

import httpx
import pytest

from billing.models import Settlement, StripeEvent
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.billing.conftest import WEBHOOK_SECRET, close, set_up_billing
from tests.gateway.conftest import close_server_connections
from tests.support.fake_upstream import ServerThread

pytestmark = pytest.mark.services
PATH = "/billing/stripe/webhook/"
WAIT = 60.0  # localstripe delivers about a second after the event


@pytest.fixture
def portal_url():
    from portal.asgi import application

    with ServerThread(application) as thread:
        yield thread.url
    close_server_connections()


def register(stripe_server, url: str, events=None):
    """Point localstripe's (one) webhook at `url`, for `events` (None: all of them)."""
    body = {"url": url, "secret": WEBHOOK_SECRET} | ({"events": events} if events is not None else {})
    httpx.post(f"{stripe_server.base}/_config/webhooks/portal-tests", json=body, timeout=10).raise_for_status()


def signed(payload: bytes, secret: str = WEBHOOK_SECRET) -> dict:
    stamp = int(time.time())
    signature = hmac.new(secret.encode(), b"%d.%s" % (stamp, payload), hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={stamp},v1={signature}", "Content-Type": "application/json"}


def events_at_stripe(stripe_server, kind: str) -> list[dict]:
    return [event.to_dict() for event in stripe_server.v1.events.list(params={"type": kind}).data]


def wait_for(what, predicate):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {WAIT:.0f} s")


def settlement_of(org) -> Settlement:
    with unscoped():
        return Settlement.all_objects.get(organization=org.organization, period_start=org.period)


def test_an_event_localstripe_delivers_is_verified_stored_and_processed(billed, stripe_server, portal_url):
    """The card is declined at the close (past due); the invoice is then paid at Stripe, not through
    the portal: only Stripe's event, delivered by localstripe, tells the portal, which marks it paid.
    (One event type is delivered, so the portal processes one delivery at a time.)"""
    register(stripe_server, "http://127.0.0.1:9/nowhere", events=["customer.deleted"])
    set_up_billing(billed, payment_method="pm_card_chargeCustomerFail")
    close(billed)
    settlement = settlement_of(billed)
    assert settlement.status == Settlement.Status.PAST_DUE
    with scope(billed.organization):
        from billing import services

        services.payment_method_set(organization=billed.organization, actor=billed.owner.user,
                                    test_payment_method="pm_card_visa")
    register(stripe_server, portal_url + PATH, events=["invoice.payment_succeeded"])
    stripe_server.v1.invoices.pay(settlement.stripe_invoice_id)
    event = wait_for("processed invoice.payment_succeeded", lambda: StripeEvent.objects.filter(
        type="invoice.payment_succeeded", processed_at__isnull=False,
        payload__data__object__id=settlement.stripe_invoice_id).first())
    assert event.organization_id == billed.organization.pk
    assert event.outcome == f"settlement {settlement.pk}: paid"
    assert settlement_of(billed).status == Settlement.Status.PAID


def test_a_missing_or_bad_signature_is_refused_and_nothing_is_stored(billed, stripe_server, portal_url):
    payload = json.dumps({"id": "evt_forged", "type": "invoice.payment_succeeded",
                          "data": {"object": {"id": "in_forged"}}}).encode()
    for headers in ({"Content-Type": "application/json"}, signed(payload, secret="whsec_someone_else"),
                    {"Stripe-Signature": "t=1,v1=00", "Content-Type": "application/json"}):
        response = httpx.post(portal_url + PATH, content=payload, headers=headers, timeout=10)
        assert response.status_code == 400 and "Stripe-Signature" in response.json()["error"], response.text
    for body in (b"not json", b"[1]", b"null", b'{"id": "evt_1"}', b'{"id": "evt_1", "type": "x", "data": 5}'):
        response = httpx.post(portal_url + PATH, content=body, headers=signed(body), timeout=10)
        assert response.status_code == 400, (body, response.text)  # signed, but no event
    assert httpx.get(portal_url + PATH, timeout=10).status_code == 405
    assert not StripeEvent.objects.exists()


def test_a_repeated_event_is_stored_and_processed_once(billed, stripe_server, portal_url):
    register(stripe_server, "http://127.0.0.1:9/nowhere", events=["customer.deleted"])  # deliveries by hand
    set_up_billing(billed)
    close(billed)
    settlement = settlement_of(billed)
    [event] = [e for e in events_at_stripe(stripe_server, "invoice.payment_succeeded")
               if e["data"]["object"]["id"] == settlement.stripe_invoice_id]
    payload = json.dumps(event).encode()
    answers = [httpx.post(portal_url + PATH, content=payload, headers=signed(payload), timeout=30).json()
               for _ in range(3)]
    assert [answer["duplicate"] for answer in answers] == [False, True, True]
    [stored] = StripeEvent.objects.filter(stripe_id=event["id"])
    assert stored.processed_at is not None and stored.outcome == f"settlement {settlement.pk}: paid"


def test_a_failure_and_a_success_delivered_out_of_order_end_paid(billed, stripe_server, portal_url):
    """The card is declined (past due), then the invoice is paid at Stripe with a new card; the
    success arrives first and the failure after it: the settlement ends paid."""
    register(stripe_server, "http://127.0.0.1:9/nowhere", events=["customer.deleted"])
    set_up_billing(billed, payment_method="pm_card_chargeCustomerFail")
    close(billed)
    settlement = settlement_of(billed)
    assert settlement.status == Settlement.Status.PAST_DUE
    invoice = settlement.stripe_invoice_id
    # localstripe sends no event for an invoice payment declined at once: the failure is Stripe's
    # event of that shape, carrying the invoice as it was then (open, its charge declined).
    failed = {"id": "evt_payment_failed_of_" + invoice, "object": "event", "type": "invoice.payment_failed",
              "created": int(time.time()), "data": {"object": stripe_server.v1.invoices.retrieve(invoice).to_dict()}}
    assert failed["data"]["object"]["status"] == "open"
    with scope(billed.organization):
        from billing import services

        services.payment_method_set(organization=billed.organization, actor=billed.owner.user,
                                    test_payment_method="pm_card_visa")
    stripe_server.v1.invoices.pay(invoice)  # paid at Stripe, not through the portal
    assert settlement_of(billed).status == Settlement.Status.PAST_DUE
    [succeeded] = [e for e in events_at_stripe(stripe_server, "invoice.payment_succeeded")
                   if e["data"]["object"]["id"] == invoice]
    for event in (succeeded, failed):
        payload = json.dumps(event).encode()
        assert httpx.post(portal_url + PATH, content=payload, headers=signed(payload), timeout=30).status_code == 200
        assert settlement_of(billed).status == Settlement.Status.PAID
    assert StripeEvent.objects.get(stripe_id=failed["id"]).outcome == f"settlement {settlement.pk}: paid"
    with unscoped():
        paid = AuditLogEntry.all_objects.filter(organization=billed.organization, action="settlement.paid")
        assert paid.count() == 1
