"""Writes for billing: the organization's Stripe customer and payment method, the settlement of a
closed period's consumed billable overage, and what Stripe's webhooks say of its invoices.

Never charged twice. A settlement (one per organization and period) and its lines (one per team)
are written in one transaction before any Stripe call, with the amounts they charge; they are
not recomputed afterwards. Charging then runs under a PostgreSQL session lock per organization
(two workers at once: the second waits, then finds the work done), one Stripe call at a time,
each result stored as soon as it returns (by an UPDATE of the row where it is still unset). A
run killed between two calls is finished by the next run, which first looks at Stripe for what
the killed one made and did not record: the invoice items are tagged with their line's id and
the invoice's description ends with the settlement's reference. Idempotency keys are sent too,
but nothing relies on them.

Errors: ValidationError by field for bad input, BillingNotReady for what cannot be done yet
(no Stripe keys, no customer or payment method), which the pages show as they are.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import date

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from allowances.models import Account
from billing import selectors, stripe_api
from billing.models import BillingAccount, Settlement, SettlementLine, StripeEvent
from portal.audit import log_action
from portal.models import Organization
from portal.tenancy import scope

log = logging.getLogger(__name__)
Status = Settlement.Status
# Stripe's tax id types the page offers (https://docs.stripe.com/billing/customer/tax-ids).
TAX_ID_TYPES = {"": "None", "eu_vat": "EU VAT number", "gb_vat": "UK VAT number", "ch_vat": "Swiss VAT number",
                "us_ein": "US EIN", "ca_bn": "Canadian BN", "au_abn": "Australian ABN", "in_gst": "Indian GST",
                "no_vat": "Norwegian VAT number", "jp_cn": "Japanese corporate number", "kr_brn": "Korean BRN",
                "br_cnpj": "Brazilian CNPJ"}
TAX_ID_LENGTH = 40
# The first key of the PostgreSQL advisory lock billing takes per organization ("BILL").
LOCK_CLASS = 0x42494C4C
NOT_CONFIGURED = ("Billing is not configured: the operator sets STRIPE_SECRET_KEY (and STRIPE_PUBLISHABLE_KEY and "
                  "STRIPE_WEBHOOK_SECRET) in the portal's environment.")


class BillingNotReady(Exception):
    """Billing cannot do this yet; the message says what is missing."""


def _stripe_failure(error: stripe_api.StripeError) -> str:
    return f"Stripe refused: {getattr(error, 'user_message', None) or error}"[:500]


# -- the organization as a Stripe customer -------------------------------------------------------


def _clean_account(*, billing_email, tax_id_type, tax_id) -> dict:
    errors = {}
    billing_email = str(billing_email or "").strip()
    if billing_email:
        try:
            validate_email(billing_email)
        except ValidationError:
            errors["billing_email"] = "Enter an email address, e.g. finance@example.com."
    tax_id_type, tax_id = str(tax_id_type or "").strip(), str(tax_id or "").strip()
    if tax_id_type not in TAX_ID_TYPES:
        errors["tax_id_type"] = "Choose one of the tax id types offered."
    elif tax_id and not tax_id_type:
        errors["tax_id_type"] = "Say which kind of tax id this is."
    if len(tax_id) > TAX_ID_LENGTH:
        errors["tax_id"] = f"At most {TAX_ID_LENGTH} characters."
    elif tax_id and not tax_id.isprintable():
        errors["tax_id"] = "A tax id is letters and digits."
    if errors:
        raise ValidationError(errors)
    return {"billing_email": billing_email, "tax_id_type": tax_id_type if tax_id else "", "tax_id": tax_id}


def billing_account_save(*, organization: Organization, actor, billing_email="", tax_id_type="",
                         tax_id="") -> BillingAccount:
    """Set up billing (the Stripe customer, and the subscription its invoices go on) or change its
    email and tax id; without Stripe keys the details are kept for when billing is configured."""
    data = _clean_account(billing_email=billing_email, tax_id_type=tax_id_type, tax_id=tax_id)
    with transaction.atomic():
        account, _ = BillingAccount.objects.get_or_create(organization=organization)
        account = BillingAccount.objects.select_for_update().get(pk=account.pk)
        before = {name: getattr(account, name) for name in data}
        for name, value in data.items():
            setattr(account, name, value)
        account.updated_at = timezone.now()
        account.save()
        log_action(actor=actor, organization=organization, action="billing.account_saved", obj=account,
                   data={name: [before[name], value] for name, value in data.items() if before[name] != value})
    if stripe_api.configured():
        _stripe_customer_sync(account, organization=organization, actor=actor, tax_changed=(
            before["tax_id"], before["tax_id_type"]) != (account.tax_id, account.tax_id_type))
    return account


def _stripe_customer_sync(account: BillingAccount, *, organization: Organization, actor, tax_changed: bool) -> None:
    email = account.billing_email or (actor.email if actor else "")
    try:
        if not account.stripe_customer_id:
            customer = stripe_api.customer_create(name=organization.name, email=email, organization_id=organization.pk,
                                                  idempotency_key=f"customer-{organization.pk}")
            BillingAccount.objects.filter(pk=account.pk, stripe_customer_id="").update(stripe_customer_id=customer)
            account.refresh_from_db()
            log_action(actor=actor, organization=organization, action="billing.customer_created", obj=account,
                       data={"stripe_customer_id": account.stripe_customer_id})
        else:
            stripe_api.customer_update(customer_id=account.stripe_customer_id, name=organization.name, email=email)
        if tax_changed or (account.tax_id and not account.stripe_tax_id_id):
            tax = stripe_api.tax_id_replace(customer_id=account.stripe_customer_id, old_id=account.stripe_tax_id_id,
                                            type=account.tax_id_type, value=account.tax_id)
            BillingAccount.objects.filter(pk=account.pk).update(stripe_tax_id_id=tax)
        if not account.stripe_subscription_id:
            subscription = stripe_api.subscription_ensure(customer_id=account.stripe_customer_id,
                                                          currency=organization.currency,
                                                          idempotency_key=f"subscription-{organization.pk}")
            BillingAccount.objects.filter(pk=account.pk, stripe_subscription_id="").update(
                stripe_subscription_id=subscription)
    except stripe_api.StripeError as error:
        raise ValidationError(_stripe_failure(error)) from None
    account.refresh_from_db()


def payment_method_setup_start(*, organization: Organization) -> dict:
    """A SetupIntent for Stripe's card element on the billing page: {id, client_secret}."""
    account = _ready_account(organization, need_payment_method=False)
    try:
        return stripe_api.setup_intent_create(customer_id=account.stripe_customer_id)
    except stripe_api.StripeError as error:
        raise ValidationError(_stripe_failure(error)) from None


def payment_method_set(*, organization: Organization, actor, setup_intent_id: str = "",
                       test_payment_method: str = "") -> BillingAccount:
    """Make the card of a confirmed SetupIntent the customer's default payment method. On a test
    server the page names one of Stripe's test payment methods instead, confirmed here."""
    account = _ready_account(organization, need_payment_method=False)
    try:
        if test_payment_method:
            if not stripe_api.uses_test_server() or test_payment_method not in stripe_api.TEST_PAYMENT_METHODS:
                raise ValidationError({"test_payment_method": "Choose one of the test cards offered."})
            intent = stripe_api.setup_intent_create(customer_id=account.stripe_customer_id)
            intent = stripe_api.setup_intent_confirm(setup_intent_id=intent["id"], payment_method=test_payment_method)
        else:
            if not setup_intent_id or not setup_intent_id.startswith("seti_") or len(setup_intent_id) > 100:
                raise ValidationError({"setup_intent": "The card form did not finish: enter the card again."})
            intent = stripe_api.setup_intent_retrieve(setup_intent_id=setup_intent_id)
        if intent["customer"] != account.stripe_customer_id or intent["status"] != "succeeded":
            raise ValidationError({"setup_intent": "The card was not confirmed: enter it again."})
        card = stripe_api.payment_method_attach(payment_method_id=intent["payment_method"],
                                                customer_id=account.stripe_customer_id)
        stripe_api.customer_default_payment_method(customer_id=account.stripe_customer_id,
                                                   payment_method_id=intent["payment_method"])
    except stripe_api.StripeError as error:
        raise ValidationError(_stripe_failure(error)) from None
    BillingAccount.objects.filter(pk=account.pk).update(stripe_payment_method_id=intent["payment_method"],
                                                        card_description=card[:60], updated_at=timezone.now())
    account.refresh_from_db()
    log_action(actor=actor, organization=organization, action="billing.payment_method_set", obj=account,
               data={"card": account.card_description})
    return account


def _ready_account(organization: Organization, *, need_payment_method: bool) -> BillingAccount:
    if not stripe_api.configured():
        raise BillingNotReady(NOT_CONFIGURED)
    account = selectors.billing_account(organization=organization)
    if account is None or not account.is_set_up:
        raise BillingNotReady("Billing is not set up: an owner or admin sets it up on the billing page.")
    if need_payment_method and not account.has_payment_method:
        raise BillingNotReady("No payment method: an owner or admin adds a card on the billing page.")
    return account


# -- settlement ------------------------------------------------------------------------------------


def settlement_record(*, organization: Organization, period: date) -> Settlement | None:
    """Write the settlement of a closed period and its lines (once: a settlement already written is
    returned as it is). None when the period has no consumed billable overage."""
    if Account.objects.filter(organization=organization, period_start__lte=period).exists():
        raise BillingNotReady(f"{period:%B %Y} has not been closed yet: only closed months are settled.")
    existing = Settlement.objects.filter(organization=organization, period_start=period).first()
    if existing is not None:
        return existing
    cost = selectors.period_cost(organization=organization, period=period)
    if not cost.tokens:
        return None
    try:
        with transaction.atomic():
            settlement = Settlement.objects.create(
                organization=organization, period_start=period, currency=cost.currency, amount_minor=cost.amount_minor,
                tokens=cost.tokens, status=Status.PENDING if cost.amount_minor else Status.PAID,
                paid_at=None if cost.amount_minor else timezone.now(),
                last_error="" if cost.amount_minor else "Nothing to charge at the catalog's prices.")
            SettlementLine.objects.bulk_create([SettlementLine(
                organization=organization, settlement=settlement, team_id=team.team_id, team_name=team.team,
                cost_centre=team.cost_centre, tokens=team.tokens, amount_minor=team.amount_minor,
                by_model=[{"model": row.model, "tokens": row.tokens, "amount_minor": row.amount_minor}
                          for row in team.models]) for team in cost.teams])
            log_action(actor=None, organization=organization, action="settlement.recorded", obj=settlement,
                       data={"period": f"{period:%Y-%m}", "amount_minor": settlement.amount_minor,
                             "currency": settlement.currency, "tokens": settlement.tokens,
                             "teams": [team.team for team in cost.teams]})
    except IntegrityError:  # another run wrote it first
        return Settlement.objects.get(organization=organization, period_start=period)
    return settlement


@contextmanager
def _organization_lock(organization_id: int):
    """One charging run per organization at a time, across processes: a PostgreSQL session lock,
    released when the run ends or its connection dies (a killed worker), never left behind."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s, %s)", [LOCK_CLASS, organization_id])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [LOCK_CLASS, organization_id])


def _note(settlement: Settlement, message: str) -> None:
    Settlement.objects.filter(pk=settlement.pk).update(last_error=message[:500], updated_at=timezone.now())


def settlement_run(*, organization: Organization, period: date) -> Settlement | None:
    """Settle a closed period: record it, then charge it (what the close and `settle_overage` call)."""
    settlement = settlement_record(organization=organization, period=period)
    if settlement is None:
        return None
    return settlement_charge(settlement=settlement)


def settlement_charge(*, settlement: Settlement, retry: bool = False) -> Settlement:
    """Charge a recorded settlement in Stripe (invoice items per team on an invoice of the
    organization's subscription, then pay it), resuming whatever a run before this one left.
    `retry`: pay a past-due invoice again (after the payment method was changed)."""
    organization = settlement.organization
    with _organization_lock(organization.pk):
        settlement.refresh_from_db()
        if settlement.status in (Status.PAID, Status.VOID, Status.FAILED) or (
                settlement.status == Status.PAST_DUE and not retry):
            return settlement
        try:
            account = _ready_account(organization, need_payment_method=True)
        except BillingNotReady as reason:
            _note(settlement, str(reason))
            settlement.refresh_from_db()
            return settlement
        try:
            invoice = _invoice(settlement, account)
            if invoice["total"] != settlement.amount_minor or invoice["currency"] != settlement.currency:
                Settlement.objects.filter(pk=settlement.pk, status=Status.PENDING).update(
                    status=Status.FAILED, updated_at=timezone.now(),
                    last_error=f"The Stripe invoice {invoice['id']} is for {invoice['total']} {invoice['currency']}, "
                               f"not this settlement's {settlement.amount_minor} {settlement.currency}: nothing was "
                               "paid; check the customer's pending invoice items in Stripe.")
                log_action(actor=None, organization=organization, action="settlement.failed", obj=settlement,
                           data={"invoice": invoice["id"], "invoice_total": invoice["total"]})
                settlement.refresh_from_db()
                return settlement
            if invoice["status"] in ("draft", "open"):
                invoice = stripe_api.invoice_pay(invoice_id=invoice["id"])
        except stripe_api.StripeError as error:
            log.warning("settlement %s of %s: %s", settlement.pk, organization.slug, error)
            _note(settlement, _stripe_failure(error))
            settlement.refresh_from_db()
            return settlement
        return settlement_sync(settlement=settlement, invoice=invoice)


def _invoice(settlement: Settlement, account: BillingAccount) -> dict:
    """The settlement's invoice at Stripe, made (items per team, then the invoice) if it is not."""
    customer, subscription = account.stripe_customer_id, account.stripe_subscription_id
    invoice_id = settlement.stripe_invoice_id or stripe_api.invoices_of(customer_id=customer,
                                                                        reference=settlement.reference)
    if not invoice_id:
        made_before = stripe_api.invoice_items_of(customer_id=customer)
        for line in selectors.settlement_lines(settlement=settlement).filter(stripe_invoice_item_id="",
                                                                            amount_minor__gt=0):
            item = made_before.get(str(line.pk)) or stripe_api.invoice_item_create(
                customer_id=customer, subscription_id=subscription, amount_minor=line.amount_minor,
                currency=settlement.currency, line_id=line.pk, idempotency_key=f"settlement-line-{line.pk}",
                description=(f"Token overage {settlement.period_start:%B %Y}, team {line.team_name}"
                             + (f" (cost centre {line.cost_centre})" if line.cost_centre else "")
                             + f": {line.tokens:,} tokens"))
            SettlementLine.objects.filter(pk=line.pk, stripe_invoice_item_id="").update(stripe_invoice_item_id=item)
        invoice_id = stripe_api.invoice_create(
            customer_id=customer, subscription_id=subscription, idempotency_key=f"settlement-{settlement.pk}",
            description=f"Token overage of {settlement.period_start:%B %Y}, {settlement.reference}")
    if Settlement.objects.filter(pk=settlement.pk, stripe_invoice_id="").update(
            stripe_invoice_id=invoice_id, updated_at=timezone.now()):
        log_action(actor=None, organization=settlement.organization, action="settlement.invoiced", obj=settlement,
                   data={"stripe_invoice_id": invoice_id})
    settlement.refresh_from_db()
    return stripe_api.invoice_retrieve(invoice_id=invoice_id)


def settlement_sync(*, settlement: Settlement, invoice: dict) -> Settlement:
    """Move the settlement to what its invoice at Stripe says now (fetched, never an event's copy):
    paid, past due (a payment failed), void. Paid stays paid whatever arrives later."""
    now, organization = timezone.now(), settlement.organization
    rows = Settlement.objects.filter(pk=settlement.pk)
    if invoice["url"] and invoice["url"] != settlement.stripe_invoice_url:
        rows.update(stripe_invoice_url=invoice["url"][:500])
    status, moved = invoice["status"], 0
    if status == "paid":
        moved = rows.exclude(status=Status.PAID).update(status=Status.PAID, paid_at=now, last_error="", updated_at=now)
    elif status in ("void", "uncollectible"):
        moved = rows.exclude(status__in=[Status.PAID, Status.VOID]).update(status=Status.VOID, updated_at=now)
    elif invoice["payment_failed"]:
        moved = rows.filter(status=Status.PENDING).update(
            status=Status.PAST_DUE, past_due_since=now, updated_at=now,
            last_error="The payment failed: update the payment method and retry the payment.")
        if moved:
            transaction.on_commit(lambda: _tasks().notify_past_due.delay(settlement.pk))
        else:  # a retry that failed again: still past due, since it first was
            rows.filter(status=Status.PAST_DUE).update(updated_at=now)
    settlement.refresh_from_db()
    if moved:
        log_action(actor=None, organization=organization, action=f"settlement.{settlement.status}", obj=settlement,
                   data={"stripe_invoice_id": invoice["id"], "invoice_status": status})
    return settlement


def settlement_retry(*, settlement: Settlement, actor) -> Settlement:
    """Pay a past-due settlement again (after the payment method was changed)."""
    if settlement.status != Status.PAST_DUE:
        raise ValidationError(f"This settlement is {settlement.get_status_display().lower()}: there is nothing "
                              "to retry.")
    log_action(actor=actor, organization=settlement.organization, action="settlement.retry_requested",
               obj=settlement, data={})
    return settlement_charge(settlement=settlement, retry=True)


def settlements_pending(*, organization: Organization) -> list[Settlement]:
    """Charge what is still pending (a run that had no keys, no card, or a Stripe error)."""
    return [settlement_charge(settlement=settlement)
            for settlement in Settlement.objects.filter(organization=organization, status=Status.PENDING)
            .order_by("period_start")]


# -- webhooks ------------------------------------------------------------------------------------


def stripe_event_receive(*, event: dict) -> tuple[StripeEvent, bool]:
    """Store a verified event once by its id and queue its processing; a repeat changes nothing."""
    try:
        with transaction.atomic():
            stored = StripeEvent.objects.create(stripe_id=str(event["id"])[:100], type=str(event.get("type", ""))[:100],
                                                payload=event)
    except IntegrityError:
        return StripeEvent.objects.get(stripe_id=str(event["id"])[:100]), False
    transaction.on_commit(lambda: _tasks().process_stripe_event.delay(stored.pk))
    return stored, True


def _invoice_of_event(event: StripeEvent) -> str | None:
    obj = event.payload["data"]["object"]  # its shape was checked when it was received
    if event.type.startswith("invoice."):
        return obj.get("id")
    if event.type.startswith("payment_intent.") and obj.get("id"):
        # Re-fetched: the event's copy may be older than what Stripe has now.
        return stripe_api.payment_intent_invoice(payment_intent_id=obj["id"])
    return None


def stripe_event_process(*, stripe_event_id: int) -> str:
    """Apply an event (once): the settlement of the invoice it names follows the invoice as Stripe
    has it now, so repeated and out-of-order events end where Stripe is."""
    event = StripeEvent.objects.get(pk=stripe_event_id)
    if event.processed_at is not None:
        return event.outcome
    outcome, organization = "ignored: not about a settlement's invoice", None
    invoice_id = _invoice_of_event(event) if stripe_api.configured() else None
    settlement = (Settlement.all_objects.select_related("organization").filter(stripe_invoice_id=invoice_id).first()
                  if invoice_id else None)
    if settlement is not None:
        organization = settlement.organization
        with scope(organization):
            settlement = settlement_sync(settlement=Settlement.objects.select_related("organization").get(
                pk=settlement.pk), invoice=stripe_api.invoice_retrieve(invoice_id=invoice_id))
        outcome = f"settlement {settlement.pk}: {settlement.status}"
    elif invoice_id:
        outcome = f"ignored: invoice {invoice_id} is no settlement's"
    StripeEvent.objects.filter(pk=event.pk, processed_at__isnull=True).update(
        processed_at=timezone.now(), outcome=outcome[:200], organization=organization)
    return outcome


def _tasks():
    from billing import tasks

    return tasks
