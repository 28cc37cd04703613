"""Celery jobs of the gateway. Each only calls a service."""

from celery import shared_task


@shared_task(name="gateway.rollup_usage")
def rollup_usage() -> int:
    """Hourly: recompute yesterday's and today's usage roll-ups in every organization's zone."""
    from gateway.rollups import rollup_recent

    return rollup_recent()


@shared_task(name="gateway.refresh_spend_normals")
def refresh_spend_normals() -> int:
    """Hourly: every member's normal hour, for the breaker's limits relative to it."""
    from gateway.services import spend_normals_refresh

    return spend_normals_refresh()
