"""The error answers of the REST API, declared on every operation of the OpenAPI schema.

They are the bodies that `portal.api.exceptions.exception_handler` and `TenancyMiddleware` answer:
`{"detail": "..."}` for a refusal, and errors keyed by field for a request that is not valid.
"""

import re

ERROR = {
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "What was refused, and why."}},
    "required": ["detail"],
}
VALIDATION_ERROR = {
    "type": "object",
    "description": "Messages keyed by the field at fault (for a list, by item); `non_field_errors` for the "
                   "request as a whole; `detail` for a body that is not JSON.",
    "minProperties": 1,
    "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "array", "items": {}}, {"type": "object"}]},
}

# status: (schema component, description, when: "always", "input" or "body")
ERROR_RESPONSES = {
    "400": ("ValidationError", "The request is not valid; nothing was changed.", "input"),
    "401": ("Error", "No API key or session was presented, or the key is refused (unknown, revoked, expired, "
                     "past its rotation grace, or used from outside its IP ranges).", "always"),
    "403": ("Error", "The caller's roles, or the API key's scopes, do not allow this operation.", "always"),
    "404": ("Error", "No such organization for this caller, or no such object in it.", "always"),
    "413": ("Error", "The request body is larger than the API accepts.", "body"),
    "415": ("Error", "The request body is not `application/json`.", "body"),
}


# A character Python's str.strip() keeps, written out (ECMA's \S and Python's differ: \x1c-\x1f,
# \x85 and \ufeff).
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _state_trimmed_strings(schemas: dict) -> None:
    """DRF trims a CharField's value before it checks it is not blank, so a required text must hold a
    character other than white space: say so (drf-spectacular states only minLength 1)."""
    for name, component in schemas.items():
        if not name.endswith("Request"):
            continue
        for prop in component.get("properties", {}).values():
            if prop.get("type") == "string" and prop.get("minLength", 0) >= 1 and "pattern" not in prop:
                prop["pattern"] = NOT_BLANK


def _state_decimals(schemas: dict) -> None:
    """drf-spectacular's decimal pattern also matches "", "-" and "."; a decimal has a digit."""
    for component in schemas.values():
        for prop in component.get("properties", {}).values():
            found = prop.get("format") == "decimal" and re.fullmatch(
                r"\^-\?\\d\{0,(\d+)\}\(\?:\\\.\\d\{0,(\d+)\}\)\?\$", prop.get("pattern", ""))
            if found:
                whole, places = found.groups()
                prop["pattern"] = rf"^-?(?:\d{{1,{whole}}}(?:\.\d{{0,{places}}})?|\.\d{{1,{places}}})$"


def declare_error_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: add the error answers to every operation."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    _state_trimmed_strings(schemas)
    _state_decimals(schemas)
    schemas["Error"], schemas["ValidationError"] = ERROR, VALIDATION_ERROR
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            responses = operation["responses"]
            has_body = "requestBody" in operation
            takes_input = has_body or method != "get" or any(p["in"] == "query" for p in operation.get("parameters", []))
            for status, (component, description, when) in ERROR_RESPONSES.items():
                if when == "always" or (when == "input" and takes_input) or (when == "body" and has_body):
                    responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status.startswith("4") and "content" not in response:
                    component = ERROR_RESPONSES.get(status, ("Error",))[0]
                    response["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}
            operation["responses"] = dict(sorted(responses.items()))
    return result
