"""Report pages: value-per-token insights, benefit statements (own; HR's bulk export), the payroll
CSV, reconciliation and the report settings. Thin: selectors and services do the work."""

from datetime import timedelta

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from allowances.periods import period_start_for
from portal import selectors as portal_selectors
from portal.audit import log_action
from portal.forms import apply_service_error
from portal.tenancy import require_roles
from portal.views import org_url
from reports import documents, selectors, services
from reports.forms import NO_TEAM, InsightsFilterForm, PeriodForm, ReportSettingsForm
from reports.models import StatementExport

RECONCILIATION_DAYS = 31


def _download(data: bytes, filename: str, content_type: str) -> HttpResponse:
    response = HttpResponse(data, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@require_GET
def insights(request):
    """HR and admins: the organization or a team, never a ranking; one member only when the
    organization allows it (each view audited). Everyone else: their own figures."""
    organization, member = request.organization, request.member
    settings = selectors.report_settings(organization=organization)
    sees_teams = member.has_any_role({"hr", "admin"})
    members = (portal_selectors.member_list(organization=organization).order_by("user__email")
               if sees_teams and settings.per_member_views else [])
    form = InsightsFilterForm(request.GET or None, members=members,
                              teams=selectors.insight_teams(organization=organization) if sees_teams else [])
    if request.GET and not form.is_valid():
        return render(request, "reports/insights.html", {"form": form, "figures": None}, status=400)
    cleaned = form.cleaned_data if request.GET else {}
    today = timezone.localdate()
    since, until = (form.window(today) if request.GET else (today - timedelta(days=29), today))
    subject, team = member, None
    if sees_teams:
        subject, team = None, {"": None, NO_TEAM: ""}.get(cleaned.get("team", ""), cleaned.get("team"))
        if cleaned.get("member"):
            subject = next(m for m in members if m.pk == cleaned["member"])
            log_action(actor=request.user, organization=organization, action="reports.member_insights_viewed",
                       obj=subject)
    figures = selectors.insights(organization=organization, since=since, until=until, team=team, member=subject)
    return render(request, "reports/insights.html", {
        "form": form, "figures": figures, "subject": subject, "team": team, "sees_teams": sees_teams,
        "settings": settings})


@require_GET
def statements(request):
    """A member's own statements, by period, as PDF or CSV."""
    member = request.member
    periods = selectors.statement_periods(organization=request.organization, member=member)
    form = PeriodForm(request.GET or None)
    if request.GET:
        if not form.is_valid():
            return render(request, "reports/statements.html", {"form": form, "periods": periods}, status=400)
        period = form.cleaned_data["period"]
        item = selectors.statement(member=member, period_start=period)
        if item is None:
            raise Http404("You have no statement yet.")
        if request.GET.get("format") == "pdf":
            return _download(documents.statement_pdf(item, organization_name=request.organization.name),
                             documents.statement_filename(item, "pdf"), "application/pdf")
        if request.GET.get("format") == "csv":
            return _download(documents.statements_csv([item]), documents.statement_filename(item, "csv"),
                             "text/csv; charset=utf-8")
        return render(request, "reports/statements.html", {"form": form, "periods": periods, "statement": item})
    return render(request, "reports/statements.html", {"form": form, "periods": periods})


@require_roles("hr")
@require_http_methods(["GET", "POST"])
def statement_exports(request):
    organization = request.organization
    form = PeriodForm(request.POST or None, initial={"period": f"{period_start_for(organization):%Y-%m}"})
    if request.method == "POST" and form.is_valid():
        export, created = services.statement_export_create(organization=organization, actor=request.user,
                                                           period_start=form.cleaned_data["period"])
        if not created:
            messages.info(request, "That period's statements are already being exported.")
        return redirect(org_url(request, "statement_exports"))
    return render(request, "reports/exports.html", {
        "form": form, "exports": selectors.statement_exports(organization=organization)[:20]},
        status=400 if request.method == "POST" else 200)


@require_roles("hr")
@require_GET
def statement_export(request, statement_export_id):
    """One export: its progress row (what the exports page polls with htmx), or its files."""
    export = get_object_or_404(selectors.statement_exports(organization=request.organization),
                               pk=statement_export_id)
    wanted = request.GET.get("file")
    if wanted in ("csv", "zip"):
        if export.state != StatementExport.State.DONE:
            raise Http404("The export is not finished.")
        data = StatementExport.objects.filter(pk=export.pk).values_list(f"{wanted}_data", flat=True).get()
        name = f"statements-{export.period_start:%Y-%m}.{wanted}"
        return _download(bytes(data), name, "text/csv; charset=utf-8" if wanted == "csv" else "application/zip")
    return render(request, "reports/_export_row.html", {"export": export})


@require_roles("hr")
@require_GET
def payroll(request):
    """The period's payroll CSV (one row per member); the form when no period is asked for."""
    form = PeriodForm(request.GET or None, initial={"period": f"{period_start_for(request.organization):%Y-%m}"})
    if request.GET and form.is_valid():
        period = form.cleaned_data["period"]
        rows = selectors.payroll(organization=request.organization, period_start=period)
        return _download(documents.payroll_csv(rows, period), f"payroll-{period:%Y-%m}.csv", "text/csv; charset=utf-8")
    return render(request, "reports/payroll.html", {"form": form}, status=400 if request.GET else 200)


@require_roles("admin")
@require_GET
def reconciliation(request):
    since = timezone.now().date() - timedelta(days=RECONCILIATION_DAYS)
    return render(request, "reports/reconciliation.html", {
        "alerts": selectors.reconciliation_alerts(organization=request.organization, since=since),
        "lines": selectors.reconciliation_lines(organization=request.organization, since=since)})


@require_roles("admin")
@require_http_methods(["GET", "POST"])
def report_settings(request):
    organization = request.organization
    current = selectors.report_settings(organization=organization)
    form = ReportSettingsForm(request.POST or None, instance=current, organization=organization)
    if request.method == "POST" and form.is_valid():
        values = {name: form.cleaned_data[name] for name in services.SETTINGS_FIELDS}
        try:
            services.report_settings_update(organization=organization, actor=request.user, **values)
        except ValidationError as error:
            apply_service_error(form, error)
        else:
            messages.success(request, "Report settings saved.")
            return redirect(org_url(request, "report_settings"))
    return render(request, "reports/settings.html", {"form": form},
                  status=400 if request.method == "POST" else 200)
