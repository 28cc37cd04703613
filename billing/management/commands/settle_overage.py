"""Settle closed periods' consumed billable overage through Stripe (what the period close queues)."""

from datetime import date

from django.core.management.base import BaseCommand, CommandError

from allowances.periods import period_start_for, periods_after
from billing import services
from portal.models import Organization
from portal.tenancy import scope


def _period(value: str) -> date:
    try:
        year, month = value.split("-")
        return date(int(year), int(month), 1)
    except ValueError:
        raise CommandError(f"--period takes a month as YYYY-MM, not {value!r}") from None


class Command(BaseCommand):
    help = ("Settle a closed period (default: the last one) for one organization (--org) or all; a rerun "
            "charges nothing new.")

    def add_arguments(self, parser):
        parser.add_argument("--org", help="The organization's slug (default: every organization).")
        parser.add_argument("--period", help="The month, YYYY-MM (default: each organization's last closed month).")

    def handle(self, *args, org=None, period=None, **options):
        organizations = Organization.objects.order_by("slug")
        if org:
            organizations = organizations.filter(slug=org)
            if not organizations.exists():
                raise CommandError(f"no organization with the slug {org!r}")
        wanted = _period(period) if period else None
        failed = False
        for organization in organizations:
            month = wanted or periods_after(period_start_for(organization), -1)
            try:
                with scope(organization):
                    settlement = services.settlement_run(organization=organization, period=month)
            except services.BillingNotReady as reason:
                raise CommandError(f"{organization.slug}: {reason}") from None
            if settlement is None:
                self.stdout.write(f"{organization.slug} {month:%Y-%m}: nothing billable")
                continue
            failed |= settlement.status in ("failed", "past_due")
            note = f" ({settlement.last_error})" if settlement.last_error else ""
            self.stdout.write(f"{organization.slug} {month:%Y-%m}: {settlement.amount_minor} {settlement.currency} minor "
                              f"units, {settlement.get_status_display().lower()}"
                              + (f", invoice {settlement.stripe_invoice_id}" if settlement.stripe_invoice_id else "")
                              + note)
        if failed:
            raise CommandError("some settlements failed or are past due (see above)")
