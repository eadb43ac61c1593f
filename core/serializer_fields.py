"""Serializer fields that take JSON exactly as the OpenAPI schema describes it.

DRF's own fields coerce: ``12`` is taken for the string ``"12"``, ``"7"`` for
the integer 7, ``"true"`` for a boolean, an object for a list (its keys). A
client generated from ``/api/schema/`` must be able to trust that what the
schema refuses the server refuses too, so these refuse every other JSON type.

Every string refuses NUL (DRF's ``ProhibitNullCharactersValidator``; PostgreSQL
text cannot hold it), which the schema states as a ``pattern``
(``core.schema.request_strings_refuse_nul``)."""

from __future__ import annotations

import re

from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A string, and only a string."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: not a boolean, a float (``3.0`` is a number, not an
    integer, in the schema's JSON Schema) or a numeric string."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A JSON number (integer or not), never a string or a boolean."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """``true`` or ``false``; not ``"true"``, ``1`` or ``"on"``."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictListField(serializers.ListField):
    """A JSON array; DRF's would read an object as the list of its keys."""

    def to_internal_value(self, data):
        if not isinstance(data, list):
            self.fail("not_a_list", input_type=type(data).__name__)
        return super().to_internal_value(data)


class StrictDictField(serializers.DictField):
    def to_internal_value(self, data):
        if not isinstance(data, dict):
            self.fail("not_a_dict", input_type=type(data).__name__)
        return super().to_internal_value(data)


class StrictManyRelatedField(serializers.ManyRelatedField):
    def to_internal_value(self, data):
        if not isinstance(data, list):
            self.fail("not_a_list", input_type=type(data).__name__)
        return super().to_internal_value(data)


QUERY_INTEGER = re.compile(r"-?[0-9]+")


class QueryIntegerField(serializers.IntegerField):
    """An integer query parameter: decimal digits, as a client serializes an
    integer; not ``1.0``, ``+1`` or `` 1``."""

    def to_internal_value(self, data):
        if not isinstance(data, str) or not QUERY_INTEGER.fullmatch(data):
            self.fail("invalid")
        return super().to_internal_value(data)


def query_params_single(query_params, names) -> None:
    """Refuse a scalar query parameter given more than once: ``?key=1&key=2``
    is a list, which the schema does not allow, not "the last one"."""
    repeated = sorted(name for name in names if len(query_params.getlist(name)) > 1)
    if repeated:
        raise serializers.ValidationError({name: ["must be given at most once"] for name in repeated})
