"""Celery jobs of the reports app: they take ids and only call a service."""

from celery import shared_task

from reports import services


@shared_task(name="reports.export_statements", acks_late=True)
def export_statements(statement_export_id: int) -> int:
    """Make a period's statements CSV and ZIP of PDFs (queued on commit by the service)."""
    return services.statement_export_run(statement_export_id=statement_export_id).done


@shared_task(name="reports.reconcile_providers")
def reconcile_providers() -> int:
    """Daily: compare each provider's usage report with the portal's records; alert differences."""
    return services.reconcile_all()


@shared_task(name="reports.rollup_again")
def rollup_again(organization_id: int, days: int) -> int:
    """Roll the last days of one organization up again (its size thresholds changed)."""
    from gateway.rollups import rollup_days
    from portal.models import Organization

    return rollup_days(organization=Organization.objects.get(pk=organization_id), days=days)
