"""The one parser of the REST API: JSON, bounded in size and depth, so that no body makes a 500."""

from django.conf import settings
from rest_framework import exceptions, parsers
from rest_framework.utils import json  # DRF's, with strict_constant: NaN and Infinity are not JSON

# The API's documents are a few levels deep (a batch, its events, their fields); anything much
# deeper is not one of them, and past about 1,000 levels Python's own parser and printer fail.
MAX_DEPTH = 32


class RequestTooLarge(exceptions.APIException):
    status_code = 413
    default_code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit:,} bytes.")


_CONTAINERS = frozenset({dict, list})


def too_deep(document, limit: int = MAX_DEPTH) -> bool:
    """Whether `document` nests lists and objects more than `limit` levels deep; level by level,
    not recursively, and skipping a node of scalars without a Python-level loop (a usage batch is
    a thousand of them)."""
    level = [document] if type(document) in _CONTAINERS else []
    for _depth in range(limit):
        deeper = []
        for node in level:
            children = node.values() if type(node) is dict else node
            if not _CONTAINERS.isdisjoint(map(type, children)):
                deeper.extend(child for child in children if type(child) in _CONTAINERS)
        if not deeper:
            return False
        level = deeper
    return True


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with Django's DATA_UPLOAD_MAX_MEMORY_SIZE as the body limit (413 past it)
    and a depth limit (400), and a clear 400 for a body that is not UTF-8 JSON."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(body) > limit:
            raise RequestTooLarge(limit)
        try:
            document = json.loads(body.decode(parsers.get_encoding(parser_context or {})),
                                  parse_constant=json.strict_constant if self.strict else None)
        except UnicodeDecodeError:
            raise exceptions.ParseError("The request body is not UTF-8 text.") from None
        except ValueError as error:
            raise exceptions.ParseError(f"JSON parse error - {error}") from None
        except RecursionError:
            raise exceptions.ParseError(f"The JSON document is nested deeper than {MAX_DEPTH} levels.") from None
        if too_deep(document):
            raise exceptions.ParseError(f"The JSON document is nested deeper than {MAX_DEPTH} levels.")
        return document
