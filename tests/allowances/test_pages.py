"""The allowance pages through the test client: grants, CSV imports, policies, assignments, the catalog,
the employee's dashboard and HR's balances. A refused form shows the error on its field and changes nothing."""

import re
from datetime import date, timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from allowances import ledger, services
from allowances.models import (
    Account,
    AllowancePolicy,
    CatalogModel,
    Grant,
    GrantBatch,
    LedgerEntry,
    PolicyAssignment,
)
from allowances.periods import next_period_start, period_bounds, period_start_for
from allowances.templatetags.tokens import humanize_tokens
from portal.models import AuditLogEntry
from portal.tenancy import scope, unscoped
from tests.allowances.helpers import snapshot
from tests.factories import MemberFactory, TeamFactory, UserFactory

_DAY_TIP = re.compile(r"<title>(\w{3} \w{3} \d+): ([0-9,]+) tokens used</title>")
_X_LABEL = re.compile(r'<g class="guides[^"]*"><path d="M[^"]*" class="[^"]*"[^>]*/><text [^>]*>(\w{3} \d+)</text>')
_HISTORY_ROW = re.compile(r'<tr data-testid="history-row">(.*?)</tr>', re.S)
_BALANCE_ROW = re.compile(r'<tr data-testid="balance-row">(.*?)</tr>', re.S)
_BATCH_ROW = re.compile(r'<tr data-testid="batch-row">(.*?)</tr>', re.S)
_BATCH_ERROR = re.compile(r'<tr data-testid="batch-error"><td>(\d+)</td><td>(.*?)</td></tr>', re.S)
_CELL = re.compile(r"<td[^>]*>(.*?)</td>", re.S)


# -- helpers ---------------------------------------------------------------------------------------------------


def url(org, name, **kwargs):
    return reverse(name, kwargs={"org_slug": org.slug, **kwargs})



def without(state: dict, *keys) -> dict:
    return {key: value for key, value in state.items() if key not in keys}


def balance(member):
    with unscoped():
        account = Account.all_objects.filter(member=member).first()
    return (account.granted, account.held, account.used) if account else None


def available(member) -> int:
    granted, held, used = balance(member) or (0, 0, 0)
    return granted - held - used


def form_errors(response, field, form="form"):
    return list(response.context[form].errors.get(field, []))


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def audit(org, action):
    return list(AuditLogEntry.all_objects.filter(organization=org.organization, action=action).order_by("id"))


def use(member, tokens: int, *, model: str = "gpt-test", held: int | None = None, key: str = "") -> None:
    with scope(member.organization):
        account = Account.objects.get(member=member)
        hold = ledger.authorize(account=account, tokens=held or tokens, model=model,
                                idempotency_key=key or f"use-{member.pk}-{model}-{tokens}")
        ledger.settle(hold=hold, used_tokens=tokens)


def grant(org, member, tokens, reason="bonus"):
    with scope(org.organization):
        return services.grant_create(organization=org.organization, actor=org.members["hr"].user, tokens=tokens,
                                     reason=reason, member=member)


def csv_file(content, name="grants.csv"):
    return SimpleUploadedFile(name, content if isinstance(content, bytes) else content.encode(), content_type="text/csv")


# -- grants ------------------------------------------------------------------------------------------------------


def grant_form(org, **overrides):
    return {"tokens": "1000", "reason": "conference", "member": org.members["employee"].pk, "team": "",
            "idempotency_key": "page-key-1"} | overrides


@pytest.mark.parametrize("tokens", ["-5", "0", "abc", "1.5", "10000000001", "99999999999999999999999", "", "1e6"])
def test_grant_form_with_bad_tokens_shows_the_error_and_changes_nothing(as_hr, org_a, tokens):
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, tokens=tokens))
    assert response.status_code == 200
    assert form_errors(response, "tokens")
    assert not any(form_errors(response, field) for field in ("reason", "member", "team"))
    assert snapshot() == before


def test_grant_form_names_the_limit_for_an_absurd_grant(as_hr, org_a):
    response = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, tokens="10000000001"))
    assert form_errors(response, "tokens") == ["That is more than 10,000,000,000 tokens; check the number."]
    assert "10,000,000,000 tokens; check the number." in response.content.decode()


@pytest.mark.parametrize("reason", ["", "    "])
def test_grant_form_with_a_blank_reason_shows_the_error_and_changes_nothing(as_hr, org_a, reason):
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, reason=reason))
    assert response.status_code == 200
    assert form_errors(response, "reason") and not form_errors(response, "tokens")
    assert snapshot() == before


def test_grant_form_needs_exactly_one_target(as_hr, org_a):
    before = snapshot()
    both = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, team=org_a.team.pk))
    neither = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, member=""))
    for response in (both, neither):
        assert response.status_code == 200 and response.context["form"].non_field_errors()
    assert snapshot() == before


def test_grant_form_cannot_target_another_organizations_member(as_hr, org_a, org_b):
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, member=org_b.members["employee"].pk))
    assert response.status_code == 200 and form_errors(response, "member")
    assert snapshot() == before


def test_grant_form_to_a_team_gives_every_active_member_the_tokens(as_hr, org_a):
    inactive = MemberFactory(organization=org_a.organization, team=org_a.team, is_active=False)
    active = list(org_a.members.values())
    before = {m.pk: available(m) for m in active}
    response = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, member="", team=org_a.team.pk, tokens="250000"),
                          follow=True)
    assert response.redirect_chain[-1][0] == url(org_a, "grant_list")
    assert "Granted 250,000 tokens to Team a." in messages_of(response)
    with unscoped():
        grant = Grant.all_objects.get(idempotency_key="page-key-1")
        entries = list(LedgerEntry.all_objects.filter(reference=f"grant:{grant.pk}"))
    assert grant.team_id == org_a.team.pk and grant.created_by_id == org_a.members["hr"].user.pk
    assert sorted(e.account.member_id for e in entries) == sorted(m.pk for m in active)
    assert {(e.kind, e.tokens) for e in entries} == {("bonus", 250_000)}
    assert all(available(m) == before[m.pk] + 250_000 for m in active)
    assert balance(inactive) is None


def test_grant_form_submitted_twice_with_its_key_grants_once(as_hr, org_a):
    page = as_hr.get(url(org_a, "grant_list"))
    key = page.context["form"]["idempotency_key"].value()
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert f'type="hidden" name="idempotency_key" value="{key}"' in page.content.decode()
    assert as_hr.get(url(org_a, "grant_list")).context["form"]["idempotency_key"].value() != key
    employee = org_a.members["employee"]
    before_available, before_grants = available(employee), snapshot()["grants"]
    first = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, idempotency_key=key, tokens="4000"))
    second = as_hr.post(url(org_a, "grant_list"), grant_form(org_a, idempotency_key=key, tokens="4000"))
    assert first.status_code == second.status_code == 302
    assert snapshot()["grants"] == before_grants + 1
    assert available(employee) == before_available + 4_000


def test_revoking_an_unused_grant_from_the_page(as_hr, org_a):
    approver = org_a.members["approver"]
    before = available(approver)
    given = grant(org_a, approver, 9_000)
    assert available(approver) == before + 9_000
    response = as_hr.post(url(org_a, "grant_revoke", grant_id=given.pk), follow=True)
    assert "Grant of 9,000 tokens revoked." in messages_of(response)
    assert available(approver) == before
    with unscoped():
        adjustment = LedgerEntry.all_objects.get(reference=f"grant:{given.pk}", kind="adjustment")
    assert adjustment.tokens == -9_000
    assert [e.object_id for e in audit(org_a, "grant.revoked")] == [str(given.pk)]
    # The list shows it revoked, with no revoke button left for it.
    assert f'grant_id={given.pk}' not in response.content.decode()
    assert url(org_a, "grant_revoke", grant_id=given.pk) not in response.content.decode()


def test_revoking_a_partly_used_grant_from_the_page_is_refused_naming_the_member(as_hr, org_a):
    approver = org_a.members["approver"]
    given = grant(org_a, approver, 9_000)
    use(approver, 2_500)
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_revoke", grant_id=given.pk), follow=True)
    [message] = messages_of(response)
    assert "approver@a.example has already used part of this grant" in message
    assert snapshot() == before
    assert audit(org_a, "grant.revoked") == []


def test_revoking_twice_from_the_page_is_refused(as_hr, org_a):
    given = grant(org_a, org_a.members["approver"], 500)
    assert messages_of(as_hr.post(url(org_a, "grant_revoke", grant_id=given.pk), follow=True)) == [
        "Grant of 500 tokens revoked."]
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_revoke", grant_id=given.pk), follow=True)
    assert messages_of(response) == ["This grant is already revoked."]
    assert snapshot() == before


def test_revoking_another_organizations_grant_is_a_404(as_hr, org_a, org_b):
    before = snapshot()
    assert as_hr.post(url(org_a, "grant_revoke", grant_id=org_b.grant.pk)).status_code == 404
    assert snapshot() == before


def test_employees_cannot_use_the_grant_pages(as_employee, org_a):
    before = snapshot()
    assert as_employee.get(url(org_a, "grant_list")).status_code == 403
    assert as_employee.post(url(org_a, "grant_list"), grant_form(org_a)).status_code == 403
    assert as_employee.post(url(org_a, "grant_revoke", grant_id=org_a.grant.pk)).status_code == 403
    assert as_employee.post(url(org_a, "grant_import"), {"file": csv_file("email,tokens,reason\n")}).status_code == 403
    assert snapshot() == before


# -- CSV bulk grants -------------------------------------------------------------------------------------------

GOOD_CSV = (
    "email,tokens,reason\n"
    "employee@a.example,1000,onboarding\n"
    "\n"
    "Approver@A.example , 2_500 ,\"offsite, day 2\"\n"
)


def upload(client, org, content, name="grants.csv"):
    return client.post(url(org, "grant_import"), {"file": csv_file(content, name)})


def test_good_csv_previews_then_applies_every_row_once(as_hr, org_a):
    employee, approver = org_a.members["employee"], org_a.members["approver"]
    before_employee, before_approver = available(employee), available(approver)
    before = snapshot()
    response = upload(as_hr, org_a, GOOD_CSV, "march.csv")
    with unscoped():
        batch = GrantBatch.all_objects.filter(organization=org_a.organization).latest("id")
    assert response.status_code == 302 and response["Location"] == url(org_a, "grant_batch", grant_batch_id=batch.pk)
    # Previewing grants nothing.
    assert without(snapshot(), "batches") == without(before, "batches") and snapshot()["batches"] == before["batches"] + 1

    preview = as_hr.get(response["Location"])
    page = preview.content.decode()
    rows = [[cell.strip() for cell in _CELL.findall(row)] for row in _BATCH_ROW.findall(page)]
    assert [(row[0], row[1], row[3]) for row in rows] == [("2", "employee@a.example", "onboarding"),
                                                          ("4", "approver@a.example", "offsite, day 2")]
    assert 'title="2,500 tokens"' in page and _BATCH_ERROR.findall(page) == []
    assert "Grant all 2" in page and "march.csv" in page

    applied = as_hr.post(response["Location"], follow=True)
    assert applied.redirect_chain[-1][0] == url(org_a, "grant_list")
    assert "Granted 3,500 tokens in 2 grants." in messages_of(applied)
    assert available(employee) == before_employee + 1_000
    assert available(approver) == before_approver + 2_500
    with unscoped():
        grants = list(Grant.all_objects.filter(batch=batch).order_by("id"))
        batch.refresh_from_db()
    assert [(g.member_id, g.tokens, g.reason) for g in grants] == [
        (employee.pk, 1_000, "onboarding"), (approver.pk, 2_500, "offsite, day 2")]
    assert batch.status == "applied" and batch.applied_at is not None
    [logged] = audit(org_a, "grant_batch.applied")
    assert logged.data == {"rows": 2, "tokens": 3_500, "filename": "march.csv"}
    # Each grant of a batch is logged once, as the batch: no grant.created per row.
    assert not [e for e in audit(org_a, "grant.created") if e.object_id in {str(g.pk) for g in grants}]

    after = snapshot()
    again = as_hr.post(response["Location"])
    assert again.status_code == 302
    assert snapshot() == after
    assert "Status: <strong>Applied</strong>" in as_hr.get(response["Location"]).content.decode()


def test_csv_with_bad_rows_lists_each_by_line_and_cannot_be_applied(as_hr, org_a, org_b):
    content = (
        "email,tokens,reason\n"
        "employee@a.example,1000,good row\n"
        "nobody@a.example,1000,unknown person\n"
        "approver@a.example,-5,negative\n"
        "admin@a.example,300,\n"
        "employee@b.example,300,other company\n"
        "not-an-email,300,typo\n"
        "owner@a.example,abc,words\n"
    )
    before = snapshot()
    response = upload(as_hr, org_a, content)
    assert response.status_code == 302
    preview = as_hr.get(response["Location"])
    page = preview.content.decode()
    errors = {int(line): message for line, message in _BATCH_ERROR.findall(page)}
    assert sorted(errors) == [3, 4, 5, 6, 7, 8]
    assert "nobody@a.example is not an active member of this organization" in errors[3]
    assert "tokens: Enter a positive number of tokens." in errors[4]
    assert "reason is empty" in errors[5]
    assert "employee@b.example is not an active member" in errors[6]
    assert "is not an email address" in errors[7]
    assert "tokens: Enter a whole number of tokens." in errors[8]
    assert "Grant all" not in page  # no apply button

    refused = as_hr.post(response["Location"], follow=True)
    assert messages_of(refused) == ["Fix the 6 rows with errors and upload the file again; nothing was granted."]
    # Nothing granted, not even the good row; only the previewed batch exists.
    assert without(snapshot(), "batches") == without(before, "batches")
    with unscoped():
        batch = GrantBatch.all_objects.get(pk=int(response["Location"].rstrip("/").rsplit("/", 1)[1]))
        assert batch.status == "preview" and batch.grants.count() == 0
    assert audit(org_a, "grant_batch.applied") == []


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


@pytest.mark.parametrize("content, message", [
    ("email,tokens,reason\nemployee@a.example,100,café\n".encode("latin-1"), "not UTF-8"),
    ("email,amount\nemployee@a.example,100\n", "missing: reason, tokens"),
    ("name;tokens;reason\nx;1;y\n", "missing: email"),
    ("email,tokens,reason\n", "no rows below the header"),
    ("email,tokens,reason\n\n\n", "no rows below the header"),
    (PNG, "not UTF-8"),
    (b"\x00\x01\x02\x03" * 64, "must name the columns email, tokens, reason"),
    (b"", "The submitted file is empty."),
], ids=["latin-1", "missing columns", "wrong delimiter", "header only", "header and blank lines", "png", "nul bytes",
        "empty"])
def test_malformed_csv_is_a_file_error_and_creates_nothing(as_hr, org_a, content, message):
    before = snapshot()
    response = upload(as_hr, org_a, content)
    assert response.status_code == 400
    errors = form_errors(response, "file", form="import_form")
    assert errors and message in " ".join(errors)
    assert message in response.content.decode()
    assert snapshot() == before


def test_import_without_a_file_is_a_file_error(as_hr, org_a):
    before = snapshot()
    response = as_hr.post(url(org_a, "grant_import"), {})
    assert response.status_code == 400 and form_errors(response, "file", form="import_form")
    assert snapshot() == before


def test_another_organizations_batch_is_a_404(as_hr, org_a, org_b):
    before = snapshot()
    assert as_hr.get(url(org_a, "grant_batch", grant_batch_id=org_b.grant_batch.pk)).status_code == 404
    assert as_hr.post(url(org_a, "grant_batch", grant_batch_id=org_b.grant_batch.pk)).status_code == 404
    assert snapshot() == before


# -- policies ----------------------------------------------------------------------------------------------------


def policy_form(**overrides):
    return {"name": "Research", "monthly_tokens": "2000000", "rollover_rule": "none", "rollover_cap_tokens": "",
            "rollover_cap_percent": "", "rollover_lifetime_periods": "1", "overage_rule": "hard_stop",
            "auto_approve_tokens": "", "auto_approve_requests": ""} | overrides


BAD_POLICY_FORMS = [
    ("capped tokens without a cap", {"rollover_rule": "capped_tokens"}, "rollover_cap_tokens"),
    ("capped percent 0", {"rollover_rule": "capped_percent", "rollover_cap_percent": "0"}, "rollover_cap_percent"),
    ("capped percent 150", {"rollover_rule": "capped_percent", "rollover_cap_percent": "150"}, "rollover_cap_percent"),
    ("cap in tokens with rule none", {"rollover_cap_tokens": "1000"}, "rollover_cap_tokens"),
    ("cap in tokens with rule all", {"rollover_rule": "all", "rollover_cap_tokens": "1000"}, "rollover_cap_tokens"),
    ("auto approve without tokens", {"overage_rule": "auto_approve", "auto_approve_requests": "2"},
     "auto_approve_tokens"),
    ("auto approve without requests", {"overage_rule": "auto_approve", "auto_approve_tokens": "1000"},
     "auto_approve_requests"),
    ("auto approve tokens with hard stop", {"auto_approve_tokens": "1000"}, "auto_approve_tokens"),
    ("negative monthly", {"monthly_tokens": "-1"}, "monthly_tokens"),
    ("absurd monthly", {"monthly_tokens": "10000000001"}, "monthly_tokens"),
    ("lifetime 0", {"rollover_rule": "all", "rollover_lifetime_periods": "0"}, "rollover_lifetime_periods"),
    ("lifetime 25", {"rollover_rule": "all", "rollover_lifetime_periods": "25"}, "rollover_lifetime_periods"),
    ("lifetime 3 with rule none", {"rollover_lifetime_periods": "3"}, "rollover_lifetime_periods"),
    ("duplicate name", {"name": "standard"}, "name"),
]


@pytest.mark.parametrize("overrides, field", [c[1:] for c in BAD_POLICY_FORMS], ids=[c[0] for c in BAD_POLICY_FORMS])
def test_policy_form_with_contradictory_rules_shows_the_error_and_changes_nothing(as_hr, org_a, overrides, field):
    before = snapshot()
    response = as_hr.post(url(org_a, "policy_list"), policy_form(**overrides))
    assert response.status_code == 200
    errors = {name: list(errs) for name, errs in response.context["form"].errors.items()}
    assert list(errors) == [field], errors
    assert snapshot() == before


def test_policy_form_creates_a_consistent_policy(as_hr, org_a):
    response = as_hr.post(url(org_a, "policy_list"), policy_form(
        rollover_rule="capped_percent", rollover_cap_percent="25", rollover_lifetime_periods="2",
        overage_rule="auto_approve", auto_approve_tokens="100000", auto_approve_requests="5"), follow=True)
    assert response.redirect_chain[-1][0] == url(org_a, "policy_list")
    with unscoped():
        policy = AllowancePolicy.all_objects.get(organization=org_a.organization, name="Research")
    assert (policy.monthly_tokens, policy.rollover_cap_percent, policy.rollover_lifetime_periods,
            policy.auto_approve_tokens, policy.auto_approve_requests) == (2_000_000, 25, 2, 100_000, 5)
    assert 'title="2,000,000 tokens">2M<' in response.content.decode()


def test_policy_edit_page_refuses_contradictions_and_saves_for_the_next_period(as_hr, org_a):
    employee = org_a.members["employee"]
    edit = url(org_a, "policy_edit", allowance_policy_id=org_a.policy.pk)
    before = snapshot()
    response = as_hr.post(edit, policy_form(name="Standard", rollover_lifetime_periods="0", applies="next"))
    assert response.status_code == 200 and form_errors(response, "rollover_lifetime_periods")
    assert snapshot() == before

    before_employee = balance(employee)
    saved = as_hr.post(edit, policy_form(name="Standard", monthly_tokens="3000000", applies="next"), follow=True)
    assert any("it applies from the next period" in m for m in messages_of(saved))
    org_a.policy.refresh_from_db()
    assert org_a.policy.monthly_tokens == 3_000_000
    assert balance(employee) == before_employee
    assert snapshot()["entries"] == before["entries"]


def test_assign_page_from_the_next_period_changes_nothing_now(as_hr, org_a):
    organization = org_a.organization
    team = TeamFactory(organization=organization, name="Later")
    member = MemberFactory(organization=organization, team=team)
    grant(org_a, member, 1_234)
    before = snapshot()
    response = as_hr.post(url(org_a, "policy_assign"), {"policy": org_a.policy.pk, "team": team.pk, "member": "",
                                                          "applies": "next"})
    assert response.status_code == 302
    after = snapshot()
    assert after["accounts"] == before["accounts"] and after["entries"] == before["entries"]
    assert after["assignments"] == before["assignments"] + 1
    with unscoped():
        assignment = PolicyAssignment.all_objects.get(team=team)
    start = next_period_start(period_start_for(organization))
    assert assignment.effective_from == period_bounds(organization, start)[0]
    assert balance(member) == (1_234, 0, 0)


def test_assign_page_needs_a_team_or_a_member(as_hr, org_a):
    before = snapshot()
    response = as_hr.post(url(org_a, "policy_assign"), {"policy": org_a.policy.pk, "team": org_a.team.pk,
                                                          "member": org_a.members["employee"].pk, "applies": "now"})
    assert response.status_code == 200 and response.context["form"].non_field_errors()
    assert snapshot() == before


# -- catalog -----------------------------------------------------------------------------------------------------


def catalog_form(org, **overrides):
    return {"model_id": "claude-test", "display_name": "Claude test", "connection": org.provider_connection.pk,
            "max_output_tokens": "4096",
            "input_multiplier": "1", "output_multiplier": "3", "cached_multiplier": "0.1",
            "input_price_per_million": "3", "output_price_per_million": "15", "cached_price_per_million": "0.3",
            "is_active": "on"} | overrides


@pytest.mark.parametrize("overrides, field", [
    ({"input_multiplier": "-1"}, "input_multiplier"),
    ({"output_multiplier": "abc"}, "output_multiplier"),
    ({"input_multiplier": "0"}, "input_multiplier"),
    ({"input_multiplier": "99999999"}, "input_multiplier"),
    ({"cached_multiplier": "-0.1"}, "cached_multiplier"),
    ({"input_price_per_million": "-3"}, "input_price_per_million"),
    ({"output_price_per_million": "abc"}, "output_price_per_million"),
    ({"output_price_per_million": "1e12"}, "output_price_per_million"),
    ({"model_id": "gpt-test"}, "model_id"),
], ids=repr)
def test_catalog_form_with_bad_values_shows_the_error_and_changes_nothing(as_admin, org_a, overrides, field):
    before = snapshot()
    response = as_admin.post(url(org_a, "catalog"), catalog_form(org_a, **overrides))
    assert response.status_code == 200
    assert list(response.context["form"].errors) == [field]
    assert snapshot() == before


def test_catalog_form_adds_a_model(as_admin, org_a):
    response = as_admin.post(url(org_a, "catalog"), catalog_form(org_a), follow=True)
    assert "Claude test added to the catalog." in messages_of(response)
    with unscoped():
        entry = CatalogModel.all_objects.get(organization=org_a.organization, model_id="claude-test")
    assert (str(entry.output_multiplier), entry.connection) == ("3.000", org_a.provider_connection)
    assert "<code>claude-test</code>" in response.content.decode()


def test_catalog_is_for_admins_only(login, org_a):
    before = snapshot()
    for role in ("hr", "approver", "employee"):
        client = login(org_a.members[role])
        assert client.get(url(org_a, "catalog")).status_code == 403
        assert client.post(url(org_a, "catalog"), catalog_form(org_a)).status_code == 403
        assert client.get(url(org_a, "catalog_model_edit", catalog_model_id=org_a.catalog_model.pk)).status_code == 403
    assert snapshot() == before
    for role in ("admin", "owner"):
        response = login(org_a.members[role]).get(url(org_a, "catalog"))
        assert response.status_code == 200 and "<code>gpt-test</code>" in response.content.decode()


# -- the employee's dashboard -------------------------------------------------------------------------------------


@pytest.fixture
def busy_employee(org_a):
    """The employee of org a with 5,000,000 tokens available after some usage on two models today."""
    employee = org_a.members["employee"]
    # The fixture left 5,000 granted and 1,000 held; usage will be 290,000.
    grant(org_a, employee, 5_000_000 - 4_000 + 290_000, reason="quarter bonus")
    use(employee, 250_000, model="gpt-test", held=300_000)
    use(employee, 40_000, model="claude-x")
    assert available(employee) == 5_000_000
    return employee


# What the busy employee's unfiltered history lists: two bonus grants and two usages (holds are left out).
VISIBLE_HISTORY = 4


def gauge_figure(page: str, testid: str) -> str:
    match = re.search(rf'<dd data-testid="{testid}">(.*?)</dd>', page, re.S)
    assert match, testid
    return match.group(1)


def stat(page: str, label: str) -> str:
    match = re.search(rf'<div class="label">{label}</div><div class="value"[^>]*>(.*?)</div>', page, re.S)
    assert match, label
    return match.group(1)


def test_dashboard_shows_balance_usage_days_left_burn_rate_chart_models_and_history(as_employee, org_a, busy_employee):
    start = timezone.now()
    response = as_employee.get(url(org_a, "dashboard"))
    finish = timezone.now()
    assert response.status_code == 200
    page = response.content.decode()
    board = response.context["board"]

    assert gauge_figure(page, "available") == '<span class="tokens" title="5,000,000 tokens">5M</span>'
    assert gauge_figure(page, "used") == '<span class="tokens" title="290,000 tokens">290k</span>'
    assert gauge_figure(page, "held") == '<span class="tokens" title="1,000 tokens">1k</span>'
    assert gauge_figure(page, "granted") == f'<span class="tokens" title="{5_291_000:,} tokens">5.3M</span>'
    assert re.search(r'data-testid="gauge" data-level="ok"', page)

    today = finish.date()  # the organization's zone is UTC
    period = date(today.year, today.month, 1)
    end = next_period_start(period)
    assert stat(page, "Days left in the period") == str((end - today).days)

    begin = period_bounds(org_a.organization, period)[0]
    fastest = int(290_000 / max((start - begin).total_seconds() / 86400, 1 / 24))
    slowest = int(290_000 / max((finish - begin).total_seconds() / 86400, 1 / 24))
    assert slowest <= board.burn_per_day <= fastest and board.burn_per_day > 0
    assert stat(page, "Burn rate").startswith(f'<span class="tokens" title="{board.burn_per_day:,} tokens">'
                                              f"{humanize_tokens(board.burn_per_day)}</span>")
    run_out = re.search(r'data-testid="run-out">(.*?)</div>', page).group(1)
    if board.run_out_on:
        assert run_out == f"At this pace you run out on {board.run_out_on:%b} {board.run_out_on.day}."
        assert today <= board.run_out_on < end
    else:
        assert run_out == "At this pace your allowance lasts the period."

    chart = re.search(r'data-testid="usage-chart">(.*?)</figure>', page, re.S).group(1)
    assert chart.startswith("<svg") and 'role="img"' in chart and "<script" not in chart
    assert 'class="axis x"' in chart and 'class="axis y always_show"' in chart  # axes, with titles
    assert ">Day of the period</text>" in chart and ">Tokens</text>" in chart
    labels = _X_LABEL.findall(chart)  # dates on the axis: the period's first day, today (marked)
    assert f"{period:%b} {period.day}" in labels and f"{today:%b} {today.day}" in labels
    assert ">today</text>" in chart
    # A tooltip per day with usage (the SVG's own <title>: no JavaScript needed).
    assert _DAY_TIP.findall(chart) == [(f"{today:%a %b} {today.day}", "290,000")]
    table = re.search(r'data-testid="usage-table">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r"<td>(.*?)</td><td class=\"num\">([0-9,]+)</td>", table) == [
        (f"{today:%a %b} {today.day}", "290,000")]

    by_model = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\"><span class=\"tokens\" title=\"([0-9,]+) tokens\">",
                          page)
    assert by_model == [("gpt-test", "250,000"), ("claude-x", "40,000")]

    rows = _HISTORY_ROW.findall(page)
    with unscoped():
        expected = LedgerEntry.all_objects.filter(account__member=busy_employee).exclude(
            kind__in=["hold", "release"]).count()
    # Holds (and releases) are left out unless asked for by kind: two bonuses and two usages.
    assert len(rows) == expected == VISIBLE_HISTORY
    assert not any(">Hold" in row for row in rows)
    # Signed and coloured: usage -, grants +.
    assert "Usage" in rows[0] and "claude-x" in rows[0] and 'amount-minus" title="\u221240,000 tokens"' in rows[0]
    (bonus,) = [row for row in rows if "quarter bonus" in row and "by hr@a.example" in row]
    assert f'amount-plus" title="+{5_286_000:,} tokens">+5.3M<' in bonus


def test_dashboard_says_when_the_allowance_runs_out(login, org_a):
    member = MemberFactory(organization=org_a.organization, user=UserFactory(email="spender@a.example"))
    grant(org_a, member, 10_000)
    with scope(org_a.organization):  # reported by the organization's own gateway: a fact, beyond the allowance
        ledger.post(account=Account.objects.get(member=member), kind=ledger.Kind.USAGE, tokens=12_000,
                    used_delta=12_000, idempotency_key="ingest:beyond")
    response = login(member).get(url(org_a, "dashboard"))
    page = response.content.decode()
    today = timezone.now().date()
    assert gauge_figure(page, "available") == '<span class="tokens" title="-2,000 tokens">-2k</span>'
    assert re.search(r'data-testid="gauge" data-level="exhausted"', page)
    assert "Your allowance is used up for this period." in page
    assert f"At this pace you run out on {today:%b} {today.day}." in page


def test_dashboard_without_usage_lasts_the_period(login, org_a):
    member = MemberFactory(organization=org_a.organization, user=UserFactory(email="idle@a.example"))
    grant(org_a, member, 10_000)
    page = login(member).get(url(org_a, "dashboard")).content.decode()
    assert "At this pace your allowance lasts the period." in page
    assert "No usage this period yet." in page
    assert 'data-testid="usage-chart"' not in page and 'data-testid="usage-empty"' in page
    assert 'data-testid="gauge"' in page and 'data-testid="empty-state"' not in page


def test_first_dashboard_visit_shows_the_monthly_grant(login, org_a):
    """A new member's account opens on the first visit; the page shows what it was granted."""
    organization = org_a.organization
    begin = period_bounds(organization, period_start_for(organization))[0]
    team = TeamFactory(organization=organization, name="Newcomers")
    with scope(organization):
        services.policy_assign(organization=organization, actor=org_a.members["hr"].user, policy=org_a.policy,
                               team=team, immediately=True, at=begin)
    member = MemberFactory(organization=organization, team=team, joined_at=begin - timedelta(days=3),
                           user=UserFactory(email="first@a.example"))
    page = login(member).get(url(org_a, "dashboard")).content.decode()
    assert balance(member) == (1_000_000, 0, 0)
    assert gauge_figure(page, "available") == '<span class="tokens" title="1,000,000 tokens">1M</span>'
    assert "policy Standard" in page


def test_htmx_history_filter_returns_only_the_filtered_partial(as_employee, org_a, busy_employee):
    response = as_employee.get(url(org_a, "dashboard"), {"kind": "bonus"},
                               headers={"HX-Request": "true", "HX-Target": "history"})
    assert response.status_code == 200
    names = [t.name for t in response.templates]
    assert names[0] == "allowances/_history.html" and "allowances/dashboard.html" not in names and "base.html" not in names
    page = response.content.decode()
    assert "<html" not in page and "Usage by day" not in page and "<svg" not in page
    rows = _HISTORY_ROW.findall(page)
    assert len(rows) == 2
    assert all("Bonus grant" in row for row in rows)
    assert any("quarter bonus" in row for row in rows) and any("welcome" in row for row in rows)

    usage = as_employee.get(url(org_a, "dashboard"), {"kind": "usage"},
                            headers={"HX-Request": "true", "HX-Target": "history"})
    assert [("Usage" in row) for row in _HISTORY_ROW.findall(usage.content.decode())] == [True, True]


def test_history_filter_without_htmx_renders_the_whole_page_filtered(as_employee, org_a, busy_employee):
    response = as_employee.get(url(org_a, "dashboard"), {"kind": "hold"})
    page = response.content.decode()
    assert "Usage by day" in page
    rows = _HISTORY_ROW.findall(page)
    assert len(rows) == 3 and all(">Hold" in row for row in rows)


@pytest.mark.parametrize("query, message", [
    ({"since": "2030-02-01", "until": "2030-01-01"}, "The end date is before the start date."),
    ({"since": "not-a-date"}, "Enter a valid date."),
    ({"until": "2030-13-45"}, "Enter a valid date."),
    ({"since": "99999-01-01"}, "Enter a valid date."),
    ({"kind": "free-money"}, "Select a valid choice."),
    ({"page": "abc"}, None),
    ({"page": "99999999999999999999"}, None),
], ids=repr)
@pytest.mark.parametrize("htmx", [False, True])
def test_bad_history_filters_show_an_error_never_a_500(as_employee, org_a, busy_employee, query, message, htmx):
    headers = {"HX-Request": "true", "HX-Target": "history"} if htmx else {}
    response = as_employee.get(url(org_a, "dashboard"), query, headers=headers)
    # A filter that is not valid is a 400 page naming the field; a page number past the end is not an error.
    assert response.status_code == (400 if message else 200)
    page = response.content.decode()
    if message:
        assert message in page
    # An unusable filter does not hide the history: it is listed unfiltered.
    assert len(_HISTORY_ROW.findall(page)) == VISIBLE_HISTORY


def test_history_date_range_filters_by_day(as_employee, org_a, busy_employee):
    today = timezone.now().date()
    inside = as_employee.get(url(org_a, "dashboard"), {"since": today.isoformat(), "until": today.isoformat()},
                             headers={"HX-Request": "true", "HX-Target": "history"})
    assert len(_HISTORY_ROW.findall(inside.content.decode())) == VISIBLE_HISTORY
    before = as_employee.get(url(org_a, "dashboard"), {"until": (today - timedelta(days=1)).isoformat()},
                             headers={"HX-Request": "true", "HX-Target": "history"})
    assert _HISTORY_ROW.findall(before.content.decode()) == [] and "Nothing here yet." in before.content.decode()


# -- HR's balances -------------------------------------------------------------------------------------------------


def test_balances_page_lists_members_with_available_and_used_this_period(as_hr, org_a, org_b, busy_employee):
    grant(org_a, org_a.members["approver"], 1_500)
    response = as_hr.get(url(org_a, "balances"))
    assert response.status_code == 200
    rows = {}
    for row in _BALANCE_ROW.findall(response.content.decode()):
        cells = [re.sub(r"<a [^>]*>(.*?)</a>", r"\1", cell).strip() for cell in _CELL.findall(row)]
        rows[cells[0]] = cells[1:]
    assert sorted(rows) == sorted(m.user.email for m in org_a.members.values())
    team, granted, used, held, avail, policy, level = rows["employee@a.example"]
    assert "no policy" in policy and ">ok</span>" in level  # the fixture's policy governs from next month
    assert team == "Team a"
    assert used == '<span class="tokens" title="290,000 tokens">290k</span>'
    assert avail == '<span class="tokens" title="5,000,000 tokens">5M</span>'
    assert held == '<span class="tokens" title="1,000 tokens">1k</span>'
    assert granted == f'<span class="tokens" title="{5_291_000:,} tokens">5.3M</span>'
    assert rows["approver@a.example"][2] == '<span class="tokens" title="0 tokens">0</span>'
    assert rows["approver@a.example"][4] == '<span class="tokens" title="1,500 tokens">1.5k</span>'
    assert rows["owner@a.example"][1] == "no account yet (opens on first use)"
    assert "@b.example" not in response.content.decode()


def emails_listed(response) -> list[str]:
    return [re.sub(r"<[^>]+>", "", _CELL.findall(row)[0]) for row in _BALANCE_ROW.findall(response.content.decode())]


def test_balances_page_filters_by_search_and_team(as_hr, org_a, busy_employee):
    other = TeamFactory(organization=org_a.organization, name="Elsewhere")
    MemberFactory(organization=org_a.organization, team=other, user=UserFactory(email="far@a.example"))
    searched = as_hr.get(url(org_a, "balances"), {"q": "EMPLOY"})
    assert emails_listed(searched) == ["employee@a.example"]
    by_team = as_hr.get(url(org_a, "balances"), {"team": other.pk})
    assert emails_listed(by_team) == ["far@a.example"]
    for junk in ("abc", "-1", "9" * 40, "١٢"):
        assert as_hr.get(url(org_a, "balances"), {"team": junk}).status_code == 200


def test_balances_page_is_for_hr(as_employee, org_a):
    assert as_employee.get(url(org_a, "balances")).status_code == 403


@pytest.mark.parametrize("value, text", [
    (0, '<span class="tokens" title="0 tokens">0</span>'),
    (999, '<span class="tokens" title="999 tokens">999</span>'),
    (1_000, '<span class="tokens" title="1,000 tokens">1k</span>'),
    (12_400_000, '<span class="tokens" title="12,400,000 tokens">12.4M</span>'),
    (5_000_000, '<span class="tokens" title="5,000,000 tokens">5M</span>'),
    (10_000_000_000, '<span class="tokens" title="10,000,000,000 tokens">10B</span>'),
    (-2_500, '<span class="tokens" title="-2,500 tokens">-2.5k</span>'),
])
def test_tokens_filter_humanizes_with_the_exact_number_in_the_title(value, text):
    from allowances.templatetags.tokens import tokens

    assert str(tokens(value)) == text


def test_history_paging_links_keep_the_filter_and_name_the_page_once(org_a, login):
    employee = org_a.members["employee"]
    with scope(org_a.organization):
        for i in range(30):
            ledger.post(account=org_a.account, kind="bonus", tokens=1, idempotency_key=f"paging-{i}")
    client = login(employee)
    response = client.get(f"/o/{org_a.slug}/", {"kind": "bonus", "page": "2"})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'href="?kind=bonus&amp;page=1"' in html and html.count("page=2&amp;page") == 0
