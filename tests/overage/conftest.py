"""An organization made for overage: two teams under policies that allow it, people in every role.

Engineering's policy (1,000,000 tokens a month) sends requests to the approvers; Research's
(1,000,000 a month) approves up to 300,000 tokens in two requests a month at once. Both govern
since long before this month, so every employee's account opens with the whole month.
"""

from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.utils import timezone

from allowances import services as allowance_services
from gateway import services as gateway_services
from overage import services
from overage.models import ApproverTeam
from portal.models import Member
from portal.tenancy import scope
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory, UserFactory

MONTHLY = 1_000_000
AUTO_TOKENS, AUTO_REQUESTS = 300_000, 2


def build_overage_org(slug: str = "ovr", time_zone: str = "Europe/Berlin") -> SimpleNamespace:
    organization = OrganizationFactory(slug=slug, name=f"Overage {slug}", time_zone=time_zone)
    engineering = TeamFactory(organization=organization, name="Engineering")
    research = TeamFactory(organization=organization, name="Research")
    long_ago = timezone.now() - timedelta(days=90)

    def person(label, team=None, **roles):
        return MemberFactory(organization=organization, team=team, joined_at=long_ago,
                             user=UserFactory(email=f"{label}@{slug}.example"),
                             **({"is_employee": False} | roles))

    with scope(organization):
        catalog_connection = gateway_services.provider_connection_create(
            organization=organization, actor=None, name="Sandbox", kind="sandbox", connect_timeout=5, read_timeout=60)
        model = allowance_services.catalog_model_create(
            organization=organization, actor=None, model_id="gpt-4o", display_name="GPT-4o",
            connection=catalog_connection, input_multiplier="5", output_multiplier="5",
            input_price_per_million="2.50", output_price_per_million="10.00")
        standard = allowance_services.policy_create(organization=organization, actor=None, name="Standard",
                                                    monthly_tokens=MONTHLY, overage_rule="request_approval")
        research_policy = allowance_services.policy_create(
            organization=organization, actor=None, name="Research", monthly_tokens=MONTHLY,
            overage_rule="auto_approve", auto_approve_tokens=AUTO_TOKENS, auto_approve_requests=AUTO_REQUESTS)
        allowance_services.policy_assign(organization=organization, actor=None, policy=standard, team=engineering,
                                         immediately=True, at=long_ago)
        allowance_services.policy_assign(organization=organization, actor=None, policy=research_policy, team=research,
                                         immediately=True, at=long_ago)
        # People join once the policies govern (assigning "immediately" in the past opens no account then).
        people = {
            "owner": person("owner", is_owner=True), "admin": person("admin", is_admin=True),
            "hr": person("hr", is_hr=True),
            "approver": person("approver", engineering, is_approver=True, is_employee=True),
            "eng_approver": person("eng-approver", research, is_approver=True, is_employee=True),
            "alice": person("alice", engineering, is_employee=True), "bob": person("bob", engineering, is_employee=True),
            "carol": person("carol", research, is_employee=True), "dave": person("dave", research, is_employee=True),
        }
        # The second approver approves for Engineering only (though in Research themselves).
        ApproverTeam.objects.create(organization=organization, member=people["eng_approver"], team=engineering)
        # As stored (joined_at back from the database), with what the services read of them.
        people = {label: Member.objects.select_related("organization", "user", "team").get(pk=member.pk)
                  for label, member in people.items()}
        for member in people.values():
            allowance_services.account_open(member=member)
    return SimpleNamespace(organization=organization, slug=slug, engineering=engineering, research=research,
                           standard=standard, research_policy=research_policy, model=model, **people)


@pytest.fixture
def ovr(db):
    return build_overage_org()


def ask(member, tokens=200_000, reason="A bigger evaluation run", **extra):
    with scope(member.organization):
        overage_request, _created = services.overage_request_create(member=member, actor=member.user, tokens=tokens,
                                                                    reason=reason, **extra)
    return overage_request


def decide(overage_request, member, decision="approve", **extra):
    with scope(member.organization):
        decided, _ = services.overage_request_decide(overage_request=overage_request, actor_member=member,
                                                     decision=decision, **extra)
    return decided
