"""Allowance pages: the employee's dashboard and HR's balances, policies, assignments and grants."""

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from allowances import charts, selectors, services
from allowances.forms import (
    AssignmentForm,
    CatalogModelForm,
    GrantForm,
    GrantImportForm,
    HistoryFilterForm,
    ModelAliasForm,
    PolicyEditForm,
    PolicyForm,
    TransferForm,
    TransferSettingsForm,
)
from apikeys.selectors import keys_of
from gateway.selectors import connections_of, usage_records
from portal import selectors as portal_selectors
from portal.exports import csv_response
from portal.forms import apply_service_error
from portal.tenancy import require_roles
from portal.views import LAST_ORGANIZATION_KEY, org_url


def _history(request, account):
    form = HistoryFilterForm(request.GET or None)
    filters = form.cleaned_data if form.is_valid() else {}
    entries = selectors.ledger_history(account=account, kind=filters.get("kind", ""), since=filters.get("since"),
                                       until=filters.get("until"))
    return form, Paginator(entries, 25).get_page(request.GET.get("page"))


@require_GET
def dashboard(request):
    """The member's own allowance: balance, burn rate, run-out date, usage by day and model, history."""
    request.session[LAST_ORGANIZATION_KEY] = request.organization.slug
    account = services.account_open(member=request.member)
    form, page = _history(request, account)
    if request.htmx and request.htmx.target == "history":
        return render(request, "allowances/_history.html", {"page": page, "history_form": form}, status=form.status)
    board = selectors.dashboard(account=account)
    return render(request, "allowances/dashboard.html", {
        "board": board, "history_form": form, "page": page,
        "chart": charts.daily_usage_chart(board.daily, today=board.today, burn_per_day=board.burn_per_day,
                                          run_out_on=board.run_out_on),
        "model_chart": charts.breakdown_chart(board.by_model, what="model"),
    }, status=form.status)


@require_roles("hr")
@require_GET
def overview(request):
    """HR's and admins' view of the open period: spend against the organization's allowance, by
    team, by model and by day, and the members near or past their limit."""
    board = selectors.organization_overview(organization=request.organization)
    if request.GET.get("export") in ("teams", "models"):
        rows = board.by_team if request.GET["export"] == "teams" else board.by_model
        what = "team" if request.GET["export"] == "teams" else "model"
        return csv_response(f"{request.organization.slug}-{what}s-{board.period_begin:%Y-%m}.csv",
                            [what, "tokens used this period"], rows)
    return render(request, "allowances/overview.html", {
        "board": board,
        "team_chart": charts.breakdown_chart(board.by_team, what="team"),
        "model_chart": charts.breakdown_chart(board.by_model, what="model"),
        "time_chart": charts.spend_over_time_chart(board.days, board.by_day_and_team, what="team"),
    })


@require_roles("hr")
@require_GET
def balances(request):
    team_id = request.GET.get("team", "")
    level = request.GET.get("level", "")
    sort = request.GET.get("sort", "email")
    members = selectors.member_balances(
        organization=request.organization, search=request.GET.get("q", ""), level=level, sort=sort,
        team_id=int(team_id) if team_id.isascii() and team_id.isdigit() and len(team_id) < 18 else None)
    if request.GET.get("export") == "csv":
        return csv_response(f"{request.organization.slug}-balances.csv",
                            ["email", "team", "policy", "granted this period", "used this period", "held", "left", "level"],
                            _balance_rows(request.organization, members))
    return render(request, "allowances/balances.html", {
        "page": Paginator(members, 50).get_page(request.GET.get("page")), "q": request.GET.get("q", ""),
        "teams": portal_selectors.team_list(organization=request.organization), "team_id": team_id,
        "level": level, "levels": selectors.BALANCE_LEVELS, "sort": sort,
        "columns": [("email", "Member", ""), ("team", "Team", ""), ("granted", "Granted", "num"),
                    ("used", "Used this period", "num"), ("held", "Held", "num"), ("left", "Left", "num")],
        "policies": {policy.pk: policy for policy in selectors.policy_list(organization=request.organization)},
    })


def _balance_rows(organization, members):
    policies = {policy.pk: policy.name for policy in selectors.policy_list(organization=organization)}
    for member in members:
        level = selectors.balance_level(available=member.available_now, granted=member.granted_this_period)
        yield [member.user.email, member.team.name if member.team else "", policies.get(member.policy_in_force, ""),
               member.granted_this_period, member.used_this_period, member.held_now, member.available_now, level]


@require_roles("hr")
@require_GET
def balance_detail(request, member_id):
    """One member's allowance, keys and recent usage, from HR's balances."""
    subject = selectors.member_balance_get(organization=request.organization, member_id=member_id)
    account = getattr(subject, "account", None)
    board = selectors.dashboard(account=account) if account is not None else None
    return render(request, "allowances/balance_detail.html", {
        "subject": subject, "board": board,
        "chart": charts.daily_usage_chart(board.daily, today=board.today, burn_per_day=board.burn_per_day,
                                          run_out_on=board.run_out_on) if board and board.used_this_period else "",
        "keys": keys_of(member=subject),
        "records": usage_records(organization=request.organization, member=subject)[:20],
    })


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def policy_list(request):
    form = PolicyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            policy = services.policy_create(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Policy {policy.name} created. Assign it to a team or a member.")
            return redirect(org_url(request, "policy_list"))
    return render(request, "allowances/policy_list.html", {
        "form": form, "policies": selectors.policy_list(organization=request.organization),
        "assignments": selectors.assignment_list(organization=request.organization)[:100],
    })


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def policy_edit(request, allowance_policy_id):
    policy = selectors.policy_get(organization=request.organization, policy_id=allowance_policy_id)
    initial = {field: getattr(policy, field) for field in services.POLICY_FIELDS} | {"applies": "next"}
    form = PolicyEditForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        immediately = data.pop("applies") == "now"
        try:
            services.policy_update(policy=policy, actor=request.user, immediately=immediately, **data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Policy {policy.name} saved; "
                             + ("members were topped up or down pro rata now." if immediately else "it applies from the next period."))
            return redirect(org_url(request, "policy_list"))
    return render(request, "allowances/policy_edit.html", {"form": form, "policy": policy})


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def policy_assign(request):
    organization = request.organization
    form = AssignmentForm(request.POST or None, policies=selectors.policy_list(organization=organization),
                          teams=portal_selectors.team_list(organization=organization),
                          members=portal_selectors.member_list(organization=organization).filter(is_active=True))
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            services.policy_assign(organization=organization, actor=request.user, policy=data["policy"],
                                   team=data["team"], member=data["member"], immediately=data["applies"] == "now")
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"{data['policy'].name} assigned to {data['team'] or data['member'].user.email}.")
            return redirect(org_url(request, "policy_list"))
    return render(request, "allowances/policy_assign.html", {"form": form})


def _grant_form(request, data=None):
    organization = request.organization
    return GrantForm(data, teams=portal_selectors.team_list(organization=organization),
                     members=portal_selectors.member_list(organization=organization).filter(is_active=True))


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def grant_list(request):
    form = _grant_form(request, request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            grant = services.grant_create(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"Granted {grant.tokens:,} tokens to {grant.member.user.email if grant.member else grant.team.name}.")
            return redirect(org_url(request, "grant_list"))
    grants = Paginator(selectors.grant_list(organization=request.organization), 50).get_page(request.GET.get("page"))
    return render(request, "allowances/grant_list.html", {"form": form, "page": grants, "import_form": GrantImportForm()})


@require_roles("hr")
@require_POST
def grant_revoke(request, grant_id):
    grant = selectors.grant_get(organization=request.organization, grant_id=grant_id)
    try:
        services.grant_revoke(grant=grant, actor=request.user)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, f"Grant of {grant.tokens:,} tokens revoked.")
    return redirect(org_url(request, "grant_list"))


@require_roles("hr")
@require_POST
def grant_import(request):
    form = GrantImportForm(request.POST, request.FILES)
    if form.is_valid():
        try:
            batch = services.grant_batch_preview(organization=request.organization, actor=request.user,
                                                 upload=form.cleaned_data["file"])
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            return redirect(org_url(request, "grant_batch", grant_batch_id=batch.pk))
    grants = Paginator(selectors.grant_list(organization=request.organization), 50).get_page(1)
    return render(request, "allowances/grant_list.html", {"form": _grant_form(request), "page": grants,
                                                          "import_form": form}, status=400)


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def grant_batch(request, grant_batch_id):
    batch = selectors.grant_batch_get(organization=request.organization, grant_batch_id=grant_batch_id)
    if request.method == "POST":
        try:
            services.grant_batch_apply(batch=batch, actor=request.user)
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
        else:
            messages.success(request, f"Granted {batch.total_tokens:,} tokens in {len(batch.rows)} grants.")
            return redirect(org_url(request, "grant_list"))
    return render(request, "allowances/grant_batch.html", {"batch": batch})


def _catalog_form(request, data=None, **kwargs):
    return CatalogModelForm(data, connections=connections_of(organization=request.organization),
                            catalog=selectors.catalog(organization=request.organization, active_only=True), **kwargs)


def _alias_form(request, data=None):
    return ModelAliasForm(data, catalog=selectors.catalog(organization=request.organization))


def _catalog_page(request, *, form, alias_form, status=200):
    return render(request, "allowances/catalog.html", {
        "form": form, "alias_form": alias_form, "models": selectors.catalog(organization=request.organization),
        "aliases": selectors.model_aliases(organization=request.organization),
        "currency": request.organization.currency,
    }, status=status)


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def catalog(request):
    form = _catalog_form(request, request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            entry = services.catalog_model_create(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"{entry.display_name} added to the catalog.")
            return redirect(org_url(request, "catalog"))
    return _catalog_page(request, form=form, alias_form=_alias_form(request))


@require_roles("admin")
@require_POST
def model_alias_create(request):
    alias_form = _alias_form(request, request.POST)
    if alias_form.is_valid():
        try:
            alias = services.model_alias_create(organization=request.organization, actor=request.user,
                                                **alias_form.cleaned_data)
        except ValidationError as error:
            apply_service_error(alias_form, error)
        else:
            messages.success(request, f"Requests for {alias.alias} now go to {alias.catalog_model.model_id}.")
            return redirect(org_url(request, "catalog"))
    form = _catalog_form(request)
    return _catalog_page(request, form=form, alias_form=alias_form, status=400)


@require_roles("admin")
@require_POST
def model_alias_delete(request, model_alias_id):
    alias = selectors.model_alias_get(organization=request.organization, model_alias_id=model_alias_id)
    services.model_alias_delete(model_alias=alias, actor=request.user)
    messages.success(request, f"Alias {alias.alias} removed; requests for it are refused from now on.")
    return redirect(org_url(request, "catalog"))


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def catalog_model_edit(request, catalog_model_id):
    entry = selectors.catalog_model_get(organization=request.organization, catalog_model_id=catalog_model_id)
    form = _catalog_form(request, request.POST or None,
                         initial={field: getattr(entry, field) for field in services.CATALOG_FIELDS})
    if request.method == "POST" and form.is_valid():
        try:
            services.catalog_model_update(catalog_model=entry, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, f"{entry.display_name} saved.")
            return redirect(org_url(request, "catalog"))
    return render(request, "allowances/catalog_edit.html", {"form": form, "entry": entry})


def _transfer_page(request, form, status=200):
    account = services.account_open(member=request.member)
    return render(request, "allowances/transfers.html", {
        "form": form, "rules": selectors.transfer_rules(organization=request.organization),
        "transferable": selectors.transferable(account=account),
        "mine": selectors.transfers_of(member=request.member),
        "pool": selectors.team_pool(member=request.member),
    }, status=status)


@require_http_methods(["GET", "POST"])
def transfer_list(request):
    """A member gives part of their unused base allowance to a teammate or their team's pool, and
    sees what they gave and got."""
    receivers = selectors.transfer_receivers(member=request.member)
    pool_team = request.member.team if selectors.pool_enabled(member=request.member) else None
    form = TransferForm(request.POST if request.method == "POST" else None, receivers=receivers, pool_team=pool_team)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            transfer = services.transfer_create(giver=request.member, receiver=data["receiver"], tokens=data["tokens"],
                                                note=data["note"], idempotency_key=data["idempotency_key"],
                                                actor=request.user)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            to = f"the {transfer.pool_team.name} team pool" if transfer.to_pool else transfer.receiver.user.email
            messages.success(request, f"{transfer.tokens:,} tokens given to {to}.")
            return redirect(org_url(request, "transfer_list"))
    return _transfer_page(request, form, status=400 if form.errors else 200)


@require_GET
def team_pool(request):
    """The member's team pool: what it has left, who gave to it and who drew on it this period."""
    return render(request, "allowances/team_pool.html", {"pool": selectors.team_pool(member=request.member)})


@require_roles("hr")
@require_GET
def transfer_report(request):
    period = services.account_open(member=request.member).period_start
    return render(request, "allowances/transfer_report.html", {
        "report": selectors.transfer_report(organization=request.organization, period=period), "period": period})


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def transfer_settings(request):
    rules = selectors.transfer_rules(organization=request.organization)
    form = TransferSettingsForm(request.POST if request.method == "POST" else None, initial={
        "enabled": rules.enabled, "same_team_only": rules.same_team_only, "max_per_period": rules.max_per_period,
        "team_pools": rules.team_pools})
    if request.method == "POST" and form.is_valid():
        try:
            services.transfer_settings_save(organization=request.organization, actor=request.user, **form.cleaned_data)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, "Transfer rules saved.")
            return redirect(org_url(request, "transfer_settings"))
    return render(request, "allowances/transfer_settings.html", {"form": form},
                  status=400 if form.errors else 200)
