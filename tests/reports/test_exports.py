"""HR's export of a period's statements: a real Celery worker makes the CSV and the ZIP of PDFs for
5,000 members, storing progress the page polls; the files hold every member's figures."""

import csv
import io
import zipfile

import pytest
from django.urls import reverse
from pypdf import PdfReader

from allowances.models import Account
from portal.tenancy import scope, unscoped
from reports import services
from reports.models import StatementExport
from tests.allowances.test_close_worker import (  # noqa: F401 (fixtures)
    MONTHLY,
    USAGE_STEP,
    broker,
    queue,
    result_of,
    seed_in_bulk,
    wait_until,
    workers,
)
from tests.reports.helpers import catalog

EXPORT = "reports.export_statements"
MEMBERS = 5_000


@pytest.mark.services
def test_a_worker_exports_5000_statements_with_progress(workers, broker, queue):  # noqa: F811
    seeded = seed_in_bulk("exports", MEMBERS)
    organization = seeded.organization
    with scope(organization):
        from gateway import services as gateway_services

        connection = gateway_services.provider_connection_create(
            organization=organization, actor=None, name="Sandbox", kind="sandbox", connect_timeout=5, read_timeout=60)
        mini, _big = catalog(organization, connection=connection, economy=("mini", "1.00", "4.00", "0.5"))
        services.report_settings_update(organization=organization, actor=None, valuation_model=mini)
        export = StatementExport.objects.create(organization=organization, period_start=seeded.closed)
    workers.start(queue)
    seen = set()

    def progress():
        with unscoped():
            row = StatementExport.objects.filter(pk=export.pk).values_list("state", "done", "total").get()
        seen.add(row)
        return row[0] in ("done", "failed")

    sent = broker.send_task(EXPORT, args=[export.pk], queue=queue)
    wait_until(progress, what="the export finished", pool=workers, interval=0.05)
    assert result_of(sent, workers) == MEMBERS
    with unscoped():
        export.refresh_from_db()
    assert export.state == "done" and (export.done, export.total) == (MEMBERS, MEMBERS)
    # Progress was stored on the way (the worker writes it every 250 members).
    assert any(state == "running" and 0 < done < MEMBERS and total == MEMBERS for state, done, total in seen), seen

    rows = list(csv.DictReader(io.StringIO(bytes(export.csv_data).decode())))
    assert len(rows) == MEMBERS
    with unscoped():  # what the seed used of each account (0 to 90,000 in steps of 10,000)
        used = dict(Account.all_objects.filter(organization=organization).values_list("member__user__email", "used"))
    assert set(used.values()) == {step * USAGE_STEP for step in range(10)}
    for row in rows:
        assert int(row["granted_tokens"]) == MONTHLY
        assert int(row["used_tokens"]) == -used[row["email"]]
        assert row["used_value"] == f"{-used[row['email']] / 1_000_000:.2f}"
    with zipfile.ZipFile(io.BytesIO(bytes(export.zip_data))) as bundle:
        names = bundle.namelist()
        assert len(names) == MEMBERS
        email = next(email for email, tokens in sorted(used.items()) if tokens == 6 * USAGE_STEP)
        sample = next(name for name in names if f"-{email.replace('@', '_')}." in name)
        text = PdfReader(io.BytesIO(bundle.read(sample))).pages[0].extract_text()
    assert email in text and f"{MONTHLY:,}" in text and "-60,000" in text

    # Done is done: running it again changes nothing.
    assert result_of(broker.send_task(EXPORT, args=[export.pk], queue=queue), workers) == MEMBERS


@pytest.mark.django_db
def test_the_exports_page_queues_one_export_per_period_and_polls_it(org_a, login, django_capture_on_commit_callbacks):
    client = login(org_a.members["hr"])
    url = reverse("statement_exports", kwargs={"org_slug": org_a.slug})
    with scope(org_a.organization):
        period = org_a.statement_export.period_start
        StatementExport.objects.filter(pk=org_a.statement_export.pk).update(state="done", total=1, done=1)
    with django_capture_on_commit_callbacks() as queued:
        assert client.post(url, {"period": f"{period:%Y-%m}"}).status_code == 302
        assert client.post(url, {"period": f"{period:%Y-%m}"}).status_code == 302  # found, not queued again
    assert len(queued) == 1
    with scope(org_a.organization):
        export = StatementExport.objects.exclude(pk=org_a.statement_export.pk).get()
    assert export.state == "queued"
    html = client.get(url).content.decode()
    assert f'hx-get="/o/{org_a.slug}/reports/statements/exports/{export.pk}/"' in html  # polled while running
    row = client.get(reverse("statement_export", kwargs={"org_slug": org_a.slug, "statement_export_id": export.pk}))
    assert row.status_code == 200 and 'hx-trigger="every 2s"' in row.content.decode()
    # The files of an unfinished export are not there yet.
    assert client.get(row.wsgi_request.path, {"file": "zip"}).status_code == 404
    # Run it in-process: then the row stops polling and links its files.
    services.statement_export_run(statement_export_id=export.pk)
    row = client.get(row.wsgi_request.path).content.decode()
    assert "hx-trigger" not in row and "?file=zip" in row
    archive = client.get(reverse("statement_export", kwargs={"org_slug": org_a.slug, "statement_export_id": export.pk}),
                         {"file": "zip"})
    assert archive.status_code == 200 and zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    assert client.post(url, {"period": "May 2026"}).status_code == 400
