"""Alerts when a member passes 80% and 100% of their allowance: once per threshold per period,
on their dashboard and by email. Run by a beat job; a rerun finds the alerts already there."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, IntegerField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.urls import reverse

from allowances.models import Account, LedgerEntry, UsageAlert
from allowances.templatetags.tokens import share_used
from portal.links import public_url
from portal.tenancy import scope, unscoped


def _period_sum(field: str):
    in_open_period = LedgerEntry.all_objects.filter(account=OuterRef("pk"), period_start=OuterRef("period_start"))
    return Coalesce(Subquery(in_open_period.order_by().values("account").annotate(total=Sum(field)).values("total"),
                             output_field=IntegerField()), 0)


def _granted_into_open_period():
    """The open period's own grants, and what the last close's entry opened it with (its opening
    parts): the close of the month before, the only close entry of the 31 days before it."""
    last_close = LedgerEntry.all_objects.filter(
        account=OuterRef("pk"), kind=LedgerEntry.Kind.CLOSE, period_start__lt=OuterRef("period_start"),
        period_start__gte=OuterRef("period_start") - timedelta(days=31))
    opening = sum((sign * F(column) for column, sign in LedgerEntry.OPENING_PARTS.items()), Value(0))
    return _period_sum("granted_delta") + Coalesce(Subquery(
        last_close.order_by().values("account").annotate(total=Sum(opening)).values("total"),
        output_field=IntegerField()), 0)


def send_usage_alerts() -> int:
    """Record (and email) every alert newly due in the accounts' open periods; returns how many."""
    lowest = min(UsageAlert.THRESHOLDS)
    with unscoped():
        # Tokens granted into the open period (monthly grant, bonuses, rollover) against tokens used in it.
        candidates = (Account.all_objects.annotate(allowance=_granted_into_open_period(), used_now=_period_sum("used_delta"))
                      .filter(allowance__gt=0, member__is_active=True)
                      .select_related("member__user", "organization"))
        due = [account for account in candidates.iterator(chunk_size=2000)
               if account.used_now * 100 >= lowest * account.allowance]
    sent = 0
    for account in due:
        recorded = [alert for threshold in UsageAlert.THRESHOLDS
                    if account.used_now * 100 >= threshold * account.allowance
                    and (alert := _record(account, threshold)) is not None]
        sent += len(recorded)
        if recorded:  # one email, for the highest threshold passed: it states the share actually used
            transaction.on_commit(lambda account=account, alert=recorded[-1]: _email(account, alert))
    return sent


def _record(account: Account, threshold: int) -> UsageAlert | None:
    with scope(account.organization):
        try:
            with transaction.atomic():
                return UsageAlert.objects.create(organization=account.organization, account=account,
                                                 period_start=account.period_start, threshold=threshold,
                                                 used=account.used_now, allowance=account.allowance)
        except IntegrityError:  # sent before (or by a concurrent run): once per threshold per period
            return None


def _email(account: Account, alert: UsageAlert) -> None:
    dashboard = public_url(reverse("dashboard", kwargs={"org_slug": account.organization.slug}))
    share = share_used(alert.used, alert.allowance)
    passed = "used all of" if alert.used >= alert.allowance else f"used {share}% of"
    send_mail(
        subject=f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}You have {passed} your token allowance",
        message=(f"In {account.organization.name} you have {passed} your token allowance for the period of "
                 f"{alert.period_start:%B %Y}: {alert.used:,} of {alert.allowance:,} tokens ({share}%).\n\n"
                 f"Your balance and history, and where to ask for more: {dashboard}\n"),
        from_email=None, recipient_list=[account.member.user.email])
