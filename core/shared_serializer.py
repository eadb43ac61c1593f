"""One serializer instance per process for the hot gateway endpoints, with
its per-request work compiled once.

DRF deep-copies a serializer's declared fields for every new instance, and on
the dispatch and completion paths that copy cost more than the validation
itself. A :class:`SharedSerializer` builds its serializer once, its fields
bound once, then validates with ``run_validation`` and renders with
``to_representation``: neither keeps anything on the instance, so the
server's threads share it. The serializer class stays the one definition of
the fields, their validation and the schema (drf-spectacular reads the class).

DRF also walks that definition again on every request: for each field it
looks the field up, checks its flags, finds its ``validate_<name>`` method,
and goes through the general conversion that accepts every spelling a field
allows. Measured in-process, the gateway's two inputs and two outputs took
about a tenth of a dispatch-and-completion's Python (``bench/HISTORY.md``).
So each shared serializer also compiles, from its own fields, a plan for the
inputs a gateway actually sends: JSON of exactly the field's type, within
its limits. A value the plan cannot settle that way (a string for a number,
a date, a value out of range, anything blank or malformed, a field class it
does not know) hands the whole input to DRF, which validates it or raises
the usual error; so the plan never makes an error or a coercion of its own.
``tests/test_shared_serializer.py`` checks, on random inputs, that both give
the same result, against the DRF installed: an upgrade that changes a
field's rules fails there first.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from django.core import validators as django_validators
from django.core.exceptions import ObjectDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import fields as drf_fields
from rest_framework import serializers
from rest_framework import validators as drf_validators
from rest_framework.fields import SkipField, empty
from rest_framework.relations import PKOnlyObject

from core import serializer_fields


class SharedSerializer:
    def __init__(self, serializer_class: type[serializers.Serializer]) -> None:
        self.serializer_class = serializer_class
        self._built: tuple[serializers.Serializer, _InputPlan | None, _OutputPlan | None] | None = None
        self._lock = threading.Lock()

    def _build(self) -> tuple[serializers.Serializer, _InputPlan | None, _OutputPlan | None]:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    instance = self.serializer_class()
                    _bind(instance)
                    self._built = (instance, _input_plan(instance), _output_plan(instance))
        return self._built

    def validate(self, data: Any) -> dict:
        """The validated data, or ``ValidationError`` with the same detail
        ``is_valid(raise_exception=True)`` raises."""
        instance, plan, _ = self._build()
        if plan is not None:
            try:
                return plan.validate(instance, data)
            except (_Undecided, serializers.ValidationError, DjangoValidationError, SkipField):
                pass  # DRF's own validation decides, and words any error
        return instance.run_validation(data)

    def render(self, obj: Any) -> dict:
        instance, _, plan = self._build()
        return plan.render(obj) if plan is not None else instance.to_representation(obj)


def _bind(serializer: serializers.Serializer) -> None:
    """Build every (nested) field list now, before threads share them."""
    for field in serializer.fields.values():
        if isinstance(field, serializers.Serializer):
            _bind(field)
        elif isinstance(field, serializers.ListSerializer | serializers.ListField) and isinstance(
            field.child, serializers.Serializer
        ):
            _bind(field.child)


# --- input -------------------------------------------------------------------------------------


class _Undecided(Exception):
    """The plan cannot settle this value: DRF validates the whole input."""


_SKIP = object()  # an absent field without a default: left out, as DRF's SkipField leaves it

Convert = Callable[[Any], Any]

_STRINGS = (serializers.CharField, serializer_fields.StrictCharField)
_INTEGERS = (serializers.IntegerField, serializer_fields.StrictIntegerField)
_FLOATS = (serializers.FloatField, serializer_fields.StrictFloatField)
_BOOLEANS = (serializers.BooleanField, serializer_fields.StrictBooleanField)
_LISTS = (serializers.ListField, serializer_fields.StrictListField)


def _checks(field: drf_fields.Field) -> Callable[[Any], bool] | None:
    """The field's validators as one test (a failing value is undecided), or
    None when one of them is not a kind the plan knows."""
    tests = []
    for validator in field.validators:
        kind, limit = type(validator), getattr(validator, "limit_value", None)
        if callable(limit):
            return None
        if kind is django_validators.MaxLengthValidator:
            tests.append(lambda v, n=limit: len(v) <= n)
        elif kind is django_validators.MinLengthValidator:
            tests.append(lambda v, n=limit: len(v) >= n)
        elif kind is django_validators.MaxValueValidator:
            tests.append(lambda v, n=limit: v <= n)
        elif kind is django_validators.MinValueValidator:
            tests.append(lambda v, n=limit: v >= n)
        elif kind is django_validators.ProhibitNullCharactersValidator:
            tests.append(lambda v: "\x00" not in v)
        elif kind is drf_validators.ProhibitSurrogateCharactersValidator:
            tests.append(str.isascii)  # stricter than needed: others go to DRF
        else:
            return None
    return lambda v: all(test(v) for test in tests)


def _undecided(value):
    raise _Undecided


def _value_plan(field: drf_fields.Field) -> Convert | None:
    """What ``field.to_internal_value`` and its validators give a present,
    non-null value of exactly the field's JSON type, or ``_Undecided``; None
    when the field's validators are not kinds the plan knows."""
    checks = _checks(field)
    if checks is None:
        return None
    kind = type(field)
    if kind in _STRINGS:
        trim, blank = field.trim_whitespace, field.allow_blank

        def convert(value):
            if type(value) is not str:
                raise _Undecided
            value = value.strip() if trim else value
            if not value:
                if blank:  # CharField.run_validation: blank is '', checked before anything else
                    return ""
                raise _Undecided
            if not checks(value):
                raise _Undecided
            return value

    elif kind in _INTEGERS:

        def convert(value):
            if type(value) is not int or not checks(value):
                raise _Undecided
            return value

    elif kind in _FLOATS:

        def convert(value):
            if type(value) is not float and type(value) is not int:
                raise _Undecided
            try:
                value = float(value)
            except OverflowError:
                raise _Undecided from None
            if not math.isfinite(value) or not checks(value):
                raise _Undecided
            return value

    elif kind in _BOOLEANS:

        def convert(value):
            if (value is not True and value is not False) or not checks(value):
                raise _Undecided
            return value

    elif kind is serializers.ChoiceField:
        choices = field.choice_strings_to_values

        def convert(value):
            if type(value) is not str or value not in choices:
                raise _Undecided
            value = choices[value]
            if not checks(value):
                raise _Undecided
            return value

    elif kind in _LISTS:
        child = _field_plan(field.child)
        if child is None:
            return None
        allow_empty = field.allow_empty

        def convert(value):
            if type(value) is not list or not (value or allow_empty):
                raise _Undecided
            converted = [child(item) for item in value]
            if not checks(converted):
                raise _Undecided
            return converted

    elif kind.run_validation is drf_fields.Field.run_validation and kind.get_value is drf_fields.Field.get_value:
        # A field the plan cannot convert (a date, say): absent or null it
        # settles like any other; a value goes to DRF.
        return _undecided
    else:
        return None
    return convert


def _field_plan(field: drf_fields.Field) -> Convert | None:
    """``field.run_validation`` for the inputs the plan settles: absent,
    null, or a value ``_value_plan`` converts."""
    if (
        field.read_only
        or field.source == "*"
        or type(field).validate_empty_values is not drf_fields.Field.validate_empty_values
    ):
        return None
    value_plan = _value_plan(field)
    if value_plan is None:
        return None
    required, allow_null, has_default = field.required, field.allow_null, field.default is not empty

    def convert(value):
        if value is empty:
            if required:
                raise _Undecided
            return field.get_default() if has_default else _SKIP
        if value is None:
            if not allow_null:
                raise _Undecided
            return None
        return value_plan(value)

    return convert


class _InputPlan:
    def __init__(self, steps: list[tuple[str, Convert, Callable[[Any], Any] | None]], *, validators: bool) -> None:
        self.steps = steps
        self.validators = validators

    def validate(self, serializer: serializers.Serializer, data: Any) -> dict:
        """``serializer.run_validation(data)`` for a plain JSON object, or
        ``_Undecided`` (or the error a ``validate_<name>`` method raised,
        which DRF then raises in its own words)."""
        if type(data) is not dict:
            raise _Undecided
        validated = {}
        for name, convert, method in self.steps:
            value = convert(data.get(name, empty))
            if value is _SKIP:
                continue
            validated[name] = value if method is None else method(value)
        if self.validators:
            serializer.run_validators(validated)
        validated = serializer.validate(validated)
        if validated is None:
            raise _Undecided  # DRF's own assertion says what is wrong
        return validated


def _input_plan(serializer: serializers.Serializer) -> _InputPlan | None:
    """The plan, or None when a writable field is of a kind it does not know
    (that serializer always validates through DRF)."""
    if getattr(serializer, "partial", False) or _overrides(serializer, serializers.Serializer, _INPUT_METHODS):
        return None  # its own way of validating: DRF runs it
    steps = []
    for field in serializer._writable_fields:
        convert = _field_plan(field)
        if convert is None or field.source_attrs != [field.field_name]:
            return None
        steps.append((field.field_name, convert, getattr(serializer, "validate_" + field.field_name, None)))
    return _InputPlan(steps, validators=bool(serializer.validators))


def _overrides(obj: Any, base: type, names: tuple[str, ...]) -> bool:
    """Whether ``obj``'s class replaces one of ``base``'s methods the plan
    stands in for (then the plan would skip that code)."""
    return any(getattr(type(obj), name) is not getattr(base, name) for name in names)


_INPUT_METHODS = ("run_validation", "validate_empty_values", "to_internal_value")


# --- output ------------------------------------------------------------------------------------


class _OutputPlan:
    """``Serializer.to_representation`` with each field's look-up and
    conversion chosen once."""

    def __init__(self, serializer: serializers.Serializer) -> None:
        self.fields = []
        for field in serializer._readable_fields:
            if isinstance(field, serializers.Serializer) and not _overrides(
                field, serializers.Serializer, ("to_representation",)
            ):
                represent = _OutputPlan(field).render
            elif type(field) in _STRINGS or _uuid_as_string(field):
                represent = str  # what their to_representation returns
            else:
                represent = field.to_representation
            # A field reading its value its own way (a relation's primary
            # key, say) always reads it so; the others through the chain.
            attrs = None if _overrides(field, drf_fields.Field, ("get_attribute",)) else tuple(field.source_attrs)
            self.fields.append((field.field_name, attrs, represent, field))

    def render(self, instance: Any) -> dict:
        rendered = {}
        for name, attrs, represent, field in self.fields:
            value = instance
            try:
                if attrs is None:
                    raise _Undecided
                for attr in attrs:
                    value = value[attr] if isinstance(value, Mapping) else getattr(value, attr)
                    if callable(value):
                        raise _Undecided
            except (KeyError, AttributeError, ObjectDoesNotExist, _Undecided):
                try:
                    value = field.get_attribute(instance)  # DRF's default, null, skip or error
                except SkipField:
                    continue
            if isinstance(value, PKOnlyObject):
                rendered[name] = None if value.pk is None else field.to_representation(value)
            else:
                rendered[name] = None if value is None else represent(value)
        return rendered


def _uuid_as_string(field: drf_fields.Field) -> bool:
    return type(field) is serializers.UUIDField and field.uuid_format == "hex_verbose"


def _output_plan(serializer: serializers.Serializer) -> _OutputPlan | None:
    """The plan, or None when the serializer renders its own way."""
    if _overrides(serializer, serializers.Serializer, ("to_representation",)):
        return None
    return _OutputPlan(serializer)
