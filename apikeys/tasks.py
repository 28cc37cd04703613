"""Celery jobs of the API keys app. Each only calls a service."""

from celery import shared_task


@shared_task(name="apikeys.send_expiry_reminders")
def send_expiry_reminders() -> int:
    """Hourly: remind owners of keys expiring within a week (once per key)."""
    from apikeys.services import send_expiry_reminders as send

    return send()
