"""Query parameters of the REST API: typed by serializers that both parse them and state them in
the OpenAPI schema, so a value the schema does not allow is a 400, never ignored or a 500."""

from rest_framework import pagination, serializers
from rest_framework.fields import empty

MAX_LIMIT = 1000
MAX_OFFSET = 10**9


class _AsSent:
    """The parameter as sent: DRF reads `?limit=` as no parameter at all (HTML form semantics)."""

    def get_value(self, dictionary):
        return dictionary.get(self.field_name, empty)


class QueryChoiceField(_AsSent, serializers.ChoiceField):
    pass


class QueryIntegerField(_AsSent, serializers.IntegerField):
    """An integer written in ASCII digits, as the schema's `integer` says; DRF's own field also
    takes " 5", "5.0" and "+5"."""

    def to_internal_value(self, data):
        text = data if isinstance(data, str) else ""
        digits = text[1:] if text.startswith("-") else text
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 19):
            self.fail("invalid")
        return int(text)


def parse_query(serializer_class, request) -> dict:
    """The request's query parameters that `serializer_class` declares, validated (400 if not)."""
    serializer = serializer_class(data=request.query_params)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class PageQuery(serializers.Serializer):
    limit = QueryIntegerField(required=False, min_value=1, max_value=MAX_LIMIT,
                              help_text="Number of results to return per page.")
    offset = QueryIntegerField(required=False, min_value=0, max_value=MAX_OFFSET,
                               help_text="The initial index from which to return the results.")


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    """DRF's limit/offset pages with the bounds of PageQuery: out-of-range, malformed or empty
    values are a 400 naming the parameter (DRF silently falls back to the defaults, and a limit
    past a 64-bit integer failed in the database)."""

    max_limit = MAX_LIMIT

    def paginate_queryset(self, queryset, request, view=None):
        self.page_query = parse_query(PageQuery, request)
        return super().paginate_queryset(queryset, request, view)

    def get_limit(self, request):
        return self.page_query.get("limit", self.default_limit)

    def get_offset(self, request):
        return self.page_query.get("offset", 0)

    def get_schema_operation_parameters(self, view):
        fields = PageQuery().fields
        return [{"name": name, "required": False, "in": "query", "description": str(fields[name].help_text),
                 "schema": {"type": "integer", "minimum": fields[name].min_value, "maximum": fields[name].max_value}}
                for name in ("limit", "offset")]
