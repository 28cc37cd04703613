"""Celery jobs of the overage app: they take ids, run in the organization's scope, and only call
the notifications. Queued on commit by the services."""

from celery import shared_task

from overage import notifications


@shared_task(name="overage.notify_decision")
def notify_decision(overage_request_id: int) -> int:
    """Tell the requester what was decided (email; the notice is on their dashboard)."""
    return notifications.decision_sent(overage_request_id=overage_request_id)


@shared_task(name="overage.notify_approvers")
def notify_approvers(overage_request_id: int) -> int:
    """Tell the approvers who may decide a new request that it is in their queue."""
    return notifications.new_request_sent(overage_request_id=overage_request_id)


@shared_task(name="overage.send_pending_digests")
def send_pending_digests() -> int:
    """Hourly: each approver's daily digest of what is still pending, once their morning has come."""
    return notifications.pending_digests_sent()
