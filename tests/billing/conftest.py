"""Billing against localstripe (a fake Stripe server started by scripts/with-services.sh), with the
real stripe library pointed at it, and an organization whose members consumed billable overage.

`billed` builds the overage organization of tests/overage/conftest.py and makes Alice (team
Engineering) use 1,500,000 tokens of approved overage on gpt-4o and Carol (team Research)
1,234,567 on claude-sonnet, in the open month; `close` closes that month (as the hourly job would
once it ended), which settles it.
"""

import os
from decimal import ROUND_HALF_UP, Decimal
from types import SimpleNamespace

import httpx
import pytest

from allowances import closing, ledger
from allowances import services as allowance_services
from allowances.models import Account
from allowances.periods import period_bounds
from billing import services
from overage import services as overage_services
from portal.tenancy import scope
from tests.overage.conftest import MONTHLY, build_overage_org

ALICE_BEYOND, CAROL_BEYOND = 1_500_000, 1_234_567
WEBHOOK_SECRET = "whsec_portal_tests"


@pytest.fixture
def stripe_server(settings):
    """localstripe, emptied, and the portal's Stripe settings pointed at it."""
    base = os.environ.get("PORTAL_TEST_STRIPE_API_BASE")
    assert base, "PORTAL_TEST_STRIPE_API_BASE is not set: run the tests through scripts/with-services.sh (make test)"
    httpx.delete(f"{base}/_config/data", timeout=10).raise_for_status()
    settings.STRIPE_SECRET_KEY = "sk_test_portal"
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_portal"
    settings.STRIPE_API_BASE = base
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    from billing import stripe_api

    return SimpleNamespace(base=base, v1=stripe_api.client().v1)


def consume(org, member, beyond: int, model: str, key: str):
    """The member is granted `beyond` tokens of overage (an admin approves their request) and uses
    their whole month plus all of it on `model`."""
    with scope(org.organization):
        overage_request, _ = overage_services.overage_request_create(member=member, actor=member.user, tokens=beyond,
                                                                     reason="A long evaluation run")
        overage_services.overage_request_decide(overage_request=overage_request, actor_member=org.admin,
                                                decision="approve")
        account = Account.objects.get(member=member)
        hold = ledger.authorize(account=account, tokens=MONTHLY + beyond, idempotency_key=f"use-{key}", model=model)
        ledger.settle(hold=hold, used_tokens=MONTHLY + beyond)


def build_billed(slug: str = "bil"):
    org = build_overage_org(slug=slug)
    with scope(org.organization):
        org.sonnet = allowance_services.catalog_model_create(
            organization=org.organization, actor=None, model_id="claude-sonnet", display_name="Claude Sonnet",
            connection=org.model.connection, input_multiplier="4", output_multiplier="4",
            input_price_per_million="3.00", output_price_per_million="15.00")
    consume(org, org.alice, ALICE_BEYOND, "gpt-4o", "alice")
    consume(org, org.carol, CAROL_BEYOND, "claude-sonnet", "carol")
    with scope(org.organization):
        org.period = Account.objects.get(member=org.alice).period_start  # the open month, settled by `close`
    return org


@pytest.fixture
def billed(db):
    return build_billed()


def expected_minor(tokens: int, multiplier: str, price: str) -> int:
    """Tokens counted against the allowance priced as input tokens, in cents (by hand, not the code's rule)."""
    amount = Decimal(tokens) / Decimal(multiplier) * Decimal(price) / Decimal(1_000_000)
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


EXPECTED = {"Engineering": expected_minor(ALICE_BEYOND, "5", "2.50"),
            "Research": expected_minor(CAROL_BEYOND, "4", "3.00")}


def set_up_billing(org, payment_method: str = "pm_card_visa"):
    with scope(org.organization):
        services.billing_account_save(organization=org.organization, actor=org.owner.user,
                                      billing_email="finance@bil.example", tax_id_type="eu_vat", tax_id="DE123456789")
        return services.payment_method_set(organization=org.organization, actor=org.owner.user,
                                           test_payment_method=payment_method)


def close(org):
    """Close the month the consumption is in, as the hourly job does once it has ended there."""
    with scope(org.organization):
        closing.close_due_periods(at=period_bounds(org.organization, org.period)[1], organization=org.organization)


def invoices_of(stripe_server, customer_id: str, reference: str):
    return [invoice for invoice in stripe_server.v1.invoices.list(params={"customer": customer_id}).data
            if (invoice.description or "").endswith(reference)]
