"""Seed the demo: two organizations with an owner, HR, an approver and three employees in two teams.

Idempotent: running it again finds what exists, resets the demo passwords, and prints the same
logins.
"""

from allauth.account.models import EmailAddress
from django.core.management.base import BaseCommand
from django.db import transaction

from allowances.demo import seed_allowances, seed_usage
from allowances.periods import period_bounds, period_start_for
from apikeys.demo import seed_keys
from billing.demo import seed_billing
from overage.demo import seed_overage
from portal.demo import DEMO_ORGANIZATIONS, DEMO_PASSWORD
from portal.models import Member, Organization, Team, User
from portal.tenancy import scope


class Command(BaseCommand):
    help = "Create (or refresh) the demo organizations and users and print their logins."

    def handle(self, *args, **options):
        with transaction.atomic():
            organizations = [self._seed_organization(spec) for spec in DEMO_ORGANIZATIONS]
            key_lines, pending = [], []
            for organization in organizations:
                with scope(organization):
                    key_lines.append(seed_keys(organization))
                    seed_usage(organization)
                    pending.append(seed_overage(organization))
                    seed_billing(organization)
        for organization, spec, keys, waiting in zip(organizations, DEMO_ORGANIZATIONS, key_lines, pending):
            self.stdout.write(f"# {organization.name} (/o/{organization.slug}/)")
            for person in spec["people"]:
                self.stdout.write(f"login {person['email']} {DEMO_PASSWORD} {','.join(person['roles'])}")
            for line in keys:
                self.stdout.write(line)
            approvers = [person["email"] for person in spec["people"] if person["roles"] == ["approver"]]
            self.stdout.write(f"# {len(waiting)} overage requests wait in /o/{organization.slug}/approvals/ for "
                              f"{', '.join(approvers)}")
            self.stdout.write(f"# consumed billable overage so far: /o/{organization.slug}/billing/ (owner)")

    def _seed_organization(self, spec) -> Organization:
        organization, _ = Organization.objects.get_or_create(
            slug=spec["slug"], defaults={"name": spec["name"], "time_zone": spec["time_zone"], "currency": spec["currency"]}
        )
        with scope(organization):
            teams = {}
            for name in spec["teams"]:
                teams[name], _ = Team.objects.get_or_create(organization=organization, name=name,
                                                             defaults={"cost_centre": name[:3].upper() + "-100"})
            for person in spec["people"]:
                user = User.objects.filter(email=person["email"]).first()
                if user is None:
                    user = User.objects.create_user(email=person["email"], password=DEMO_PASSWORD,
                                                    first_name=person["first_name"], last_name=person["last_name"])
                else:
                    user.set_password(DEMO_PASSWORD)
                    user.save(update_fields=["password"])
                EmailAddress.objects.update_or_create(user=user, email=user.email, defaults={"verified": True, "primary": True})
                # Demo members have been around since the period began, so they get a whole month.
                member, _ = Member.objects.get_or_create(organization=organization, user=user, defaults={
                    "is_employee": True, "joined_at": period_bounds(organization, period_start_for(organization))[0]})
                member.set_roles(person["roles"])
                member.team = teams[person["team"]]
                member.is_active = True
                member.save()
            seed_allowances(organization)
        return organization
