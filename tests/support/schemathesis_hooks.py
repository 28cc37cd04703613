"""Loaded by the schemathesis CLI in tests/portal/test_schema_fuzz.py (SCHEMATHESIS_HOOKS).

The API answers 400 both for a request that breaks its schema and for one that breaks a business
rule no schema can state (a team or a member, not both; an id of another organization; a name
already taken). Schemathesis's positive_data_acceptance cannot tell them apart, so it is told to
accept a 400 and this check fails instead when a request the schema allows is refused for its
shape: with one of the messages of DRF's own field checks, which only run on what the schema states.
"""

import os
import re

import django
import schemathesis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup()

from rest_framework import fields, relations, serializers  # noqa: E402  (after Django is set up)

# Data-dependent: the id is well formed, the object does not exist in this organization.
_RULES = {("PrimaryKeyRelatedField", "does_not_exist")}
# JSON Schema's `format: email` takes addresses Django's validator refuses (a one-letter top-level
# domain, "0@0.a"), and no schema keyword states Django's rule: the one shape it cannot state.
_LOOSER_IN_JSON_SCHEMA = {("EmailField", "invalid")}


def _shape_messages() -> re.Pattern:
    texts = set()
    for module in (fields, relations, serializers):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, fields.Field):
                for code, message in getattr(value, "default_error_messages", {}).items():
                    if (value.__name__, code) not in _RULES | _LOOSER_IN_JSON_SCHEMA:
                        texts.add(str(message))
    # "Ensure this value is less than or equal to {max_value}." -> a pattern with the blanks open.
    patterns = [".*".join(re.escape(part) for part in re.split(r"\{[^}]*\}", text)) for text in texts]
    return re.compile("|".join(f"(?:{p})" for p in sorted(patterns)))


SHAPE = _shape_messages()


def _messages(body):
    if isinstance(body, str):
        yield body
    elif isinstance(body, list):
        for item in body:
            yield from _messages(item)
    elif isinstance(body, dict):
        for item in body.values():
            yield from _messages(item)


@schemathesis.check
def schema_valid_request_refused_for_its_shape(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    shape = sorted({message for message in _messages(body) if SHAPE.search(message)})
    if shape:
        raise AssertionError(f"A request the schema allows was refused for its shape: {shape}")
    return None
