"""Celery jobs of the allowances app. Each only calls a service."""

from celery import shared_task

from allowances import ledger


@shared_task(name="allowances.release_expired_holds")
def release_expired_holds() -> int:
    """Give back the tokens of holds whose request never settled them (crash, lost connection)."""
    released = batch = ledger.release_expired_holds()
    while batch == ledger.SWEEP_BATCH:  # a backlog: keep going until it is cleared
        batch = ledger.release_expired_holds()
        released += batch
    return released


@shared_task(name="allowances.close_due_periods")
def close_due_periods() -> int:
    """Hourly: queue the close of every organization whose local month has ended."""
    from allowances.closing import organizations_due

    due = organizations_due()
    for organization in due:
        close_organization_periods.delay(organization.pk)
    return len(due)


@shared_task(name="allowances.close_organization_periods", acks_late=True)
def close_organization_periods(organization_id: int) -> int:
    """Close one organization's ended periods (chunked; a rerun finishes what a killed one left)."""
    from allowances import closing
    from portal.models import Organization

    organization = Organization.objects.get(pk=organization_id)
    return sum(count for _period, count in closing.close_organization_periods(organization=organization))


@shared_task(name="allowances.send_usage_alerts")
def send_usage_alerts() -> int:
    """Every few minutes: alert members who passed 80% or 100% of their allowance (once each)."""
    from allowances.alerts import send_usage_alerts as send

    return send()
