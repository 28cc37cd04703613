"""Admins are told when a provider reports more usage than a request's hold covered.

That should never happen (the hold is the request's worst case, gateway.bounds): when it does,
the excess is not charged (the allowance's limit holds) but the organization still pays its
provider for it. Each case is in the audit log and on the usage page; the organization's owners
and admins get an email, at most one an hour, that sums up what is new.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.core.cache import cache
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.urls import reverse

from portal.audit import log_action
from portal.links import public_url
from portal.models import Member, Organization
from portal.tenancy import unscoped

log = logging.getLogger(__name__)
EMAIL_EVERY_SECONDS = 3600


def uncharged_usage(*, organization_id: int, record: dict) -> None:
    """Record (and mail) that a request's usage went beyond its hold; `record` is the usage record's values."""
    log.error("request %s of organization %s: %s tokens beyond its hold were not charged", record["request_id"],
              organization_id, record["uncharged"])
    with unscoped():
        organization = Organization.objects.get(pk=organization_id)
        log_action(actor=None, organization=organization, action="usage.beyond_hold", data={
            "request_id": record["request_id"], "member": record["member"], "model": record["model"],
            "charged_tokens": record["charged"], "uncharged_tokens": record["uncharged"]})
    try:
        due = cache.add(f"alarm:uncharged:{organization_id}", 1, timeout=EMAIL_EVERY_SECONDS)
    except redis.RedisError:
        due = True  # better one email too many than none
    if due:
        transaction.on_commit(lambda: _email(organization))


def _email(organization: Organization) -> None:
    with unscoped():
        recipients = list(Member.objects.filter(Q(is_owner=True) | Q(is_admin=True), organization=organization,
                                                is_active=True).values_list("user__email", flat=True))
    if not recipients:
        return
    usage = public_url(reverse("usage_list", kwargs={"org_slug": organization.slug}))
    send_mail(subject=f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}A provider reported more usage than was held",
              message=(f"In {organization.name}, a provider reported more tokens for a request than the gateway "
                       "had held for it. The excess was not charged to the member's allowance, but your provider "
                       f"bills it. The usage page lists each case: {usage}\n\nThis points at a model whose output "
                       "or input the gateway cannot bound (for example an unusual content type); tell your "
                       "portal's operators.\n"),
              from_email=None, recipient_list=recipients, fail_silently=True)
