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
