"""The billing page (owners and admins) and Stripe's webhook endpoint."""

import csv

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from allowances.periods import period_start_for
from billing import selectors, services, stripe_api
from billing.forms import BillingAccountForm, PaymentMethodForm
from portal.forms import apply_service_error
from portal.tenancy import require_roles
from portal.views import org_url


def _account_initial(account) -> dict:
    if account is None:
        return {}
    return {"billing_email": account.billing_email, "tax_id_type": account.tax_id_type, "tax_id": account.tax_id}


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def billing(request):
    organization = request.organization
    account = selectors.billing_account(organization=organization)
    form = BillingAccountForm(request.POST or None, initial=_account_initial(account))
    if request.method == "POST" and form.is_valid():
        try:
            services.billing_account_save(organization=organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, "Billing is set up." if stripe_api.configured() and account is None
                             else "The billing details are saved.")
            return redirect(org_url(request, "billing"))
    return _page(request, account_form=form, status=400 if form.errors else 200)


def _page(request, *, account_form=None, card_form=None, status=200):
    organization = request.organization
    account = selectors.billing_account(organization=organization)
    setup_intent = None
    ready = stripe_api.configured() and account is not None and account.is_set_up
    if ready and not stripe_api.uses_test_server():
        try:  # Stripe's card element confirms this SetupIntent in the browser
            setup_intent = services.payment_method_setup_start(organization=organization)
        except (ValidationError, services.BillingNotReady) as error:
            messages.error(request, " ".join(getattr(error, "messages", [str(error)])))
    settlements = list(selectors.settlement_list(organization=organization))
    return render(request, "billing/billing.html", {
        "configured": stripe_api.configured(), "test_server": stripe_api.uses_test_server(), "account": account,
        "ready": ready, "account_form": account_form or BillingAccountForm(initial=_account_initial(account)),
        "card_form": card_form or PaymentMethodForm(), "setup_intent": setup_intent,
        "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "current": selectors.period_cost(organization=organization, period=period_start_for(organization)),
        "settlements": settlements, "not_configured": services.NOT_CONFIGURED,
        "frozen": selectors.approvals_frozen(organization=organization),
    }, status=status)


@require_roles("admin")
@require_POST
def billing_payment_method(request):
    form = PaymentMethodForm(request.POST)
    if form.is_valid():
        try:
            account = services.payment_method_set(organization=request.organization, actor=request.user,
                                                  setup_intent_id=form.cleaned_data["setup_intent"],
                                                  test_payment_method=form.cleaned_data["test_payment_method"])
        except ValidationError as error:
            apply_service_error(form, error)
        except services.BillingNotReady as reason:
            form.add_error(None, str(reason))
        else:
            messages.success(request, f"Payments are charged to the {account.card_description}.")
            return redirect(org_url(request, "billing"))
    return _page(request, card_form=form, status=400)


@require_roles("admin")
@require_POST
def billing_settlement_retry(request, settlement_id):
    settlement = selectors.settlement_get(organization=request.organization, settlement_id=settlement_id)
    try:
        settlement = services.settlement_retry(settlement=settlement, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        if settlement.status == settlement.Status.PAID:
            messages.success(request, f"The settlement of {settlement.period_start:%B %Y} is paid.")
        else:
            messages.error(request, f"The settlement of {settlement.period_start:%B %Y} is still "
                                    f"{settlement.get_status_display().lower()}: {settlement.last_error}")
    return redirect(org_url(request, "billing"))


def chargeback_response(settlement) -> HttpResponse:
    """A settlement's chargeback CSV for finance (pages and API)."""
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (f'attachment; filename="chargeback-{settlement.organization.slug}-'
                                       f'{settlement.period_start:%Y-%m}.csv"')
    writer = csv.writer(response)
    writer.writerow(selectors.CHARGEBACK_COLUMNS)
    for row in selectors.chargeback_rows(settlement=settlement):
        # Cells a spreadsheet would run as a formula are quoted as text (team names are the org's input).
        writer.writerow(["'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell for cell in row])
    return response


@require_roles("admin")
@require_GET
def billing_chargeback(request, settlement_id):
    return chargeback_response(selectors.settlement_get(organization=request.organization,
                                                        settlement_id=settlement_id))


# -- Stripe's webhooks (no organization in the URL, no session, no CSRF token: the signature) ------


@csrf_exempt
@require_POST
def stripe_webhook(request):
    """Stripe's events: the signature verified with STRIPE_WEBHOOK_SECRET, each stored once by its
    id and processed in a task; anything else is refused with 400 and nothing stored."""
    try:
        event = stripe_api.webhook_event(payload=request.body,
                                         signature=request.headers.get("Stripe-Signature", ""))
    except stripe_api.SignatureError:
        return JsonResponse({"error": "The Stripe-Signature header is missing or does not verify."}, status=400)
    except ValueError:
        return JsonResponse({"error": "The body is not a Stripe event."}, status=400)
    stored, created = services.stripe_event_receive(event=event)
    return JsonResponse({"received": stored.stripe_id, "duplicate": not created})
