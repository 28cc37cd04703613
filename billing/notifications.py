"""Emails about billing: a settlement whose payment failed, to the organization's owners."""

from __future__ import annotations

from django.conf import settings
from django.core.mail import send_mail
from django.urls import reverse

from billing.models import Settlement
from billing.selectors import from_minor, grace_period
from portal.links import public_url
from portal.models import Member
from portal.tenancy import scope


def past_due_sent(*, settlement_id: int) -> int:
    settlement = Settlement.all_objects.select_related("organization").filter(pk=settlement_id).first()
    if settlement is None or settlement.status != Settlement.Status.PAST_DUE:
        return 0
    organization = settlement.organization
    with scope(organization):
        owners = [member.user.email for member in Member.objects.filter(
            organization=organization, is_active=True, is_owner=True).select_related("user")]
        if not owners:
            return 0
        url = public_url(reverse("billing", kwargs={"org_slug": organization.slug}))
        frozen_on = settlement.past_due_since + grace_period()
        send_mail(
            subject=f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}Payment failed: {organization.name}'s token overage "
                    f"of {settlement.period_start:%B %Y}",
            message=(f"The payment of {from_minor(settlement.amount_minor, settlement.currency)} {settlement.currency} "
                     f"for {organization.name}'s token overage of {settlement.period_start:%B %Y} failed.\n\n"
                     f"Update the payment method and retry the payment on the billing page: {url}\n\n"
                     f"Until it is paid, new overage approvals are frozen from {frozen_on:%Y-%m-%d %H:%M} UTC."),
            from_email=None, recipient_list=owners)
    return len(owners)
