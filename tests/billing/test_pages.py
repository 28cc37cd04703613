"""The billing page and API without Stripe keys (the demo's case): what is billable so far comes from
the ledger, the page says billing is not configured and how; bad input is a field error and
changes nothing; settlements and their chargeback CSV are read by owners and admins."""

import csv
import io

import pytest

from billing import services
from billing.models import BillingAccount, Settlement
from portal.tenancy import scope, unscoped
from tests.billing.conftest import ALICE_BEYOND, CAROL_BEYOND, EXPECTED, close


def test_without_stripe_keys_the_page_shows_the_billable_consumption_and_how_to_configure(billed, client):
    client.force_login(billed.owner.user, backend="django.contrib.auth.backends.ModelBackend")
    response = client.get(f"/o/{billed.slug}/billing/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Billing is not configured" in page and "STRIPE_SECRET_KEY" in page
    assert f"{ALICE_BEYOND:,}" in page and f"{CAROL_BEYOND:,}" in page
    assert f"{sum(EXPECTED.values()) / 100:.2f} USD" in page


def test_without_stripe_keys_the_close_records_the_settlement_and_charges_nothing(billed,
                                                                                  django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):  # the close queues the settlement on commit
        close(billed)
    with unscoped():
        settlement = Settlement.all_objects.get(organization=billed.organization, period_start=billed.period)
    assert settlement.status == Settlement.Status.PENDING and settlement.amount_minor == sum(EXPECTED.values())
    assert settlement.last_error == services.NOT_CONFIGURED and not settlement.stripe_invoice_id


@pytest.mark.parametrize(("data", "field"), [
    ({"billing_email": "not an email"}, "billing_email"),
    ({"tax_id": "DE123"}, "tax_id_type"),
    ({"tax_id_type": "xx_vat", "tax_id": "DE123"}, "tax_id_type"),
    ({"tax_id_type": "eu_vat", "tax_id": "D" * 41}, "tax_id"),
])
def test_bad_billing_details_are_field_errors_and_change_nothing(billed, client, data, field):
    client.force_login(billed.owner.user, backend="django.contrib.auth.backends.ModelBackend")
    response = client.post(f"/o/{billed.slug}/billing/", data=data)
    assert response.status_code == 400
    assert field in response.context["account_form"].errors
    with unscoped():
        assert not BillingAccount.all_objects.filter(organization=billed.organization).exists()


def test_the_card_form_needs_billing_set_up_first(billed, client):
    client.force_login(billed.owner.user, backend="django.contrib.auth.backends.ModelBackend")
    response = client.post(f"/o/{billed.slug}/billing/payment-method/", data={"test_payment_method": "pm_card_visa"})
    assert response.status_code == 400 and "Billing is not configured" in response.content.decode()


def test_settlements_and_their_chargeback_through_the_api_and_the_page(billed, client,
                                                                      django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        close(billed)
    with unscoped():
        settlement = Settlement.all_objects.get(organization=billed.organization, period_start=billed.period)
    client.force_login(billed.admin.user, backend="django.contrib.auth.backends.ModelBackend")
    listed = client.get(f"/api/v1/o/{billed.slug}/billing/settlements/").json()
    assert [row["id"] for row in listed["results"]] == [settlement.pk]
    detail = client.get(f"/api/v1/o/{billed.slug}/billing/settlements/{settlement.pk}/").json()
    assert {line["team_name"]: line["amount_minor"] for line in detail["lines"]} == EXPECTED
    for path in (f"/api/v1/o/{billed.slug}/billing/settlements/{settlement.pk}/chargeback/",
                 f"/o/{billed.slug}/billing/settlements/{settlement.pk}/chargeback.csv"):
        response = client.get(path)
        assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(response.content.decode())))
        assert rows == [["period", "team", "cost_centre", "model", "tokens", "cost", "currency", "stripe_invoice_id"],
                        [f"{billed.period:%Y-%m}", "Engineering", "", "gpt-4o", str(ALICE_BEYOND),
                         f"{EXPECTED['Engineering'] / 100:.2f}", "USD", ""],
                        [f"{billed.period:%Y-%m}", "Research", "", "claude-sonnet", str(CAROL_BEYOND),
                         f"{EXPECTED['Research'] / 100:.2f}", "USD", ""]]
    client.force_login(billed.approver.user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.get(f"/api/v1/o/{billed.slug}/billing/settlements/").status_code == 403
    assert client.get(f"/o/{billed.slug}/billing/").status_code == 403


def test_the_webhook_is_refused_without_a_configured_secret(client, db):
    response = client.post("/billing/stripe/webhook/", data=b"{}", content_type="application/json",
                           HTTP_STRIPE_SIGNATURE="t=1,v1=00")
    assert response.status_code == 400


def test_a_period_not_closed_yet_is_not_settled(billed):
    with scope(billed.organization), pytest.raises(services.BillingNotReady, match="not been closed"):
        services.settlement_run(organization=billed.organization, period=billed.period)


def test_the_demo_leaves_the_billing_page_meaningful_without_stripe_keys(db, client,
                                                                         django_capture_on_commit_callbacks):
    from django.core.management import call_command

    from portal.models import User

    with django_capture_on_commit_callbacks(execute=True):
        call_command("seed_demo", stdout=io.StringIO())
        call_command("seed_demo", stdout=io.StringIO())  # again: nothing more is used
    client.force_login(User.objects.get(email="owner@acme.example"),
                       backend="django.contrib.auth.backends.ModelBackend")
    response = client.get("/o/acme/billing/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Billing is not configured" in page
    [row] = response.context["current"].teams
    assert (row.team, [(m.model, m.tokens) for m in row.models]) == ("Engineering", [("gpt-4o", 300_000)])
    assert response.context["current"].amount_minor > 0 and "300,000" in page


def test_the_approvers_queue_says_why_approvals_are_frozen(billed, client, django_capture_on_commit_callbacks,
                                                           settings):
    from datetime import timedelta

    from django.utils import timezone

    with django_capture_on_commit_callbacks(execute=True):
        close(billed)
    client.force_login(billed.approver.user, backend="django.contrib.auth.backends.ModelBackend")
    assert "approvals-frozen" not in client.get(f"/o/{billed.slug}/approvals/").content.decode()
    with unscoped():
        Settlement.all_objects.filter(organization=billed.organization).update(
            status=Settlement.Status.PAST_DUE, past_due_since=timezone.now() - timedelta(days=settings.BILLING_GRACE_DAYS,
                                                                                       hours=1))
    page = client.get(f"/o/{billed.slug}/approvals/").content.decode()
    assert "Overage approvals are frozen" in page and "approvals-frozen" in page
