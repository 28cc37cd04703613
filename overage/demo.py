"""The demo's overage requests: in each organization a few decided and a few pending, so that the
approver's queue has work in it (the second Engineering employee has nothing pending or approved, free to ask).
Made through the services, as people would; idempotent per month."""

from allowances import closing
from allowances.periods import period_start_for
from overage import services
from overage.models import OverageRequest
from portal.models import Member

# (member's first name's position among the employees, tokens, reason, model, decision, approved tokens, note)
DEMO_REQUESTS = [
    (0, 800_000, "Load test of the support agent before the launch", "gpt-4o", "approve", 500_000,
     "Half now: ask again next week if the test needs more."),
    (1, 2_000_000, "Benchmark runs over the whole evaluation set", "gpt-4o", "reject", None,
     "Run the benchmark on gpt-4o-mini first."),
    (2, 250_000, "Literature review for the new project", "claude-sonnet", None, None, ""),  # Research: at once
    (2, 5_000_000, "Generating the fine-tuning data set", "claude-sonnet", None, None, ""),  # past Research's limit
    (0, 1_000_000, "Prototype of the code-review bot", "claude-sonnet", None, None, ""),
]


def seed_overage(organization) -> list[OverageRequest]:
    """Returns the requests still pending."""
    closing.close_organization_periods(organization=organization)  # what the hourly job would do first
    members = Member.objects.filter(organization=organization, is_active=True).select_related("user", "organization")
    employees = [m for m in members.order_by("pk") if m.roles == ["employee"]]
    approver = next(m for m in members if m.roles == ["approver"])
    period = period_start_for(organization)
    for number, (who, tokens, reason, model, decision, approved, note) in enumerate(DEMO_REQUESTS):
        requester = employees[who]
        try:
            overage_request, _created = services.overage_request_create(
                member=requester, actor=requester.user, tokens=tokens, reason=reason, model=model,
                idempotency_key=f"demo:{period}:{number}")
        except services.OverageConflict:
            continue  # someone made a request of their own in the demo meanwhile

        if decision is not None and overage_request.is_pending:
            services.overage_request_decide(overage_request=overage_request, actor_member=approver,
                                            decision=decision, tokens=approved, note=note)
    return list(OverageRequest.objects.filter(organization=organization, state=OverageRequest.State.PENDING))
