"""Writes of the reports: settings (audited), bulk statement exports, reconciliation runs."""

from __future__ import annotations

import io
import logging
import zipfile
from datetime import UTC, date, timedelta
from decimal import Decimal

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from allowances.models import CatalogModel
from gateway.models import ProviderConnection
from portal.audit import log_action
from portal.models import Member, Organization
from portal.tenancy import scope, unscoped
from reports import documents, reconciliation, selectors
from reports.models import ReconciliationAlert, ReconciliationLine, ReportSettings, StatementExport

logger = logging.getLogger(__name__)

SETTINGS_FIELDS = ("per_member_views", "small_prompt_tokens", "small_reply_tokens", "economy_model",
                   "valuation_model", "reconciliation_tolerance_percent", "reconciliation_tolerance_tokens")
ROLLUP_AGAIN_DAYS = 31  # the insights page's window: redone when the thresholds change
PROGRESS_EVERY = 250  # members between progress writes of an export
RECONCILED_DAYS = 3  # each daily run redoes the last UTC days (providers report late)


def report_settings_update(*, organization: Organization, actor, **values) -> ReportSettings:
    """Change the organization's report settings; every change is audited. New size thresholds
    roll the last 31 days up again (queued on commit)."""
    unknown = set(values) - set(SETTINGS_FIELDS)
    if unknown:
        raise ValueError(f"unknown report settings {sorted(unknown)}")
    for name in ("economy_model", "valuation_model"):
        model = values.get(name)
        if model is not None and (not isinstance(model, CatalogModel) or model.organization_id != organization.pk):
            raise ValidationError({name: "Choose a model of this organization's catalog."})
    with transaction.atomic():
        row, _ = ReportSettings.objects.select_for_update().get_or_create(organization=organization)
        changed = {}
        for name, value in values.items():
            before = getattr(row, name)
            if before != value:
                changed[name] = {"from": getattr(before, "model_id", before), "to": getattr(value, "model_id", value)}
                setattr(row, name, value)
        if not changed:
            return row
        row.updated_at = timezone.now()
        row.full_clean(exclude=["organization"])
        row.save()
        log_action(actor=actor, organization=organization, action="reports.settings_changed", obj=row, data=changed)
        if {"small_prompt_tokens", "small_reply_tokens"} & set(changed):
            from reports.tasks import rollup_again

            transaction.on_commit(lambda: rollup_again.delay(organization.pk, ROLLUP_AGAIN_DAYS))
    return row


# -- benefit statements --------------------------------------------------------------------------


def statement_export_create(*, organization: Organization, actor, period_start: date) -> tuple[StatementExport, bool]:
    """Queue the export of a period's statements (one running per period: asking again while one
    is queued or running finds it)."""
    with transaction.atomic():
        # Serializes the check below between HR members asking at once.
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        running = StatementExport.objects.filter(
            organization=organization, period_start=period_start,
            state__in=[StatementExport.State.QUEUED, StatementExport.State.RUNNING]).first()
        if running is not None:
            return running, False
        export = StatementExport.objects.create(organization=organization, period_start=period_start,
                                                requested_by=actor)
        log_action(actor=actor, organization=organization, action="reports.statements_exported", obj=export,
                   data={"period": f"{period_start:%Y-%m}"})
        from reports.tasks import export_statements

        transaction.on_commit(lambda: export_statements.delay(export.pk))
    return export, True


def statement_export_run(*, statement_export_id: int) -> StatementExport:
    """Make the export's CSV and ZIP of PDFs, storing progress as it goes; a rerun of one that is
    done changes nothing, a rerun of one that died part way starts it again."""
    with unscoped():
        export = StatementExport.objects.select_related("organization").get(pk=statement_export_id)
    organization = export.organization
    with scope(organization):
        if export.state == StatementExport.State.DONE:
            return export
        try:
            items = selectors.statements(organization=organization, period_start=export.period_start)
            StatementExport.objects.filter(pk=export.pk).update(state=StatementExport.State.RUNNING,
                                                                total=len(items), done=0)
            archive = io.BytesIO()
            # Stored, not deflated: the PDFs are compressed already.
            with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
                for index, item in enumerate(items, 1):
                    bundle.writestr(documents.statement_filename(item, "pdf"),
                                    documents.statement_pdf(item, organization_name=organization.name))
                    if index % PROGRESS_EVERY == 0:
                        StatementExport.objects.filter(pk=export.pk).update(done=index)
            StatementExport.objects.filter(pk=export.pk).update(
                state=StatementExport.State.DONE, done=len(items), csv_data=documents.statements_csv(items),
                zip_data=archive.getvalue(), finished_at=timezone.now())
        except Exception as error:
            logger.exception("statement export %s failed", export.pk)
            StatementExport.objects.filter(pk=export.pk).update(
                state=StatementExport.State.FAILED, error=f"{type(error).__name__}: {error}"[:300],
                finished_at=timezone.now())
            raise
        export.refresh_from_db()
    return export


# -- reconciliation ------------------------------------------------------------------------------


def _differs(provider: int, portal: int, settings: ReportSettings) -> bool:
    difference = abs(provider - portal)
    share = Decimal(difference) * 100 / Decimal(max(provider, portal, 1))
    return difference > settings.reconciliation_tolerance_tokens and share > settings.reconciliation_tolerance_percent


def _findings(*, day, model, provider, portal, catalog: CatalogModel | None, settings) -> list[tuple[str, str]]:
    """The alerts of one day and model: (kind, detail)."""
    Kind = ReconciliationAlert.Kind
    priced = catalog is not None and any((catalog.input_price_per_million, catalog.output_price_per_million))
    if not priced:
        what = "no catalog model" if catalog is None else f"catalog model {catalog.model_id} has no price"
        return [(Kind.UNPRICED, f"{model} on {day}: usage of a model without a catalog price ({what}).")]
    found = []
    portal_tokens = (portal.input_tokens + portal.output_tokens + portal.cached_tokens) if portal else 0
    if provider is None:
        if portal_tokens:
            found.append((Kind.MISSING_AT_PROVIDER, f"{model} on {day}: the portal recorded {portal_tokens:,} tokens; "
                                                   "the provider's report has none."))
    else:
        provider_tokens = provider.input_tokens + provider.output_tokens + provider.cached_tokens
        if portal is None and provider_tokens:
            found.append((Kind.MISSING_IN_PORTAL, f"{model} on {day}: the provider reports {provider_tokens:,} tokens; "
                                                 "the portal recorded none."))
        elif portal is not None and _differs(provider_tokens, portal_tokens, settings):
            found.append((Kind.DIFFERS, f"{model} on {day}: the provider reports {provider_tokens:,} tokens, the "
                                       f"portal recorded {portal_tokens:,}."))
    if portal is not None and portal.zero_records:
        found.append((Kind.ZERO_COST, f"{model} on {day}: {portal.zero_records:,} successful requests recorded at "
                                     "zero tokens or zero cost."))
    return found


def reconcile_connection(*, connection: ProviderConnection, today: date | None = None,
                         days: int = RECONCILED_DAYS) -> list[ReconciliationAlert]:
    """Compare the connection's report of the last `days` whole UTC days with the portal's records;
    rewrite the lines, and raise each alert once (returns the new ones, emailed to the admins)."""
    organization = connection.organization
    today = today or timezone.now().astimezone(UTC).date()
    start, end = today - timedelta(days=days), today
    settings = selectors.report_settings(organization=organization)
    catalog = list(CatalogModel.objects.filter(organization=organization, connection=connection))
    provider_models = {model.model_id: model.provider_model for model in catalog}
    by_provider_model = {model.provider_model: model for model in catalog}
    reported = reconciliation.provider_usage(connection, start=start, end=end)
    recorded = reconciliation.portal_usage(connection=connection, provider_models=provider_models, start=start,
                                           end=end)
    created = []
    with transaction.atomic():
        ReconciliationLine.objects.filter(connection=connection, day__gte=start, day__lt=end).delete()
        lines = []
        for day, model in sorted(set(reported) | set(recorded)):
            provider, portal = reported.get((day, model)), recorded.get((day, model))
            lines.append(ReconciliationLine(
                organization=organization, connection=connection, day=day, model=model,
                provider_requests=provider.requests if provider else None,
                provider_input_tokens=provider.input_tokens if provider else None,
                provider_output_tokens=provider.output_tokens if provider else None,
                provider_cached_tokens=provider.cached_tokens if provider else None,
                portal_requests=portal.requests if portal else 0, portal_input_tokens=portal.input_tokens if portal else 0,
                portal_output_tokens=portal.output_tokens if portal else 0,
                portal_cached_tokens=portal.cached_tokens if portal else 0,
                portal_cost=portal.cost if portal else 0))
            for kind, detail in _findings(day=day, model=model, provider=provider, portal=portal,
                                          catalog=by_provider_model.get(model), settings=settings):
                try:
                    with transaction.atomic():
                        created.append(ReconciliationAlert.objects.create(
                            organization=organization, connection=connection, day=day, model=model, kind=kind,
                            detail=detail))
                except IntegrityError:
                    pass  # raised by an earlier run: once per connection, day, model and kind
        ReconciliationLine.objects.bulk_create(lines)
        if created:
            transaction.on_commit(lambda: _email_admins(organization, connection, created))
    return created


def _email_admins(organization: Organization, connection: ProviderConnection, alerts) -> None:
    with scope(organization):
        recipients = list(Member.objects.filter(organization=organization, is_active=True)
                          .filter(Q(is_admin=True) | Q(is_owner=True)).values_list("user__email", flat=True))
    if not recipients:
        return
    lines = "\n".join(f"- {alert.get_kind_display()}: {alert.detail}" for alert in alerts)
    send_mail(subject=f"[{organization.name}] Usage of {connection.name} does not match the provider's report",
              message=f"The daily reconciliation of {connection.name} found:\n\n{lines}\n\nDetails: "
                      f"{django_settings.PORTAL_BASE_URL}/o/{organization.slug}/reports/reconciliation/",
              from_email=None, recipient_list=recipients)


def reconcile_all(*, today: date | None = None) -> int:
    """Every active OpenAI and Anthropic connection of every organization; returns new alerts.
    A connection whose report cannot be read is logged and left for the next run."""
    with unscoped():
        connections = list(ProviderConnection.objects.filter(is_active=True, kind__in=reconciliation.RECONCILED_KINDS)
                           .select_related("organization").order_by("pk"))
    raised = 0
    for connection in connections:
        with scope(connection.organization):
            try:
                raised += len(reconcile_connection(connection=connection, today=today))
            except reconciliation.ReportUnavailable as error:
                logger.warning("reconciliation of connection %s: %s", connection.pk, error)
    return raised
