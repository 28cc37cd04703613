"""Serializer fields that take exactly what the OpenAPI schema says they take."""

import re

from django.db import models
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers

MAX_ID = 2**63 - 1  # a bigint primary key


class WholeNumberField(serializers.IntegerField):
    """A JSON integer: DRF's IntegerField also takes "5" and " 5" (strings, which the schema's
    `integer` does not allow) and would print a nested list to parse it. Bounds as IntegerField's."""

    def to_internal_value(self, data):
        if isinstance(data, float) and data.is_integer():
            data = int(data)  # 5.0 is an integer to JSON Schema
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return data


def object_id(**kwargs) -> WholeNumberField:
    """The id of another object of the organization, named in a request body."""
    return WholeNumberField(min_value=1, max_value=MAX_ID, **kwargs)


class TokensField(WholeNumberField):
    """A number of tokens: a JSON integer, or its digits as a string (as HR systems export them).
    The string form takes exactly the same numbers: no sign, no leading zero, within the bounds."""

    def __init__(self, *, min_value: int, max_value: int, **kwargs):
        digits = len(str(max_value)) - 1
        if max_value != 10**digits or min_value not in (0, 1):
            raise ValueError("the digit pattern is written for bounds of 0 or 1 to a power of ten")
        self.pattern = f"^({'0|' if min_value == 0 else ''}[1-9][0-9]{{0,{digits - 1}}}|1{'0' * digits})$"
        super().__init__(min_value=min_value, max_value=max_value, **kwargs)

    def to_internal_value(self, data):
        if isinstance(data, str):
            if not re.fullmatch(self.pattern, data):
                self.fail("invalid")
            return int(data)
        return super().to_internal_value(data)


class TokensFieldSchema(OpenApiSerializerFieldExtension):
    target_class = TokensField
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        field = self.target
        number = {"type": "integer", "minimum": field.min_value, "maximum": field.max_value}
        schema = {"anyOf": [number, {"type": "string", "pattern": field.pattern}]}
        if field.allow_null:
            schema["nullable"] = True
        return schema


class _StringOnly:
    """A JSON string, as the schema says: DRF's text fields also take numbers (0 becomes "0")."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class CharField(_StringOnly, serializers.CharField):
    pass


class EmailField(_StringOnly, serializers.EmailField):
    pass


class ModelSerializer(serializers.ModelSerializer):
    """DRF's, with the model's text columns taken as strings only."""

    serializer_field_mapping = serializers.ModelSerializer.serializer_field_mapping | {
        models.CharField: CharField, models.TextField: CharField, models.EmailField: EmailField}
