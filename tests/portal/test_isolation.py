"""Tenant isolation over every route the project has, discovered, not listed.

A member of organization A (its owner, who has every role) aims every URL pattern and API route at
organization B: B's slug, and A's slug with B's object ids. Every answer must be 403 or 404, and
nothing of B may change. A new route is covered without editing this test; a route whose URL
kwargs this test cannot aim at another organization makes it fail until they follow the
convention (`org_slug`, and `<model>_id` for a tenant model's primary key).
"""

import json

import pytest
from django.apps import apps

from portal.models import Organization, User
from portal.tenancy import TenantModel, unscoped
from tests.urlwalk import walk

METHODS = ["get", "post", "put", "patch", "delete"]
DENIED = {403, 404}
# Kwargs of allauth's own account routes: secrets of one user's email or password reset, never an
# organization's data; and the login routes of organizations' identity providers (allauth's OpenID
# Connect and SAML views), public by design: they start or finish a login and hold no data.
USER_ACCOUNT_KWARGS = {"key", "uidb36", "provider_id", "organization_slug"}
# The directory's SCIM API takes SCIM tokens only: a session is refused as no credential at all.
SCIM_DENIED = DENIED | {401}


def denied(route) -> set[int]:
    return SCIM_DENIED if route.route.startswith("scim/") else DENIED


def tenant_models():
    return [model for model in apps.get_models() if issubclass(model, TenantModel)]


def model_for_kwarg(name: str):
    if not name.endswith("_id"):
        return None
    wanted = name[: -len("_id")].replace("_", "")
    for model in tenant_models():
        if model._meta.model_name == wanted:
            return model
    return None


def first_object(model, organization):
    with unscoped():
        return model.all_objects.filter(organization=organization).order_by("pk").first()


def snapshot(organization) -> str:
    """Every row organization B owns, its own row, and its members' accounts."""
    with unscoped():
        state = {
            model._meta.label: list(model.all_objects.filter(organization=organization).order_by("pk").values())
            for model in tenant_models()
        }
        state["organization"] = list(Organization.objects.filter(pk=organization.pk).values())
        state["users"] = list(
            User.objects.filter(memberships__organization=organization).order_by("pk").values("email", "password", "is_active")
        )
    return json.dumps(state, default=str, sort_keys=True)


def hostile_body(org) -> dict:
    """A body that would change org B if any view trusted ids it was sent."""
    body = {"name": "taken over", "email": "intruder@a.example", "roles": ["owner", "admin"], "is_active": False,
            "cost_centre": "X-1", "time_zone": "UTC", "currency": "EUR", "reason": "taken over"}
    for model in tenant_models():
        obj = first_object(model, org.organization)
        if obj is not None:
            body[model._meta.model_name] = obj.pk
            body[f"{model._meta.model_name}_id"] = obj.pk
    return body


def send(client, method, path, body, is_api):
    if method == "get":
        return client.get(path)
    if is_api:
        return getattr(client, method)(path, data=json.dumps(body), content_type="application/json")
    return getattr(client, method)(path, data=body) if method == "post" else getattr(client, method)(path)


def kwargs_for(route, org, target):
    """Fill the route's kwargs with `target`'s objects, or say why the route is not tenant-aimed."""
    values = {}
    for name in route.kwarg_names:
        if name == "org_slug":
            values[name] = org.slug
        elif name == "token":
            values[name] = target.invitation_token
        elif name in USER_ACCOUNT_KWARGS:
            return None
        else:
            model = model_for_kwarg(name)
            assert model is not None, (
                f"route {route.route!r} has kwarg {name!r} that the isolation test cannot aim at another "
                "organization: name object ids <model>_id after a tenant model"
            )
            obj = first_object(model, target.organization)
            assert obj is not None, f"the fixture has no {model.__name__} in {target.slug} to aim {route.route!r} at"
            values[name] = obj.pk
    return values


def test_every_route_refuses_another_organizations_objects(client, org_a, org_b):
    intruder = org_a.members["owner"].user

    def as_intruder(method, path, body, is_api):
        client.force_login(intruder, backend="django.contrib.auth.backends.ModelBackend")
        return send(client, method, path, body, is_api)

    before = snapshot(org_b.organization)
    body = hostile_body(org_b)
    checked, failures = 0, []
    for route in walk():
        if route.namespace == "admin":
            continue  # platform staff only: see test_admin_is_platform_staff_only
        is_api = route.route.startswith(("api/", "scim/"))
        names = route.kwarg_names
        if not names:
            # Routes without ids (sign-up, new organization, account pages) may be used, but a
            # body full of B's ids must not reach B (checked by the snapshot at the end).
            as_intruder("post", route.build(), body, is_api)
            continue
        b_values = kwargs_for(route, org_b, org_b)
        if b_values is None:
            continue  # a user-account secret route, no organization data
        # 1. B's own URL; 2. A's URL (or no organization's) carrying B's object ids or tokens. The
        # second is probed with A's own objects first, to skip methods the route does not take.
        aims = [(b_values, None)] if "org_slug" in names else []
        if names != ["org_slug"]:
            aims.append((kwargs_for(route, org_a, org_b), kwargs_for(route, org_a, org_a)))
        for values, own_values in aims:
            for method in METHODS:
                if own_values is not None and as_intruder(method, route.build(**own_values), body, is_api).status_code == 405:
                    continue  # the route does not take this method at all
                response = as_intruder(method, route.build(**values), body, is_api)
                checked += 1
                if response.status_code not in denied(route):
                    failures.append(f"{method.upper()} {route.build(**values)} -> {response.status_code}")

    assert not failures, "cross-organization requests not refused:\n" + "\n".join(failures)
    assert checked > 50, f"only {checked} cross-organization requests were made; is discovery broken?"
    assert snapshot(org_b.organization) == before, "organization B changed"


def test_an_api_key_of_one_organization_never_reaches_anothers_routes(client, org_a, org_b):
    """A's key (every endpoint scope) aimed at every discovered API route of B, and at B's ids."""
    before = snapshot(org_b.organization)
    body = hostile_body(org_b)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {org_a.api_key_secret}"}
    checked = 0
    for route in walk():
        if not route.route.startswith("api/") or "org_slug" not in route.kwarg_names:
            continue
        aims = [kwargs_for(route, org_b, org_b)]
        if len(route.kwarg_names) > 1:  # A's own URL carrying B's ids
            aims.append(kwargs_for(route, org_a, org_b))
        for values in aims:
            for method in METHODS:
                data = {} if method == "get" else {"data": json.dumps(body), "content_type": "application/json"}
                response = getattr(client, method)(route.build(**values), **data, **headers)
                checked += 1
                own_org = values["org_slug"] == org_a.slug
                allowed = DENIED | ({405} if own_org else set())
                assert response.status_code in allowed, (method, route.build(**values), response.status_code)
    assert checked > 40
    assert snapshot(org_b.organization) == before


def test_anonymous_requests_to_organization_routes_are_refused(client, org_b):
    before = snapshot(org_b.organization)
    for route in walk():
        if "org_slug" not in route.kwarg_names:
            continue
        values = kwargs_for(route, org_b, org_b)
        response = client.post(route.build(**values), data={"name": "anonymous"})
        if route.route.startswith(("api/", "scim/")):
            assert response.status_code == 401, route.route
        else:
            assert response.status_code == 302 and "/accounts/login/" in response["Location"], route.route
    assert snapshot(org_b.organization) == before


def test_a_scim_token_of_one_organization_never_reaches_anothers_directory(client, org_a, org_b):
    """A's SCIM token aimed at every discovered SCIM route of B, and at A's own with B's ids: 404
    (no such organization, no such resource), in SCIM's error shape, and nothing of B changes."""
    before = snapshot(org_b.organization)
    body = hostile_body(org_b) | {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                  "userName": org_b.members["employee"].user.email, "active": False,
                                  "Operations": [{"op": "replace", "path": "active", "value": False}]}
    headers = {"HTTP_AUTHORIZATION": f"Bearer {org_a.scim_token_secret}"}
    checked = 0
    for route in walk():
        if not route.route.startswith("scim/"):
            continue
        aims = [kwargs_for(route, org_b, org_b)]
        if len(route.kwarg_names) > 1:
            aims.append(kwargs_for(route, org_a, org_b))
        for values in aims:
            for method in METHODS:
                data = {} if method == "get" else {"data": json.dumps(body), "content_type": "application/scim+json"}
                response = getattr(client, method)(route.build(**values), **data, **headers)
                checked += 1
                own_org = values["org_slug"] == org_a.slug
                assert response.status_code in ({404, 405} if own_org else {404}), (
                    method, route.build(**values), response.status_code, response.content)
                assert response.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    assert checked >= 30
    assert snapshot(org_b.organization) == before


def test_deactivated_member_loses_access(client, org_a):
    member = org_a.members["hr"]
    with unscoped():
        member.is_active = False
        member.save()
    client.force_login(member.user, backend="django.contrib.auth.backends.ModelBackend")
    assert client.get(f"/o/{org_a.slug}/").status_code == 404
    assert client.get(f"/api/v1/o/{org_a.slug}/members/").status_code == 404


@pytest.mark.parametrize("model_name", ["member", "team", "invitation", "auditlogentry"])
def test_admin_is_platform_staff_only(client, org_a, model_name):
    client.force_login(org_a.members["owner"].user, backend="django.contrib.auth.backends.ModelBackend")
    response = client.get(f"/admin/portal/{model_name}/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def _aimed_at_b(org_a, org_b):
    """A's admin key with every scope, and bodies aimed at B's members, keys, holds and models."""
    from allowances import services as allowance_services
    from apikeys.models import ENDPOINTS
    from apikeys.services import api_key_create
    from portal.tenancy import scope

    admin = org_a.members["admin"]
    with scope(org_a.organization):
        _key, secret = api_key_create(member=admin, actor=admin.user, name="everything", endpoints=list(ENDPOINTS))
    with scope(org_b.organization):
        allowance_services.catalog_model_create(organization=org_b.organization, actor=org_b.members["admin"].user,
                                                model_id="only-in-b", display_name="B only",
                                                connection=org_b.provider_connection)
    b_member, b_key = org_b.members["employee"].user.email, org_b.api_key.display_prefix
    aimed = {"model": "only-in-b", "input_tokens": 5, "output_tokens": 5, "max_output_tokens": 5, "max_tokens": 5,
             "messages": [{"role": "user", "content": "hi"}], "input": "hi", "hold_id": org_b.hold.id,
             "idempotency_key": "intruder-1"}
    bodies = [aimed | {"member": b_member}, aimed | {"api_key": b_key},
              {"events": [aimed | {"member": b_member}, aimed | {"idempotency_key": "intruder-2", "api_key": b_key},
                          aimed | {"idempotency_key": "intruder-3", "member": b_member, "model": "gpt-test"}]}]
    return secret, bodies, (b_member, b_key)


def test_api_routes_whose_organization_is_the_keys_never_reach_another(client, org_a, org_b):
    """The API routes outside /o/<slug>/ whose organization is the presented key's (usage ingest,
    holds), discovered: A's admin key with every scope, aimed at B's members, keys, holds and
    models, changes nothing of B and is answered as if they did not exist."""
    secret, bodies, b_names = _aimed_at_b(org_a, org_b)
    routes = [route for route in walk() if getattr(getattr(route.callback, "view_class", None), "key_only", False)]
    assert {"api-usage-ingest", "api-authorize", "api-settle"} <= {route.name for route in routes}
    before = snapshot(org_b.organization)
    for route in routes:
        path = route.build()
        for body in bodies:
            for method in METHODS:
                data = {} if method == "get" else {"data": json.dumps(body), "content_type": "application/json"}
                response = getattr(client, method)(path, **data, HTTP_AUTHORIZATION=f"Bearer {secret}")
                answer = response.content.decode()
                assert not any(name in answer for name in b_names), (method, path, answer)
                if route.name == "api-usage-ingest" and response.status_code == 200:
                    assert {r["status"] for r in response.json()["results"]} == {"rejected"}, answer
                else:
                    assert response.status_code in {400, 403, 404, 405}, (method, path, response.status_code, answer)
    assert snapshot(org_b.organization) == before


@pytest.mark.transactional
def test_gateway_routes_never_reach_another_organization(org_a, org_b):
    """Every gateway path (gateway.endpoints.VIEWS), served as in production: A's admin key aimed at
    B's model, members and keys reaches nothing of B."""
    import httpx

    from gateway.endpoints import VIEWS
    from portal.asgi import application
    from tests.gateway.conftest import close_server_connections
    from tests.support.fake_upstream import ServerThread

    import re

    from gateway.models import UsageRecord

    secret, bodies, b_names = _aimed_at_b(org_a, org_b)
    with unscoped():  # a response B's employee made, which A's key must not reach
        UsageRecord.all_objects.create(organization=org_b.organization, member=org_b.members["employee"],
                                       model="only-in-b", endpoint="responses", status="ok", response_id="resp_of_b")
    assert {"/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models", "/v1/responses",
            "/v1/models/{model_id:path}", "/v1/responses/{response_id}"} <= set(VIEWS)
    aimed = {"model_id": "only-in-b", "response_id": "resp_of_b"}
    before = snapshot(org_b.organization)
    with ServerThread(application) as server:
        for template in VIEWS:
            path = re.sub(r"\{(\w+)(:path)?\}", lambda m: aimed[m[1]], template)
            for body in bodies:
                for method in METHODS:
                    response = httpx.request(method.upper(), server.url + path, headers={
                        "Authorization": f"Bearer {secret}"}, json=None if method == "get" else body, timeout=30)
                    answer = response.text
                    assert not any(name in answer for name in b_names), (method, path, answer)
                    if path == "/v1/models" and method == "get":
                        assert "only-in-b" not in answer and response.status_code == 200
                    else:
                        assert response.status_code in {400, 403, 404, 405}, (method, path, response.status_code, answer)
    close_server_connections()
    assert snapshot(org_b.organization) == before


def test_the_stripe_webhook_outside_organizations_reaches_nothing_unsigned(client, org_a, org_b, settings):
    """The one route outside /o/<slug>/ that changes an organization's billing takes Stripe's
    signature, not a session: A's owner (or anyone) posting B's invoice ids, unsigned or signed with
    another secret, is refused with 400 and nothing is stored or changed."""
    from billing.models import Settlement, StripeEvent

    settings.STRIPE_WEBHOOK_SECRET = "whsec_the_portals"
    [route] = [route for route in walk() if route.name == "stripe_webhook"]
    assert route.kwarg_names == []
    with unscoped():
        Settlement.all_objects.filter(pk=org_b.settlement.pk).update(stripe_invoice_id="in_of_b")
    before = snapshot(org_b.organization)
    event = json.dumps({"id": "evt_intruder", "type": "invoice.payment_succeeded",
                        "data": {"object": {"id": "in_of_b", "customer": "cus_of_b"}}})
    client.force_login(org_a.members["owner"].user, backend="django.contrib.auth.backends.ModelBackend")
    for headers in ({}, {"HTTP_STRIPE_SIGNATURE": "t=1,v1=" + "0" * 64}):
        for body in (event, json.dumps(hostile_body(org_b))):
            response = client.post(route.build(), data=body, content_type="application/json", **headers)
            assert response.status_code == 400, response.content
    assert not StripeEvent.objects.exists()
    assert snapshot(org_b.organization) == before
