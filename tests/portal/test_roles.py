"""Each role reaches exactly the pages and API routes it should, and sees exactly the links it may use.

Pages and API routes are discovered with `tests.urlwalk.walk()`, not listed: a new organization
route makes these tests fail until someone adds it to EXPECTED / EXPECTED_API, i.e. decides which
roles may use it.

The fixture members of `org_a` each hold exactly one role flag. Roles imply others
(`portal.tenancy.IMPLIED_ROLES`): the owner can do what an admin can, an admin what HR can.
"""

import re

import pytest
from django.apps import apps
from django.urls import resolve

from portal.models import Invitation, Member, Organization, Team
from portal.tenancy import ROLES, TenantModel, unscoped
from tests.urlwalk import walk

EVERYONE = frozenset(ROLES)
PEOPLE = frozenset({"owner", "admin", "hr"})
ADMINS = frozenset({"owner", "admin"})
APPROVERS = frozenset({"owner", "admin", "approver"})

# url name -> the roles that may open it. Everyone else gets 403.
EXPECTED = {
    "dashboard": EVERYONE,
    "member_list": PEOPLE,
    "member_edit": PEOPLE,
    "team_list": PEOPLE,
    "team_edit": PEOPLE,
    "invitation_list": PEOPLE,
    "invitation_revoke": PEOPLE,
    "audit_log": ADMINS,
    "organization_settings": ADMINS,
    # Allowances: HR runs budgets; admins own the model catalog (DESIGN.md roles).
    "overview": PEOPLE,
    "balances": PEOPLE,
    "balance_detail": PEOPLE,
    "policy_list": PEOPLE,
    "policy_assign": PEOPLE,
    "policy_edit": PEOPLE,
    "grant_list": PEOPLE,
    "grant_import": PEOPLE,  # POST-only
    "grant_batch": PEOPLE,
    "grant_revoke": PEOPLE,  # POST-only
    "catalog": ADMINS,
    "catalog_model_edit": ADMINS,
    "model_alias_create": ADMINS,  # POST-only
    "model_alias_delete": ADMINS,  # POST-only
    # API keys: every member manages their own; admins see and revoke all.
    "key_list": EVERYONE,
    "key_create": EVERYONE,  # POST-only
    "key_rotate": EVERYONE,  # POST-only, own keys
    "key_revoke": EVERYONE,  # POST-only, own keys (admins: any)
    "key_admin": ADMINS,
    "key_resume": EVERYONE,  # POST-only, own keys paused by their own breaker (admins: any)
    "key_breaker_exempt": ADMINS,  # POST-only
    # The spend-velocity breaker: its limits and its trips are the admins'.
    "breaker_settings": ADMINS,
    "breaker_trip_resume": ADMINS,  # POST-only
    # Transfers: every member gives to teammates; HR reads the report; admins set the rules.
    "transfer_list": EVERYONE,
    "transfer_report": PEOPLE,
    "team_pool": EVERYONE,
    "transfer_settings": ADMINS,
    # Gateway: admins own the provider connections; every member sees their own usage (HR: everyone's).
    "provider_list": ADMINS,
    "provider_edit": ADMINS,
    "usage_list": EVERYONE,
    # Company identity: the identity provider, email domains and SCIM tokens are the admins'.
    "identity_settings": ADMINS,
    "identity_provider_test": ADMINS,  # POST-only
    "identity_provider_delete": ADMINS,  # POST-only
    "email_domain_verify": ADMINS,  # POST-only
    "email_domain_remove": ADMINS,  # POST-only
    "scim_token_revoke": ADMINS,  # POST-only
    # Overage: every member asks for more and follows their own requests; approvers (admins too)
    # decide; admins set the cap and the teams approvers approve for.
    "overage_request_list": EVERYONE,
    "overage_request_new": EVERYONE,
    "overage_request_edit": EVERYONE,  # own requests: see OWN_OBJECT_PAGES
    "overage_request_cancel": EVERYONE,  # POST-only, own requests
    "overage_notices_dismiss": EVERYONE,  # POST-only
    "approval_queue": APPROVERS,
    "approval_detail": APPROVERS,
    "approvals_approve": APPROVERS,  # POST-only
    "approval_settings": ADMINS,
    # Reports: every member sees their own value per token and statements; HR exports everyone's
    # statements and the payroll; admins reconcile and set the report settings.
    "insights": EVERYONE,
    "statements": EVERYONE,
    "statement_exports": PEOPLE,
    "statement_export": PEOPLE,
    "payroll": PEOPLE,
    "reconciliation": ADMINS,
    "report_settings": ADMINS,
    # Billing: the owner's (DESIGN.md roles), and admins' (who can do what an owner can but assign roles).
    "billing": ADMINS,
    "billing_payment_method": ADMINS,  # POST-only
    "billing_settlement_retry": ADMINS,  # POST-only
    "billing_chargeback": ADMINS,
}
# Pages of one member's own object (the fixture's is the member with this role's): every other
# member the role table lets in gets 404, as for an object that does not exist.
OWN_OBJECT_PAGES = {"overage_request_edit": "employee"}

# API route name -> the roles that may GET it. Everyone else gets 403.
EXPECTED_API = {
    "api-member-list": PEOPLE,
    "api-member-detail": PEOPLE,
    "api-team-list": PEOPLE,
    "api-team-detail": PEOPLE,
    "api-invitation-list": PEOPLE,
    "api-invitation-detail": PEOPLE,
    "api-invitation-revoke": PEOPLE,  # POST-only: GET answers 405 to those allowed
    "api-audit-log-list": ADMINS,
    "api-policy-list": PEOPLE,
    "api-policy-detail": PEOPLE,
    "api-assignment-list": PEOPLE,
    "api-assignment-detail": PEOPLE,
    "api-grant-list": PEOPLE,
    "api-grant-detail": PEOPLE,
    "api-grant-revoke": PEOPLE,  # POST-only
    "api-grant-bulk": PEOPLE,  # POST-only
    # Every member reads their own balance and history and the models they may use; HR sees all rows.
    "api-balance-list": EVERYONE,
    "api-ledger-entry-list": EVERYONE,
    "api-catalog-model-list": EVERYONE,
    "api-catalog-model-detail": EVERYONE,
    # Members ask for more and follow and cancel their own requests (other members' answer 404);
    # approvers and admins also see the requests they may decide, and decide them.
    "api-overage-request-list": EVERYONE,
    "api-overage-request-detail": EVERYONE,
    "api-overage-request-cancel": EVERYONE,  # POST-only
    "api-overage-request-decide": APPROVERS,  # POST-only
    # The payroll / HRIS export is HR's.
    "api-payroll-list": PEOPLE,
    "api-settlement-list": ADMINS,
    "api-settlement-detail": ADMINS,
    "api-settlement-chargeback": ADMINS,
}

# The organization navigation: link text -> the page it opens.
NAV_LINKS = {
    "Overview": "overview",
    "My allowance": "dashboard",
    "Balances": "balances",
    "Policies": "policy_list",
    "Grants": "grant_list",
    "Models": "catalog",
    "API keys": "key_list",
    "All keys": "key_admin",
    "Providers": "provider_list",
    "Usage": "usage_list",
    "Value per token": "insights",
    "Members": "member_list",
    "Teams": "team_list",
    "Invitations": "invitation_list",
    "Audit log": "audit_log",
    "Settings": "organization_settings",
    "Approvals": "approval_queue",
    "Overage": "approval_settings",
    "Billing": "billing",
    "Breaker": "breaker_settings",
    "Transfers": "transfer_list",
    "Transfer report": "transfer_report",
    "Transfer rules": "transfer_settings",
}


# -- discovery --------------------------------------------------------------------------------


def _tenant_model_for_kwarg(name: str):
    """`member_id` -> Member: the convention test_isolation.py enforces for object ids."""
    if not name.endswith("_id"):
        return None
    wanted = name[: -len("_id")].replace("_", "")
    for model in apps.get_models():
        if issubclass(model, TenantModel) and model._meta.model_name == wanted:
            return model
    return None


def _own_object(model, organization):
    with unscoped():
        return model.all_objects.filter(organization=organization).order_by("pk").first()


def _path(route, org) -> str:
    values = {}
    for name in route.kwarg_names:
        if name == "org_slug":
            values[name] = org.slug
            continue
        model = _tenant_model_for_kwarg(name)
        assert model is not None, f"{route.route!r}: kwarg {name!r} does not name a tenant model (<model>_id)"
        obj = _own_object(model, org.organization)
        assert obj is not None, f"the fixture has no {model.__name__} to fill {route.route!r} with"
        values[name] = obj.pk
    path = route.build(**values)
    assert path is not None, f"cannot build a path for {route.route!r}"
    return path


def organization_pages():
    return [r for r in walk() if "org_slug" in r.kwarg_names and not r.route.startswith(("api/", "scim/"))]


def scim_routes():
    return [r for r in walk() if r.route.startswith("scim/")]


def organization_api_routes():
    return [r for r in walk() if "org_slug" in r.kwarg_names and r.route.startswith("api/v1/o/")]


def _snapshot(organization):
    with unscoped():
        return {
            "organization": list(Organization.objects.filter(pk=organization.pk).values()),
            "members": list(Member.all_objects.filter(organization=organization).order_by("pk").values()),
            "teams": list(Team.all_objects.filter(organization=organization).order_by("pk").values()),
            "invitations": list(Invitation.all_objects.filter(organization=organization).order_by("pk").values()),
        }


# -- the tables cover every route ---------------------------------------------------------------


def test_discovery_finds_the_organization_pages():
    names = {route.name for route in organization_pages()}
    # Guard against a broken walk() silently checking nothing.
    assert {"dashboard", "member_list", "audit_log"} <= names


def test_every_organization_page_has_a_role_decision():
    discovered = {route.name for route in organization_pages()}
    unnamed = [route.route for route in organization_pages() if not route.name]
    assert not unnamed, f"organization pages without a URL name: {unnamed}"
    missing = sorted(discovered - EXPECTED.keys())
    assert not missing, f"add these pages to EXPECTED in {__name__} with the roles that may use them: {missing}"
    stale = sorted(EXPECTED.keys() - discovered)
    assert not stale, f"EXPECTED names pages that no longer exist: {stale}"


def test_every_organization_api_route_has_a_role_decision():
    discovered = {route.name for route in organization_api_routes()}
    assert {"api-member-list", "api-audit-log-list"} <= discovered
    missing = sorted(discovered - EXPECTED_API.keys())
    assert not missing, f"add these API routes to EXPECTED_API in {__name__}: {missing}"
    stale = sorted(EXPECTED_API.keys() - discovered)
    assert not stale, f"EXPECTED_API names routes that no longer exist: {stale}"


def test_fixture_members_hold_exactly_one_role(org_a):
    for role in ROLES:
        assert org_a.members[role].roles == [role]


# -- pages ----------------------------------------------------------------------------------------


def test_each_role_gets_exactly_its_pages(client, org_a):
    failures = []
    checked = 0
    for route in organization_pages():
        allowed = EXPECTED.get(route.name)
        assert allowed is not None, f"page {route.name!r} ({route.route}) is missing from EXPECTED"
        path = _path(route, org_a)
        for role in ROLES:
            client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
            response = client.get(path)
            checked += 1
            status = response.status_code
            if role in allowed and OWN_OBJECT_PAGES.get(route.name, role) != role:
                ok = status == 404  # someone else's object
            elif role in allowed:
                # 405 only for a POST-only view (it says so in its Allow header).
                ok = status == 200 or (status == 405 and response.get("Allow") == "POST")
            else:
                ok = status == 403
            if not ok:
                expectation = "allowed" if role in allowed else "refused (403)"
                failures.append(f"GET {path} as {role}: {status}, expected {expectation}")
    assert not failures, "\n".join(failures)
    assert checked == len(EXPECTED) * len(ROLES)


def test_refused_roles_cannot_post_to_any_page(client, org_a):
    """A POST from a role without access is refused before the view runs, and changes nothing."""
    before = _snapshot(org_a.organization)
    body = {"name": "changed", "cost_centre": "X", "time_zone": "UTC", "currency": "EUR", "email": "x@a.example",
            "roles": ["owner"], "team": org_a.team.pk, "is_active": ""}
    failures = []
    for route in organization_pages():
        allowed = EXPECTED.get(route.name)
        assert allowed is not None, f"page {route.name!r} ({route.route}) is missing from EXPECTED"
        path = _path(route, org_a)
        for role in sorted(set(ROLES) - allowed):
            client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
            status = client.post(path, data=body).status_code
            if status != 403:
                failures.append(f"POST {path} as {role}: {status}, expected 403")
    assert not failures, "\n".join(failures)
    assert _snapshot(org_a.organization) == before


def test_no_role_reaches_the_directorys_scim_api_with_a_session(client, org_a):
    """SCIM takes the organization's SCIM token only: a member's session, whatever their roles, is no credential."""
    routes = scim_routes()
    assert {"scim_users", "scim_user", "scim_groups", "scim_group"} <= {route.name for route in routes}
    for route in routes:
        path = _path(route, org_a)
        for role in ROLES:
            client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
            for method in ("get", "post", "delete"):
                response = getattr(client, method)(path)
                assert response.status_code == 401, (method, path, role, response.status_code)


@pytest.mark.parametrize("role", sorted(EXPECTED["invitation_revoke"]))
def test_post_only_page_works_for_allowed_roles(client, org_a, role):
    client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
    invitation = org_a.invitation
    response = client.post(f"/o/{org_a.slug}/invitations/{invitation.pk}/revoke/")
    assert response.status_code == 302
    with unscoped():
        invitation.refresh_from_db()
    assert invitation.status == "revoked"


# -- API ------------------------------------------------------------------------------------------


def test_each_role_gets_exactly_its_api_routes(client, org_a):
    failures = []
    for route in organization_api_routes():
        allowed = EXPECTED_API.get(route.name)
        assert allowed is not None, f"API route {route.name!r} ({route.route}) is missing from EXPECTED_API"
        path = _path(route, org_a)
        for role in ROLES:
            client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
            method, response = "GET", client.get(path)
            if response.status_code == 405:  # a POST-only action: ask with the method it takes
                method, response = "POST", client.post(path, data="{}", content_type="application/json")
            status = response.status_code
            ok = status not in (403, 405) if role in allowed else status == 403
            if not ok:
                failures.append(f"{method} {path} as {role}: {status}, expected {'allowed' if role in allowed else 403}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("resource", "allowed"),
    [("members", PEOPLE), ("teams", PEOPLE), ("invitations", PEOPLE), ("audit-log", ADMINS)],
)
def test_api_list_routes_by_role(client, org_a, resource, allowed):
    for role in ROLES:
        client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
        response = client.get(f"/api/v1/o/{org_a.slug}/{resource}/")
        if role in allowed:
            assert response.status_code == 200, (resource, role, response.status_code)
            assert response.json()["count"] >= 1, (resource, role)
        else:
            assert response.status_code == 403, (resource, role, response.status_code)


# -- navigation -----------------------------------------------------------------------------------

_NAV = re.compile(r'<nav class="orgnav"[^>]*>(.*?)</nav>', re.S)
_LINK = re.compile(r'<a href="([^"]+)"[^>]*>(.*?)</a>', re.S)


def nav_links(client, org) -> dict[str, str]:
    """The organization navigation of the dashboard: link text -> URL name."""
    response = client.get(f"/o/{org.slug}/")
    assert response.status_code == 200
    match = _NAV.search(response.content.decode())
    assert match, "the dashboard has no organization navigation"
    return {text.strip(): resolve(href).url_name for href, text in _LINK.findall(match.group(1))}


@pytest.mark.parametrize("role", ROLES)
def test_navigation_shows_exactly_the_pages_the_role_may_open(client, org_a, role):
    client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
    links = nav_links(client, org_a)
    assert set(links.values()) <= set(NAV_LINKS.values()), f"unexpected navigation links: {links}"
    expected = {text: name for text, name in NAV_LINKS.items() if role in EXPECTED[name]}
    assert links == expected


def test_navigation_examples(client, org_a):
    def links_of(role):
        client.force_login(org_a.members[role].user, backend="django.contrib.auth.backends.ModelBackend")
        return nav_links(client, org_a)

    employee, hr, approver = links_of("employee"), links_of("hr"), links_of("approver")
    admin, owner = links_of("admin"), links_of("owner")
    assert "Members" not in employee and "Members" not in approver
    assert "Members" in hr and "Teams" in hr and "Invitations" in hr
    assert "Audit log" not in hr and "Settings" not in hr
    for links in (admin, owner):
        assert {"Members", "Audit log", "Settings"} <= links.keys()
    for links in (employee, hr, approver, admin, owner):
        assert links["My allowance"] == "dashboard"
