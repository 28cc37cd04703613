"""Inputs that once made the REST API answer 500: each is now a precise 4xx in the API's JSON error
shape, declared in the schema, and changes nothing."""

import json

import pytest

from gateway.models import UsageRecord
from portal.models import Team
from portal.tenancy import unscoped
from tests.allowances.helpers import snapshot

INGEST = "/api/v1/usage"
EVENT = {"idempotency_key": "e-1", "member": "employee@a.example", "model": "gpt-test", "input_tokens": 10}


def everything() -> dict:
    with unscoped():
        return snapshot() | {"records": UsageRecord.all_objects.count(), "teams": Team.all_objects.count()}


def refused(response, status) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    return response.json()


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# -- bodies ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100_000, 2_000, 33])
def test_json_nested_too_deep_is_a_400_on_the_usage_ingest(client, org_a, ingest_key, depth):
    before = everything()
    body = '{"events": ' + nested(depth, json.dumps(EVENT)) + "}"
    response = client.post(INGEST, data=body, content_type="application/json", **ingest_key)
    assert "nested deeper than 32 levels" in refused(response, 400)["detail"]
    assert everything() == before


@pytest.mark.parametrize("body", [
    '{"name": ' + nested(100_000) + "}",
    '{"name": ' + nested(900) + "}",  # parses, but a typed field printing it would recurse too deep
    nested(100_000, '{"name": "x"}'),
], ids=["100000-levels", "900-levels", "top-level"])
def test_json_nested_too_deep_is_a_400_on_the_organization_api(as_hr, org_a, body):
    before = everything()
    response = as_hr.post(f"/api/v1/o/{org_a.slug}/teams/", data=body, content_type="application/json")
    assert "nested deeper" in refused(response, 400)["detail"]
    assert everything() == before


def test_the_deepest_document_the_api_takes_still_works(client, org_a, ingest_key):
    """32 levels are allowed: a batch is 3 deep, so the limit is far from any real request."""
    body = {"events": [EVENT], "padding": json.loads(nested(30))}
    response = client.post(INGEST, data=json.dumps(body), content_type="application/json", **ingest_key)
    assert response.status_code == 200, response.content[:300]
    assert response.json()["recorded"] == 1


def test_a_3_mb_body_on_the_usage_ingest_is_a_413(client, org_a, ingest_key, settings):
    before = everything()
    events = [EVENT | {"idempotency_key": f"e-{i}-" + "x" * 100} for i in range(20_000)]
    body = json.dumps({"events": events})
    assert len(body) > 3_000_000
    response = client.post(INGEST, data=body, content_type="application/json", **ingest_key)
    detail = refused(response, 413)["detail"]
    assert f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes" in detail
    assert everything() == before


def test_a_body_just_under_the_limit_is_parsed(client, org_a, ingest_key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    body = json.dumps({"events": [EVENT], "padding": "x" * (4096 - 200)})
    assert len(body) <= 4096
    response = client.post(INGEST, data=body, content_type="application/json", **ingest_key)
    assert response.status_code == 200, response.content[:300]
    refused(client.post(INGEST, data=body + " " * 200, content_type="application/json", **ingest_key), 413)


def test_a_body_that_is_not_utf8_or_not_json_text_is_a_400(client, org_a, ingest_key):
    before = everything()
    for body in (b'{"events": "\xff\xfe"}', b'{"events": NaN}', b'{"events": [1e999999]}'.replace(b"1e999999", b"Infinity")):
        response = client.post(INGEST, data=body, content_type="application/json", **ingest_key)
        assert refused(response, 400)["detail"], body
    assert everything() == before


def test_a_body_of_another_type_is_a_415(client, org_a, ingest_key):
    before = everything()
    response = client.post(INGEST, data={"events": "x"}, **ingest_key)  # multipart form
    assert "detail" in refused(response, 415)
    assert everything() == before


# -- pages of lists -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["teams/", "members/", "invitations/", "audit-log/", "policies/", "assignments/",
                                  "grants/", "balances/", "ledger-entries/", "models/"])
@pytest.mark.parametrize("param, value", [
    ("limit", "9" * 25), ("limit", "0"), ("limit", "-1"), ("limit", "abc"), ("limit", ""), ("limit", "1001"),
    ("limit", "1.5"), ("offset", "null"), ("offset", "-1"), ("offset", "abc"), ("offset", "9" * 25),
    ("offset", "1e3"), ("offset", "\uff11"),
], ids=repr)
def test_a_page_parameter_out_of_its_bounds_is_a_400_naming_it(as_owner, org_a, path, param, value):
    before = everything()
    response = as_owner.get(f"/api/v1/o/{org_a.slug}/{path}", {param: value})
    assert list(refused(response, 400)) == [param]
    assert everything() == before


def test_page_parameters_in_bounds_page(as_owner, org_a):
    path = f"/api/v1/o/{org_a.slug}/audit-log/"
    everything_there = as_owner.get(path).json()
    assert everything_there["count"] >= 2
    first = as_owner.get(path, {"limit": 1, "offset": 0}).json()
    second = as_owner.get(path, {"limit": "1000", "offset": "1"}).json()
    assert [row["id"] for row in first["results"] + second["results"]] == [
        row["id"] for row in everything_there["results"]]
    assert as_owner.get(path, {"offset": 10**9}).json()["results"] == []


@pytest.mark.parametrize("param, value", [("action", "x" * 65), ("actor", "a\x00b"), ("object_type", "y" * 65)])
def test_audit_log_filters_the_schema_does_not_allow_are_a_400(as_owner, org_a, param, value):
    assert list(refused(as_owner.get(f"/api/v1/o/{org_a.slug}/audit-log/", {param: value}), 400)) == [param]


# -- the schema says so ------------------------------------------------------------------------------------------


def test_the_schema_declares_these_answers(client, db):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    components = schema["components"]["schemas"]
    assert components["Error"]["required"] == ["detail"]
    ingest = schema["paths"][INGEST]["post"]
    assert {"400", "401", "403", "404", "413", "415"} <= set(ingest["responses"])
    assert ingest["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert set(ingest["requestBody"]["content"]) == {"application/json"}
    listing = schema["paths"]["/api/v1/o/{org_slug}/teams/"]["get"]
    parameters = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert parameters["limit"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert parameters["offset"] == {"type": "integer", "minimum": 0, "maximum": 10**9}
    assert listing["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationError")
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert {"401", "403", "404"} <= set(operation["responses"]), (method, path)
