"""Settlement of a closed period's consumed billable overage, against localstripe: customer and
card set-up, an invoice with a line per team at exactly the catalog's prices, nothing charged
twice (a rerun, a crash between two Stripe calls), a declined card (past due, owners emailed,
approvals frozen after the grace period and unfrozen once paid)."""

from datetime import timedelta

import pytest
from django.core import mail
from django.core.management import call_command

from allowances.periods import period_bounds, periods_after
from billing import services, stripe_api
from billing.models import BillingAccount, Settlement
from overage import services as overage_services
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.billing.conftest import EXPECTED, close, invoices_of, set_up_billing

pytestmark = pytest.mark.services


class Killed(Exception):
    """The run ends where it stands, between two Stripe calls."""


def settlement_of(org) -> Settlement:
    with unscoped():
        return Settlement.all_objects.get(organization=org.organization, period_start=org.period)


def account_of(org) -> BillingAccount:
    with unscoped():
        return BillingAccount.all_objects.get(organization=org.organization)


def settlement_invoices(stripe_server, org):
    settlement = settlement_of(org)
    return invoices_of(stripe_server, account_of(org).stripe_customer_id, settlement.reference)


def charged_lines(invoice) -> list[tuple[int, str]]:
    # The subscription's own plan line is at no charge; the rest are the settlement's items.
    return sorted((line.amount, line.description) for line in invoice.lines.data if line.amount)


def test_billing_set_up_creates_the_customer_and_its_card(billed, stripe_server):
    account = set_up_billing(billed)
    customer = stripe_server.v1.customers.retrieve(account.stripe_customer_id)
    assert (customer.email, customer.name, customer.metadata["organization"]) == (
        "finance@bil.example", billed.organization.name, str(billed.organization.pk))
    assert customer.invoice_settings.default_payment_method == account.stripe_payment_method_id
    assert [tax.value for tax in stripe_server.v1.customers.tax_ids.list(account.stripe_customer_id).data] == [
        "DE123456789"]
    assert account.card_description.endswith("ending 4242")
    assert stripe_server.v1.subscriptions.retrieve(account.stripe_subscription_id).customer == customer.id
    with unscoped():
        actions = set(AuditLogEntry.all_objects.filter(organization=billed.organization).values_list("action", flat=True))
    assert {"billing.account_saved", "billing.customer_created", "billing.payment_method_set"} <= actions


def test_the_close_settles_a_line_per_team_at_exactly_the_catalog_prices(billed, stripe_server):
    set_up_billing(billed)
    close(billed)
    settlement = settlement_of(billed)
    assert settlement.status == Settlement.Status.PAID, settlement.last_error
    with unscoped():
        lines = {line.team_name: line for line in settlement.lines.all()}
    assert {name: line.amount_minor for name, line in lines.items()} == EXPECTED
    assert {name: line.by_model for name, line in lines.items()} == {
        "Engineering": [{"model": "gpt-4o", "tokens": 1_500_000, "amount_minor": EXPECTED["Engineering"]}],
        "Research": [{"model": "claude-sonnet", "tokens": 1_234_567, "amount_minor": EXPECTED["Research"]}]}
    assert settlement.amount_minor == sum(EXPECTED.values()) and settlement.currency == "USD"
    [invoice] = settlement_invoices(stripe_server, billed)
    assert invoice.id == settlement.stripe_invoice_id and invoice.status == "paid"
    assert invoice.total == settlement.amount_minor and invoice.currency == "usd"
    assert [amount for amount, _ in charged_lines(invoice)] == sorted(EXPECTED.values())
    assert {line.invoice_item for line in invoice.lines.data if line.amount} == {
        line.stripe_invoice_item_id for line in lines.values()}


def test_a_rerun_of_the_same_period_charges_nothing_new(billed, stripe_server):
    set_up_billing(billed)
    close(billed)
    first = settlement_of(billed)
    with scope(billed.organization):
        again = services.settlement_run(organization=billed.organization, period=billed.period)
    call_command("settle_overage", org=billed.slug, period=f"{billed.period:%Y-%m}")
    assert (again.pk, again.stripe_invoice_id, again.status) == (first.pk, first.stripe_invoice_id, "paid")
    [invoice] = settlement_invoices(stripe_server, billed)
    assert invoice.total == first.amount_minor
    customer = account_of(billed).stripe_customer_id
    assert stripe_server.v1.invoice_items.list(params={"customer": customer}).data == []  # none left pending


@pytest.mark.parametrize(("call", "dies_on"), [
    ("invoice_item_create", 2),  # the second team's item made at Stripe, not recorded
    ("invoice_create", 1),  # the invoice made, its id not recorded
    ("invoice_pay", 1),  # paid at Stripe, not recorded
])
def test_a_crash_between_two_stripe_calls_then_a_rerun_completes_without_duplicates(
        billed, stripe_server, monkeypatch, call, dies_on):
    """The run dies right after a Stripe call returned, before the portal recorded what it made;
    the rerun finds it at Stripe and ends with one invoice of exactly the two lines, paid once."""
    set_up_billing(billed)
    made = getattr(stripe_api, call)
    calls = []

    def dies_after_stripe_answered(**kwargs):
        answer = made(**kwargs)
        calls.append(answer)
        if len(calls) == dies_on:
            raise Killed("the worker dies here")
        return answer

    monkeypatch.setattr(stripe_api, call, dies_after_stripe_answered)
    with pytest.raises(Killed):
        close(billed)
    assert settlement_of(billed).status == Settlement.Status.PENDING
    monkeypatch.setattr(stripe_api, call, made)
    call_command("settle_overage", org=billed.slug, period=f"{billed.period:%Y-%m}")
    settlement = settlement_of(billed)
    assert settlement.status == Settlement.Status.PAID, settlement.last_error
    [invoice] = settlement_invoices(stripe_server, billed)
    assert invoice.id == settlement.stripe_invoice_id and invoice.status == "paid"
    assert invoice.total == sum(EXPECTED.values())
    assert [amount for amount, _ in charged_lines(invoice)] == sorted(EXPECTED.values())
    with unscoped():
        recorded = set(settlement.lines.values_list("stripe_invoice_item_id", flat=True))
    assert {line.invoice_item for line in invoice.lines.data if line.amount} == recorded
    customer = account_of(billed).stripe_customer_id
    charges = [pi for pi in stripe_server.v1.payment_intents.list(params={"limit": 100}).data
               if pi.customer == customer and pi.status == "succeeded"]
    assert [pi.amount for pi in charges] == [invoice.total]  # charged once


def test_a_declined_card_is_past_due_emails_the_owners_freezes_approvals_after_the_grace_period(
        billed, stripe_server, settings):
    settings.BILLING_GRACE_DAYS = 3
    set_up_billing(billed, payment_method="pm_card_chargeCustomerFail")
    mail.outbox.clear()
    close(billed)
    settlement = settlement_of(billed)
    assert settlement.status == Settlement.Status.PAST_DUE and settlement.past_due_since is not None
    assert [message.to for message in mail.outbox if "Payment failed" in message.subject] == [["owner@bil.example"]]
    # The month after the settled one: a new request, decided while past due.
    with scope(billed.organization):
        next_month = period_bounds(billed.organization, periods_after(billed.period, 1))[0] + timedelta(hours=1)
        asked, _ = overage_services.overage_request_create(member=billed.bob, actor=billed.bob.user, tokens=1_000,
                                                           reason="More tests", at=next_month)
        # Within the grace period approvals go on.
        Settlement.objects.filter(pk=settlement.pk).update(past_due_since=next_month - timedelta(days=2))
        decided, _ = overage_services.overage_request_decide(overage_request=asked, actor_member=billed.admin,
                                                             decision="approve", at=next_month)
        assert decided.is_approved
        # Past it they are frozen, with the reason, on every path (the API answers 409 with it).
        Settlement.objects.filter(pk=settlement.pk).update(past_due_since=next_month - timedelta(days=4))
        second, _ = overage_services.overage_request_create(member=billed.alice, actor=billed.alice.user, tokens=1_000,
                                                            reason="More tests", at=next_month)
        with pytest.raises(overage_services.OverageConflict, match="Overage approvals are frozen"):
            overage_services.overage_request_decide(overage_request=second, actor_member=billed.admin,
                                                    decision="approve", at=next_month)
        # A new card, the payment retried: paid, and approvals go on.
        services.payment_method_set(organization=billed.organization, actor=billed.owner.user,
                                    test_payment_method="pm_card_visa")
        paid = services.settlement_retry(settlement=settlement_of(billed), actor=billed.owner.user)
        assert paid.status == Settlement.Status.PAID, paid.last_error
        decided, _ = overage_services.overage_request_decide(overage_request=second, actor_member=billed.admin,
                                                             decision="approve", at=next_month)
        assert decided.is_approved
    [invoice] = settlement_invoices(stripe_server, billed)
    assert invoice.status == "paid" and invoice.total == sum(EXPECTED.values())
