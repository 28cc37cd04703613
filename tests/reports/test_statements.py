"""Benefit statements: each line is the sum of the member's ledger entries of the period of its
kinds, whatever a month of activity holds (a property test through the ledger and the period
close); the PDF and CSV carry the figures; members download their own only."""

import csv
import io
from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.db import transaction
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from allowances import closing, ledger
from allowances import services as allowance_services
from allowances.models import Account, LedgerEntry
from allowances.periods import period_bounds, period_start_for, periods_after
from portal.tenancy import scope
from reports import documents, selectors, services
from tests.factories import MemberFactory, OrganizationFactory, TeamFactory
from tests.reports.helpers import catalog

pytestmark = pytest.mark.django_db


def test_every_ledger_kind_is_on_a_statement_line_or_moves_no_balance():
    """A new entry kind fails here until it is given its line in STATEMENT_LINES."""
    assert set(LedgerEntry.Kind.values) <= set(selectors.STATEMENT_LINES)
    for kind, line in selectors.STATEMENT_LINES.items():
        if line is None and kind in LedgerEntry.Kind.values and kind != LedgerEntry.Kind.CLOSE:
            assert ledger.MOVES[kind][0] == ledger.MOVES[kind][2] == 0, f"{kind} moves the balance"
    # A close entry is on the lines of its parts, each of them.
    assert set(selectors.CLOSE_PART_LINES) == set(LedgerEntry.PARTS)
    assert set(selectors.CLOSE_PART_LINES.values()) <= set(selectors.LINE_LABELS)


# -- the property --------------------------------------------------------------------------------

OPERATION = st.one_of(
    st.tuples(st.just("bonus"), st.integers(1, 500_000)),
    st.tuples(st.just("use"), st.integers(1, 400_000), st.integers(0, 400_000)),  # held, then used (at most the hold)
    st.tuples(st.just("release"), st.integers(1, 300_000)),
    st.tuples(st.just("adjust"), st.integers(-200_000, 200_000).filter(bool)),
    st.tuples(st.just("overage"), st.integers(1, 300_000)),
    st.tuples(st.just("leave_open"), st.integers(1, 50_000)),  # a hold still open when the month closes
)
MONTHS = st.lists(st.lists(OPERATION, max_size=8), min_size=1, max_size=3)
ROLLOVER = st.sampled_from([{"rollover_rule": "none"}, {"rollover_rule": "all", "rollover_lifetime_periods": 2},
                            {"rollover_rule": "capped_tokens", "rollover_cap_tokens": 150_000}])


def _apply(account, operation, counter):
    kind, *args = operation
    key = f"op-{counter}"
    if kind == "bonus":
        allowance_services.grant_create(organization=account.organization, actor=None, tokens=args[0], reason="bonus",
                                        member=account.member)
        return {"granted": args[0]}
    if kind == "overage":
        ledger.post(account=account, kind=ledger.Kind.OVERAGE_GRANT, tokens=args[0], idempotency_key=key)
        return {"overage_approved": args[0]}
    if kind == "adjust":
        try:
            ledger.post(account=account, kind=ledger.Kind.ADJUSTMENT, tokens=args[0], granted_delta=args[0],
                        idempotency_key=key, guard="zero" if args[0] < 0 else None)
        except ledger.InsufficientTokens:
            return {}
        return {"adjusted": args[0]}
    try:
        hold = ledger.authorize(account=account, tokens=args[0], idempotency_key=key)
    except ledger.InsufficientTokens:
        return {}
    if kind == "use":
        used = min(args[1], args[0])
        ledger.settle(hold=hold, used_tokens=used)
        return {"used": -used}
    if kind == "release":
        ledger.release(hold=hold)
    return {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(months=MONTHS, rollover=ROLLOVER, monthly=st.integers(0, 1_000_000))
def test_a_statement_adds_up_to_the_members_ledger_for_the_period(months, rollover, monthly):
    organization = OrganizationFactory(currency="EUR", time_zone="Europe/Berlin")
    try:
        with transaction.atomic(), scope(organization):
            _check_months(organization, months, rollover, monthly)
            raise _RollBack
    except _RollBack:
        pass


class _RollBack(Exception):
    pass


def _check_months(organization, months, rollover, monthly):
    from gateway import services as gateway_services

    connection = gateway_services.provider_connection_create(organization=organization, actor=None, name="Sandbox",
                                                             kind="sandbox", connect_timeout=5, read_timeout=60)
    mini, _big = catalog(organization, connection=connection, economy=("mini", "3.00", "12.00", "1.50"))
    CatalogModelRate = Decimal("3.00") / Decimal("1")  # input price over its multiplier, per million
    team = TeamFactory(organization=organization)
    first = periods_after(period_start_for(organization), -len(months))
    begin = period_bounds(organization, first)[0]
    member = MemberFactory(organization=organization, team=team, joined_at=begin - timedelta(days=40))
    policy = allowance_services.policy_create(organization=organization, actor=None, name="P", monthly_tokens=monthly,
                                              **rollover)
    allowance_services.policy_assign(organization=organization, actor=None, policy=policy, team=team,
                                     immediately=True, at=begin - timedelta(days=40))
    account = allowance_services.account_open(member=member, at=begin)
    services.report_settings_update(organization=organization, actor=None, valuation_model=mini)
    expected = {}  # period -> line -> tokens the operations themselves put there
    counter = 0
    for operations in months:
        period = Account.objects.get(pk=account.pk).period_start
        lines = expected.setdefault(period, {})
        for operation in operations:
            counter += 1
            for line, tokens in _apply(Account.objects.get(pk=account.pk), operation, counter).items():
                lines[line] = lines.get(line, 0) + tokens
        closing.close_period(organization=organization, period=period)
    stored = Account.objects.get(pk=account.pk)
    total = 0
    for period in selectors.statement_periods(organization=organization, member=member):
        statement = selectors.statement(member=member, period_start=period)
        entries = LedgerEntry.objects.filter(account=account, period_start=period).exclude(kind=LedgerEntry.Kind.CLOSE)
        # The close of the period (its closing parts) and the one before (its opening parts).
        closes = {e.period_start: e for e in LedgerEntry.objects.filter(account=account, kind=LedgerEntry.Kind.CLOSE)}
        closing_parts, opening_parts = closes.get(period), closes.get(periods_after(period, -1))
        for item in statement.lines:
            kinds = [kind for kind, line in selectors.STATEMENT_LINES.items() if line == item.line]
            parts = [part for part, line in selectors.CLOSE_PART_LINES.items() if line == item.line]
            from_parts = sum(LedgerEntry.CLOSING_PARTS.get(part, 0) * getattr(closing_parts, part, 0)
                             + LedgerEntry.OPENING_PARTS.get(part, 0) * getattr(opening_parts, part, 0)
                             for part in parts)
            assert item.tokens == sum(e.granted_delta - e.used_delta for e in entries if e.kind in kinds) + from_parts, \
                item.line
            assert item.value == (Decimal(item.tokens) * CatalogModelRate / 1_000_000).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP)
        # The period's own entries, its close's closing parts and the last close's opening parts.
        closing_net = sum(sign * getattr(closing_parts, part, 0) for part, sign in LedgerEntry.CLOSING_PARTS.items())
        opening_net = sum(sign * getattr(opening_parts, part, 0) for part, sign in LedgerEntry.OPENING_PARTS.items())
        assert statement.net_tokens == sum(e.granted_delta - e.used_delta for e in entries) + closing_net + opening_net
        # What the operations did shows on their lines (the monthly grant is granted too).
        own = expected.get(period, {})
        monthly_grant = sum(e.tokens for e in entries if e.kind == "grant") + getattr(opening_parts, "close_granted", 0)
        assert statement.tokens("granted") == own.get("granted", 0) + monthly_grant
        for line in ("used", "adjusted", "overage_approved"):
            assert statement.tokens(line) == own.get(line, 0), line
        assert statement.tokens("transferred") == 0
        total += statement.net_tokens
    # Over all periods the statements add up to the account's balance.
    assert total == stored.granted - stored.used


# -- one member's statement and its files --------------------------------------------------------


@pytest.fixture
def statement_of(org_a):
    """Org A's employee this month: the fixture's grant of 5,000 and one of 100,000, 40,000 used,
    valued at 2.50 per million input tokens of a model counting input 1.25x: 2.00 per million
    allowance tokens."""
    organization = org_a.organization
    with scope(organization):
        _mini, big = catalog(organization, connection=org_a.provider_connection,
                             premium=("big", "2.50", "10.00", "1.25"))
        big.input_multiplier = Decimal("1.25")
        big.save()
        services.report_settings_update(organization=organization, actor=None, valuation_model=big)
        allowance_services.grant_create(organization=organization, actor=None, tokens=100_000, reason="project",
                                        member=org_a.members["employee"])
        account = Account.objects.get(member=org_a.members["employee"])
        hold = ledger.authorize(account=account, tokens=50_000, idempotency_key="statement-use")
        ledger.settle(hold=hold, used_tokens=40_000, model="big")
        item = selectors.statement(member=org_a.members["employee"], period_start=account.period_start)
    return item


def test_the_statement_of_a_member(statement_of):
    item = statement_of
    granted = item.tokens("granted")
    assert granted == 105_000
    assert item.value("granted") == Decimal("0.21")  # 105,000 * 2.00 / 1M
    assert item.tokens("used") == -40_000
    assert item.value("used") == Decimal("-0.08")  # 40,000 * 2.00 / 1M
    assert item.net_tokens == granted - 40_000


def test_the_pdf_shows_the_figures(statement_of, org_a):
    item = statement_of
    pdf = documents.statement_pdf(item, organization_name=org_a.organization.name)
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "Benefit statement" in text and item.email in text and org_a.organization.name in text
    assert f"{item.tokens('granted'):,}" in text
    assert "-40,000" in text and "-0.08" in text
    assert f"{item.net_tokens:,}" in text and f"{item.net_value:,}" in text
    assert "USD" in text


def test_the_csv_has_one_row_of_figures(statement_of):
    rows = list(csv.DictReader(io.StringIO(documents.statements_csv([statement_of]).decode())))
    assert len(rows) == 1
    row = rows[0]
    assert row["email"] == statement_of.email and row["used_tokens"] == "-40000" and row["used_value"] == "-0.08"
    assert int(row["net_tokens"]) == statement_of.net_tokens


def test_a_cell_that_would_run_as_a_formula_is_quoted(statement_of):
    statement_of.name = "=HYPERLINK(\"http://evil\")"
    row = next(csv.DictReader(io.StringIO(documents.statements_csv([statement_of]).decode())))
    assert row["name"].startswith("'=")


def test_a_member_downloads_their_own_statement(statement_of, org_a, login):
    client = login(org_a.members["employee"])
    url = reverse("statements", kwargs={"org_slug": org_a.slug})
    period = f"{statement_of.period_start:%Y-%m}"
    listing = client.get(url)
    assert listing.status_code == 200 and f"?period={period}" in listing.content.decode()
    pdf = client.get(url, {"period": period, "format": "pdf"})
    assert pdf.status_code == 200 and pdf["Content-Type"] == "application/pdf"
    assert "-40,000" in PdfReader(io.BytesIO(pdf.content)).pages[0].extract_text()
    got = client.get(url, {"period": period, "format": "csv"})
    assert next(csv.DictReader(io.StringIO(got.content.decode())))["email"] == org_a.members["employee"].user.email
    # The HR member's statement is HR's own: nobody downloads another's (no account yet: 404).
    assert login(org_a.members["approver"]).get(url, {"period": period, "format": "pdf"}).status_code == 404


@pytest.mark.parametrize("period", ["2026-13", "26-01", "x", "2026-1", "0000-01"])
def test_a_bad_period_is_a_field_error(org_a, login, period):
    response = login(org_a.members["employee"]).get(reverse("statements", kwargs={"org_slug": org_a.slug}),
                                                    {"period": period})
    assert response.status_code == 400 and "Enter a month as YYYY-MM" in response.content.decode()
