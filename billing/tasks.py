"""Celery jobs of billing: they take ids, run in the organization's scope and only call a service.
Queued on commit by the period close and the services."""

from datetime import date

from celery import shared_task

from billing import notifications, services
from portal.models import Organization
from portal.tenancy import scope


@shared_task(name="billing.settle_period", acks_late=True)
def settle_period(organization_id: int, period: str) -> str:
    """Settle one organization's closed period (`period`: its first day, ISO); a rerun charges nothing new."""
    organization = Organization.objects.get(pk=organization_id)
    with scope(organization):
        settlement = services.settlement_run(organization=organization, period=date.fromisoformat(period))
    return settlement.status if settlement is not None else "nothing billable"


@shared_task(name="billing.settle_pending")
def settle_pending() -> int:
    """Hourly: charge the settlements still pending (no card yet, Stripe unavailable, a run cut short)."""
    from billing.models import Settlement

    count = 0
    organization_ids = set(Settlement.all_objects.filter(status=Settlement.Status.PENDING)
                           .values_list("organization_id", flat=True))
    for organization in Organization.objects.filter(pk__in=organization_ids):
        with scope(organization):
            count += len(services.settlements_pending(organization=organization))
    return count


@shared_task(name="billing.process_stripe_event", acks_late=True)
def process_stripe_event(stripe_event_id: int) -> str:
    """Apply a stored Stripe webhook event (once; the invoice is fetched from Stripe again)."""
    return services.stripe_event_process(stripe_event_id=stripe_event_id)


@shared_task(name="billing.notify_past_due")
def notify_past_due(settlement_id: int) -> int:
    """Email the owners that a settlement's payment failed."""
    return notifications.past_due_sent(settlement_id=settlement_id)
