from types import SimpleNamespace

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from allowances import ledger
from allowances import services as allowance_services
from apikeys import services as api_key_services
from apikeys.models import ENDPOINT_ROLES, ENDPOINTS
from gateway import services as gateway_services
from gateway.models import UsageRecord
from portal import shared_cache
from portal.audit import log_action
from portal.tenancy import ROLES, scope, unscoped
from tests.factories import (
    PASSWORD,
    InvitationFactory,
    MemberFactory,
    OrganizationFactory,
    OverageRequestFactory,
    TeamFactory,
    UserFactory,
)

# Their code runs on other connections (threads, processes, live servers): rows must be committed.
COMMITTING_MARKERS = {"transactional", "services"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMMITTING_MARKERS & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.django_db(transaction=True))


@pytest.fixture(autouse=True)
def _fast_and_clean(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    yield
    cache.clear()
    shared_cache.clear()


def make_org(label: str):
    """One organization with a member per role, a team, an open invitation and an audit entry."""
    organization = OrganizationFactory(name=f"Org {label}", slug=f"org-{label}")
    team = TeamFactory(organization=organization, name=f"Team {label}")
    members = {}
    for role in ROLES:
        flags = {f"is_{r}": r == role for r in ROLES}
        members[role] = MemberFactory(organization=organization, team=team,
                                      user=UserFactory(email=f"{role}@{label}.example"), **flags)
    invitation = InvitationFactory(organization=organization, team=team, token=f"token-of-{label}",
                                   email=f"newcomer@{label}.example")
    with unscoped():
        log_action(actor=members["owner"].user, organization=organization, action="test.seeded", obj=team)
    with scope(organization):
        allowance = seed_allowance_objects(organization, team=team, members=members)
        identity = seed_identity_objects(organization, label=label, members=members)
        billing = seed_billing_objects(organization, team=team)
        reports = seed_report_objects(organization, members=members)
    return SimpleNamespace(organization=organization, slug=organization.slug, team=team, members=members,
                           invitation=invitation, invitation_token=f"token-of-{label}", password=PASSWORD, **allowance,
                           **identity, **billing, **reports)


def seed_billing_objects(organization, *, team):
    """A billing account (no Stripe customer) and a settlement of an earlier month with its team's
    line (rows: the fixture has no closed period with consumed overage)."""
    from datetime import date

    from billing.models import BillingAccount, Settlement, SettlementLine

    billing_account = BillingAccount.objects.create(organization=organization, billing_email="finance@example.com")
    settlement = Settlement.objects.create(organization=organization, period_start=date(2025, 1, 1), currency="USD",
                                           amount_minor=1234, tokens=1000, status=Settlement.Status.PENDING)
    settlement_line = SettlementLine.objects.create(
        organization=organization, settlement=settlement, team=team, team_name=team.name, tokens=1000,
        amount_minor=1234, by_model=[{"model": "gpt-test", "tokens": 1000, "amount_minor": 1234}])
    return {"billing_account": billing_account, "settlement": settlement, "settlement_line": settlement_line}


def seed_report_objects(organization, *, members):
    """A statement export of last month, queued (a row: the service would queue its task)."""
    from allowances.periods import period_start_for, periods_after
    from reports.models import StatementExport

    statement_export = StatementExport.objects.create(
        organization=organization, period_start=periods_after(period_start_for(organization), -1),
        requested_by=members["hr"].user)
    return {"statement_export": statement_export}


def seed_identity_objects(organization, *, label: str, members):
    """One of each identity object, made through the services: an identity provider (OpenID Connect,
    single sign-on not required), the members' email domain (verified, as its DNS check would), a
    SCIM token."""
    from identity import services as identity_services

    owner = members["owner"]
    identity_provider = identity_services.identity_provider_save(
        organization=organization, actor=owner.user, kind="oidc", name=f"IdP {label}",
        discovery_url=f"https://idp.{label}.example/", client_id=f"portal-{label}", client_secret=f"secret-{label}",
        jit_enabled=True, default_role="employee")
    email_domain = identity_services.email_domain_add(organization=organization, actor=owner.user,
                                                      domain=f"{label}.example")
    email_domain.verified_at = timezone.now()
    email_domain.save(update_fields=["verified_at"])
    scim_token, scim_token_secret = identity_services.scim_token_create(organization=organization,
                                                                        actor_member=owner, name="directory")
    return {"identity_provider": identity_provider, "email_domain": email_domain, "scim_token": scim_token,
            "scim_token_secret": scim_token_secret}


def seed_governance_objects(organization, *, members, api_key):
    """One of each spend-governance object: the breaker's settings (no limit set, made through the
    service), a trip of the fixture key's breaker already resumed (a row: tripping pauses keys),
    the employee's normal hour (from too few hours to count) and the transfer rules (off). No
    transfer: it would move the fixture accounts' balances."""
    from gateway.models import BreakerTrip, SpendNormal

    breaker_settings = gateway_services.breaker_settings_save(organization=organization, actor=members["admin"].user)
    breaker_trip = BreakerTrip.objects.create(
        organization=organization, scope=BreakerTrip.Scope.KEY, api_key=api_key, member=members["employee"],
        window="minute", rate=2_000, limit=1_000, resumed_at=timezone.now(), resumed_by=members["admin"].user)
    spend_normal = SpendNormal.objects.create(organization=organization, member=members["employee"],
                                              p95_hour_tokens=100, active_hours=1)
    transfer_settings = allowance_services.transfer_settings_save(organization=organization, actor=None,
                                                                  enabled=False, same_team_only=True)
    return {"breaker_settings": breaker_settings, "breaker_trip": breaker_trip, "spend_normal": spend_normal,
            "transfer_settings": transfer_settings}


def seed_allowance_objects(organization, *, team, members):
    """One of each allowances object, made through the services: policy, assignment, grant, batch, hold;
    and the employee's pending overage request (a row: the fixture's policy governs from next month)."""
    hr = members["hr"].user
    provider_connection = gateway_services.provider_connection_create(
        organization=organization, actor=members["admin"].user, name="Sandbox", kind="sandbox", connect_timeout=5,
        read_timeout=60)
    catalog_model = allowance_services.catalog_model_create(
        organization=organization, actor=hr, model_id="gpt-test", display_name="GPT test",
        connection=provider_connection,
        input_multiplier="1", output_multiplier="2", cached_multiplier="0.5")
    model_alias = allowance_services.model_alias_create(organization=organization, actor=members["admin"].user,
                                                       alias="gpt-test-*", catalog_model=catalog_model)
    policy = allowance_services.policy_create(organization=organization, actor=hr, name="Standard",
                                              monthly_tokens=1_000_000)
    assignment = allowance_services.policy_assign(organization=organization, actor=hr, policy=policy, team=team)
    employee = members["employee"]
    grant = allowance_services.grant_create(organization=organization, actor=hr, tokens=5_000, reason="welcome",
                                            member=employee)
    upload = SimpleUploadedFile("grants.csv", f"email,tokens,reason\n{employee.user.email},100,csv bonus\n".encode())
    batch = allowance_services.grant_batch_preview(organization=organization, actor=hr, upload=upload)
    account = allowance_services.account_open(member=employee)
    hold = ledger.authorize(account=account, tokens=1_000, idempotency_key="fixture-hold")
    api_key, api_key_secret = api_key_services.api_key_create(
        member=employee, actor=employee.user, name="fixture key",
        endpoints=[e for e in ENDPOINTS if e not in ENDPOINT_ROLES])
    usage_record = UsageRecord.objects.create(
        organization=organization, member=employee, api_key=api_key, model="gpt-test", endpoint="chat",
        status=UsageRecord.Status.OK, input_tokens=10, output_tokens=5, charged_tokens=20)
    overage_request = OverageRequestFactory(member=employee)
    governance = seed_governance_objects(organization, members=members, api_key=api_key)
    return {**governance, "provider_connection": provider_connection, "usage_record": usage_record,
            "key_spend": api_key.spend, "catalog_model": catalog_model, "model_alias": model_alias, "policy": policy,
            "assignment": assignment, "grant": grant,
            "grant_batch": batch, "account": account, "hold": hold, "api_key": api_key,
            "api_key_secret": api_key_secret, "overage_request": overage_request}


@pytest.fixture
def org_a(db):
    return make_org("a")


@pytest.fixture
def org_b(db):
    return make_org("b")


@pytest.fixture
def ingest_key(org_a):
    """Authorization for the usage ingest API: an org A admin's key with the usage_write scope."""
    admin = org_a.members["admin"]
    with scope(org_a.organization):
        _key, secret = api_key_services.api_key_create(member=admin, actor=admin.user, name="ingest",
                                                       endpoints=["usage_write"])
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


@pytest.fixture
def login(client):
    """Log the test client in as a member or user: login(member)."""

    def _login(who):
        user = getattr(who, "user", who)
        client.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
        return client

    return _login


def _logged_in_as(role: str):
    @pytest.fixture
    def fixture(login, org_a):
        """The test client, logged in as org A's member with this role."""
        return login(org_a.members[role])

    return fixture


as_owner, as_admin, as_hr, as_approver, as_employee = (_logged_in_as(role) for role in ROLES)
