"""SCIM filters (RFC 7644 §3.4.2.2) as Django queries: scim2-models parses and checks the filter
against the resource's schema; this visitor turns its tree into a Q over the portal's rows, for the
attributes the portal stores. Any other attribute is refused as `invalidFilter`, never guessed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from scim2_models import Group, InvalidFilterException, ScimFilter, User
from scim2_models.path import CompareOperator, FilterVisitor, LogicalOperator

# SCIM attribute path (lower case) -> the model field it reads, and its kind: a number id, text, boolean or time.
USER_FIELDS = {
    "id": ("pk", "id"), "username": ("user__email", "text"), "externalid": ("directory__external_id", "text"),
    "displayname": ("user__email", "text"), "name.givenname": ("user__first_name", "text"),
    "name.familyname": ("user__last_name", "text"), "emails": ("user__email", "text"),
    "emails.value": ("user__email", "text"), "active": ("is_active", "bool"), "meta.created": ("joined_at", "time"),
    "groups": ("team_id", "id"), "groups.value": ("team_id", "id"), "groups.display": ("team__name", "text"),
}
GROUP_FIELDS = {
    "id": ("pk", "id"), "displayname": ("name", "text"), "externalid": ("directory__external_id", "text"),
    "members": ("members__pk", "id"), "members.value": ("members__pk", "id"),
    "members.display": ("members__user__email", "text"), "meta.created": ("created_at", "time"),
}
_TEXT = {CompareOperator.eq: "iexact", CompareOperator.co: "icontains", CompareOperator.sw: "istartswith",
         CompareOperator.ew: "iendswith"}
MAX_ID = 2**63 - 1  # PostgreSQL's bigint
_ORDER = {CompareOperator.gt: "gt", CompareOperator.ge: "gte", CompareOperator.lt: "lt", CompareOperator.le: "lte"}


@dataclass
class _ToQuery(FilterVisitor[Q]):
    fields: dict
    prefix: str = ""

    def _field(self, attr_path) -> tuple[str, str]:
        name = ".".join(filter(None, [self.prefix, attr_path.attr, attr_path.sub_attr])).lower()
        if name not in self.fields:
            raise InvalidFilterException(detail=f"Filtering on {name} is not supported.")
        return self.fields[name]

    def visit_comparison(self, node) -> Q:
        field, kind = self._field(node.attr_path)
        value, op = node.value, node.op
        if value is None:  # `eq null` is "not present" (RFC 7644 §3.4.2.2), `ne null` "present"
            if op not in (CompareOperator.eq, CompareOperator.ne):
                raise InvalidFilterException(detail=f"null is compared with eq or ne, not {op}.")
            present = self._present(field, kind)
            return present if op == CompareOperator.ne else ~present
        if kind == "id":
            try:
                value = int(str(value))
            except ValueError:  # no row has a non-numeric id
                return Q(pk__in=[]) if op != CompareOperator.ne else Q()
            if not -MAX_ID <= value <= MAX_ID:
                raise InvalidFilterException(detail=f"{value} is not an id: ids are 64-bit integers.")
            if op in (CompareOperator.eq, CompareOperator.ne):
                match = Q(**{field: value})
                return ~match if op == CompareOperator.ne else match
            if op in _ORDER:
                return Q(**{f"{field}__{_ORDER[op]}": value})
            raise InvalidFilterException(detail=f"An id is compared with eq or ne, not {op}.")
        if kind == "bool":
            if op not in (CompareOperator.eq, CompareOperator.ne) or not isinstance(value, bool):
                raise InvalidFilterException(detail="A boolean is compared with eq or ne to true or false.")
            return Q(**{field: value if op == CompareOperator.eq else not value})
        if kind == "time":
            try:
                moment = value if isinstance(value, datetime) else parse_datetime(value) if isinstance(value, str) \
                    else None
            except ValueError:  # well formed, but no such day or hour
                moment = None
            if moment is None or op not in (CompareOperator.eq, CompareOperator.ne, *_ORDER):
                raise InvalidFilterException(detail="A date is compared with eq, ne, gt, ge, lt or le to a date "
                                                    'and time such as "2024-01-31T00:00:00Z".')
            if timezone.is_naive(moment):
                moment = timezone.make_aware(moment, UTC)
            if op in _ORDER:
                return Q(**{f"{field}__{_ORDER[op]}": moment})
            return ~Q(**{field: moment}) if op == CompareOperator.ne else Q(**{field: moment})
        if not isinstance(value, str) or isinstance(value, bool):
            raise InvalidFilterException(detail=f"{node.attr_path} is a string: compare it to one, in quotes.")
        value = value.replace("\x00", "")  # PostgreSQL text holds no NUL
        if op == CompareOperator.ne:
            return ~Q(**{f"{field}__iexact": value})
        if op in _TEXT:
            return Q(**{f"{field}__{_TEXT[op]}": value})
        if op in _ORDER:
            return Q(**{f"{field}__{_ORDER[op]}": value})
        raise InvalidFilterException(detail=f"{op} does not apply here.")

    @staticmethod
    def _present(field: str, kind: str) -> Q:
        present = Q(**{f"{field}__isnull": False})
        return present & ~Q(**{field: ""}) if kind == "text" else present

    def visit_present(self, node) -> Q:
        return self._present(*self._field(node.attr_path))

    def visit_not(self, node) -> Q:
        return ~self.visit(node.expr)

    def visit_logical_expr(self, node) -> Q:
        terms = [self.visit(term) for term in node.terms]
        combined = terms[0]
        for term in terms[1:]:
            combined = combined & term if node.op == LogicalOperator.and_ else combined | term
        return combined

    def visit_value_path(self, node) -> Q:
        return _ToQuery(self.fields, prefix=node.attr_path.attr).visit(node.val_filter)


def user_filter(text: str) -> Q:
    """The members a filter on Users selects (InvalidFilterException when it is not one the portal can run)."""
    return _ToQuery(USER_FIELDS).visit(ScimFilter[User](text).ast)


def group_filter(text: str) -> Q:
    return _ToQuery(GROUP_FIELDS).visit(ScimFilter[Group](text).ast)
