"""Overage pages: a member asks for more tokens and follows their requests; approvers work the
queue; admins set the organization's cap and the teams approvers approve for."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from allowances.selectors import catalog, policy_in_force
from billing.selectors import approvals_frozen
from overage import selectors, services
from overage.forms import ApproverTeamsForm, BatchApproveForm, CapForm, DecisionForm, OverageRequestForm
from portal import selectors as portal_selectors
from portal.forms import apply_service_error
from portal.models import Member
from portal.tenancy import require_roles
from portal.views import org_url

MAX_PREFILLED_DIGITS = 11  # MAX_TOKENS has 11 digits; anything longer is not an amount


def _request_form(request, data=None, initial=None):
    return OverageRequestForm(data, initial=initial, catalog=catalog(organization=request.organization,
                                                                     active_only=True).order_by("display_name"))


def _prefill(request) -> dict:
    """The gateway's 429 links here with the refused request's shortfall and model."""
    initial = {}
    tokens = request.GET.get("tokens", "")
    if tokens.isascii() and tokens.isdigit() and len(tokens) <= MAX_PREFILLED_DIGITS:
        initial["tokens"] = tokens
    model = request.GET.get("model", "")
    if model.isprintable() and len(model) <= services.MODEL_LENGTH:
        initial["model"] = model
    return initial


def _initial(overage_request) -> dict:
    return {name: getattr(overage_request, name) for name in ("tokens", "reason", "model", "project")}


@require_GET
def request_list(request):
    return render(request, "overage/request_list.html", {
        "page": Paginator(selectors.own_requests(member=request.member), 25).get_page(request.GET.get("page")),
        "pending": selectors.pending_request(member=request.member),
    })


@require_http_methods(["GET", "POST"])
def request_new(request):
    member = request.member
    pending = selectors.pending_request(member=member)
    if pending is not None and request.method == "GET":
        # One pending request at a time: asking again is changing that one.
        return render(request, "overage/request_form.html", {
            "form": _request_form(request, initial=_initial(pending)), "refusal": None, "editing": pending,
            "already_pending": True})
    refusal = services.policy_refusal(member=member, policy=policy_in_force(member=member))
    form = _request_form(request, request.POST or None, initial=_prefill(request))
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        try:
            overage_request, _created = services.overage_request_create(
                member=member, actor=request.user, idempotency_key=data.pop("form_token"), **data)
        except ValidationError as error:
            apply_service_error(form, error)
        except services.OverageConflict as conflict:
            messages.error(request, str(conflict))
            if conflict.overage_request is not None:
                return redirect(org_url(request, "overage_request_edit",
                                        overage_request_id=conflict.overage_request.pk))
            return redirect(org_url(request, "overage_request_list"))
        else:
            if overage_request.is_approved:
                messages.success(request, f"Approved at once: {overage_request.approved_tokens:,} tokens were added "
                                          "to your allowance.")
            else:
                messages.success(request, f"Request for {overage_request.tokens:,} tokens sent to the approvers.")
            return redirect(org_url(request, "overage_request_list"))
    return render(request, "overage/request_form.html", {"form": form, "refusal": refusal, "editing": None},
                  status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
def request_edit(request, overage_request_id):
    overage_request = selectors.own_request_get(member=request.member, overage_request_id=overage_request_id)
    if not overage_request.is_pending:
        messages.info(request, f"This request is {overage_request.get_state_display().lower()}; it cannot change.")
        return redirect(org_url(request, "overage_request_list"))
    form = _request_form(request, request.POST or None, initial=_initial(overage_request))
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        data.pop("form_token")
        try:
            changed = services.overage_request_update(overage_request=overage_request, actor_member=request.member,
                                                      **data)
        except ValidationError as error:
            apply_service_error(form, error)
        except services.OverageConflict as conflict:
            messages.error(request, str(conflict))
            return redirect(org_url(request, "overage_request_list"))
        else:
            messages.success(request, "Approved at once." if changed.is_approved else "Request changed.")
            return redirect(org_url(request, "overage_request_list"))
    return render(request, "overage/request_form.html", {"form": form, "refusal": None, "editing": overage_request},
                  status=400 if form.errors else 200)


@require_POST
def request_cancel(request, overage_request_id):
    overage_request = selectors.own_request_get(member=request.member, overage_request_id=overage_request_id)
    try:
        services.overage_request_cancel(overage_request=overage_request, actor_member=request.member)
    except services.OverageConflict as conflict:
        messages.error(request, str(conflict))
    else:
        messages.success(request, f"Request #{overage_request.pk} cancelled.")
    return redirect(org_url(request, "overage_request_list"))


@require_POST
def notices_dismiss(request):
    services.overage_notices_dismiss(member=request.member)
    return redirect(org_url(request, "dashboard"))


# -- approvers -------------------------------------------------------------------------------------------


@require_roles("approver")
@require_GET
def approval_queue(request):
    queue = selectors.approval_queue(member=request.member)
    page = Paginator(queue, 25).get_page(request.GET.get("page"))
    return render(request, "overage/queue.html", {
        "page": page, "contexts": [selectors.request_context(overage_request=r) for r in page],
        "batch_form": BatchApproveForm(queue=queue),
        "cap_room": selectors.cap_room(organization=request.organization,
                                       period=selectors.current_period(organization=request.organization)),
        "frozen": approvals_frozen(organization=request.organization),
    })


@require_roles("approver")
@require_POST
def approvals_approve(request):
    form = BatchApproveForm(request.POST, queue=selectors.approval_queue(member=request.member))
    if not form.is_valid():
        messages.error(request, " ".join(" ".join(errors) for errors in form.errors.values()))
        return redirect(org_url(request, "approval_queue"))
    chosen = form.cleaned_data["overage_requests"]
    outcome = services.overage_requests_approve(overage_requests=chosen, actor_member=request.member,
                                                note=form.cleaned_data["note"],
                                                asked_tokens={r.pk: _asked(request, f"asked-{r.pk}") for r in chosen})
    if outcome.approved:
        messages.success(request, f"Approved {len(outcome.approved)} request{'s' if len(outcome.approved) != 1 else ''}"
                                  f" in full: {', '.join(f'#{r.pk}' for r in outcome.approved)}.")
    for refused, why in outcome.refused:
        messages.error(request, f"#{refused.pk} was not approved: {why}")
    return redirect(org_url(request, "approval_queue"))


def _asked(request, name: str) -> int | None:
    """The amount the page showed for a request (a hidden field), so that a request changed since
    is not decided unseen; not sent: None; unreadable: 0, an amount no request has."""
    shown = request.POST.get(name)
    if shown is None:
        return None
    return int(shown) if shown.isascii() and shown.isdigit() and len(shown) <= MAX_PREFILLED_DIGITS else 0


@require_roles("approver")
@require_http_methods(["GET", "POST"])
def approval_detail(request, overage_request_id):
    overage_request = selectors.approval_get(member=request.member, overage_request_id=overage_request_id)
    form = DecisionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            decided, _ = services.overage_request_decide(overage_request=overage_request,
                                                         actor_member=request.member, **form.cleaned_data,
                                                         asked_tokens=_asked(request, "asked_tokens"))
        except ValidationError as error:
            apply_service_error(form, error)
        except services.OverageConflict as conflict:
            messages.error(request, str(conflict))
            return redirect(org_url(request, "approval_detail", overage_request_id=overage_request.pk))
        else:
            messages.success(request, f"Request #{decided.pk} {decided.get_state_display().lower()}"
                                      + (f": {decided.approved_tokens:,} tokens granted." if decided.is_approved
                                         else "."))
            return redirect(org_url(request, "approval_queue"))
    return render(request, "overage/detail.html", {
        "context": selectors.request_context(overage_request=overage_request), "form": form,
        "cap_room": selectors.cap_room(organization=request.organization, period=overage_request.period_start),
    }, status=400 if form.errors else 200)


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def approval_settings(request):
    organization = request.organization
    approvers = Member.objects.filter(organization=organization, is_active=True, is_approver=True, is_admin=False,
                                      is_owner=False).select_related("user").order_by("user__email")
    teams = portal_selectors.team_list(organization=organization)
    cap_form = CapForm(request.POST if request.POST.get("form") == "cap" else None,
                       initial={"cap_tokens": selectors.cap_of(organization=organization)})
    teams_form = ApproverTeamsForm(request.POST if request.POST.get("form") == "teams" else None,
                                   approvers=approvers, teams=teams)
    if request.method == "POST":
        try:
            if cap_form.is_bound and cap_form.is_valid():
                services.overage_settings_update(organization=organization, actor=request.user,
                                                 cap_tokens=cap_form.cleaned_data["cap_tokens"])
                messages.success(request, "The organization's overage cap is saved.")
                return redirect(org_url(request, "approval_settings"))
            if teams_form.is_bound and teams_form.is_valid():
                approver = teams_form.cleaned_data["approver"]
                services.approver_teams_set(organization=organization, actor=request.user, approver=approver,
                                            teams=teams_form.cleaned_data["teams"])
                messages.success(request, f"Saved the teams {approver.user.email} approves for.")
                return redirect(org_url(request, "approval_settings"))
        except ValidationError as error:
            apply_service_error(cap_form if cap_form.is_bound else teams_form, error)
        if not (cap_form.is_bound or teams_form.is_bound):
            messages.error(request, "Nothing to save.")
    rows = [(approver, ApproverTeamsForm(approvers=approvers, teams=teams, initial={
        "approver": approver.pk, "teams": list(approver.approves_for.values_list("team_id", flat=True))}))
        for approver in approvers]
    return render(request, "overage/settings.html", {
        "cap_form": cap_form, "teams_form": teams_form, "rows": rows,
        "approved": selectors.approved_in_period(organization=organization,
                                                 period=selectors.current_period(organization=organization)),
    }, status=400 if request.method == "POST" else 200)  # a POST that saved redirected
