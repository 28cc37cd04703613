"""The usage event as the OpenAPI schema states it and as `gateway.services` checks it by hand (for
speed) are one rule: every probe the schema calls valid is recorded, every probe it calls invalid is
rejected naming the field. The probes are derived from the schema served at /api/schema/, so a bound
changed on one side only fails here."""

import copy
import json

import jsonschema
import pytest


INGEST = "/api/v1/usage"
GOOD = {"member": "employee@a.example", "model": "gpt-test", "input_tokens": 10, "output_tokens": 1,
        "cached_tokens": 0, "timestamp": "2025-01-15T10:00:00+02:00"}


def as_json_schema(schema):
    """OpenAPI 3.0's `nullable` in JSON Schema's words."""
    schema = copy.deepcopy(schema)
    for prop in schema["properties"].values():
        if prop.pop("nullable", False):
            prop["type"] = [prop["type"], "null"]
    return schema


def probes(schema):
    """(description, event without its idempotency key unless probed) at and past every bound and type."""
    props = schema["properties"]
    for name, prop in props.items():
        if name in ("member", "api_key"):
            continue  # their values name rows: probed below by presence
        values = [None, True, [], {}]
        if prop["type"] == "integer":
            values += [prop["minimum"] - 1, prop["minimum"], prop["maximum"], prop["maximum"] + 1, 1.5, 5.0, "5"]
        elif prop["type"] == "string" and name != "model":
            values += [5]
            if "maxLength" in prop:
                values += ["", " ", "k" * prop["maxLength"], "k" * (prop["maxLength"] + 1)]
        else:
            values += [5]
        for value in values:
            yield f"{name}={value!r:.30}", GOOD | {name: value}
    for name in schema["required"]:
        if name != "idempotency_key":
            yield f"without {name}", {k: v for k, v in GOOD.items() if k != name}
    yield "member and api_key", GOOD | {"api_key": "tap_000000000000"}
    yield "neither member nor api_key", {k: v for k, v in GOOD.items() if k != "member"}


def field_of(error) -> str:
    if error.path:
        return error.path[0]
    if error.validator == "required":
        return error.message.split("'")[1]
    return "member"  # the oneOf: a member or an API key


def test_the_hand_written_event_check_is_the_schemas(client, org_a, ingest_key):
    served = client.get("/api/schema/", {"format": "json"}).json()
    body = served["paths"][INGEST]["post"]["requestBody"]["content"]["application/json"]["schema"]
    event_schema = body["properties"]["events"]["items"]
    validator = jsonschema.Draft7Validator(as_json_schema(event_schema))
    cases = list(probes(event_schema))
    events = [({"idempotency_key": f"probe-{i}"} | event) for i, (_name, event) in enumerate(cases)]
    assert len(events) <= served["paths"][INGEST]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["events"]["maxItems"]

    response = client.post(INGEST, data=json.dumps({"events": events}), content_type="application/json",
                           **ingest_key)

    assert response.status_code == 200, response.content[:300]
    disagreements = []
    for (name, _event), event, answer in zip(cases, events, response.json()["results"]):
        errors = sorted(field_of(error) for error in validator.iter_errors(event))
        if errors and answer["status"] != "rejected":
            disagreements.append(f"{name}: the schema refuses it ({errors}) but it was {answer['status']}")
        elif not errors and answer["status"] != "recorded":
            disagreements.append(f"{name}: the schema allows it but it was {answer['status']}: {answer.get('errors')}")
        elif errors and not set(answer["errors"]) & set(errors):
            disagreements.append(f"{name}: refused for {sorted(answer['errors'])}, the schema says {errors}")
    assert not disagreements, "\n".join(disagreements)
    assert sum(1 for a in response.json()["results"] if a["status"] == "recorded") >= 10
