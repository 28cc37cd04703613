"""Two real Celery worker processes settle the same period at once: one invoice, each team's line
charged once (the second waits for the first's lock, then finds the settlement paid)."""

import uuid

import pytest
from celery.result import allow_join_result

from billing.models import BillingAccount, Settlement
from portal.tenancy import unscoped
from tests.billing.conftest import EXPECTED, close, invoices_of, set_up_billing
from tests.support.celery_worker import WorkerPool, purge, sender_app, terminate_database_backends

pytestmark = pytest.mark.services
SETTLE = "billing.settle_period"


@pytest.fixture
def broker():
    app = sender_app()
    yield app
    app.close()


@pytest.fixture
def workers(transactional_db, broker, tmp_path):
    pool = WorkerPool(broker, tmp_path)
    yield pool
    pool.stop_all()
    terminate_database_backends()


def test_two_workers_settling_the_same_period_at_once_charge_once(billed, stripe_server, broker, workers,
                                                                   monkeypatch, settings):
    set_up_billing(billed)
    settings.STRIPE_SECRET_KEY = ""  # the close here records the settlement, the workers charge it
    close(billed)
    with unscoped():
        settlement = Settlement.all_objects.get(organization=billed.organization, period_start=billed.period)
    assert settlement.status == Settlement.Status.PENDING and not settlement.stripe_invoice_id
    for name, value in {"STRIPE_SECRET_KEY": "sk_test_portal", "STRIPE_API_BASE": stripe_server.base}.items():
        monkeypatch.setenv(name, value)
    queue = f"settle-test-{uuid.uuid4().hex[:10]}"
    purge(broker, queue)
    for _ in range(2):
        workers.start(queue)
    results = [broker.send_task(SETTLE, args=[billed.organization.pk, billed.period.isoformat()], queue=queue)
               for _ in range(4)]
    # The test process is no worker: earlier eager tasks run by threads at once (a live server's)
    # can leave Celery's process-wide "inside a task" flag set, which would refuse these waits.
    with allow_join_result():
        outcomes = [result.get(timeout=120) for result in results]
    assert outcomes == ["paid"] * 4, workers.describe()
    with unscoped():
        settlement.refresh_from_db()
        customer = BillingAccount.all_objects.get(organization=billed.organization).stripe_customer_id
    [invoice] = invoices_of(stripe_server, customer, settlement.reference)
    assert invoice.status == "paid" and invoice.total == sum(EXPECTED.values())
    assert sorted(line.amount for line in invoice.lines.data if line.amount) == sorted(EXPECTED.values())
    assert settlement.stripe_invoice_id == invoice.id
    purge(broker, queue)
