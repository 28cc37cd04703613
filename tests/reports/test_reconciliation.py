"""Reconciliation against a provider's own usage report (a fake OpenAI / Anthropic usage endpoint on
loopback, reached through the gateway's address-checked client): matching reports raise nothing; a
missing day, an over-report, an unpriced model and zero-cost usage each raise one alert naming the
day and model; a rerun changes nothing."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.urls import reverse

from gateway import services as gateway_services
from gateway.models import ProviderConnection
from portal.tenancy import scope, unscoped
from reports import reconciliation, services
from reports.models import ReconciliationAlert, ReconciliationLine
from tests.reports.helpers import catalog, record
from tests.support.fake_upstream import ServerThread
from tests.support.fake_usage import FakeUsageReports

pytestmark = pytest.mark.transactional

TODAY = datetime.now(UTC).date()  # the page shows the last 31 days
DAYS = [TODAY - timedelta(days=back) for back in (3, 2, 1)]  # the three whole UTC days a run checks
K = 1000


@pytest.fixture
def provider():
    reports = FakeUsageReports()
    with ServerThread(reports.app) as server:
        reports.url = server.url
        yield reports


@pytest.fixture(params=["openai", "anthropic"])
def setup(request, org_a, provider, settings):
    """Org A with an OpenAI (or Anthropic) connection to the fake provider, whose catalog models are
    "mini" (served as provider model "mini-2026") and "big"; the portal recorded the same usage as
    the provider reports on each of the three days. Internal addresses are refused except loopback's
    network, allowed as for a self-hosted server: the reports go through the gateway's address rule."""
    settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS = True
    settings.GATEWAY_PROVIDER_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    organization = org_a.organization
    with scope(organization):
        connection = gateway_services.provider_connection_create(
            organization=organization, actor=None, name="Upstream", kind=request.param,
            base_url=provider.url + "/v1", secret="sk-admin-test", connect_timeout=5, read_timeout=10)
        mini, big = catalog(organization, connection=connection)
        mini.upstream_model = "mini-2026"
        mini.save()
    member = org_a.members["employee"]
    for day in DAYS:
        at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        record(organization, member, at, model="mini", input_tokens=40 * K, output_tokens=10 * K, cached_tokens=8 * K,
               cost="0.0136")
        record(organization, member, at, model="mini", input_tokens=20 * K, output_tokens=2 * K, cost="0.0042")
        record(organization, member, at, model="big", input_tokens=100 * K, output_tokens=30 * K, cost="0.55")
        provider.usage[(day, "mini-2026")] = (2, 60 * K, 12 * K, 8 * K)
        provider.usage[(day, "big")] = (1, 100 * K, 30 * K, 0)
    org_a.connection, org_a.member, org_a.kind = connection, member, request.param
    return org_a


def run(org):
    with scope(org.organization):
        return services.reconcile_connection(connection=ProviderConnection.objects.get(pk=org.connection.pk),
                                             today=TODAY)


def alerts(org):
    with unscoped():
        return sorted(ReconciliationAlert.all_objects.filter(organization=org.organization)
                      .values_list("day", "model", "kind"))


def test_matching_reports_raise_nothing(setup, provider):
    assert run(setup) == []
    assert alerts(setup) == []
    with unscoped():
        lines = ReconciliationLine.all_objects.filter(organization=setup.organization)
        assert lines.count() == 6
        line = lines.get(day=DAYS[0], model="mini-2026")
    assert (line.provider_tokens, line.portal_tokens, line.portal_requests) == (80 * K, 80 * K, 2)
    # Each page was asked for with the connection's secret, by UTC day.
    sent = provider.requests[0]
    assert (sent.headers.get("authorization") == "Bearer sk-admin-test" if setup.kind == "openai"
            else sent.headers.get("x-api-key") == "sk-admin-test")
    assert len(provider.requests) == 3  # one page per day


def test_a_day_missing_from_the_report_raises_one_alert(setup, provider):
    del provider.usage[(DAYS[1], "big")]
    assert [(a.day, a.model, a.kind) for a in run(setup)] == [(DAYS[1], "big", "missing_at_provider")]


def test_an_over_report_raises_one_alert(setup, provider):
    requests, uncached, output, cached = provider.usage[(DAYS[2], "mini-2026")]
    provider.usage[(DAYS[2], "mini-2026")] = (requests, uncached + 5 * K, output, cached)  # 5k more: 6.25%
    created = run(setup)
    assert [(a.day, a.model, a.kind) for a in created] == [(DAYS[2], "mini-2026", "differs")]
    assert "85,000" in created[0].detail and "80,000" in created[0].detail


def test_a_difference_within_the_tolerance_raises_nothing(setup, provider):
    requests, uncached, output, cached = provider.usage[(DAYS[2], "mini-2026")]
    provider.usage[(DAYS[2], "mini-2026")] = (requests, uncached + 500, output, cached)  # under 1,000 tokens
    assert run(setup) == []


def test_usage_of_a_model_without_a_catalog_price_raises_one_alert(setup, provider):
    provider.usage[(DAYS[0], "gpt-unknown")] = (4, 10 * K, K, 0)
    assert [(a.day, a.model, a.kind) for a in run(setup)] == [(DAYS[0], "gpt-unknown", "unpriced")]


def test_usage_recorded_at_zero_cost_raises_one_alert(setup, provider):
    at = datetime(DAYS[1].year, DAYS[1].month, DAYS[1].day, 13, tzinfo=UTC)
    record(setup.organization, setup.member, at, model="big", input_tokens=0, output_tokens=0, cost="0")
    requests, *tokens = provider.usage[(DAYS[1], "big")]
    provider.usage[(DAYS[1], "big")] = (requests + 1, *tokens)
    created = run(setup)
    assert [(a.day, a.model, a.kind) for a in created] == [(DAYS[1], "big", "zero_cost")]
    assert "1 successful requests" in created[0].detail


def test_the_job_is_idempotent_and_alerts_admins_once(setup, provider):
    del provider.usage[(DAYS[1], "big")]
    provider.usage[(DAYS[0], "gpt-unknown")] = (4, 10 * K, K, 0)
    first = run(setup)
    assert len(first) == 2 and len(mail.outbox) == 1
    assert set(mail.outbox[0].to) == {"owner@a.example", "admin@a.example"}
    assert "gpt-unknown" in mail.outbox[0].body and str(DAYS[1]) in mail.outbox[0].body
    with unscoped():
        lines = sorted(ReconciliationLine.all_objects.filter(organization=setup.organization)
                       .values_list("day", "model", "provider_input_tokens", "portal_input_tokens"))
    before = alerts(setup)
    assert run(setup) == []
    assert alerts(setup) == before and len(mail.outbox) == 1
    with unscoped():
        assert sorted(ReconciliationLine.all_objects.filter(organization=setup.organization)
                      .values_list("day", "model", "provider_input_tokens", "portal_input_tokens")) == lines


def test_the_page_shows_the_days_and_models_that_differ(setup, provider, client):
    del provider.usage[(DAYS[1], "big")]
    run(setup)
    client.force_login(setup.members["admin"].user, backend="django.contrib.auth.backends.ModelBackend")
    html = client.get(reverse("reconciliation", kwargs={"org_slug": setup.slug})).content.decode()
    assert 'data-kind="missing_at_provider"' in html and str(DAYS[1]) in html and "big" in html


@pytest.mark.parametrize("kind", ["openai"])
def test_a_provider_on_a_refused_address_is_not_asked(org_a, provider, settings, kind):
    """Without the allowance for its network, the report is not fetched (nothing is sent there)."""
    organization = org_a.organization
    with scope(organization):
        connection = gateway_services.provider_connection_create(
            organization=organization, actor=None, name="Upstream", kind=kind, base_url=provider.url + "/v1",
            secret="sk-admin-test", connect_timeout=5, read_timeout=10)
    settings.GATEWAY_REFUSE_PRIVATE_PROVIDERS = True
    settings.GATEWAY_PROVIDER_ALLOWED_NETWORKS = []
    with scope(organization), pytest.raises(reconciliation.ReportUnavailable, match="internal network address"):
        services.reconcile_connection(connection=connection, today=TODAY)
    assert provider.requests == []
    assert services.reconcile_all(today=TODAY) == 0  # logged and left for the next run


def test_a_failing_provider_or_a_malformed_report_is_unavailable_not_a_crash(setup, provider):
    provider.fail_status = 500
    with pytest.raises(reconciliation.ReportUnavailable, match="answered 500"):
        run(setup)
    with pytest.raises(reconciliation.ReportUnavailable, match="not a whole number"):
        reconciliation.parse_report("openai", [{"data": [{"start_time": 0, "results": [
            {"model": "x", "input_tokens": "12"}]}]}])
    with pytest.raises(reconciliation.ReportUnavailable):
        reconciliation.parse_report("anthropic", [{"data": [{"starting_at": "yesterday", "results": []}]}])


def test_the_daily_job_is_scheduled():
    from django.conf import settings as django_settings

    assert django_settings.CELERY_BEAT_SCHEDULE["reconcile-providers"]["task"] == "reports.reconcile_providers"
