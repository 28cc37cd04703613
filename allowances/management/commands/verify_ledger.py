"""Recompute every account from its ledger entries; exit non-zero naming the accounts that differ."""

from django.core.management.base import BaseCommand, CommandError

from allowances import ledger
from portal.models import Organization


class Command(BaseCommand):
    help = "Check that every account's stored balance equals the sum of its ledger entries."

    def add_arguments(self, parser):
        parser.add_argument("--org", help="Only this organization's accounts (slug).")

    def handle(self, *args, org=None, **options):
        organization_id = None
        if org:
            organization = Organization.objects.filter(slug=org).first()
            if organization is None:
                raise CommandError(f"no organization with slug {org!r}")
            organization_id = organization.pk
        problems = ledger.verify(organization_id=organization_id)
        for problem in problems:
            if "problem" in problem:
                entry = f"entry {problem['entry_id']}: " if problem["entry_id"] is not None else ""
                self.stderr.write(f"account {problem['account_id']}: {entry}{problem['problem']}")
            else:
                self.stderr.write(f"account {problem['account_id']} (organization {problem['organization_id']}): "
                                  f"stored {problem['stored']} but entries sum to {problem['from_entries']}")
        if problems:
            raise CommandError(f"{len({p['account_id'] for p in problems})} account(s) differ from their ledger")
        self.stdout.write("ledger verified: every account equals the sum of its entries")
