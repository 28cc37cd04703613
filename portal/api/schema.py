"""The error answers of the REST API, declared on every operation of the OpenAPI schema.

They are the bodies that `portal.api.exceptions.exception_handler` and `TenancyMiddleware` answer:
`{"detail": "..."}` for a refusal, and errors keyed by field for a request that is not valid.
"""

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


def declare_error_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: add the error answers to every operation."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
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
