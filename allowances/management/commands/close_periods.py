"""Close the periods that ended, as the hourly job does; safe to run at any time and any number of times."""

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_datetime

from allowances.closing import close_due_periods
from portal.models import Organization


class Command(BaseCommand):
    help = "Close every account period that ended in its organization's time zone (rollover, expiry, new grant)."

    def add_arguments(self, parser):
        parser.add_argument("--org", help="Only this organization (slug).")
        parser.add_argument("--at", help="Close as if it were this moment (ISO 8601, e.g. 2026-12-01T00:30:00+00:00).")

    def handle(self, *args, org=None, at=None, **options):
        moment = None
        if at:
            try:
                moment = parse_datetime(at)
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None:
                raise CommandError(f"--at needs an ISO 8601 time with its offset, not {at!r}")
        organization = None
        if org:
            organization = Organization.objects.filter(slug=org).first()
            if organization is None:
                raise CommandError(f"no organization with slug {org!r}")
        report = close_due_periods(at=moment, organization=organization)
        for slug, period, count in report.periods:
            self.stdout.write(f"{slug}: closed the period of {period:%B %Y} on {count} accounts")
        self.stdout.write(f"closed {report.accounts_closed} account periods in {report.organizations} organizations")
