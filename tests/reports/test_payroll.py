"""The payroll / HRIS export: a CSV per period with a row per member, and the same rows in the API."""

import csv
import io
from decimal import Decimal

import pytest
from django.urls import reverse

from allowances import ledger
from allowances import services as allowance_services
from allowances.models import Account
from apikeys import services as api_key_services
from identity.models import DirectoryEntry
from portal.models import Team
from portal.tenancy import scope
from reports import services
from tests.reports.helpers import catalog

pytestmark = pytest.mark.django_db


@pytest.fixture
def payroll_org(org_a):
    """Org A's employee (externalId E-100 from the directory, team cost centre CC-7): 5,000 (the
    fixture's grant) + 20,000 granted, an approved overage of 10,000, 12,000 used; HR has 1,000
    granted and nothing used, the owner 500,000. Valued at 4.00 per million (input price 4.00,
    multiplier 1)."""
    organization = org_a.organization
    employee, hr = org_a.members["employee"], org_a.members["hr"]
    with scope(organization):
        Team.objects.filter(pk=org_a.team.pk).update(cost_centre="CC-7")
        DirectoryEntry.objects.create(organization=organization, member=employee, external_id="E-100")
        _mini, big = catalog(organization, connection=org_a.provider_connection, premium=("big", "4.00", "8.00", "1"))
        services.report_settings_update(organization=organization, actor=None, valuation_model=big)
        allowance_services.grant_create(organization=organization, actor=None, tokens=20_000, reason="x", member=employee)
        account = Account.objects.get(member=employee)
        ledger.post(account=account, kind=ledger.Kind.OVERAGE_GRANT, tokens=10_000, idempotency_key="overage:1")
        hold = ledger.authorize(account=account, tokens=12_000, idempotency_key="payroll-use")
        ledger.settle(hold=hold, used_tokens=12_000)
        allowance_services.account_open(member=hr)
        allowance_services.grant_create(organization=organization, actor=None, tokens=1_000, reason="x", member=hr)
        # The owner has the most tokens and comes last: rows go by email, never by tokens.
        owner = org_a.members["owner"]
        allowance_services.account_open(member=owner)
        allowance_services.grant_create(organization=organization, actor=None, tokens=500_000, reason="x",
                                        member=owner)
    org_a.period = f"{account.period_start:%Y-%m}"
    return org_a


EXPECTED = [
    # employee id, email, cost centre, team, granted, used, value granted, value used, currency
    ["E-100", "employee@a.example", "CC-7", "Team a", "35000", "12000", "0.14", "0.05", "USD"],
    ["hr@a.example", "hr@a.example", "CC-7", "Team a", "1000", "0", "0.00", "0.00", "USD"],
    ["owner@a.example", "owner@a.example", "CC-7", "Team a", "500000", "0", "2.00", "0.00", "USD"],
]


def test_the_payroll_csv_has_a_row_per_member(payroll_org, login):
    response = login(payroll_org.members["hr"]).get(reverse("payroll", kwargs={"org_slug": payroll_org.slug}),
                                                    {"period": payroll_org.period})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == ["period", "employee_id", "email", "cost_centre", "team", "tokens_granted", "tokens_used",
                       "value_granted", "value_used", "currency"]
    # Value: 35,000 * 4.00 / 1M = 0.14; 12,000 * 4.00 / 1M = 0.048 -> 0.05. Rows by email, never by tokens.
    assert [row[1:] for row in rows[1:]] == EXPECTED
    assert {row[0] for row in rows[1:]} == {payroll_org.period}


def test_a_bad_period_is_a_field_error(payroll_org, login):
    response = login(payroll_org.members["hr"]).get(reverse("payroll", kwargs={"org_slug": payroll_org.slug}),
                                                    {"period": "2026-00"})
    assert response.status_code == 400 and "Enter a month as YYYY-MM" in response.content.decode()


def test_the_api_answers_the_same_rows(payroll_org, client):
    hr = payroll_org.members["hr"]
    with scope(payroll_org.organization):
        _key, secret = api_key_services.api_key_create(member=hr, actor=hr.user, name="hris", endpoints=["usage_read"])
    url = f"/api/v1/o/{payroll_org.slug}/payroll/"
    response = client.get(url, {"period": payroll_org.period}, HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200
    assert [[row[name] for name in ("employee_id", "email", "cost_centre", "team")]
            + [str(row["tokens_granted"]), str(row["tokens_used"]), row["value_granted"], row["value_used"],
               row["currency"]] for row in response.json()] == EXPECTED
    for bad in ({}, {"period": "2026-13"}, {"period": "12345678"}):
        response = client.get(url, bad, HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert response.status_code == 400 and "period" in response.json()


def test_only_hr_reads_the_payroll(payroll_org, client):
    employee = payroll_org.members["employee"]
    with scope(payroll_org.organization):
        _key, secret = api_key_services.api_key_create(member=employee, actor=employee.user, name="mine",
                                                       endpoints=["usage_read"])
    response = client.get(f"/api/v1/o/{payroll_org.slug}/payroll/", {"period": payroll_org.period},
                          HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 403


def test_the_schema_states_the_payroll_rows(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    operation = schema["paths"]["/api/v1/o/{org_slug}/payroll/"]["get"]
    period = next(p for p in operation["parameters"] if p["name"] == "period")
    assert period["required"] is True and period["schema"]["pattern"]
    assert set(schema["components"]["schemas"]["PayrollRow"]["properties"]) >= {
        "employee_id", "cost_centre", "tokens_granted", "tokens_used", "value_granted", "value_used", "currency"}


def test_values_in_yen_have_no_minor_unit(payroll_org):
    from portal.models import Organization
    from portal.tenancy import unscoped
    from reports import selectors

    with unscoped():
        Organization.objects.filter(pk=payroll_org.organization.pk).update(currency="JPY")
    payroll_org.organization.refresh_from_db()
    with scope(payroll_org.organization):
        rows = selectors.payroll(organization=payroll_org.organization,
                                 period_start=Account.objects.get(member=payroll_org.members["hr"]).period_start)
    assert rows[0].value_granted == Decimal("0") and str(rows[0].value_granted) == "0"
