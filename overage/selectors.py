"""Reads for overage requests: a member's own, an approver's queue and what a decision needs,
the organization's cap and the policy's auto-approval. (The consumed billable overage per
member, team, model and period is a read of the ledger: allowances.selectors.billable_overage.)

Who sees what, in one place (`visible_requests`): a member sees their own requests; an approver
(or an admin) also sees the requests they may decide, which excludes their own and, for an
approver limited to teams, requests of members outside those teams. A request someone may not
see is answered like one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Count, Q, QuerySet, Sum
from django.shortcuts import get_object_or_404
from django.utils import timezone

from allowances import selectors as allowance_selectors
from allowances.consumption import OVERAGE_KINDS, unused_overage
from allowances.models import Account, AllowancePolicy, CatalogModel, LedgerEntry
from allowances.periods import period_start_for
from overage.models import OverageRequest, OverageSettings
from portal.models import CURRENCIES, Member, Organization

State = OverageRequest.State


# -- who may see and decide what ---------------------------------------------------------------------


def approver_team_ids(*, member: Member) -> set[int] | None:
    """The teams a member approves for; None: every team (admins, and approvers with no teams set)."""
    if not member.has_any_role(["approver"]):
        return set()
    if member.has_any_role(["admin"]):
        return None
    return {approves_for.team_id for approves_for in member.approves_for.all()} or None


def decidable_requests(*, member: Member) -> QuerySet[OverageRequest]:
    """The requests `member` may decide (whatever their state now): not their own, of their teams."""
    requests = OverageRequest.objects.filter(organization=member.organization).exclude(member=member)
    teams = approver_team_ids(member=member)
    if teams is not None:
        requests = requests.filter(member__team_id__in=teams)
    return requests


def may_decide(*, member: Member, overage_request: OverageRequest) -> str | None:
    """Why `member` may not decide this request, or None."""
    if not member.has_any_role(["approver"]):
        return "Only approvers and admins decide overage requests."
    if overage_request.member_id == member.pk:
        return "Nobody decides their own request: another approver will."
    teams = approver_team_ids(member=member)
    if teams is not None and overage_request.member.team_id not in teams:
        return "You approve for other teams than the requester's."
    return None


def visible_requests(*, member: Member) -> QuerySet[OverageRequest]:
    own = Q(member=member)
    if member.has_any_role(["approver"]):
        own |= Q(pk__in=decidable_requests(member=member).values("pk"))
    return (OverageRequest.objects.filter(own, organization=member.organization)
            .select_related("member__user", "member__team", "decided_by"))


def request_list(*, member: Member, state: str = "", team_id: int | None = None,
                 member_id: int | None = None) -> QuerySet[OverageRequest]:
    requests = visible_requests(member=member)
    if state:
        requests = requests.filter(state=state)
    if team_id:
        requests = requests.filter(member__team_id=team_id)
    if member_id:
        requests = requests.filter(member_id=member_id)
    return requests.order_by("-created_at", "-id")


def request_get(*, member: Member, overage_request_id: int) -> OverageRequest:
    return get_object_or_404(visible_requests(member=member), pk=overage_request_id)


def own_requests(*, member: Member) -> QuerySet[OverageRequest]:
    return (OverageRequest.objects.filter(organization=member.organization, member=member)
            .select_related("decided_by").order_by("-created_at", "-id"))


def own_request_get(*, member: Member, overage_request_id: int) -> OverageRequest:
    return get_object_or_404(own_requests(member=member), pk=overage_request_id)


def pending_request(*, member: Member) -> OverageRequest | None:
    return own_requests(member=member).filter(state=State.PENDING).first()


def pending_requests(*, organization: Organization) -> QuerySet[OverageRequest]:
    """Every pending request of the organization, oldest first."""
    return (OverageRequest.objects.filter(organization=organization, state=State.PENDING)
            .select_related("member__user", "member__team", "organization").order_by("created_at", "id"))


def approval_queue(*, member: Member) -> QuerySet[OverageRequest]:
    """What `member` has to decide, oldest first."""
    return (decidable_requests(member=member).filter(state=State.PENDING)
            .select_related("member__user", "member__team").order_by("created_at", "id"))


def approval_get(*, member: Member, overage_request_id: int) -> OverageRequest:
    return get_object_or_404(decidable_requests(member=member).select_related("member__user", "member__team",
                                                                              "decided_by"), pk=overage_request_id)


def tellable_members(*, organization: Organization) -> tuple[list[Member], list[Member]]:
    """The active approvers, and the active admins and owners, of an organization: whom
    approvers_to_tell chooses from."""
    members = list(Member.objects.filter(organization=organization, is_active=True)
                   .filter(Q(is_approver=True) | Q(is_admin=True) | Q(is_owner=True))
                   .select_related("user", "organization").prefetch_related("approves_for"))
    return ([member for member in members if member.is_approver],
            [member for member in members if member.is_admin or member.is_owner])


def approvers_to_tell(*, overage_request: OverageRequest,
                      members: tuple[list[Member], list[Member]] | None = None) -> list[Member]:
    """Who is told of a pending request (emailed when it is made, listed in the daily digest): the
    approvers who may decide it, or, when none may (there are none, or all approve for other
    teams), the admins and owners. `members`: tellable_members of its organization, if known."""
    approvers, admins = members or tellable_members(organization=overage_request.organization)
    return ([member for member in approvers if may_decide(member=member, overage_request=overage_request) is None]
            or [member for member in admins if may_decide(member=member, overage_request=overage_request) is None])


def whom_to_ask(*, organization: Organization) -> list[str]:
    """The addresses of HR (or, without HR, the admins): who grants tokens when overage is not allowed."""
    members = Member.objects.filter(organization=organization, is_active=True).select_related("user")
    hr = members.filter(is_hr=True)
    people = hr if hr.exists() else members.filter(Q(is_admin=True) | Q(is_owner=True))
    return sorted(member.user.email for member in people)


# -- the organization's cap and the policy's auto-approval --------------------------------------------------


def approved_in_period(*, organization: Organization, period: date) -> int:
    return OverageRequest.objects.filter(organization=organization, period_start=period,
                                         state__in=OverageRequest.APPROVED_STATES).aggregate(
        total=Sum("approved_tokens"))["total"] or 0


def cap_of(*, organization: Organization) -> int | None:
    return OverageSettings.objects.filter(organization=organization).values_list("cap_tokens", flat=True).first()


def cap_room(*, organization: Organization, period: date) -> int | None:
    """Approved overage tokens the organization's cap still allows in the period; None: no cap."""
    cap = cap_of(organization=organization)
    return None if cap is None else max(cap - approved_in_period(organization=organization, period=period), 0)


def auto_approved_in_period(*, member: Member, period: date) -> tuple[int, int]:
    """(requests, tokens) the policy approved at once for the member in the period."""
    done = OverageRequest.objects.filter(organization=member.organization, member=member, period_start=period,
                                         auto_approved=True).aggregate(count=Count("pk"), tokens=Sum("approved_tokens"))
    return done["count"], done["tokens"] or 0


def auto_approval_fits(*, policy: AllowancePolicy | None, member: Member, period: date, tokens: int) -> bool:
    """Whether the policy approves `tokens` more at once: within its tokens and requests per period."""
    if policy is None or policy.overage_rule != AllowancePolicy.Overage.AUTO_APPROVE:
        return False
    count, approved = auto_approved_in_period(member=member, period=period)
    return count + 1 <= policy.auto_approve_requests and approved + tokens <= policy.auto_approve_tokens


# -- what a decision needs ---------------------------------------------------------------------------------


@dataclass
class RequestContext:
    request: OverageRequest
    board: allowance_selectors.Dashboard
    granted_this_period: int
    previous: list
    outcomes: dict
    cost_low: Decimal | None
    cost_high: Decimal | None
    currency: str
    priced_models: list

    @property
    def allowance(self) -> int | None:
        return self.board.policy.monthly_tokens if self.board.policy else None


def _money(value: Decimal, currency: str) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-CURRENCIES.get(currency, 2)), rounding=ROUND_HALF_UP)


def request_context(*, overage_request: OverageRequest, at=None) -> RequestContext:
    """The requester's allowance, use, pace and model mix this period, their earlier requests, and
    what the amount costs at catalog prices (between all input and all output tokens, on the
    request's model, else on the models they used this period, else on the active catalog)."""
    member = overage_request.member
    organization = member.organization
    account = Account.objects.select_related("organization", "member").get(member=member)  # opened to ask
    board = allowance_selectors.dashboard(account=account, at=at)
    granted = allowance_selectors.granted_in_period(account=account, period=account.period_start)
    previous = list(own_requests(member=member).exclude(pk=overage_request.pk)[:10])
    outcomes = dict(own_requests(member=member).exclude(pk=overage_request.pk).order_by().values_list("state")
                    .annotate(n=Count("pk")))
    catalog = CatalogModel.objects.filter(organization=organization, is_active=True)
    if overage_request.model:
        models = list(catalog.filter(model_id=overage_request.model))
    else:
        used = [model for model, _total in board.by_model]
        models = list(catalog.filter(model_id__in=used)) or list(catalog)
    costs = [cost for model in models for cost in model.pricing.allowance_cost(overage_request.tokens)]
    currency = organization.currency
    return RequestContext(
        request=overage_request, board=board, granted_this_period=granted, previous=previous,
        outcomes={State(state).label: count for state, count in outcomes.items()},
        cost_low=_money(min(costs), currency) if costs else None,
        cost_high=_money(max(costs), currency) if costs else None, currency=currency,
        priced_models=[model.model_id for model in models])


# -- the member's overage this period (dashboard) -----------------------------------------------------------


@dataclass
class OverageStatus:
    granted: int  # overage granted into the open period
    billable_used: int
    left: int  # what the balance still has of it (lapses at the close if unused)
    level: str  # "ok", "low" or "exhausted": how prominent "Request more tokens" is
    pending: OverageRequest | None
    notices: list  # decided requests the member has not dismissed yet


def overage_status(*, account: Account) -> OverageStatus:
    member = account.member
    period = account.period_start
    entries = LedgerEntry.objects.filter(account=account, period_start=period)
    overage = entries.aggregate(total=Sum("granted_delta", filter=Q(kind__in=OVERAGE_KINDS)))["total"] or 0
    all_granted = allowance_selectors.granted_in_period(account=account, period=period)
    billable = sum(row.tokens for row in allowance_selectors.billable_overage(organization=account.organization, period=period,
                                                          member=member)) if overage else 0
    available = account.available
    level = allowance_selectors.balance_level(available=available, granted=all_granted)
    notices = list(own_requests(member=member).exclude(state__in=[State.PENDING, State.CANCELLED])
                   .filter(notice_seen_at__isnull=True)[:3])
    return OverageStatus(granted=overage, billable_used=billable, left=unused_overage(available=available,
                                                                                     overage=overage),
                         level=level, pending=pending_request(member=member), notices=notices)


def current_period(*, organization: Organization, at=None) -> date:
    return period_start_for(organization, at or timezone.now())
